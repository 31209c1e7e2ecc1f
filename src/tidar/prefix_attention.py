"""Frozen-AR training attention of the mask half through a flash kernel.

In frozen-AR training (DESIGN.md section 2) the mask half attends over a cache that holds
the clean half (slots ``0..L-1``, no gradient) and the mask half itself (slots ``L..2L-1``).
Mask token ``p`` of a block that starts at ``s`` sees the clean keys ``c < s`` and its own
block's mask keys. With ``b`` the block size, ``p - s < b``, so its clean keys split into:

- **far** keys ``c <= p - b``: queries ``b..L-1`` over clean keys ``0..L-b-1``, plain causal
  attention, which the flash kernel behind ``scaled_dot_product_attention`` runs;
- **near** keys ``p - b < c < s``: these lie in the ``b`` clean slots before the block once
  each row is shifted so that its blocks start at multiples of ``b``. With the block's own
  mask keys that is ``2b`` keys per block: a Triton kernel on CUDA
  (``tidar.prefix_kernels``), batched matmuls elsewhere.

The parts are merged by their log-sum-exps (in the near keys' kernel). The backward gives
each part the merged output and log-sum-exp (as split-key attention does), so each computes
its share of the exact gradient; the clean keys get none. On CUDA the far keys' share of the
query gradient comes from a Triton kernel too: the flash backward would also compute the
clean keys' gradients, which nothing uses (2.2x the time on the H200). flex_attention over
the same mask walks tiles of 128 keys with per-score index loads and computes gradients for
the clean keys too (``benchmarks/train_attention.py --layouts frozen`` times both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from . import prefix_kernels
except ImportError:  # no Triton (a CPU-only torch): the batched-matmul path
    prefix_kernels = None


@dataclass
class PrefixBlockMask:
    """The mask half of a training layout over a cache of ``length`` clean slots, then
    ``length`` mask slots; ``shift[r]`` moves row ``r``'s blocks to multiples of ``block``."""

    shift: Tensor  # [B]
    block: int
    length: int

    @classmethod
    def for_offsets(cls, offsets: Tensor, block: int, length: int) -> PrefixBlockMask:
        """The rows of ``training_layout(tokens, block, offsets, ...)``."""
        return cls((block - offsets.reshape(-1)) % block, block, length)


def prefix_block_attention(q: Tensor, k: Tensor, v: Tensor, mask: PrefixBlockMask) -> Tensor:
    """Attention of mask-half queries ``q [B, H, L, D]`` over the cache ``k, v [B, Hkv, S, D]``
    (``S >= 2L``): ``[B, H, L, D]``, as a dense mask of the layout would give."""
    n = mask.length
    return _PrefixBlockAttention.apply(
        q, k[:, :, :n].detach(), v[:, :, :n].detach(), k[:, :, n : 2 * n], v[:, :, n : 2 * n],
        mask.shift, mask.block,
    )


class _Chunks:
    """Each row shifted so that its blocks start at multiples of ``block`` and cut into
    chunks of ``block`` places; a chunk's queries against its ``2 * block`` local keys (the
    clean chunk before it, then its own mask chunk) as batched matmuls over
    ``B * Hkv * chunks`` problems of ``G * block`` queries (``G`` query heads per KV head)."""

    def __init__(self, shift: Tensor, block: int, q: Tensor, kv_heads: int):
        length = q.shape[2]
        self.block, self.kv_heads, self.group = block, kv_heads, q.shape[1] // kv_heads
        self.acc = _accumulation(q.dtype)
        self.low = q.dtype if flash_kernel(q) == "cuda" else None
        self.chunks = -(-(length + block - 1) // block)
        places = torch.arange(self.chunks * block, device=shift.device)
        source = places - shift[:, None]
        self.valid = (source >= 0) & (source < length)  # [B, A]
        self.source = source.clamp(0, length - 1)
        self.place = torch.arange(length, device=shift.device) + shift[:, None]  # [B, L]

    def queries(self, x: Tensor) -> Tensor:
        """``[B, H, L, ...]`` to ``[B * Hkv * chunks, G * block, ...]``."""
        x = _take(x, self.source).unflatten(2, (self.chunks, self.block))
        x = x.unflatten(1, (self.kv_heads, -1)).movedim(2, 3)  # [B, Hkv, chunks, G, block, ...]
        return x.flatten(0, 2).flatten(1, 2)

    def unqueries(self, x: Tensor, batch: int) -> Tensor:
        """The inverse of ``queries``."""
        x = x.unflatten(0, (batch, self.kv_heads, self.chunks)).unflatten(3, (-1, self.block))
        return _take(x.movedim(3, 2).flatten(1, 2).flatten(2, 3), self.place)

    def keys(self, clean: Tensor, own: Tensor) -> Tensor:
        """Clean and mask-half keys (or values) ``[B, Hkv, L, D]`` to each chunk's local ones,
        ``[B * Hkv * chunks, 2 * block, D]``."""
        clean, own = (_take(x, self.source).unflatten(2, (self.chunks, self.block))
                      for x in (clean, own))
        before = F.pad(clean, (0, 0, 0, 0, 1, 0))[:, :, :-1]  # none before chunk 0
        return torch.cat([before, own], dim=3).flatten(0, 2)

    def unkeys(self, x: Tensor, batch: int) -> Tensor:
        """The mask-half part of local keys' gradients, back to ``[B, Hkv, L, D]``."""
        own = x[:, self.block :].unflatten(0, (batch, self.kv_heads, self.chunks))
        return _take(own.flatten(2, 3), self.place)

    def allowed(self) -> Tensor:
        """Which local keys each chunk query sees, ``[B * Hkv * chunks, G * block, 2 * block]``."""
        b = self.block
        valid = self.valid.view(-1, self.chunks, b)
        before = F.pad(valid, (0, 0, 1, 0))[:, :-1]
        after = torch.arange(b, device=valid.device)
        after = after[None, :] > after[:, None]  # clean key j comes after query i's far keys
        clean = before[:, :, None, :] & after
        own = valid[:, :, None, :].expand(-1, -1, b, -1)
        both = torch.cat([clean, own], dim=-1) & valid[:, :, :, None]  # [B, chunks, b, 2b]
        both = both[:, None, :, None].expand(-1, self.kv_heads, -1, self.group, -1, -1)
        return both.flatten(0, 2).flatten(1, 2)

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        """``a @ b`` in float32 (or float64): on CUDA in bf16/fp16 through tensor cores, as
        the flash kernel rounds its operands; elsewhere in the accumulation dtype."""
        if self.low is not None:
            return torch.bmm(a.to(self.low), b.to(self.low), out_dtype=torch.float32)
        return torch.bmm(a.to(self.acc), b.to(self.acc))


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, H, N, ...]`` at ``index [B, M]`` along dim 2, per row."""
    index = index.view(index.shape[0], 1, index.shape[1], *([1] * (x.dim() - 3)))
    return x.gather(2, index.expand(x.shape[0], x.shape[1], -1, *x.shape[3:]))


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention of equal-length ``q, k, v`` (as many heads): output and log-sum-exp,
    from the flash kernel where there is one for the device and dtype."""
    kernel = flash_kernel(q)
    if kernel == "cuda":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, scale=scale)
        return out[0], out[1]
    if kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True,
                                                                          scale=scale)
    scores = _causal_scores(q, k, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v.to(scores.dtype)).to(q.dtype), lse


def _flash_query_grad(grad, q, k, v, out, lse, scale: float) -> Tensor:
    """The query gradient of causal attention, given ``out`` and ``lse`` (those of the whole
    attention this is part of)."""
    kernel = flash_kernel(q)
    if kernel == "cuda":
        # No sequence offsets (the forward returns none for equal-length rows) and no
        # dropout, so no random state.
        length, unused = q.shape[2], torch.empty(0, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, None, None, length, length, 0.0, True, unused, unused,
            scale=scale)[0]
    if kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, True, scale=scale)[0]
    acc = lse.dtype
    probs = torch.exp(_causal_scores(q, k, scale) - lse[..., None])
    grad_probs = grad.to(acc) @ v.to(acc).transpose(-1, -2)
    rowdot = (grad.to(acc) * out.to(acc)).sum(-1, keepdim=True)
    return (probs * (grad_probs - rowdot)) @ k.to(acc) * scale


def flash_kernel(q: Tensor) -> str:
    """``cuda`` or ``cpu`` (the aten flash-attention ops), or ``math`` where neither runs
    (float32 on CUDA)."""
    if q.device.type == "cuda":
        return "cuda" if q.dtype in (torch.float16, torch.bfloat16) else "math"
    return "cpu" if q.device.type == "cpu" else "math"


def _causal_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Where no flash kernel runs (float32 on CUDA): the scores, in the accumulation dtype."""
    acc = _accumulation(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf"))


def near_kernel(q: Tensor, block: int) -> str:
    """``triton`` (``tidar.prefix_kernels``) on CUDA where it supports the shapes, else
    ``torch`` (batched matmuls over copied chunks: the CPU, other block sizes)."""
    if q.device.type == "cuda" and prefix_kernels is not None and \
            prefix_kernels.supported(q, block):
        return "triton"
    return "torch"


class _PrefixBlockAttention(torch.autograd.Function):
    # Under autocast the local matmuls would return bf16 scores; these keep them in float32,
    # as the flash kernel does.
    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, q, k_clean, v_clean, k_own, v_own, shift, block):
        batch, heads, length, dim = q.shape
        if length > block:  # far keys: queries b.. over clean keys ..L-b-1, causal
            out_far, lse_far = _flash(*_far_operands(q, k_clean, v_clean, block), dim**-0.5)
        else:
            out_far = q.new_empty(batch, heads, 0, dim)
            lse_far = q.new_empty(batch, heads, 0, dtype=torch.float32)
        near = (prefix_kernels.near_forward if near_kernel(q, block) == "triton"
                else _near_forward)
        out, lse = near(q, k_clean, v_clean, k_own, v_own, out_far, lse_far.contiguous(),
                        shift, block)
        ctx.save_for_backward(q, k_clean, v_clean, k_own, v_own, shift, out, lse)
        ctx.block = block
        return out

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad):
        q, k_clean, v_clean, k_own, v_own, shift, out, lse = ctx.saved_tensors
        block, length = ctx.block, q.shape[2]
        grad = grad.contiguous()
        triton = near_kernel(q, block) == "triton"
        if length > block and triton:
            grad_q_far = prefix_kernels.far_query_grad(
                grad[:, :, block:], *_far_operands(q, k_clean, v_clean, block, repeat=False),
                out[:, :, block:], lse[:, :, block:])
        elif length > block:
            grad_q_far = _flash_query_grad(
                grad[:, :, block:], *_far_operands(q, k_clean, v_clean, block),
                out[:, :, block:].contiguous(), lse[:, :, block:].contiguous(),
                q.shape[3] ** -0.5)
        else:
            grad_q_far = q.new_empty(*q.shape[:2], 0, q.shape[3])
        near = prefix_kernels.near_backward if triton else _near_backward
        grad_q, grad_k, grad_v = near(grad, q, k_clean, v_clean, k_own, v_own, out, lse,
                                      grad_q_far, shift, block)
        return grad_q, None, None, grad_k, grad_v, None, None


def _near_forward(q, k_clean, v_clean, k_own, v_own, out_far, lse_far, shift, block):
    """``prefix_kernels.near_forward`` in batched matmuls: output and log-sum-exp."""
    chunks = _Chunks(shift, block, q, k_clean.shape[1])
    scale = q.shape[3] ** -0.5
    scores = chunks.matmul(chunks.queries(q), chunks.keys(k_clean, k_own).mT) * scale
    scores = scores.masked_fill(~chunks.allowed(), float("-inf"))
    lse_near = torch.logsumexp(scores, dim=-1)  # -inf for the places past a row's end
    probs = torch.exp(scores - lse_near.masked_fill(lse_near.isinf(), 0)[..., None])
    out_near = chunks.unqueries(chunks.matmul(probs, chunks.keys(v_clean, v_own)), q.shape[0])
    lse_near = chunks.unqueries(lse_near, q.shape[0])
    before = q.shape[2] - out_far.shape[2]  # queries with no far keys
    out_far = F.pad(out_far.to(chunks.acc), (0, 0, before, 0))
    lse_far = F.pad(lse_far.to(chunks.acc), (before, 0), value=float("-inf"))
    lse = torch.logaddexp(lse_far, lse_near)
    out = (torch.exp(lse_far - lse)[..., None] * out_far
           + torch.exp(lse_near - lse)[..., None] * out_near)
    return out.to(q.dtype), lse


def _near_backward(grad, q, k_clean, v_clean, k_own, v_own, out, lse, grad_q_far, shift,
                   block):
    """``prefix_kernels.near_backward`` in batched matmuls, recomputing the scores."""
    batch, scale = q.shape[0], q.shape[3] ** -0.5
    chunks = _Chunks(shift, block, q, k_clean.shape[1])
    q_near, k_near = chunks.queries(q), chunks.keys(k_clean, k_own)
    v_near, grad_near = chunks.keys(v_clean, v_own), chunks.queries(grad)
    rowdot = chunks.queries((grad.to(chunks.acc) * out.to(chunks.acc)).sum(-1))
    scores = chunks.matmul(q_near, k_near.mT) * scale
    probs = torch.exp(scores - chunks.queries(lse)[..., None])
    probs = probs.masked_fill(~chunks.allowed(), 0)
    grad_scores = probs * (chunks.matmul(grad_near, v_near.mT) - rowdot[..., None])
    grad_q = chunks.unqueries(chunks.matmul(grad_scores, k_near) * scale, batch)
    before = q.shape[2] - grad_q_far.shape[2]
    grad_q = grad_q + F.pad(grad_q_far.to(chunks.acc), (0, 0, before, 0))
    grad_k = chunks.unkeys(chunks.matmul(grad_scores.mT, q_near) * scale, batch)
    grad_v = chunks.unkeys(chunks.matmul(probs.mT, grad_near), batch)
    return grad_q.to(q.dtype), grad_k.to(k_own.dtype), grad_v.to(v_own.dtype)


def _far_operands(q: Tensor, k_clean: Tensor, v_clean: Tensor, block: int,
                  repeat: bool = True):
    """Queries ``b..L-1`` and clean keys ``0..L-b-1``, the keys repeated for every query head
    where ``repeat`` asks for it and the consumer needs it (the CUDA flash ops take grouped
    heads, as does ``prefix_kernels.far_query_grad``, which passes ``repeat=False``)."""
    keys = q.shape[2] - block
    k_far, v_far = k_clean[:, :, :keys], v_clean[:, :, :keys]
    group = q.shape[1] // k_clean.shape[1]
    if repeat and flash_kernel(q) != "cuda" and group > 1:
        k_far, v_far = (x.repeat_interleave(group, dim=1) for x in (k_far, v_far))
    return q[:, :, block:], k_far, v_far
