"""Triton kernels for ``tidar.prefix_attention``'s near and own keys (GPU; the tests run them
in Triton's interpreter).

A thread block takes one block-aligned chunk of one row and one KV head: the chunk's
``block`` mask queries for each query head of the group, the ``block`` clean keys before the
chunk and the chunk's own ``block`` mask keys. The forward also merges the far keys' flash
output by log-sum-exp, and the backward adds the far keys' query gradient, so neither needs
another pass over the queries. That gradient comes from ``far_query_grad``: a flash-style
backward of causal attention that computes the queries' gradient alone. Importing this module
needs Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = math.log2(math.e)
# Tiles and launch options per kernel: the fastest of a sweep on the H200 (bf16, batch 128 x
# 512, SmolLM2-135M's heads; docs/results.md section 4, session 21).
LAUNCH = {
    "near_forward": {"num_warps": 1},
    "near_backward": {"num_warps": 1},
    "far_query_grad": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _chunk(Shift, kv_heads, length, BLOCK: tl.constexpr):
    """Thread block (row x KV head, chunk): row ``b``, KV head ``h``, the chunk's tokens ``p``
    (its queries and own keys), the clean tokens ``c`` before it, which of them exist, and
    which near and own keys each query sees."""
    bh, n = tl.program_id(0), tl.program_id(1)
    b, h = (bh // kv_heads).to(tl.int64), bh % kv_heads
    i = tl.arange(0, BLOCK)
    p = n * BLOCK + i - tl.load(Shift + b + 0 * i)  # (a vector load: Triton 3.6's interpreter)
    c = p - BLOCK
    p_ok, c_ok = (p >= 0) & (p < length), c >= 0
    near = (i[None, :] > i[:, None]) & c_ok[None, :] & p_ok[:, None]  # after the far keys
    own = p_ok[None, :] & p_ok[:, None]
    return b, h, p, c, p_ok, c_ok, near, own


@triton.jit
def _near_forward_kernel(
    Q, KC, VC, KO, VO, OutFar, LseFar, Shift, Out, Lse,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sf_b, sf_h, sf_t, slf_b, slf_h,
    so_b, so_h, so_t, sl_b, sl_h, length, kv_heads,
    GROUP: tl.constexpr, qk_scale: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    FP32: tl.constexpr,
):
    """Thread block (row x KV head, chunk): near and own keys, merged with the far ones."""
    b, h, p, c, p_ok, c_ok, near, own = _chunk(Shift, kv_heads, length, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    kv = b * sk_b + h * sk_h
    kc = tl.load(KC + kv + c[None, :] * sk_t + d[:, None], mask=c_ok[None, :], other=0.0)
    ko = tl.load(KO + kv + p[None, :] * sk_t + d[:, None], mask=p_ok[None, :], other=0.0)
    vc = tl.load(VC + kv + c[:, None] * sk_t + d[None, :], mask=c_ok[:, None], other=0.0)
    vo = tl.load(VO + kv + p[:, None] * sk_t + d[None, :], mask=p_ok[:, None], other=0.0)
    far_ok = p_ok & c_ok
    for g in range(GROUP):
        head = h * GROUP + g
        q = tl.load(Q + b * sq_b + head * sq_h + p[:, None] * sq_t + d[None, :],
                    mask=p_ok[:, None], other=0.0)
        s_c = tl.where(near, _dot(q, kc, FP32) * qk_scale, float("-inf"))
        s_o = tl.where(own, _dot(q, ko, FP32) * qk_scale, float("-inf"))
        peak = tl.maximum(tl.max(s_c, 1), tl.max(s_o, 1))
        peak = tl.where(peak == float("-inf"), 0.0, peak)  # places past the row's end
        e_c, e_o = tl.exp2(s_c - peak[:, None]), tl.exp2(s_o - peak[:, None])
        total = tl.sum(e_c, 1) + tl.sum(e_o, 1)
        seen = total > 0
        total = tl.where(seen, total, 1.0)
        out_near = (_dot(e_c, vc, FP32) + _dot(e_o, vo, FP32)) / total[:, None]
        lse_near = tl.where(seen, peak + tl.log2(total), float("-inf"))
        # The far keys: flash's output for query p sits at p - BLOCK, its lse in natural units.
        lse_far = tl.load(LseFar + b * slf_b + head * slf_h + c, mask=far_ok,
                          other=float("-inf")) * 1.4426950408889634
        out_far = tl.load(OutFar + b * sf_b + head * sf_h + c[:, None] * sf_t + d[None, :],
                          mask=far_ok[:, None], other=0.0).to(tl.float32)
        top = tl.maximum(lse_far, lse_near)
        top = tl.where(top == float("-inf"), 0.0, top)
        w_far, w_near = tl.exp2(lse_far - top), tl.exp2(lse_near - top)
        both = tl.where(w_far + w_near > 0, w_far + w_near, 1.0)
        out = (w_far[:, None] * out_far + w_near[:, None] * out_near) / both[:, None]
        tl.store(Out + b * so_b + head * so_h + p[:, None] * so_t + d[None, :],
                 out.to(Out.dtype.element_ty), mask=p_ok[:, None])
        tl.store(Lse + b * sl_b + head * sl_h + p, (top + tl.log2(both)) / 1.4426950408889634,
                 mask=p_ok)


@triton.jit
def _near_backward_kernel(
    Q, KC, VC, KO, VO, Grad, Out, Lse, GradFar, Shift, GradQ, GradK, GradV,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sg_b, sg_h, sg_t, so_b, so_h, so_t, sl_b, sl_h,
    sf_b, sf_h, sf_t, sd_b, sd_h, sd_t, se_b, se_h, se_t, length, kv_heads,
    GROUP: tl.constexpr, sm_scale: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    FP32: tl.constexpr,
):
    """Thread block (row x KV head, chunk): the near and own keys' share of the gradient,
    from the whole attention's output and log-sum-exp; the query gradient adds the far
    keys' share, and the own keys' gradients sum over the group's query heads."""
    b, h, p, c, p_ok, c_ok, near, own = _chunk(Shift, kv_heads, length, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    kv = b * sk_b + h * sk_h
    kc = tl.load(KC + kv + c[:, None] * sk_t + d[None, :], mask=c_ok[:, None], other=0.0)
    ko = tl.load(KO + kv + p[:, None] * sk_t + d[None, :], mask=p_ok[:, None], other=0.0)
    vc = tl.load(VC + kv + c[:, None] * sk_t + d[None, :], mask=c_ok[:, None], other=0.0)
    vo = tl.load(VO + kv + p[:, None] * sk_t + d[None, :], mask=p_ok[:, None], other=0.0)
    grad_k = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    grad_v = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    far_ok = p_ok & c_ok
    qk_scale = sm_scale * 1.4426950408889634
    for g in range(GROUP):
        head = h * GROUP + g
        q = tl.load(Q + b * sq_b + head * sq_h + p[:, None] * sq_t + d[None, :],
                    mask=p_ok[:, None], other=0.0)
        grad = tl.load(Grad + b * sg_b + head * sg_h + p[:, None] * sg_t + d[None, :],
                       mask=p_ok[:, None], other=0.0)
        out = tl.load(Out + b * so_b + head * so_h + p[:, None] * so_t + d[None, :],
                      mask=p_ok[:, None], other=0.0)
        lse = tl.load(Lse + b * sl_b + head * sl_h + p, mask=p_ok, other=0.0)
        lse = lse * 1.4426950408889634
        rowdot = tl.sum(grad.to(tl.float32) * out.to(tl.float32), 1)
        p_c = tl.where(near, tl.exp2(_dot(q, tl.trans(kc), FP32) * qk_scale - lse[:, None]), 0.0)
        p_o = tl.where(own, tl.exp2(_dot(q, tl.trans(ko), FP32) * qk_scale - lse[:, None]), 0.0)
        ds_c = p_c * (_dot(grad, tl.trans(vc), FP32) - rowdot[:, None])
        ds_o = p_o * (_dot(grad, tl.trans(vo), FP32) - rowdot[:, None])
        grad_q = (_dot(ds_c, kc, FP32) + _dot(ds_o, ko, FP32)) * sm_scale
        grad_q += tl.load(GradFar + b * sf_b + head * sf_h + c[:, None] * sf_t + d[None, :],
                          mask=far_ok[:, None], other=0.0).to(tl.float32)
        tl.store(GradQ + b * sd_b + head * sd_h + p[:, None] * sd_t + d[None, :],
                 grad_q.to(GradQ.dtype.element_ty), mask=p_ok[:, None])
        grad_k += _dot(tl.trans(ds_o), q, FP32) * sm_scale
        grad_v += _dot(tl.trans(p_o), grad, FP32)
    kv = b * se_b + h * se_h + p[:, None] * se_t + d[None, :]
    tl.store(GradK + kv, grad_k.to(GradK.dtype.element_ty), mask=p_ok[:, None])
    tl.store(GradV + kv, grad_v.to(GradV.dtype.element_ty), mask=p_ok[:, None])


@triton.jit
def _far_query_grad_kernel(
    Q, K, V, Grad, Out, Lse, GradQ,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sg_b, sg_h, sg_t, so_b, so_h, so_t, sl_b, sl_h,
    sd_b, sd_h, sd_t, length, heads,
    GROUP: tl.constexpr, sm_scale: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, KEY_TILES: tl.constexpr, HEAD_DIM: tl.constexpr,
    FP32: tl.constexpr,
):
    """Thread block (query tile, row x head): the query gradient of causal attention from
    the whole attention's output and log-sum-exp, over key tiles up to the diagonal."""
    m0, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    b, head = (bh // heads).to(tl.int64), bh % heads
    m, d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM)
    m_ok = m < length
    q = tl.load(Q + b * sq_b + head * sq_h + m[:, None] * sq_t + d[None, :],
                mask=m_ok[:, None], other=0.0)
    grad = tl.load(Grad + b * sg_b + head * sg_h + m[:, None] * sg_t + d[None, :],
                   mask=m_ok[:, None], other=0.0)
    out = tl.load(Out + b * so_b + head * so_h + m[:, None] * so_t + d[None, :],
                  mask=m_ok[:, None], other=0.0)
    lse = tl.load(Lse + b * sl_b + head * sl_h + m, mask=m_ok, other=0.0) * 1.4426950408889634
    rowdot = tl.sum(grad.to(tl.float32) * out.to(tl.float32), 1)
    kv = b * sk_b + (head // GROUP) * sk_h
    qk_scale = sm_scale * 1.4426950408889634
    grad_q = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Key tiles up to the diagonal; the loop's bound is a constant because Triton 3.6's
    # interpreter cannot take one computed from the program id.
    for tile in range(KEY_TILES):
        if tile * BLOCK_N < m0 + BLOCK_M:
            n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < length
            k = tl.load(K + kv + n[:, None] * sk_t + d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(V + kv + n[:, None] * sk_t + d[None, :], mask=n_ok[:, None], other=0.0)
            seen = (n[None, :] <= m[:, None]) & n_ok[None, :] & m_ok[:, None]
            scores = _dot(q, tl.trans(k), FP32) * qk_scale
            probs = tl.where(seen, tl.exp2(scores - lse[:, None]), 0.0)
            grad_s = probs * (_dot(grad, tl.trans(v), FP32) - rowdot[:, None])
            grad_q += _dot(grad_s, k, FP32)
    tl.store(GradQ + b * sd_b + head * sd_h + m[:, None] * sd_t + d[None, :],
             (grad_q * sm_scale).to(GradQ.dtype.element_ty), mask=m_ok[:, None])


def supported(q: Tensor, block: int) -> bool:
    """``tl.dot`` tiles: a block of 16 to 64 tokens and a head size of 16 to 256, both
    powers of two."""
    dim = q.shape[-1]
    return 16 <= block <= 64 and block & (block - 1) == 0 and 16 <= dim <= 256 \
        and dim & (dim - 1) == 0


def _grid(q: Tensor, k: Tensor, block: int) -> tuple[int, int]:
    return q.shape[0] * k.shape[1], -(-(q.shape[2] + block - 1) // block)


def _alike(*keys: Tensor) -> tuple[Tensor, ...]:
    """The kernels index keys and values with one set of strides: copies where they differ
    (slices of two caches of one shape share them)."""
    if len({k.stride() for k in keys}) == 1:
        return keys
    return tuple(k.contiguous() for k in keys)


@torch.library.custom_op("tidar::prefix_near_forward", mutates_args=())
def near_forward(q: Tensor, k_clean: Tensor, v_clean: Tensor, k_own: Tensor, v_own: Tensor,
                 out_far: Tensor, lse_far: Tensor, shift: Tensor,
                 block: int) -> tuple[Tensor, Tensor]:
    """The whole attention's output ``[B, H, L, D]`` and natural log-sum-exp ``[B, H, L]``
    (float32), from queries ``q``, the clean and own keys and values ``[B, Hkv, L, D]``, and
    the far keys' flash output and log-sum-exp for queries ``block..``."""
    batch, heads, length, dim = q.shape
    k_clean, v_clean, k_own, v_own = _alike(k_clean, v_clean, k_own, v_own)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(batch, heads, length, dtype=torch.float32)
    _near_forward_kernel[_grid(q, k_clean, block)](
        q, k_clean, v_clean, k_own, v_own, out_far, lse_far, shift, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k_clean.stride(0), k_clean.stride(1),
        k_clean.stride(2), out_far.stride(0), out_far.stride(1), out_far.stride(2),
        lse_far.stride(0), lse_far.stride(1), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), length, k_clean.shape[1], GROUP=heads // k_clean.shape[1],
        qk_scale=dim**-0.5 * LOG2E, BLOCK=block, HEAD_DIM=dim, FP32=q.dtype == torch.float32,
        **LAUNCH["near_forward"])
    return out, lse


@near_forward.register_fake
def _(q, k_clean, v_clean, k_own, v_own, out_far, lse_far, shift, block):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=torch.float32))


@torch.library.custom_op("tidar::prefix_near_backward", mutates_args=())
def near_backward(grad: Tensor, q: Tensor, k_clean: Tensor, v_clean: Tensor, k_own: Tensor,
                  v_own: Tensor, out: Tensor, lse: Tensor, grad_q_far: Tensor, shift: Tensor,
                  block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the queries (the far keys' ``grad_q_far`` for queries ``block..`` added)
    and of the own keys and values."""
    batch, heads, length, dim = q.shape
    k_clean, v_clean, k_own, v_own = _alike(k_clean, v_clean, k_own, v_own)
    grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
    grad_k = torch.empty_like(k_own, memory_format=torch.contiguous_format)
    grad_v = torch.empty_like(v_own, memory_format=torch.contiguous_format)
    _near_backward_kernel[_grid(q, k_clean, block)](
        q, k_clean, v_clean, k_own, v_own, grad, out, lse, grad_q_far, shift, grad_q, grad_k,
        grad_v, q.stride(0), q.stride(1), q.stride(2), k_clean.stride(0), k_clean.stride(1),
        k_clean.stride(2), grad.stride(0), grad.stride(1), grad.stride(2), out.stride(0),
        out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), grad_q_far.stride(0),
        grad_q_far.stride(1), grad_q_far.stride(2), grad_q.stride(0), grad_q.stride(1),
        grad_q.stride(2), grad_k.stride(0), grad_k.stride(1), grad_k.stride(2), length,
        k_clean.shape[1], GROUP=heads // k_clean.shape[1], sm_scale=dim**-0.5, BLOCK=block,
        HEAD_DIM=dim, FP32=q.dtype == torch.float32, **LAUNCH["near_backward"])
    return grad_q, grad_k, grad_v


@near_backward.register_fake
def _(grad, q, k_clean, v_clean, k_own, v_own, out, lse, grad_q_far, shift, block):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format)
                 for x in (q, k_own, v_own))



@torch.library.custom_op("tidar::prefix_far_query_grad", mutates_args=())
def far_query_grad(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                   lse: Tensor) -> Tensor:
    """The query gradient of causal attention of ``q [B, H, N, D]`` over ``k, v [B, Hkv, N,
    D]`` (``H`` a multiple of ``Hkv``), given the output and natural log-sum-exp of the
    attention this is part of. (The flash backward also computes key and value gradients,
    which the clean keys do not need.)"""
    batch, heads, length, dim = q.shape
    k, v = _alike(k, v)
    grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
    launch = LAUNCH["far_query_grad"]
    _far_query_grad_kernel[(-(-length // launch["BLOCK_M"]), batch * heads)](
        q, k, v, grad, out, lse, grad_q, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), grad.stride(0), grad.stride(1), grad.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        grad_q.stride(0), grad_q.stride(1), grad_q.stride(2), length, heads,
        GROUP=heads // k.shape[1], sm_scale=dim**-0.5,
        KEY_TILES=-(-length // launch["BLOCK_N"]), HEAD_DIM=dim,
        FP32=q.dtype == torch.float32, **launch)
    return grad_q


@far_query_grad.register_fake
def _(grad, q, k, v, out, lse):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
