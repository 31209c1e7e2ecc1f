"""Pass latency t(q) of the engine's CUDA-graphed decode pass, eager and compiled blocks, in
one process, against the AR step's floors.

    python benchmarks/pass_latency.py --context 1024 --batch 1 4 16 64
    python benchmarks/pass_latency.py --batch 1 4 16 64 --compiled-only \
        --attention split sdpa triton
    python benchmarks/pass_latency.py --batch 1 --ar-only --compiled-only --fuse off on \
        --inductor engine untuned
    python benchmarks/pass_latency.py --batch 1 4 --compiled-only --compile-scope blocks pass
    python benchmarks/pass_latency.py --batch 1 --compiled-only --slot-shapes static symbolic
    python benchmarks/pass_latency.py --batch 1 4 --context 100 --compiled-only \
        --short-caches old new
    python benchmarks/pass_latency.py --batch 1 4 --compiled-only --single-replays
    python benchmarks/pass_latency.py --batch 1 --compiled-only --queries 1 32 272 \
        --inductor engine max-autotune
    python benchmarks/pass_latency.py --batch 1 --compiled-only --queries 1 32 272 --rounds 2
    python benchmarks/pass_latency.py --batch 1 --compiled-only --queries 1 32 272 \
        --inductor engine no-combo cublaslt --rounds 2
    python benchmarks/pass_latency.py --batch 1 4 --compiled-only --queries 1 32 272 \
        --kernel-settings FEW_ROWS_MIN_CHUNK=256,FEW_ROWS_MERGE_ALL=False engine --rounds 2
    python benchmarks/pass_latency.py --batch 1 4 --compiled-only --queries 1 32 \
        --kernel-settings MAX_ROWS=0 engine --rounds 2
    python benchmarks/pass_latency.py --batch 1 --compiled-only --queries 1 32 272 \
        --inductor no-pdl engine
    python benchmarks/pass_latency.py --batch 1 4 --compiled-only --queries 1 32 272 \
        --kernel-settings engine MAX_PASS_ROWS=4096 --rounds 2
    python benchmarks/pass_latency.py --batch 1 --compiled-only --ar-only \
        --kernel-settings engine NARROW_OUTPUTS=8,NARROW_WARPS=4 --rounds 2
    python benchmarks/pass_latency.py --batch 1 4 --compiled-only --ar-only \
        --kernel-settings engine ENABLED=True --rounds 2
    python benchmarks/pass_latency.py --batch 1 --compiled-only --queries 1 32 272 \
        --kernel-settings engine ONE_HEAD_MAX_ROWS=0 --rounds 2
    python benchmarks/pass_latency.py --batch 1 --compiled-only --queries 1 144 272 \
        --adapters 48 --kernel-settings engine MAX_WIDE_ROWS=0 --rounds 2
    python benchmarks/pass_latency.py --batch 1 4 --compiled-only --queries 32 144 272 \
        --adapters 48 --kernel-settings engine WIDE_STACKED_MLP_MAX_ROWS=0 --rounds 2
    python benchmarks/pass_latency.py --batch 1 --compiled-only --queries 272 [--adapters 48] \
        --kernel-settings engine WIDE_MLP_MAX_ROWS_ONE_SEQUENCE=192 --rounds 4
    python benchmarks/pass_latency.py --batch 1 --compiled-only --queries 208 240 \
        --kernel-settings engine WIDE_MLP_MAX_ROWS_ONE_SEQUENCE=192

``--attention`` runs one variant per choice, each compiled and captured under it (see
``attention_context``). ``--fuse off`` decodes with separate q/k/v and gate/up projections;
``--inductor`` compiles under other inductor settings; ``--kernel-settings`` sets
constants of the Triton decode kernels and the engine (``common.kernel_settings``).
``--rounds 2`` compiles and times every variant twice, in turn: how far the same graphs time
apart by their place in the process (session 12 saw 3-7% for the AR step).
``--compile-scope blocks`` compiles the blocks alone, as the engine did before it compiled
the whole pass with static shapes.
``--slot-shapes static`` compiles the cache's slot count into the graphs, as the engine did
before it kept it symbolic (one graph for every capacity bucket). ``--short-caches old``
gives AR caches an unused scratch slot (a 256-slot capacity then takes 512 slots) and merges
a single key slice in a second kernel, as the engine did before it wrote one slice directly.

``--shape`` times random weights of a larger model's shape (``common.SHAPES``: Llama-3.2-1B,
Llama-3.1-8B, OLMoE-1B-7B), whose AR step reads far more weights than the default's:

    python benchmarks/pass_latency.py --shape llama-8b --batch 1 4 --compiled-only

Floors of one AR step (batch 1): memory, every weight it uses (an MoE's active experts) and
the context's KV read once at the device's bandwidth (``common.step_bytes``); launch, the
pass's kernel count times the measured cost of one tiny kernel replayed in a CUDA graph
(kernels of the whole pass: inputs, blocks, head and bookkeeping).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from functools import partial

import torch
from common import (
    SHAPES,
    add_random_adapters,
    graph_seconds,
    kernel_settings,
    random_model,
    step_bytes,
    write_json,
)
from profile_pass import kernel_table

from tidar.engine import COMPILE_OPTIONS, DecodeConfig, Engine, proposal_set
from tidar.tuner import pass_shapes


def graph_kernel_seconds(n: int = 1000) -> float:
    """Seconds per kernel of a CUDA graph of ``n`` dependent one-element kernels."""
    x = torch.zeros(1, device="cuda")
    return graph_seconds(lambda: x.add_(1), n)


def kernels_per_pass(make_engine, cfg: DecodeConfig, context: int) -> int:
    """CUDA kernels one whole decode pass launches (batch 1, run outside any graph)."""
    return kernel_table(make_engine(cuda_graphs=False), cfg, context, passes=1)["kernels"]


def attention_context(choice: str):
    """``default``: the model's own choice (``dense_attention_kernel``); ``triton``: the
    split-KV Triton kernel always; ``sdpa``: SDPA always (torch's kernel pick, cuDNN on
    Hopper); ``efficient``: SDPA always, its memory-efficient kernel first (it supports the
    dense mask); ``split``: the engine's choice before the Triton kernel, split-KV as batched
    matmuls over 256-key slices for few queries at small batch, else SDPA."""
    if choice == "default":
        return contextlib.nullcontext()
    if choice in ("triton", "sdpa"):
        return kernel_policy(lambda q, k: choice)
    if choice == "split":
        return matmul_split_kv()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    stack = contextlib.ExitStack()
    stack.enter_context(kernel_policy(lambda q, k: "sdpa"))
    stack.enter_context(sdpa_kernel(order, set_priority=True))
    return stack


# compile options (None: the engine's; otherwise the engine's with one change) and engine
# constants, by --inductor variant; "no-combo": inductor launches independent kernels one by
# one (the engine before session 26); "cublaslt": torch's matmuls through cuBLASLt's
# heuristics instead of cuBLAS's
INDUCTOR = {"engine": (None, {}), "no-pdl": (None, {"INDUCTOR_PDL": False}),
            "untuned": ({**COMPILE_OPTIONS, "coordinate_descent_tuning": False}, {}),
            "max-autotune": ({**COMPILE_OPTIONS, "max_autotune": True}, {}),
            "pdl": (None, {"PDL_DRAFT_ROWS": 1 << 30}),
            "no-combo": ({**COMPILE_OPTIONS, "combo_kernels": False}, {}),
            "cublaslt": (None, {})}


def variant_context(attention: str, fuse: str, inductor: str, scope: str, slots: str,
                    short: str, kernel: str):
    import tidar.decode_attention
    import tidar.engine
    import tidar.model

    stack = contextlib.ExitStack()
    stack.enter_context(attention_context(attention))
    stack.enter_context(kernel_settings(kernel))
    if scope == "blocks":  # as compiled before: blocks only, dynamo's automatic dynamic shapes
        own_compile = tidar.engine.compile_static
        tidar.engine.compile_static = lambda fn, options=None: (
            torch.compile(fn, options=options or tidar.engine.COMPILE_OPTIONS)
            if isinstance(fn, torch.nn.Module) else fn)
        stack.callback(setattr, tidar.engine, "compile_static", own_compile)
    if short == "old":
        own_scratch = tidar.engine.scratch_slots
        tidar.engine.scratch_slots = lambda cfg: max(len(cfg.proposals), 1) * cfg.block_size
        tidar.decode_attention.MERGE_ALWAYS = True
        stack.callback(setattr, tidar.engine, "scratch_slots", own_scratch)
        stack.callback(setattr, tidar.decode_attention, "MERGE_ALWAYS", False)
    if slots == "static":
        own_share = tidar.engine._share_across_capacities
        tidar.engine._share_across_capacities = lambda st, cache: None
        stack.callback(setattr, tidar.engine, "_share_across_capacities", own_share)
    if inductor == "cublaslt":
        own_blas = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        stack.callback(torch.backends.cuda.preferred_blas_library, own_blas)
    options, constants = INDUCTOR[inductor]
    if options is not None:
        constants = {**constants, "COMPILE_OPTIONS": options}
    for name, value in constants.items():
        stack.callback(setattr, tidar.engine, name, getattr(tidar.engine, name))
        setattr(tidar.engine, name, value)
    if fuse == "off":
        own = tidar.model.DECODE_LINEAR_MAX_ELEMENTS
        tidar.model.DECODE_LINEAR_MAX_ELEMENTS = 0
        stack.callback(setattr, tidar.model, "DECODE_LINEAR_MAX_ELEMENTS", own)
    return stack


@contextlib.contextmanager
def kernel_policy(policy):
    """Replace the model's choice of dense-mask attention kernel with ``policy(q, k)``."""
    import tidar.model

    own = tidar.model.dense_attention_kernel
    tidar.model.dense_attention_kernel = policy
    try:
        yield
    finally:
        tidar.model.dense_attention_kernel = own


@contextlib.contextmanager
def matmul_split_kv():
    """SDPA's place taken by split-KV as batched matmuls where the engine used to choose it."""
    from attention_kernels import split_kv_attention

    import tidar.model

    sdpa = tidar.model.dense_attention

    def split_or_sdpa(q, k, v, mask):
        batch, heads, length, _ = q.shape
        if batch * k.shape[1] < 64 and batch * heads * length <= 1024:
            return split_kv_attention(q, k, v, mask, 256)
        return sdpa(q, k, v, mask)

    with kernel_policy(lambda q, k: "sdpa"):
        tidar.model.dense_attention = split_or_sdpa
        try:
            yield
        finally:
            tidar.model.dense_attention = sdpa


def timed_shapes(block_size: int, queries: list[int] | None) -> dict:
    """The passes to time by query tokens per sequence: the tuner's (``pass_shapes``) by
    default, else ``queries``, each 1 (the AR step) or a block and 1 to ``block_size``
    proposal blocks, as ``--proposals N`` decodes (the tuner weighs only some counts)."""
    if not queries:
        return pass_shapes(block_size)
    shapes = {}
    for q in queries:
        blocks, rest = divmod(q - block_size, block_size)
        if q == 1:
            shapes[q] = DecodeConfig(sampler="ar")
        elif rest == 0 and 1 <= blocks <= block_size:
            shapes[q] = DecodeConfig(block_size=block_size,
                                     proposals=proposal_set(blocks, block_size))
        else:
            raise SystemExit(f"pass_latency: no pass has {q} queries at block size "
                             f"{block_size} (1, or {2 * block_size} to "
                             f"{block_size * (block_size + 1)} in steps of {block_size})")
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES),
                    help="the random-weight model's shape (common.SHAPES): the embedded "
                    "default's, or a larger dense or MoE model's")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (H100 SXM spec)")
    ap.add_argument("--compiled-only", action="store_true", help="skip the eager-block variant")
    ap.add_argument("--attention", nargs="+", default=["default"],
                    choices=["default", "triton", "split", "sdpa", "efficient"],
                    help="attention per variant (see attention_context)")
    ap.add_argument("--fuse", nargs="+", default=["on"], choices=["on", "off"],
                    help="fused q/k/v and gate/up projections when decoding, per variant")
    ap.add_argument("--inductor", nargs="+", default=["engine"], choices=list(INDUCTOR),
                    help="compile options: the engine's, without PDL, without tile tuning, "
                    "autotuned, or with PDL in every pass")
    ap.add_argument("--compile-scope", nargs="+", default=["pass"], choices=["pass", "blocks"],
                    help="the engine's compiled pass (static graphs), or its blocks alone with "
                    "dynamo's automatic dynamic shapes (the engine before), per variant")
    ap.add_argument("--slot-shapes", nargs="+", default=["symbolic"],
                    choices=["symbolic", "static"], help="the cache's slot count symbolic in "
                    "compiled graphs (the engine), or compiled in (the engine before), per variant")
    ap.add_argument("--short-caches", nargs="+", default=["new"], choices=["new", "old"],
                    help="old: AR caches with a scratch slot, one key slice merged by a "
                    "second kernel (the engine before), per variant")
    ap.add_argument("--kernel-settings", nargs="+", default=["engine"],
                    help="settings of the Triton decode kernels per variant: engine, or "
                    "NAME=VALUE,... (see common.kernel_settings)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="compile and time the variants this many times, in turn")
    ap.add_argument("--ar-only", action="store_true", help="time the AR step alone")
    ap.add_argument("--adapters", type=int, default=0, metavar="RANK",
                    help="random mask-row adapters of this rank on every projection, as a "
                    "frozen-AR drafter has (its passes then read stacked weights); 0: none")
    ap.add_argument("--queries", type=int, nargs="+",
                    help="time only these pass shapes, by queries per row: 1 (the AR step) or "
                    "a block and 1 to block-size proposal blocks (default: the tuner's shapes)")
    ap.add_argument("--single-replays", action="store_true",
                    help="also time each pass as one replay right after a prefill, on the "
                    "same graphs (not the tuner's old timing, which did not prefill between "
                    "replays: pass_timing.py has that one)")
    args = ap.parse_args()
    if args.ar_only:
        args.queries = [1]
    shapes = timed_shapes(args.block_size, args.queries)  # fails before compiling
    full = args.block_size * (args.block_size + 1)  # the full set's pass: 272 queries at b = 16
    model = random_model(args.shape)
    if args.adapters:
        add_random_adapters(model, args.adapters, std=0.02)
    b = args.block_size
    engines = {}
    for attention, fuse, inductor, scope, slots, short, kernel in itertools.product(
            args.attention, args.fuse, args.inductor, args.compile_scope, args.slot_shapes,
            args.short_caches, args.kernel_settings):
        suffix = "" if attention == "default" else f", {attention} attention"
        suffix += "" if fuse == "on" else ", unfused projections"
        suffix += "" if inductor == "engine" else f", inductor {inductor}"
        suffix += "" if scope == "pass" else ", compiled blocks only"
        suffix += "" if slots == "symbolic" else ", static slot count"
        suffix += "" if short == "new" else ", old short caches"
        suffix += "" if kernel == "engine" else f", kernel {kernel}"
        spec = (attention, fuse, inductor, scope, slots, short, kernel)
        if not args.compiled_only:
            engines["graphed" + suffix] = (partial(Engine, model), spec)
        engines["graphed+compiled" + suffix] = (partial(Engine, model, compile=True), spec)
    floor_bytes = step_bytes(model, args.context)
    per_kernel = graph_kernel_seconds()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": args.shape, "context": args.context, "block_size": b,
               "adapters_rank": args.adapters, "step_bytes": floor_bytes,
               "memory_floor_ms": 1e3 * floor_bytes / args.bandwidth,
               "bandwidth_bytes_per_s": args.bandwidth,
               "graph_kernel_us": 1e6 * per_kernel, "variants": {}}
    if args.rounds > 1:
        engines = {f"{name} (round {r})": plan for r in range(1, args.rounds + 1)
                   for name, plan in engines.items()}
    for name, (make_engine, spec) in engines.items():
        torch._dynamo.reset()  # compile this variant afresh, under its own settings
        with variant_context(*spec), model.decode_weights():
            engine = make_engine()
            ar_kernels = kernels_per_pass(make_engine, DecodeConfig(sampler="ar"), args.context)
            full_kernels = (kernels_per_pass(make_engine, shapes[full], args.context)
                            if full in shapes else None)
            variant = {"kernels_ar_pass": ar_kernels, f"kernels_{full}_pass": full_kernels,
                       "launch_floor_ms": 1e3 * ar_kernels * per_kernel, "curves": {}}
            for batch in args.batch:
                started = time.perf_counter()
                variant["curves"][batch] = curve = engine.time_passes(
                    shapes, batch, args.context, args.repeats)
                if args.single_replays:
                    variant.setdefault("single_replay_curves", {})[batch] = engine.time_passes(
                        shapes, batch, args.context, args.repeats, burst=1)
                # Wall time of this batch's curve, compiling and capturing included.
                variant.setdefault("wall_s", {})[batch] = time.perf_counter() - started
                results["variants"][name] = variant
                write_json("pass_latency.json", results)  # so far: a later run may time out
                print(f"{name} batch {batch}: " + "  ".join(
                    f"t({q})={t * 1e3:.2f}ms" for q, t in sorted(curve.items())), flush=True)
        counted = "" if full_kernels is None else f", {full_kernels} per {full}-query pass"
        print(f"{name}: {ar_kernels} kernels per AR pass{counted}; launch floor "
              f"{variant['launch_floor_ms']:.2f} ms", flush=True)
    print(f"memory floor {results['memory_floor_ms']:.3f} ms, one graph kernel "
          f"{results['graph_kernel_us']:.2f} us")
    results["notes"] = ("t(q) in seconds, median over CUDA-event-timed bursts of back-to-back "
                        "replays of the whole captured pass (forward, verification, drafting), "
                        "the shapes taking turns, as Engine.time_passes times them; "
                        "single_replay_curves: one replay timed right after a prefill; "
                        "kernels counted for the whole pass")
    write_json("pass_latency.json", results)


if __name__ == "__main__":
    main()
