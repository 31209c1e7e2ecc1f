"""Exactness of the CUDA-graphed engine on the GPU, fp32, random weights, every family.

    python benchmarks/gpu_exactness.py [--runs eager|compiled|values|stops|joins]
        [--families llama qwen3_moe ...] [--head-dim 128] [--adapters 4]

Greedy ``lossless`` (and ``mix`` at beta 1) must equal ``ar`` token for token; a batched run
must equal each row run alone, ``ar``'s too, and ``ar`` of the first two rows together (an AR
step of one or two sequences runs kernels a batch's does not: ``decode_qkv``, ``decode_moe``;
a row with ``sampler`` ``ar`` in the report). Every family
runs with eager blocks, two of them (dense and MoE) also compiled (``Engine(compile=True)``,
two of the proposal sets). Heads are 16 wide, so decode passes run the Triton attention kernel
where the model picks it (the report says which kernel ran). ``--runs values``: sampling
temperatures, top-p values and betas are data the captured (and compiled) passes read; one
engine decoding at several values must draw what a fresh engine draws at each. ``--runs
stops``: rows that end on a stop token give the same tokens whether the host looks after every
pass or every 8 (``Engine.stream``), and between looks at most one pass runs after the last row
ended. ``--runs joins``: prompts that join a running batch (continuous batching) decode as they
do alone. ``--head-dim`` gives the eager and compiled runs' models heads of that width (most
models have 128: the attention kernel's tiles then take more shared memory, and the report
lists the tiles the device refused, ``decode_attention``'s halving fallback). ``--adapters``
gives them random mask-row adapters (a drafter's stacked weights: mask rows read other weights
than clean rows).
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf
from common import DEVICE, add_random_adapters, kernel_settings, write_json

from tidar import decode_attention, decode_matmul
from tidar.config import from_hf_config
from tidar.engine import DecodeConfig, Engine
from tidar.model import Transformer, dense_attention_kernel
from tidar.sampling import SamplingParams

SMALL = dict(vocab_size=11, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
FAMILIES = {
    "llama": (tf.LlamaConfig, {}),
    "mistral": (tf.MistralConfig, {"sliding_window": 24}),
    "qwen2": (tf.Qwen2Config, {}),
    "qwen3": (tf.Qwen3Config, {"head_dim": 16}),
    "mixtral": (tf.MixtralConfig, MOE),
    "qwen2_moe": (tf.Qwen2MoeConfig, MOE | {"shared_expert_intermediate_size": 24}),
    "qwen3_moe": (tf.Qwen3MoeConfig, MOE | {"head_dim": 16}),
    "olmoe": (tf.OlmoeConfig, MOE),
}


def random_model(family: str, seed: int, head_dim: int | None = None,
                 adapters: int = 0) -> Transformer:
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    if head_dim:
        extra = extra | {"head_dim": head_dim}
    model = Transformer(from_hf_config(cls(**SMALL, **extra)))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.7)
    if adapters:
        add_random_adapters(model, adapters, std=0.3)
    return model.to(DEVICE).eval()


CONFIGS = [(2, None), (4, (0, 1)), (8, None), (16, (0, 2, 5)), (16, None)]
# A compiled engine compiles every pass shape (and batch size) on first use, about 20 s
# each on the H200: compiled runs take a partial and a full proposal set only.
COMPILED_CONFIGS = [(4, (0, 1)), (16, None)]


VALUES = [(0.8, 0.95, 0.7), (1.5, 0.9, 0.7), (0.5, 0.6, 0.3)]  # temperature, top-p, beta


def check_values(compiled: bool) -> list[dict]:
    """One engine across ``VALUES`` against a fresh engine per value, ``lossless`` and
    ``mix``, sampled: the shared runner's captured pass must read each new value."""
    model = random_model("llama", 0)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [3]]
    shared, rows = Engine(model, compile=compiled), []
    for sampler in ("lossless", "mix"):
        for temperature, top_p, beta in VALUES:
            cfg = DecodeConfig(sampler=sampler, beta=beta, block_size=4, proposals=(0, 1),
                               max_new_tokens=40, seed=3,
                               sampling=SamplingParams(temperature=temperature, top_p=top_p))
            got, _ = shared.generate(prompts, cfg)
            expected, _ = Engine(model, compile=compiled).generate(prompts, cfg)
            rows.append({"family": "llama", "compiled": compiled, "sampler": sampler,
                         "temperature": temperature, "top_p": top_p, "beta": beta,
                         "exact": got == expected})
    assert len(shared._runners) == 2  # one per sampler, whatever the values
    return rows


def check_stops() -> list[dict]:
    """Stop tokens under CUDA graphs: the tokens with a look every 8 passes against a look
    after every pass, and the passes replayed after the last row ended."""
    prompts, rows = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [3]], []
    for family in ("llama", "qwen3_moe"):
        model = random_model(family, 0)
        ar, _ = Engine(model).generate(prompts, DecodeConfig(sampler="ar", max_new_tokens=40))
        stop = ar[0][6]
        for cfg in (DecodeConfig(sampler="ar", max_new_tokens=40),
                    DecodeConfig(block_size=4, proposals=(0, 1), max_new_tokens=40)):
            engine = Engine(model, stop_ids=(stop,))
            looks = {}
            for every in (1, 8):
                out = [[] for _ in prompts]
                for row, tokens in engine.stream(prompts, cfg, sync_every=every):
                    out[row] += tokens
                replays = int(engine._live.counter[0]) - 1
                looks[every] = out, replays, max(engine.last_stats.passes) - 1
            (out1, replays1, needed), (out8, replays8, _) = looks[1], looks[8]
            truncated = [a[: a.index(stop) + 1] if stop in a else a for a in ar]
            rows.append({"family": family, "sampler": cfg.sampler, "stop": stop,
                         "exact": out1 == out8 == truncated, "passes_needed": needed,
                         "replays_look_every_pass": replays1, "replays_look_every_8": replays8,
                         "at_most_one_extra": replays8 <= needed + 1})
            print(rows[-1], flush=True)
    return rows


def check_joins() -> list[dict]:
    """Continuous batching under CUDA graphs, eager and compiled: three prompts that join a
    running batch (one into its idle row, two into rows a stop token or the budget freed)
    decode as each does alone, greedy and sampled; and a batch of one that grows into the
    buckets of 2, 4 and 8 rows as the five others join (``max_rows``), into new runners and
    into runners that decoded other prompts before (their idle rows keep that state)."""
    first, joining = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [3]], [[2, 4], [9, 8, 7, 6], [5] * 20]
    grown = (first[:1], first[1:] + joining, 8)
    starts = {"no": (first, joining, 0), "new runners": grown, "used runners": grown}
    rows = []
    for compiled in (False, True):
        model = random_model("llama", 0)
        stop = Engine(model).generate([first[1]], DecodeConfig(sampler="ar",
                                                               max_new_tokens=40))[0][0][3]
        for cfg in (DecodeConfig(sampler="ar", max_new_tokens=40),
                    DecodeConfig(block_size=4, proposals=(0, 1), max_new_tokens=40, seed=3,
                                 sampling=SamplingParams(temperature=0.8))):
            for grow, (start, later, max_rows) in starts.items():
                engine = Engine(model, stop_ids=(stop,), compile=compiled)
                if grow == "used runners":
                    for rows_before in (2, 4, 8):
                        engine.generate([[7, 7, 7]] * rows_before, cfg)
                waiting, got = iter(later), {}
                for row, tokens in engine.stream(start, cfg, max_rows=max_rows,
                                                 more=lambda longest, queue=waiting: (
                                                     next(queue, None))):
                    got.setdefault(row, []).extend(tokens)
                alone = [engine.generate([p], cfg)[0][0] for p in start + later]
                rows.append({"compiled": compiled, "sampler": cfg.sampler, "grow": grow,
                             "joined": len(got) - len(start),
                             "all_joined": len(got) == len(alone),
                             "exact": [got.get(r) for r in range(len(alone))] == alone})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", choices=["all", "eager", "compiled", "values", "stops", "joins"],
                    default="all",
                    help="eager blocks (every family, 2 seeds), compiled (llama, qwen3_moe), "
                    "or sampling values as data (eager and compiled)")
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES),
                    help="only these model families (default: those the runs name)")
    ap.add_argument("--kernel-settings", default="engine",
                    help="NAME=VALUE,... for the decode kernels (common.kernel_settings), "
                    "e.g. MAX_PASS_ROWS=4096: drafting passes through decode_matmul")
    ap.add_argument("--head-dim", type=int,
                    help="head width of the eager and compiled runs' models (default: 16)")
    ap.add_argument("--adapters", type=int, default=0, metavar="RANK",
                    help="random mask-row adapters of this rank in the eager and compiled "
                    "runs' models (0: none)")
    args = ap.parse_args()
    with kernel_settings(args.kernel_settings):
        check(args)


def check(args) -> None:
    """The runs ``args.runs`` names, under the kernel settings ``main`` applied."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [3]]
    rows, failures = [], 0
    runs = []
    if args.runs in ("all", "eager"):
        runs += [(f, seed, False) for f in FAMILIES for seed in range(2)]
    if args.runs in ("all", "compiled"):
        runs += [("llama", 0, True), ("qwen3_moe", 0, True)]
    runs = [run for run in runs if run[0] in (args.families or FAMILIES)]
    probe = torch.zeros(1, 4, 1, args.head_dim or 16, device=DEVICE)
    kernel = dense_attention_kernel(probe, probe)
    if args.runs == "joins":
        rows = check_joins()
        write_json("gpu_exactness_joins.json", {"decode_attention": kernel, "runs": rows})
        good = sum(r["exact"] and r["all_joined"] for r in rows)
        print(f"{good}/{len(rows)} continuous-batching runs exact, every prompt joined")
        return
    if args.runs == "stops":
        rows = check_stops()
        write_json("gpu_exactness_stops.json", {"decode_attention": kernel, "runs": rows})
        good = sum(r["exact"] and r["at_most_one_extra"] for r in rows)
        print(f"{good}/{len(rows)} stop-token runs exact, with at most one extra replay")
        return
    if args.runs == "values":
        rows = check_values(False) + check_values(True)
        write_json("gpu_exactness_values.json", {"decode_attention": kernel, "runs": rows})
        exact = sum(r["exact"] for r in rows)
        print(f"{exact}/{len(rows)} sampled configurations draw as a fresh engine does")
        return
    for family, seed, compiled in runs:
        model = random_model(family, seed, args.head_dim, args.adapters)
        engine = Engine(model, compile=compiled)
        ar_cfg = DecodeConfig(sampler="ar", max_new_tokens=40)
        ar, _ = engine.generate(prompts, ar_cfg)
        alone = [engine.generate([p], ar_cfg)[0][0] for p in prompts]
        pair, _ = engine.generate(prompts[:2], ar_cfg)
        failures += alone != ar or pair != ar[:2]
        rows.append({"family": family, "seed": seed, "compiled": compiled, "sampler": "ar",
                     "block_size": 1, "proposals": [], "exact": alone == ar and pair == ar[:2],
                     "tokens_per_pass": 1.0})
        configs = COMPILED_CONFIGS if compiled else CONFIGS
        for b, S in configs:
            cfg = DecodeConfig(block_size=b, proposals=S, max_new_tokens=40)
            out, stats = engine.generate(prompts, cfg)
            mix, _ = engine.generate(prompts, DecodeConfig(
                sampler="mix", beta=1.0, block_size=b, proposals=S, max_new_tokens=40))
            solo = [engine.generate([p], cfg)[0][0] for p in prompts]
            ok = out == ar and mix == ar and solo == ar
            failures += not ok
            rows.append({"family": family, "seed": seed, "compiled": compiled,
                         "block_size": b, "proposals": S, "exact": ok,
                         "tokens_per_pass": stats.tokens_per_pass})
        # After every run: a run stopped by a time limit keeps what it checked.
        write_json("gpu_exactness.json", {"decode_attention": kernel, "runs": rows,
                                          "head_dim": args.head_dim or 16,
                                          "adapters_rank": args.adapters,
                                          "refused_tiles": refused_tiles()})
        print(family, seed, "compiled" if compiled else "eager",
              all(r["exact"] for r in rows[-len(configs) - 1:]), flush=True)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"{len(rows) - failures}/{len(rows)} configurations exact on {device}, decode "
          f"attention: {kernel}, tiles refused: {refused_tiles() or 'none'}")


def refused_tiles() -> list[str]:
    """The tiles the device refused for shared memory: the attention's rows
    (``decode_attention`` halves them, then falls back to SDPA) and ``decode_matmul``'s
    outputs (it halves them)."""
    attention = [f"attention {dtype} head dim {dim}: {rows} rows"
                 for _, dtype, dim, rows in decode_attention._REFUSED]
    matmul = [f"matmul {dtype} {inputs} inputs{' SwiGLU' if swiglu else ''}: {rows} x {outputs}"
              for _, dtype, inputs, swiglu, rows, outputs, _ in decode_matmul._REFUSED]
    return sorted(attention + matmul)


if __name__ == "__main__":
    main()
