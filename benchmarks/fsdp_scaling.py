"""FSDP2 on N GPUs against 1 GPU: same loss curve at the same global batch, and throughput.

    python benchmarks/fsdp_scaling.py --gpus 1 2 --steps 60 --lr 3e-5

Builds a SmolLM2-135M-shaped random checkpoint (word-level tokenizer) and a text file of
arithmetic token sequences (learnable, so the loss falls), then runs the real command line,
``torchrun --nproc-per-node N -m tidar.cli convert``, once per N with identical flags. Reports
the largest relative difference of the logged losses from the 1-GPU run and the steady-state
clean tokens/s (between the first logged step after warm-up and the last).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from common import SMOLLM2, out_dir, write_json


def make_checkpoint(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = SMOLLM2["vocab_size"]
    LlamaForCausalLM(LlamaConfig(**SMOLLM2, eos_token_id=2)).save_pretrained(path)
    tok = Tokenizer(WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2").save_pretrained(
        path)


def make_data(path: Path, docs: int = 20000) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(docs):
            start, step = rng.randrange(3, 5000), rng.randrange(1, 7)
            f.write(" ".join(f"t{start + k * step}" for k in range(rng.randrange(50, 400))) + "\n")


def steady_rate(history: list[dict], skip: int) -> float:
    """Clean tokens/s between the logged steps ``skip`` and the last (compilation excluded)."""
    a, b = history[skip], history[-1]
    per_step = b["tokens"] / b["step"]
    seconds = b["tokens"] / b["tokens_per_second"] - a["tokens"] / a["tokens_per_second"]
    return per_step * (b["step"] - a["step"]) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mode", default="full", choices=["full", "frozen-ar"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64, help="global rows per step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", default=None,
                    help="peak lr; full mode default 3e-5 (1e-4 spikes from random init)")
    ap.add_argument("--no-compile", action="store_true", help="eager blocks")
    args = ap.parse_args()
    work = Path("/tmp/fsdp_scaling")
    work.mkdir(exist_ok=True)
    if not (work / "model" / "config.json").exists():
        make_checkpoint(work / "model")
    if not (work / "data.txt").exists():
        make_data(work / "data.txt")
    flags = ["--model", str(work / "model"), "--data", str(work / "data.txt"),
             "--mode", args.mode, "--device", "cuda", *([] if args.no_compile else ["--compile"]),
             "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
             "--steps", str(args.steps), "--warmup", "10", "--log-every", "1",
             "--eval-every", "100000", "--save-every", "100000"]
    if args.mode == "full":
        flags += ["--lora-rank", "0"]
    args.lr = args.lr or ("3e-5" if args.mode == "full" else "1e-3")
    flags += ["--lr", args.lr]
    runs = {}
    for n in args.gpus:
        out = work / f"run{n}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "-m", "tidar.cli", "convert", "--out", str(out), *flags]
        print(" ".join(cmd), flush=True)
        done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="4"),
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], flush=True)
            raise SystemExit(f"{n} GPU run failed")
        history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        for r in history:
            r["tokens"] = r["step"] * args.batch_size * args.seq_len
        runs[n] = history
        (out_dir() / f"fsdp_metrics_{n}gpu.jsonl").write_text(
            (out / "metrics.jsonl").read_text())
    base = runs[args.gpus[0]]
    keys = ["diff_loss"] + (["ar_loss"] if args.mode == "full" else [])
    report = {"device": torch.cuda.get_device_name(), "gpus": args.gpus, "mode": args.mode,
              "compile": not args.no_compile, "lr": float(args.lr),
              "global_batch_rows": args.batch_size, "seq_len": args.seq_len,
              "steps": args.steps, "runs": {}}
    for n, history in runs.items():
        diffs = {k: max(abs(r[k] - b[k]) / abs(b[k]) for r, b in zip(history, base, strict=True))
                 for k in keys}
        rate = steady_rate(history, skip=min(10, len(history) - 2))
        report["runs"][n] = {"max_relative_loss_difference": diffs,
                             "steady_clean_tokens_per_second": rate,
                             "final": {k: history[-1][k] for k in keys},
                             "first": {k: history[0][k] for k in keys}}
        print(f"{n} GPU(s): {rate:,.0f} clean tokens/s, loss {history[0]['diff_loss']:.3f} -> "
              f"{history[-1]['diff_loss']:.3f}, max rel. difference from {args.gpus[0]} GPU: "
              f"{diffs}", flush=True)
    first = report["runs"][args.gpus[0]]["steady_clean_tokens_per_second"]
    for n in args.gpus:
        report["runs"][n]["scaling"] = report["runs"][n]["steady_clean_tokens_per_second"] / first
    write_json("fsdp_scaling.json", report)


if __name__ == "__main__":
    main()
