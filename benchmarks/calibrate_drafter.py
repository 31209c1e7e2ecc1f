"""Measure a drafter's acceptance profile on the calibration prompts, as ``tidar convert``
does during training: greedy ``lossless`` tokens per pass, P(k >= j) by draft position, and
each proposal count's tokens per pass replayed from the same outputs (``tidar.acceptance``).

    python benchmarks/calibrate_drafter.py --device cpu --dtype float32 [--write]

Default drafter: the shipped one. Prompts: ``tidar.train.CALIBRATION_PROMPTS``. ``--write``
stores the measurement in the drafter file (atomically) in place of the calibration it
carries, which ``--proposals auto`` then reads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tidar.drafter import apply_drafter, read_drafter, save_drafter
from tidar.generate import encode_prompt, stop_ids
from tidar.loading import load_model
from tidar.train import CALIBRATION_PROMPTS, calibration_extra, measure_acceptance

SHIPPED = Path(__file__).parents[1] / "src/tidar/drafters/smollm2-135m-instruct.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--drafter", default=str(SHIPPED))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--write", action="store_true",
                    help="store the measurement in the drafter file as its calibration")
    args = ap.parse_args()
    loaded = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    info = apply_drafter(loaded.model, args.drafter, loaded.fingerprint)
    prompts = [encode_prompt(loaded.tokenizer, p, raw=False) for p in CALIBRATION_PROMPTS]
    start = time.perf_counter()
    result = measure_acceptance(loaded.model, prompts, stop_ids(loaded), info.block_size)
    result |= {"seconds": time.perf_counter() - start, "device": args.device,
               "dtype": args.dtype, "stored": (info.extra or {}).get("acceptance_by_position")}
    print(json.dumps(result))
    if args.write:
        tensors, info = read_drafter(args.drafter)
        info.extra = (info.extra or {}) | calibration_extra(result) | {
            "calibration": {"prompts": len(prompts), "device": args.device, "dtype": args.dtype,
                            "tokens_per_pass": result["eval/tokens_per_pass"],
                            "by": "benchmarks/calibrate_drafter.py"}}
        save_drafter(args.drafter, tensors, info)


if __name__ == "__main__":
    main()
