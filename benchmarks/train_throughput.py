"""Training throughput of the TiDAR objective on the SmolLM2-135M shape (random tokens).

    python benchmarks/train_throughput.py --modes frozen-ar full --batch 32 --seq-len 512
    python benchmarks/train_throughput.py --batch 64 --compile on --profile 2
    python benchmarks/train_throughput.py --batch 64 96 128 --compile on
    python benchmarks/train_throughput.py --modes full --batch 128 --autotune-attention off
    python benchmarks/train_throughput.py --modes full --batch 128 --compile on --mask-block 128
    python benchmarks/train_throughput.py --modes full --batch 128 --compile on \
        --attention flash triton

Clean tokens per second (the ``L`` tokens of each doubled row) and model FLOPs utilisation.
Variants (mode, batch, compile, attention) run in one process, each compiled afresh.
``--attention flash`` runs flex_attention on FlashAttention-4's kernels (``flash-attn-4``
installed), ``triton`` on its own.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from common import format_profile, profile_cuda, smollm2_shaped, write_json

from tidar.train import TrainConfig, compile_blocks, frozen_to, prepare, tidar_losses, uses_flex


def build(mode: str, batch: int, seq_len: int, compile_model: bool, autotune: str,
          lora_rank: int = 64, mask_block: int | None = None, flash: bool = False):
    """The model and one optimizer step on fresh random rows, as ``tidar convert`` runs it
    (``lora_rank``: frozen-ar's adapters; ``autotune``: flex_attention's tiles, ``auto`` as
    ``tidar convert`` picks; ``mask_block``: its BlockMasks' tile, None as it picks;
    ``flash``: flex_attention on FlashAttention-4's kernels)."""
    model = smollm2_shaped(dtype=torch.float32)
    rank = lora_rank if mode == "frozen-ar" else 0
    cfg = TrainConfig(out="", data=["-"], mode=mode, seq_len=seq_len, batch_size=batch,
                      lora_rank=rank, lora_alpha=max(rank, 1))
    named = prepare(model, cfg)
    if mode == "frozen-ar":
        frozen_to(model, torch.bfloat16)
    model.cuda().train()
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-4, fused=True)
    if compile_model:
        tune = (uses_flex(model, mode, torch.device("cuda")) if autotune == "auto"
                else autotune == "on") and not flash
        compile_blocks(model, autotune_attention=tune)
    if flash:  # untuned, the masks keep the default 128 x 128 tiles, which its Hopper kernels take
        model.flex_backend = "FLASH"
    if mask_block:
        model.flex_mask_block = mask_block
    vocab = model.cfg.vocab_size

    def step() -> None:
        tokens = torch.randint(0, vocab, (batch, seq_len), device="cuda")
        offsets = torch.randint(0, cfg.block_size, (batch,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ar, diff, _ = tidar_losses(model, tokens, cfg.block_size, offsets, mode, flex=True)
        loss = diff if ar is None else (ar + diff) / 2
        (loss / tokens.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def run(mode: str, batch: int, seq_len: int, compile_model: bool, autotune: str, steps: int,
        profile_steps: int, mask_block: int | None = None, attention: str = "triton") -> dict:
    torch._dynamo.reset()  # each variant compiles afresh
    model, step = build(mode, batch, seq_len, compile_model, autotune, mask_block=mask_block,
                        flash=attention == "flash")
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    n = sum(p.numel() for p in model.parameters())
    tok_s = batch * seq_len / sec
    flops_per_token = (6 if mode == "full" else 4) * 2 * n  # doubled rows; frozen: no weight grads
    result = {"mode": mode, "batch": batch, "seq_len": seq_len, "compile": compile_model,
              "autotune_attention": autotune, "mask_block": model.flex_mask_block,
              "attention": attention,
              "step_seconds": sec, "clean_tokens_per_second": tok_s,
              "mfu_vs_989tflops": tok_s * flops_per_token / 989e12,
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
    if profile_steps:
        result["profile"] = profile_cuda(step, profile_steps)
        print(format_profile(result["profile"]), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["frozen-ar", "full"])
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--autotune-attention", choices=["auto", "on", "off"], default="auto",
                    help="autotune flex_attention's tiles (auto: where tidar convert does)")
    ap.add_argument("--mask-block", type=int, choices=[64, 128],
                    help="flex_attention's BlockMask tile (default: as tidar convert picks, 64 "
                    "where the tiles are autotuned; 64 needs them autotuned)")
    ap.add_argument("--attention", nargs="+", choices=["triton", "flash"], default=["triton"],
                    help="flex_attention's kernels, each a variant: its own Triton kernels, or "
                    "FlashAttention-4's (flash-attn-4 installed)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile this many steps: GPU time by kernel, and GPU-busy share")
    args = ap.parse_args()
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for mode, batch, comp, attention in itertools.product(args.modes, args.batch, compiles,
                                                          args.attention):
        torch.cuda.reset_peak_memory_stats()
        try:
            r = run(mode, batch, args.seq_len, comp, args.autotune_attention, args.steps,
                    args.profile, args.mask_block, attention)
        except Exception as exc:  # report and go on: one failing variant must not stop the rest
            r = {"mode": mode, "batch": batch, "compile": comp, "attention": attention,
                 "error": repr(exc)[:300]}
        rows.append(r)
        print({k: v for k, v in r.items() if k != "profile"}, flush=True)
        write_json("train_throughput.json", rows)  # so far: a later variant may time out


if __name__ == "__main__":
    main()
