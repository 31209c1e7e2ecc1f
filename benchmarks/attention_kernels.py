"""Candidate kernels for the decode pass, timed alone: masked attention over the static KV
cache (SDPA as the model runs it, split-KV as batched matmuls, and the Triton split-KV kernel
of ``tidar.decode_attention`` at several grid sizes or tile settings) and the q/k/v and
gate/up projections separate against fused (SmolLM2-135M shapes, bf16, H100/H200).

    python benchmarks/attention_kernels.py
    python benchmarks/attention_kernels.py --attention-only --queries 1 17 32 80 144 272 \
        --batch 1 4 16 64
    python benchmarks/attention_kernels.py --attention-only --triton-sweep tiles \
        --queries 1 32 272 --batch 1 16 64
    python benchmarks/attention_kernels.py --attention-only --triton-sweep slices \
        --queries 1 32 272 --batch 1 4 --slots 512 1536 --triton-only
    python benchmarks/attention_kernels.py --attention-only --triton-sweep many_rows \
        --queries 32 144 272 --batch 1 4 --triton-only

Each candidate is compiled, then ``--calls`` dependent calls are captured in one CUDA graph;
the time per call is the median replay time over ``--repeats`` replays divided by the calls,
which is what a kernel costs inside the engine's captured pass, launch gap included.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from common import graph_seconds, write_json
from torch import Tensor

import tidar.decode_attention
from tidar.engine import raise_recompile_limit
from tidar.model import dense_attention

HEADS, KV_HEADS, HEAD_DIM, DIM, HIDDEN = 9, 3, 64, 576, 1536


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, chunk: int) -> Tensor:
    """Masked attention computed over ``chunk``-key slices of the cache in parallel, then
    merged by their log-sum-exp, as batched matmuls (the engine's split-KV before the Triton
    kernel; kept here as a baseline).

    A few queries over a long cache give a fused attention kernel only a handful of thread
    blocks, each walking every key in turn; slicing the keys spreads that walk over the GPU.
    Shapes as ``attend`` with a dense mask ``[B, 1, T, S]``.
    """
    batch, heads, length, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    group = heads // kv_heads
    pad = -slots % chunk
    if pad:
        k, v, mask = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(mask, (0, pad))
    n = (slots + pad) // chunk
    rows = group * length  # the query heads sharing a KV head, folded into rows
    q = q.reshape(batch, kv_heads, 1, rows, dim)
    mask = mask.repeat(1, 1, group, 1).reshape(batch, 1, rows, n, chunk).transpose(2, 3)
    scores = (q @ k.reshape(batch, kv_heads, n, chunk, dim).transpose(-1, -2)).float()
    scores = (scores * dim**-0.5).masked_fill(~mask, float("-inf"))
    # A slice no query may see has peak -inf: clamp, so its weights are exp(-inf) = 0.
    peak = scores.amax(-1, keepdim=True).clamp(min=-1e30)
    p = torch.exp(scores - peak)
    part = p.to(v.dtype) @ v.reshape(batch, kv_heads, n, chunk, dim)
    weight = torch.exp(peak - peak.amax(2, keepdim=True))
    out = (part.float() * weight).sum(2) / (p.sum(-1, keepdim=True) * weight).sum(2)
    return out.to(q.dtype).reshape(batch, heads, length, dim)


def decode_mask(batch: int, queries: int, slots: int, committed: int) -> torch.Tensor:
    """A verify/propose-like mask: every query sees the committed prefix plus a few more."""
    pos = torch.arange(slots, device="cuda")
    horizon = committed + torch.arange(queries, device="cuda") % 17
    return (pos[None, :] <= horizon[:, None]).expand(batch, 1, queries, slots).contiguous()


def attention_rows(shapes, calls: int, repeats: int, report: dict, sweep: str,
                   baselines: bool = True) -> list[dict]:
    rows = report.setdefault("attention", [])
    for batch, queries, slots in shapes:
        q = torch.randn(batch, HEADS, queries, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = decode_mask(batch, queries, slots, slots - 300)
        reference = dense_attention(q, k, v, mask).float()
        candidates = {"sdpa": dense_attention,
                      "split_kv_256": partial(split_kv_attention, chunk=256)} if baselines else {}
        candidates["triton"] = tidar.decode_attention.decode_attention  # its own settings
        for settings in TRITON_SWEEPS[sweep]:
            name = "_".join(f"{key.lower()}{value}" for key, value in settings.items())
            candidates[f"triton_{name}"] = partial(triton_attention, settings)
        row = {"batch": batch, "queries": queries, "slots": slots}
        for name, fn in candidates.items():
            compiled = (fn if name.startswith("triton") else
                        torch.compile(fn, fullgraph=True, dynamic=False))
            try:
                err = (compiled(q, k, v, mask).float() - reference).abs().max().item()
                sec = graph_seconds(partial(compiled, q, k, v, mask), calls, repeats)
                row[name] = {"us": round(sec * 1e6, 2), "max_abs_err": err}
            except Exception as exc:  # one failing candidate must not end the sweep
                row[name] = {"error": repr(exc)[:300]}
        print(row, flush=True)
        rows.append(row)
        write_json("attention_kernels.json", report)  # so far: a later shape may time out
    return rows


TRITON_SWEEPS = {  # settings of tidar.decode_attention tried beside its own
    "programs": [{"TARGET_PROGRAMS": n} for n in (66, 132, 264, 528, 1056)],
    "tiles": [{"BLOCK_N": n, "NUM_WARPS": w} for n in (32, 64, 128) for w in (2, 4, 8)],
    # the AR step's rows: slices and merge as for many rows (before session 13), then other
    # shortest slices and merge step sizes
    "slices": [{"FEW_ROWS_MIN_CHUNK": 256, "FEW_ROWS_MERGE_ALL": False}]
    + [{"FEW_ROWS_MIN_CHUNK": c} for c in (128, 256)]
    + [{"MERGE_ELEMENTS": e} for e in (2048, 16384)],
    # many rows (drafting passes): smaller row tiles, and one key slice (no merge kernel)
    "many_rows": [{"MANY_ROWS_TILE": t, "TARGET_PROGRAMS": p}
                  for t in (16, 32, 64) for p in (1, 132, 264, 528)],
}


def triton_attention(settings: dict, q, k, v, mask):
    """The Triton kernel with some of its module settings replaced for this call."""
    module = tidar.decode_attention
    own = {name: getattr(module, name) for name in settings}
    for name, value in settings.items():
        setattr(module, name, value)
    try:
        return module.decode_attention(q, k, v, mask)
    finally:
        for name, value in own.items():
            setattr(module, name, value)


def projection_rows(tokens_list, calls: int, repeats: int) -> list[dict]:
    kv_dim = KV_HEADS * HEAD_DIM
    w = {n: torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.02 for n, (o, i) in {
        "q": (DIM, DIM), "k": (kv_dim, DIM), "v": (kv_dim, DIM), "gate": (HIDDEN, DIM),
        "up": (HIDDEN, DIM)}.items()}
    qkv = torch.cat([w["q"], w["k"], w["v"]])
    gate_up = torch.cat([w["gate"], w["up"]])
    candidates = {
        "qkv_separate": lambda x: (F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"])),
        "qkv_fused": lambda x: F.linear(x, qkv).split([DIM, kv_dim, kv_dim], dim=-1),
        "gate_up_separate": lambda x: F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]),
        "gate_up_fused": lambda x: (lambda gu: F.silu(gu[..., :HIDDEN]) * gu[..., HIDDEN:])(
            F.linear(x, gate_up)),
    }
    rows = []
    for tokens in tokens_list:
        x = torch.randn(1, tokens, DIM, device="cuda", dtype=torch.bfloat16)
        row = {"tokens": tokens}
        for name, fn in candidates.items():
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            sec = graph_seconds(partial(compiled, x), calls, repeats)
            row[name + "_us"] = round(sec * 1e6, 2)
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 17, 272])
    ap.add_argument("--slots", type=int, nargs="+", default=[1536],
                    help="cache slots (1536: a 1024 context, padded)")
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--triton-sweep", choices=list(TRITON_SWEEPS), default="programs",
                    help="which settings of the Triton kernel to try beside its own")
    ap.add_argument("--triton-only", action="store_true",
                    help="time the Triton kernel's settings alone, not SDPA or split-KV matmuls")
    args = ap.parse_args()
    torch.manual_seed(0)
    raise_recompile_limit()
    shapes = [(b, q, s) for s in args.slots for b in args.batch for q in args.queries]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    attention_rows(shapes, args.calls, args.repeats, report, args.triton_sweep,
                   not args.triton_only)
    if not args.attention_only:
        report["projections"] = projection_rows([1, 4, 17, 272], args.calls, args.repeats)
    write_json("attention_kernels.json", report)


if __name__ == "__main__":
    main()
