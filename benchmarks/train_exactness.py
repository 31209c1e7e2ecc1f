"""Frozen-AR's training step on the GPU, as ``tidar convert`` runs it, against float32.

    python benchmarks/train_exactness.py [--batch 8] [--seq-len 512]

Frozen-AR's mask pass runs the adapted projections whose output is at least as wide as their
input as one matmul with a backward of its own (``tidar.model._AdaptedLinear``). This takes
one step of the objective on the SmolLM2-135M shape (random weights and tokens, adapters with
random ``B`` so every adapter has a gradient) three times: compiled blocks, bf16 autocast and
bf16 frozen weights with that Function (``own backward``) and with the same arithmetic
through plain autograd (``plain autograd``), and float32 eager with plain autograd (the
reference). It reports each one's relative error against the reference: the diffusion loss,
and the gradient of every trained parameter (largest ``|g - g_ref| / |g_ref|``, norms).
The own backward should be no further from float32 than plain autograd is.
"""

from __future__ import annotations

import argparse

import torch
from common import smollm2_shaped, write_json

import tidar.model
from tidar.train import TrainConfig, compile_blocks, frozen_to, prepare, tidar_losses

OWN_BACKWARD = tidar.model._AdaptedLinear


class PlainAutograd:
    """``_AdaptedLinear``'s arithmetic through autograd, with no Function of its own."""

    @staticmethod
    def apply(x, weight, bias, lora_A, lora_B):
        F = torch.nn.functional
        return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B)


def step(batch: int, seq_len: int, fast: bool, function) -> tuple[float, dict]:
    """The diffusion loss and the trained parameters' gradients of one step."""
    tidar.model._AdaptedLinear = function
    torch._dynamo.reset()
    model = smollm2_shaped(device="cpu", dtype=torch.float32, seed=0)
    cfg = TrainConfig(out="", data=["-"], mode="frozen-ar", seq_len=seq_len,
                      batch_size=batch, lora_rank=64, lora_alpha=128)
    named = prepare(model, cfg)  # seeded above: the same adapters each time
    with torch.no_grad():
        for name, p in named:
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    if fast:
        frozen_to(model, torch.bfloat16)
    model.cuda().train()
    if fast:
        compile_blocks(model)
    gen = torch.Generator(device="cuda").manual_seed(2)
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len), device="cuda", generator=gen)
    offsets = torch.randint(0, cfg.block_size, (batch,), device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast):
        _, diff, _ = tidar_losses(model, tokens, cfg.block_size, offsets, "frozen-ar",
                                  flex=True)
    (diff / tokens.numel()).backward()
    return diff.item(), {name: p.grad.float().clone() for name, p in named}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    ref_loss, ref_grads = step(args.batch, args.seq_len, False, PlainAutograd)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "batch": args.batch, "seq_len": args.seq_len, "reference_loss": ref_loss}
    for label, function in [("own backward", OWN_BACKWARD), ("plain autograd", PlainAutograd)]:
        loss, grads = step(args.batch, args.seq_len, True, function)
        errors = {name: ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item()
                  for name, g in grads.items()}
        worst = max(errors, key=errors.get)
        result[label] = {"loss": loss, "loss_rel_error": abs(loss - ref_loss) / abs(ref_loss),
                         "grad_rel_error_max": errors[worst], "worst": worst,
                         "grad_rel_error_median": sorted(errors.values())[len(errors) // 2]}
        print(label, result[label], flush=True)
    tidar.model._AdaptedLinear = OWN_BACKWARD
    write_json("train_exactness.json", result)


if __name__ == "__main__":
    main()
