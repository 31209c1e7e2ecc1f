"""Shared helpers for the GPU benchmark scripts (run through the device tool)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, OlmoeConfig

from tidar.config import from_hf_config
from tidar.model import Transformer

# SmolLM2-135M-Instruct's architecture (the embedded default): timings do not depend on
# weight values, so random weights of this shape measure the real pass cost.
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0,
)


# Larger models' shapes, from their published configs (RoPE scaling left out: timings do not
# depend on it), for where the pass costs stand past the default's size.
LLAMA_1B = dict(  # Llama-3.2-1B
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
)
LLAMA_8B = LLAMA_1B | dict(  # Llama-3.1-8B
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
    tie_word_embeddings=False,
)
OLMOE_7B = dict(  # OLMoE-1B-7B: 64 experts, 8 a token, 1.3B parameters active of 6.9B
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False, rope_theta=10000.0,
)
SHAPES = {
    "smollm2-135m": (LlamaConfig, SMOLLM2),
    "llama-1b": (LlamaConfig, LLAMA_1B),
    "llama-8b": (LlamaConfig, LLAMA_8B),
    "olmoe-7b": (OlmoeConfig, OLMOE_7B),
}

DEVICE = os.environ.get("TIDAR_BENCH_DEVICE", "cuda")


def random_model(shape: str, device=DEVICE, dtype=torch.bfloat16, seed=0) -> Transformer:
    """A model of ``SHAPES[shape]`` with weights ~ N(0, 0.02), built on ``device`` (an 8B
    model's float32 weights would take minutes to draw on the CPU)."""
    torch.manual_seed(seed)
    config_class, fields = SHAPES[shape]
    with torch.device(device):
        model = Transformer(from_hf_config(config_class(**fields))).to(dtype)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def smollm2_shaped(device=DEVICE, dtype=torch.bfloat16, seed=0) -> Transformer:
    return random_model("smollm2-135m", device, dtype, seed)


def step_bytes(model: Transformer, context: int) -> int:
    """Bytes one AR step of one sequence must read: every weight it uses, once (of an MoE
    layer only the active experts; of an untied input embedding one row, counted as none),
    and ``context`` tokens' keys and values in every layer."""
    cfg = model.cfg
    weights = model.num_parameters()[1] - sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    if not cfg.tie_embeddings:
        weights -= model.embed_tokens.weight.numel()
    size = model.embed_tokens.weight.element_size()
    return size * (weights + 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context)


def add_random_adapters(model: Transformer, rank: int, std: float) -> Transformer:
    """Mask-row adapters of ``rank`` on every projection, as a frozen-AR drafter has, with
    random ``lora_A`` and ``lora_B`` ~ N(0, std) (a trained drafter's mask rows read weights
    unlike the base's; its decoding passes then read stacked weights), on the model's
    device and dtype."""
    from tidar.drafter import add_row_lora

    first = next(model.parameters())
    add_row_lora(model, rank, alpha=2 * rank)
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=std)
    return model.to(device=first.device, dtype=first.dtype)


def kernel_settings(spec: str) -> contextlib.ExitStack:
    """A context that sets module constants of the decode kernels: ``engine`` (their own settings)
    or ``NAME=VALUE,...`` on each of ``tidar.decode_attention``, ``tidar.decode_matvec``,
    ``tidar.decode_matmul``, ``tidar.decode_moe``, ``tidar.decode_qkv``, ``tidar.pdl`` and
    ``tidar.engine`` that has the name, e.g. ``MIN_CHUNK=128``, ``MAX_ROWS=0`` (no fused
    matvecs), ``PDL=False`` (no programmatic dependent launch), ``MAX_PASS_ROWS=4096`` (fused
    drafting matmuls), ``MAX_WIDE_ROWS=0`` (no wide tiles past 96 rows),
    ``WIDE_STACKED_MLP_MAX_ROWS=0`` (gate/up and down out of the wide tile over stacked weights
    for several sequences; ``WIDE_MLP_MAX_ROWS`` over plain weights,
    ``WIDE_MLP_MAX_ROWS_ONE_SEQUENCE`` for one sequence over either), ``ENABLED=False`` (RoPE
    and the cache writes out of the AR step's q/k/v matvec), ``ONE_HEAD_MAX_ROWS=0`` (two head
    GEMMs in every drafting pass), ``MOE_MAX_ROWS=2`` (``tidar.decode_moe``'s experts in the
    AR step of two sequences too; 0: of none), ``ROUTE_IN_KERNELS=False`` (the experts
    picked before its kernels, by torch) or ``ROUTE_IN_KERNELS=False,ROUTE_KERNEL=True``
    (by one kernel)."""
    from tidar import (
        decode_attention,
        decode_matmul,
        decode_matvec,
        decode_moe,
        decode_qkv,
        engine,
        pdl,
    )

    stack = contextlib.ExitStack()
    if spec == "engine":
        return stack
    for item in spec.split(","):
        name, value = item.split("=", 1)
        value = value == "True" if value in ("True", "False") else int(value)
        modules = [m for m in (decode_attention, decode_matvec, decode_matmul, decode_moe,
                               decode_qkv, pdl, engine) if hasattr(m, name)]
        if not modules:
            raise SystemExit(f"kernel settings: no decode kernel module has {name}")
        for module in modules:
            stack.callback(setattr, module, name, getattr(module, name))
            setattr(module, name, value)
    return stack


def alternating(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Each of ``variants`` (name -> a function returning seconds) once a round, in turn, for
    ``rounds`` rounds in this process: their seconds by name."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, measure in variants.items():
            times[name].append(measure())
    return times


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "bench-out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, data) -> Path:
    path = out_dir() / name
    path.write_text(json.dumps(data, indent=1))
    return path


def profile_cuda(fn, calls: int, top: int = 20) -> dict:
    """Profile ``calls`` calls of ``fn`` (warm): GPU kernel time per call by kernel name, the
    kernel count, and the wall time per call, so ``busy`` < 1 shows the host holding the GPU
    back."""
    import time
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            totals[e.name[:100]] += e.device_time / calls
            counts[e.name[:100]] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    gpu_us = sum(totals.values())
    return {"gpu_us": gpu_us, "wall_us": wall * 1e6, "busy": gpu_us / (wall * 1e6),
            "kernels": sum(counts.values()) // calls,
            "top": [{"name": n, "us": round(t, 1), "per_call": counts[n] // calls}
                    for n, t in ranked[:top]]}


def format_profile(table: dict, rows: int = 12) -> str:
    lines = [f"   {table['gpu_us']:.0f} us GPU in {table['wall_us']:.0f} us wall "
             f"({table['busy']:.0%} busy), {table['kernels']} kernels per call"]
    lines += [f"   {r['us']:9.1f} us  x{r['per_call']:<5} {r['name']}" for r in table["top"][:rows]]
    return "\n".join(lines)


def event_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one call of ``fn()`` over ``repeats`` calls timed with CUDA events,
    after ``warmup`` untimed calls."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def graph_seconds(fn, calls: int, repeats: int = 20) -> float:
    """Seconds per call of ``fn()`` inside a CUDA graph of ``calls`` calls: median replay time
    over ``repeats`` replays, divided by the calls (launch gaps included, as in a captured
    decode pass). The calls run twice on a side stream first (``tidar.engine.captured``:
    compilation, allocator)."""
    from tidar.engine import captured

    replay = captured(lambda: [fn() for _ in range(calls)])
    return event_seconds(replay, repeats, warmup=0) / calls
