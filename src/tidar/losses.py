"""Summed cross-entropy of a linear output head without keeping ``rows x vocabulary`` logits.

The logits of a doubled training sequence times a 50k-150k vocabulary are the largest tensor
of a training step. ``linear_cross_entropy`` works through the rows in chunks; with autograd
it also computes each chunk's gradients in the forward pass (softmax minus the one-hot label,
times the two operands, as Liger's fused linear cross-entropy does), so no chunk's logits are
kept for backward or recomputed there.
"""

from __future__ import annotations

import torch
from torch import Tensor


def loss_and_grad(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of ``logits [N, V]`` (float32 inside) and its gradient."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss = (lse[:, 0] - z.gather(-1, labels[:, None])[:, 0]).sum()
    probs = torch.exp(z - lse)
    label = torch.arange(z.shape[-1], device=z.device) == labels[:, None]
    return loss, torch.where(label, probs - 1, probs).to(logits.dtype)


_compiled = None


def _loss_and_grad(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """On CUDA compiled: one read of the logits for the log-sum-exp, one for the gradient."""
    global _compiled
    if logits.device.type != "cuda":
        return loss_and_grad(logits, labels)
    if _compiled is None:
        _compiled = torch.compile(loss_and_grad)
    return _compiled(logits, labels)


CHUNK_ROWS = 4096  # rows of logits a chunk of the cross-entropy computes at once


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            loss, grad = _loss_and_grad(h @ weight.T, labels[start : start + chunk])
            total += loss
            if want_hidden:
                grad_hidden[start : start + chunk] = grad @ weight
            if want_weight:
                grad_weight += grad.T @ h
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                         chunk: int = CHUNK_ROWS) -> Tensor:
    """``sum over rows of CE(hidden @ weight.T, labels)``, float32, in chunks of rows.

    Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would.
    """
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start : start + chunk] @ weight.T
        total += torch.nn.functional.cross_entropy(
            logits.float(), labels[start : start + chunk], reduction="sum")
    return total
