"""Numerics of the fused linear cross-entropy on the GPU: loss and gradients under bf16
autocast against a float64 reference (SmolLM2 head shape, 5,000 rows: two chunks).

    python benchmarks/ce_numerics.py
"""

from __future__ import annotations

import torch

from tidar.losses import linear_cross_entropy


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> None:
    torch.manual_seed(0)
    for train_weight in (False, True):
        h = torch.randn(5000, 576, device="cuda", requires_grad=True)
        w = (torch.randn(49152, 576, device="cuda") * 0.05).requires_grad_(train_weight)
        y = torch.randint(0, 49152, (5000,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, y)
        loss.backward()
        got = loss.item(), h.grad.clone(), None if w.grad is None else w.grad.clone()
        h.grad = w.grad = None
        ref = torch.nn.functional.cross_entropy(h.double() @ w.double().T, y, reduction="sum")
        ref.backward()
        loss_err = abs(got[0] - ref.item()) / ref.item()
        print(f"train_weight={train_weight}: loss rel err {loss_err:.1e}"
              f", grad hidden rel err {relative(got[1], h.grad):.1e}"
              + (f", grad weight rel err {relative(got[2], w.grad):.1e}" if train_weight else ""))


if __name__ == "__main__":
    main()
