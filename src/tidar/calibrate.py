"""``tidar calibrate``: measure a drafter's acceptance on the prompts it is to decode and
store it in the drafter file, where ``--proposals auto`` reads it.

A conversion measures acceptance on a few built-in chat prompts (on a GPU; a CPU conversion
measures none). How far the drafts run ahead depends on the text: the shipped drafter
commits 1.59 tokens a decode pass on those prompts and 1.93 on ten HumanEval prompts
(docs/results.md section 3), so the tuner picks better from a calibration on one's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import TidarError
from .files import check_writable


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    from .train import CALIBRATION_NEW_TOKENS

    p.add_argument("--model", default=None, help="HF directory, .gguf file or hub id "
                   "(default: the embedded smollm2-135m-instruct)")
    p.add_argument("--drafter", default=None, help="drafter checkpoint to calibrate "
                   "(default: the model's shipped drafter)")
    p.add_argument("--out", default=None, help="drafter file to write: the drafter with the "
                   "new calibration (default: --drafter itself, replaced atomically; the "
                   "shipped drafter needs an --out)")
    p.add_argument("--prompt-set", "--prompts", dest="prompt_set", default="calibration",
                   help="calibration (the 8 prompts a conversion measures on), chat, "
                   "humaneval, or FILE (one prompt a line, or .jsonl with a \"prompt\" field)")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--num-prompts", type=int, default=16,
                   help="at most this many prompts, the set's first")
    p.add_argument("--max-new-tokens", type=int, default=CALIBRATION_NEW_TOKENS,
                   help="tokens decoded a prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="default: cuda if available")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--dry-run", action="store_true", help="measure and print; write nothing")
    p.add_argument("--json", action="store_true", help="print the measurement as JSON")


def _check(args) -> None:
    """What the flags alone can get wrong, before anything loads."""
    for flag, value in (("--num-prompts", args.num_prompts), ("--batch-size", args.batch_size)):
        if value < 1:
            raise TidarError(f"{flag} must be at least 1, got {value}")
    if args.out is not None and Path(args.out).is_dir():
        raise TidarError(f"--out {args.out} is a directory; name the drafter file to write")
    if args.drafter is None and args.out is None and not args.dry_run:
        raise TidarError("without --drafter the shipped drafter is calibrated, which is part "
                         "of the package and not written in place: pass --out FILE (or "
                         "--dry-run)")


def summary(result: dict, before: float | None) -> str:
    """The measurement in words."""
    reach = result["eval/acceptance_by_position"]
    replayed = result["eval/tokens_per_pass_by_proposals"]
    lines = [f"tokens per pass with every proposal block, prefill included: "
             f"{result['eval/tokens_per_pass']:.3f}"
             + ("" if before is None else f" (the drafter's calibration said {before:.3f})"),
             f"P(k >= j), a pass accepting j drafts or more, for j = 1..{min(8, len(reach))}: "
             + " ".join(f"{p:.3f}" for p in reach[:8]),
             "tokens per decode pass by proposal blocks, replayed: "
             + (", ".join(f"{n}: {m[0]:.3f}" for n, m in replayed.items())
                or "none (every output ended within a block of its prompt)")]
    return "\n".join(lines)


def run_calibrate(args) -> int:
    from .bench import prompt_texts, resolve_device
    from .drafter import apply_drafter, read_drafter, save_drafter
    from .generate import drafter_for, encode_prompt, stop_ids
    from .loading import load_model
    from .train import calibration_extra, measure_acceptance

    _check(args)
    texts = prompt_texts(args.prompt_set, args.raw)[:args.num_prompts]
    device, dtype_name, dtype = resolve_device(args)
    loaded = load_model(args.model, device=device, dtype=dtype)
    drafter = drafter_for(args.drafter, loaded)
    if drafter is None:
        raise TidarError("this model has no shipped drafter: pass --drafter FILE")
    info = apply_drafter(loaded.model, drafter, loaded.fingerprint)
    out = Path(args.out or drafter)
    if not args.dry_run:
        check_writable(out, "--out" if args.out else "the drafter")
    if args.max_new_tokens < info.block_size + 1:
        raise TidarError(f"--max-new-tokens must be at least the block size + 1 "
                         f"({info.block_size + 1}) for the replay, got {args.max_new_tokens}")
    prompts = [encode_prompt(loaded.tokenizer, t, args.raw) for t in texts]
    print(f"tidar: calibrating {drafter} on {len(prompts)} prompts ({args.prompt_set}), "
          f"{args.max_new_tokens} new tokens each, {device} {dtype_name}", file=sys.stderr)
    start = time.perf_counter()
    result = measure_acceptance(loaded.model, prompts, stop_ids(loaded), info.block_size,
                                args.max_new_tokens, args.batch_size, progress=True)
    record = {"prompts": len(prompts), "prompt_set": args.prompt_set,
              "max_new_tokens": args.max_new_tokens, "device": device, "dtype": dtype_name,
              "tokens_per_pass": result["eval/tokens_per_pass"],
              "seconds": round(time.perf_counter() - start, 1), "by": "tidar calibrate"}
    before = (info.extra or {}).get("calibration", {}).get("tokens_per_pass")
    print(summary(result, before), file=sys.stderr)
    if args.json:
        print(json.dumps(result | {"calibration": record}))
    if not args.dry_run:
        tensors, info = read_drafter(drafter)
        info.extra = (info.extra or {}) | calibration_extra(result) | {"calibration": record}
        save_drafter(out, tensors, info, dtype=None)
        print(f"tidar: calibration written to {out}", file=sys.stderr)
    return 0
