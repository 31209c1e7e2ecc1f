"""``tidar bench``: decoding speed against what users run today, in one process.

For a model and drafter, a prompt set, batch sizes and output lengths it runs, alternating
within one process: transformers ``generate`` (greedy), transformers' prompt-lookup decoding
(batch 1 only), and our engine's ``ar`` (the CUDA-graphed baseline), ``lossless`` and ``mix``
at a few betas. It reports tokens/s, the speedup over our ``ar``, tokens per pass, time to
first token, whether greedy outputs equal ``ar``'s, and the pass-latency curve ``t(q)``;
it writes ``bench.json`` and PNG plots.

Timing: wall clock between device synchronisations (the host syncs at the end of every run
anyway), after a warm-up run of every method on every batch of prompts; medians over
``--repeats``. Within a repeat the methods take turns on every batch of prompts, so drift
(clocks, temperature) hits them alike.

- ``tokens/s`` (decode): tokens after the first, divided by the time after the first token.
  For our engine that excludes prefill and the CUDA-graph capture each run does; for
  transformers it is the run's time minus the time to first token measured by a
  ``max_new_tokens=1`` call on the same batch. ``speedup`` divides it by our ``ar``'s.
- ``e2e tokens/s``: all tokens over the whole call (prefill and capture included).
- ``TTFT``: time until every row of a batch has its first token: our prefill (measured by an
  uncaptured engine, as a captured run spends the capture before its first token; that
  first-yield time is reported too, ``first_yield_ms``: on CUDA a batch of at most 8 prompts
  on a runner used before starts by the joins' captured prefills, which only it shows),
  transformers' ``max_new_tokens=1`` call.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .bench_plots import plot
from .bench_report import resume_cells, save_report, table
from .errors import TidarError
from .files import output_dir
from .peers import HFRunner, Run, sync

METHODS = ("hf", "pld", "ar", "lossless", "mix", "auto")
HUMANEVAL_WRAPPER = "Complete this Python function:\n"

CHAT_PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Explain the difference between a list and a tuple in Python.",
    "Give me three tips for writing clear emails.",
    "What causes the seasons on Earth?",
    "Write a haiku about autumn leaves.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a string in JavaScript?",
    "List five common fruits and their colours.",
    "What is the capital of Australia, and why was it chosen?",
    "Write a SQL query that counts the orders per customer.",
    "Explain recursion to a ten-year-old.",
    "Suggest a name for a bakery that sells only bread.",
    "What are the main differences between TCP and UDP?",
    "Write a short story opening about a lighthouse keeper.",
    "How many minutes are there in a week? Show your work.",
    "Write a bash command that finds all .txt files in a directory.",
    "Describe how photosynthesis works in simple terms.",
    "Give a recipe for a simple tomato pasta sauce.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "What should I pack for a weekend hiking trip?",
)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory, .gguf file or hub id "
                   "(default: the embedded smollm2-135m-instruct)")
    p.add_argument("--drafter", default=None, help="drafter checkpoint (default: the model's "
                   "shipped drafter, if any, else an untrained mask embedding)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="default: cuda if available")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--prompt-set", "--prompts", dest="prompt_set", default="chat",
                   help="humaneval, chat, calibration (built in) or FILE (one prompt a line, "
                   "or .jsonl with a \"prompt\" field)")
    p.add_argument("--raw", action="store_true", help="no chat template (HumanEval: the raw "
                   "completion prompt instead of a chat-wrapped one)")
    p.add_argument("--num-prompts", type=int, default=8,
                   help="prompts per batch size (at least one full batch; cycled if needed)")
    p.add_argument("--batch-sizes", nargs="+", default=["1,4,16,64"], help="e.g. 1,4,16,64")
    p.add_argument("--max-new-tokens", nargs="+", default=["128"], help="output lengths")
    p.add_argument("--block-size", type=int, default=None, help="default: the drafter's")
    p.add_argument("--proposals", default=None, help="proposal blocks per pass (default: all)")
    p.add_argument("--betas", nargs="+", default=["0.9,0.7,0.5"], help="betas for mix")
    p.add_argument("--methods", nargs="+", default=[",".join(METHODS)],
                   help=f"subset of {','.join(METHODS)}: hf is transformers generate, pld "
                   "its prompt-lookup decoding (batch 1 only), auto the lossless setting "
                   "`--proposals auto` picks at each batch size; ar always runs (the baseline)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--pass-repeats", type=int, default=20,
                   help="passes timed per point of the t(q) curve (0: skip the curve)")
    p.add_argument("--context", type=int, default=None,
                   help="context length for t(q) (default: median prompt + half the output)")
    p.add_argument("--compile", action="store_true", help="torch.compile our decode pass")
    p.add_argument("--out", default="bench-out", help="directory for bench.json and plots")
    p.add_argument("--resume", action="store_true", help="keep the (length, batch size) "
                   "cells of a stopped run's bench.json in --out and measure the rest; the "
                   "settings must match")


# -- inputs ------------------------------------------------------------------------------
def _split(values, name: str) -> list[str]:
    items = [x for v in ([values] if isinstance(values, str) else values)
             for x in str(v).replace(",", " ").split()]
    if not items:
        raise TidarError(f"{name} needs at least one value")
    return items


def _numbers(values, name: str, cast, what: str, low, high) -> list:
    out = []
    for item in _split(values, name):
        try:
            value = cast(item)
        except ValueError:
            raise TidarError(f"{name} takes {what}, got {item!r}") from None
        if not low <= value <= high:
            raise TidarError(f"{name} values must lie in {low} .. {high}, got {value}")
        out.append(value)
    return sorted(set(out))


def _ints(values, name: str, low: int = 1, high: int = 4096) -> list[int]:
    return _numbers(values, name, int, "integers", low, high)


def _floats(values, name: str) -> list[float]:
    """Betas: numbers in [0, 1], largest first."""
    return _numbers(values, name, float, "numbers", 0.0, 1.0)[::-1]


def _methods(values) -> list[str]:
    chosen = _split(values, "--methods")
    for m in chosen:
        if m not in METHODS:
            raise TidarError(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in chosen or m == "ar"]


def read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise TidarError(f"prompt file {path} does not exist (--prompt-set takes humaneval, "
                         "chat, calibration or a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TidarError(f"cannot read prompt file {path}: {exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{")):
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TidarError(f"{path}:{n} is not a JSON object with a \"prompt\" field") \
                    from None
            if not isinstance(prompt, str) or not prompt:
                raise TidarError(f"{path}:{n}: \"prompt\" must be a non-empty string")
            prompts.append(prompt)
    else:
        prompts = [line.strip() for line in lines]
    if not prompts:
        raise TidarError(f"prompt file {path} has no prompts")
    return prompts


def prompt_texts(spec: str, raw: bool) -> list[str]:
    """The prompt set's texts (HumanEval chat-wrapped unless ``raw``)."""
    if spec == "chat":
        return list(CHAT_PROMPTS)
    if spec == "calibration":
        from .train import CALIBRATION_PROMPTS

        return list(CALIBRATION_PROMPTS)
    if spec == "humaneval":
        from .humaneval import humaneval_prompts

        prompts = humaneval_prompts()
        return list(prompts) if raw else [HUMANEVAL_WRAPPER + p for p in prompts]
    return read_prompt_file(Path(spec).expanduser())


def batches(prompts: list, batch_size: int, num_prompts: int) -> list[list]:
    """``ceil(num_prompts / batch_size)`` batches of ``batch_size``, cycling through the set."""
    count = max(1, -(-num_prompts // batch_size))
    return [[prompts[(g * batch_size + i) % len(prompts)] for i in range(batch_size)]
            for g in range(count)]


# -- runs --------------------------------------------------------------------------------
def run_engine(engine, prompts: list[list[int]], cfg) -> Run:
    outputs: list[list[int]] = [[] for _ in prompts]
    sync(engine.device)
    start = time.perf_counter()
    first = None
    for row, tokens in engine.stream(prompts, cfg):
        if first is None:  # the stream syncs before it yields: every row's first token is in
            first = time.perf_counter() - start
        outputs[row].extend(tokens)
    sync(engine.device)
    seconds = time.perf_counter() - start
    stats = engine.last_stats
    return Run(outputs, seconds, first, passes=sum(stats.passes),
               batch_passes=max(stats.passes), hist=list(stats.committed_hist))


def engine_ttft(engine, prompts: list[list[int]], cfg) -> float:
    """Seconds until the first tokens of a batch: prefill (``engine`` must not capture)."""
    sync(engine.device)
    start = time.perf_counter()
    stream = engine.stream(prompts, cfg, sync_every=1)
    next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    return seconds


# -- the benchmark -----------------------------------------------------------------------
@dataclass
class Method:
    name: str  # hf, pld, ar, lossless, mix@0.7, auto
    kind: str  # hf, pld, engine
    cfg: object = None  # DecodeConfig for the engine (auto: set per batch size by the tuner)
    tuner: dict | None = None  # auto: the tuner's choice and expectation


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _rate(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def resolve_device(args):
    import torch

    from .cli import _device, _dtype

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = _device(device)
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device == "cuda" else "float32"
    return device, dtype_name, _dtype(dtype_name)


def _measure_cell(methods, engine, eager, hf, groups, max_new: int, repeats: int) -> dict:
    """Warm up, then time every method on every batch ``repeats`` times, alternating."""

    def full(m: Method, prompts) -> Run:
        if m.kind == "engine":
            return run_engine(engine, prompts, replace(m.cfg, max_new_tokens=max_new))
        return hf.run(prompts, max_new, pld=m.kind == "pld")

    def ttft(m: Method, prompts) -> float:
        if m.kind == "engine":
            return engine_ttft(eager, prompts, replace(m.cfg, max_new_tokens=max_new))
        return hf.run(prompts, 1, pld=m.kind == "pld").seconds

    for m in methods:  # warm-up: kernels, allocator, compilation, graph captures
        for prompts in groups:  # every batch: its prefill's size class and padded length
            full(m, prompts)
            ttft(m, prompts)
    rec = {m.name: {"seconds": [0.0] * repeats, "decode": [0.0] * repeats,
                    "ttft": [0.0] * repeats, "first": [0.0] * repeats,
                    "outputs": [], "passes": 0, "batch_passes": 0, "hist": []}
           for m in methods}
    for r in range(repeats):
        if len(groups) * len(methods) > 8:
            _log(f"  repeat {r + 1}/{repeats}")
        for prompts in groups:
            for m in methods:
                run = full(m, prompts)
                t = ttft(m, prompts)
                cell = rec[m.name]
                cell["seconds"][r] += run.seconds
                cell["ttft"][r] += t
                first = run.first_seconds if run.first_seconds is not None else t
                cell["first"][r] += first
                cell["decode"][r] += max(run.seconds - first, 0.0)
                if r == 0:
                    cell["outputs"] += run.outputs
                    cell["passes"] += run.passes
                    cell["batch_passes"] += run.batch_passes
                    if run.hist:
                        cell["hist"] = [a + b for a, b in zip(
                            cell["hist"] or [0] * len(run.hist), run.hist, strict=True)]
    return rec


def _summarise(methods, rec, batch_size: int, max_new: int, n_groups: int) -> list[dict]:
    ar = rec["ar"]
    rows = []
    for m in methods:
        cell = rec[m.name]
        outputs = cell["outputs"]
        tokens = sum(map(len, outputs))
        n_rows = len(outputs)
        seconds, decode = _median(cell["seconds"]), _median(cell["decode"])
        row = {
            "method": m.name,
            "batch_size": batch_size,
            "max_new_tokens": max_new,
            "sequences": n_rows,
            "batches": n_groups,
            "tokens": tokens,
            "seconds": seconds,
            "seconds_per_repeat": cell["seconds"],
            "tokens_per_second": _rate(tokens, seconds),
            "decode_seconds": decode,
            "decode_tokens_per_second": _rate(tokens - n_rows, decode),
            "ttft_ms": 1000 * _median(cell["ttft"]) / n_groups,
            "identical_to_ar": sum(a == b for a, b in zip(outputs, ar["outputs"], strict=True))
            / max(1, n_rows),
        }
        if m.kind == "engine":
            cfg = m.cfg
            hist = cell["hist"][1:]
            decode_passes = max(1, sum(hist))
            row |= {
                "sampler": cfg.sampler,
                "beta": cfg.beta if cfg.sampler == "mix" else None,
                "block_size": cfg.block_size,
                "proposals": len(cfg.proposals),
                "tokens_per_pass": tokens / max(1, cell["passes"]),
                "passes": cell["passes"],
                # Rows that end before the batch's longest (a stop token, more tokens a
                # pass) idle while it runs: the share of row-passes that decoded.
                "batch_passes": cell["batch_passes"],
                "row_utilisation": cell["passes"] / max(1, cell["batch_passes"] * batch_size),
                "first_yield_ms": 1000 * _median(cell["first"]) / n_groups,
                "committed_per_pass_histogram": hist,
                "acceptance_by_position": [sum(hist[j:]) / decode_passes
                                           for j in range(1, len(hist))],
            }
        else:
            # Plain generate: one token per row per forward. Prompt lookup (batch 1): counted.
            per_pass = tokens / max(1, cell["passes"]) if m.kind == "pld" else 1.0
            row |= {"tokens_per_pass": per_pass, "forward_calls": cell["passes"]}
        rows.append(row)
    ar_row = next(row for row in rows if row["method"] == "ar")
    base, base_e2e = ar_row["decode_tokens_per_second"], ar_row["tokens_per_second"]
    for row in rows:
        row["speedup"] = _ratio(row["decode_tokens_per_second"], base)
        row["speedup_end_to_end"] = _ratio(row["tokens_per_second"], base_e2e)
    return rows


def _pass_curve(engine, cfg, batch_sizes, context: int, repeats: int, max_position: int):
    """``t(q)`` per batch size: ar (q = 1) and growing proposal sets of the chosen block, as
    the tuner measures them."""
    from .tuner import measure_pass_seconds

    b = cfg.block_size
    need = (repeats + 4) * b + 3 * b + 2
    context = min(context, max_position - need)
    if context < 1:
        return None, [f"t(q) skipped: the model's context ({max_position}) is too short"]
    curves = []
    for batch in batch_sizes:
        _log(f"t(q): batch {batch}")
        seconds = measure_pass_seconds(engine, b, batch, context, repeats)
        t1 = seconds[1]
        rows = []
        for q, t in sorted(seconds.items()):
            count = 0 if q == 1 else q // b - 1
            rows.append({"label": "ar" if q == 1 else f"b={b},|S|={count}",
                         "block_size": 1 if q == 1 else b, "proposals": count,
                         "q_per_sequence": q, "q_total": q * batch, "seconds": t,
                         "ms": 1000 * t, "relative_to_ar": t / t1 if t1 > 0 else None})
        curves.append({"batch_size": batch, "points": rows})
    return {"context": context, "repeats": repeats, "curves": curves}, []


def run_bench(args) -> int:
    import torch

    from .drafter import apply_drafter
    from .engine import DecodeConfig, Engine
    from .generate import DEFAULT_BLOCK_SIZE, decode_config, drafter_for, encode_prompt
    from .generate import stop_ids as model_stop_ids
    from .loading import load_model
    from .tuner import Acceptance, auto_config

    # Validate everything a user can get wrong before loading anything.
    batch_sizes = _ints(args.batch_sizes, "--batch-sizes", 1, 1024)
    lengths = _ints(args.max_new_tokens, "--max-new-tokens", 1, 1 << 16)
    betas = _floats(args.betas, "--betas")
    methods_wanted = _methods(args.methods)
    if args.repeats < 1:
        raise TidarError(f"--repeats must be at least 1, got {args.repeats}")
    if args.num_prompts < 1:
        raise TidarError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.pass_repeats < 0:
        raise TidarError(f"--pass-repeats must be 0 or more, got {args.pass_repeats}")
    if args.context is not None and args.context < 1:
        raise TidarError(f"--context must be at least 1, got {args.context}")
    texts = prompt_texts(args.prompt_set, args.raw)
    out_dir = output_dir(args.out)
    device, dtype_name, dtype = resolve_device(args)

    _log(f"loading the model on {device} ({dtype_name})")
    loaded = load_model(args.model, device=device, dtype=dtype)
    drafter_path = drafter_for(args.drafter, loaded)
    block_size, drafter = DEFAULT_BLOCK_SIZE, "untrained (mean embedding)"
    acceptance = Acceptance()  # an untrained drafter is assumed never to be accepted
    if drafter_path is not None:
        info = apply_drafter(loaded.model, drafter_path, loaded.fingerprint)
        block_size, drafter = info.block_size, str(drafter_path)
        acceptance = Acceptance.of_drafter(info)
    dargs = argparse.Namespace(block_size=args.block_size, proposals=args.proposals,
                               sampler="lossless", beta=None, temperature=0.0, top_k=0,
                               top_p=1.0, max_new_tokens=max(lengths), seed=0)
    base = decode_config(dargs, block_size)
    methods = []
    for name in methods_wanted:
        if name in ("hf", "pld"):
            methods.append(Method(name, name))
        elif name == "ar":
            methods.append(Method("ar", "engine", DecodeConfig(
                sampler="ar", max_new_tokens=base.max_new_tokens).resolved()))
        elif name == "lossless":
            methods.append(Method("lossless", "engine", base))
        elif name == "auto":
            methods.append(Method("auto", "engine"))
        else:
            methods += [Method(f"mix@{beta:g}", "engine", DecodeConfig(
                sampler="mix", block_size=base.block_size, proposals=base.proposals, beta=beta,
                max_new_tokens=base.max_new_tokens).resolved()) for beta in betas]
    methods.sort(key=lambda m: m.name != "ar")  # ar first: the baseline of every cell

    tokenizer = loaded.tokenizer
    prompt_ids = [encode_prompt(tokenizer, t, args.raw) for t in texts]
    stops = model_stop_ids(loaded)
    engine = Engine(loaded.model, stops, compile=args.compile)
    eager = Engine(loaded.model, stops, cuda_graphs=False)  # prefill timing only
    for length in lengths:  # every prompt must fit with every length: fail before timing
        engine.check_prompts(prompt_ids, replace(base, max_new_tokens=length))

    notes = [
        "speedup: decode tokens/s (tokens after the first over the time after the first "
        "token) divided by our ar's; speedup_end_to_end uses whole-call times (prefill and, "
        "on CUDA, each call's graph capture included)",
        "pld (transformers prompt-lookup decoding) supports batch size 1 only: reported for "
        "batch 1",
        "identical_to_ar: fraction of sequences whose greedy output equals our ar's, token for "
        "token (bf16 rounding can make correct methods differ)",
        f"timing: wall clock between device synchronisations, a warm-up run per method and "
        f"batch, median over {args.repeats} repeats, methods alternated batch by batch",
    ]
    report = {
        "meta": {
            "command": shlex.join(sys.argv),
            "arguments": {k: v for k, v in vars(args).items() if k != "func"},
            "device": (torch.cuda.get_device_name() if device == "cuda"
                       else platform.processor() or platform.machine() or "cpu"),
            "device_type": device,
            "dtype": dtype_name,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "python": platform.python_version(),
            "model": loaded.source,
            "model_fingerprint": loaded.fingerprint,
            "drafter": drafter,
            "block_size": base.block_size,
            "proposals": len(base.proposals),
            "compile": bool(args.compile),
            "prompt_set": args.prompt_set,
            "raw": bool(args.raw),
            "prompts_in_set": len(prompt_ids),
            "prompt_tokens_median": int(statistics.median(map(len, prompt_ids))),
            "num_prompts": args.num_prompts,
            "batch_sizes": batch_sizes,
            "max_new_tokens": lengths,
            "betas": betas,
            "methods": [m.name for m in methods],
            "repeats": args.repeats,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "notes": notes,
        "complete": False,  # True once every cell (and the curve) is measured
        "results": [],
        "pass_latency": None,
    }
    kept = resume_cells(out_dir, report) if args.resume else {}
    if args.resume and not kept:
        _log(f"--resume: no cells to keep in {out_dir}, measuring every one")
    hf = None
    if any(m.kind in ("hf", "pld") for m in methods):
        _log("loading the transformers baseline")
        hf = HFRunner(loaded.source, device, dtype, stops, tokenizer)
    results = report["results"]
    for length in lengths:
        for batch in batch_sizes:
            if (length, batch) in kept:
                _log(f"max_new_tokens {length}, batch {batch}: kept from the earlier run")
                results += kept[length, batch]
                continue
            here = [m for m in methods if m.kind != "pld" or batch == 1]
            for m in here:
                if m.name == "auto":
                    m.cfg, m.tuner = auto_config(engine, loaded.fingerprint, base, acceptance,
                                                  batch)
                    _log(f"auto at batch {batch}: {m.tuner}")
            groups = batches(prompt_ids, batch, args.num_prompts)
            _log(f"max_new_tokens {length}, batch {batch}: {len(groups)} batches x "
                 f"{len(here)} methods x {args.repeats} repeats")
            rec = _measure_cell(here, engine, eager, hf, groups, length, args.repeats)
            results += _summarise(here, rec, batch, length, len(groups))
            for row in results[-len(here):]:
                row["measured"] = report["meta"]["time"]
                tuned = next(m for m in here if m.name == row["method"]).tuner
                if tuned is not None:
                    row["tuner"] = tuned
            save_report(out_dir, report)  # so far: a stopped run keeps its cells

    curve, curve_notes = None, []
    if args.pass_repeats:
        median_prompt = int(statistics.median(map(len, prompt_ids)))
        context = args.context or median_prompt + max(lengths) // 2
        curve, curve_notes = _pass_curve(engine, base, batch_sizes, context, args.pass_repeats,
                                         loaded.config.max_position)
    notes += curve_notes
    report["pass_latency"] = curve
    report["complete"] = True
    report["plots"] = plot(report, out_dir)
    save_report(out_dir, report)
    print(table(results))
    _log(f"wrote {out_dir / 'bench.json'}" + "".join(f", {p}" for p in report["plots"]))
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
