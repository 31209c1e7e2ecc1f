"""The AR step's q/k/v projection with RoPE and the cache writes fused in (GPU only).

In the compiled AR step the q/k/v matvec (``decode_matvec``) is followed by three small
inductor kernels a layer: RoPE for q, RoPE for k with the key's cache write, and the value's
cache write. Each takes about 0.9 us: 82 of the step's 592 us of GPU time in session 17's
H200 profile (docs/results.md section 2). This kernel does their work in the matvec: each
thread block computes pairs of outputs half a head apart, which is what rotating a head's
halves needs, rounds them as the projection's output, rotates the q and k pairs, and stores
q, and k and v at the step's cache slot.

On for one sequence (``MAX_SEQUENCES``): on the H200 (session 18, ``pass_latency.py --ar-only
--kernel-settings engine ENABLED=True``, two rounds in one process) the AR step took 0.49
against 0.55 ms at batch 1, and 0.89-0.90 against 0.87-0.88 ms at batch 4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import decode_matvec, pdl

ENABLED = True
MAX_SEQUENCES = 1  # at 4 the plain path was faster (also with one reduction a row: session 19)
PAIRS = 2  # output pairs a thread block: 4 outputs, as the matvec's plan up to 1,024 inputs


@triton.jit
def _qkv_kernel(X, NormW, W, Bias, Cos, Sin, Slots, Q, KCache, VCache, K, eps, stride_x,
                stride_w, stride_cos, stride_slot, sq_b, sq_h, skc_b, skc_h, skc_s, svc_b,
                svc_h, svc_s, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_K: tl.constexpr, BIAS: tl.constexpr, PDL: tl.constexpr):
    """Output pairs (``lo``, ``lo + HEAD_DIM / 2``) of q, k and v heads for every row (one
    query a sequence): ``W @ rmsnorm(x) (+ bias)``, rounded to the input dtype as the plain
    projection's output, then ``x * cos + rotate_half(x) * sin`` for q and k, in float32
    and rounded once as inductor's kernel did. q goes to ``Q``, k and v to the caches at the
    row's slot. With ``PDL`` the weights load while the kernel before still runs."""
    HALF: tl.constexpr = HEAD_DIM // 2
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < (HEADS + 2 * KV_HEADS) * HALF
    head, j = p // HALF, p % HALF
    lo = head * HEAD_DIM + j
    w_lo = decode_matvec.load_tile(W, lo, p_ok, k, k_ok, stride_w)
    w_hi = decode_matvec.load_tile(W, lo + HALF, p_ok, k, k_ok, stride_w)
    norm_w = tl.load(NormW + k, mask=k_ok, other=0.0)
    if BIAS:
        bias_lo = tl.load(Bias + lo, mask=p_ok, other=0.0).to(tl.float32)
        bias_hi = tl.load(Bias + lo + HALF, mask=p_ok, other=0.0).to(tl.float32)
    if PDL:  # the input, RoPE tables and slots are earlier kernels' outputs
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    is_q = p_ok & (head < HEADS)
    is_k = p_ok & (head >= HEADS) & (head < HEADS + KV_HEADS)
    is_v = p_ok & (head >= HEADS + KV_HEADS)
    kv_head = tl.where(is_k, head - HEADS, tl.maximum(head - HEADS - KV_HEADS, 0))
    for row in tl.static_range(ROWS):
        x = tl.load(X + row * stride_x + k, mask=k_ok, other=0.0)
        x = decode_matvec.rms_norm(x, norm_w, K, eps).to(tl.float32)
        a = tl.sum(w_lo.to(tl.float32) * x[None, :], 1)
        b = tl.sum(w_hi.to(tl.float32) * x[None, :], 1)
        if BIAS:
            a += bias_lo
            b += bias_hi
        a = a.to(X.dtype.element_ty).to(tl.float32)
        b = b.to(X.dtype.element_ty).to(tl.float32)
        cos_lo = tl.load(Cos + row * stride_cos + j, mask=p_ok, other=0.0).to(tl.float32)
        cos_hi = tl.load(Cos + row * stride_cos + j + HALF, mask=p_ok, other=0.0).to(tl.float32)
        sin_lo = tl.load(Sin + row * stride_cos + j, mask=p_ok, other=0.0).to(tl.float32)
        sin_hi = tl.load(Sin + row * stride_cos + j + HALF, mask=p_ok, other=0.0).to(tl.float32)
        rotary = is_q | is_k
        out_lo = tl.where(rotary, a * cos_lo - b * sin_lo, a)
        out_hi = tl.where(rotary, b * cos_hi + a * sin_hi, b)
        q = Q + row * sq_b + head * sq_h + j
        tl.store(q, out_lo.to(Q.dtype.element_ty), mask=is_q)
        tl.store(q + HALF, out_hi.to(Q.dtype.element_ty), mask=is_q)
        slot = tl.load(Slots + row * stride_slot)
        kc = KCache + row * skc_b + kv_head * skc_h + slot * skc_s + j
        tl.store(kc, out_lo.to(KCache.dtype.element_ty), mask=is_k)
        tl.store(kc + HALF, out_hi.to(KCache.dtype.element_ty), mask=is_k)
        vc = VCache + row * svc_b + kv_head * svc_h + slot * svc_s + j
        tl.store(vc, out_lo.to(VCache.dtype.element_ty), mask=is_v)
        tl.store(vc + HALF, out_hi.to(VCache.dtype.element_ty), mask=is_v)


def supported(x: Tensor, weight: Tensor, length: int) -> bool:
    """On (``ENABLED``) for the AR step's rows, one query a sequence, up to ``MAX_SEQUENCES``
    sequences, where the matvec runs."""
    return (ENABLED and length == 1 and x.shape[0] <= MAX_SEQUENCES
            and decode_matvec.supported(x, weight))


@torch.library.custom_op("tidar::decode_qkv", mutates_args=("k_cache", "v_cache"))
def decode_qkv(x: Tensor, weight: Tensor, norm_weight: Tensor, bias: Tensor | None,
               eps: float, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
               slots: Tensor, heads: int) -> Tensor:
    """q ``[B, heads, 1, D]`` of the rows ``x`` ``[B, K]`` (one query a sequence): the
    RMSNorm with ``norm_weight``, ``weight`` ``[(heads + 2 Hkv) D, K]`` (q, k then v rows)
    plus ``bias``, RoPE from ``cos, sin`` ``[B, 1, 1, D]``. k and v are written to
    ``k_cache, v_cache`` ``[B, Hkv, S, D]`` at ``slots`` ``[B, 1]``."""
    rows, inputs = x.shape
    kv_heads, dim = k_cache.shape[1], k_cache.shape[3]
    x, weight = decode_matvec.unit_stride(x, weight)
    q = x.new_empty(rows, heads, 1, dim)
    pairs = (heads + 2 * kv_heads) * dim // 2
    overlap = pdl.enabled(x)
    _qkv_kernel[(triton.cdiv(pairs, PAIRS),)](
        x, norm_weight, weight, x if bias is None else bias, cos, sin, slots, q, k_cache,
        v_cache, inputs, eps, x.stride(0), weight.stride(0), cos.stride(0), slots.stride(0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), HEADS=heads,
        KV_HEADS=kv_heads, HEAD_DIM=dim, ROWS=rows, BLOCK_P=PAIRS,
        BLOCK_K=triton.next_power_of_2(inputs), BIAS=bias is not None, PDL=overlap,
        num_warps=decode_matvec.plan(2 * pairs, inputs)[1], launch_pdl=overlap)
    return q


@decode_qkv.register_fake
def _(x, weight, norm_weight, bias, eps, cos, sin, k_cache, v_cache, slots, heads):
    return x.new_empty(x.shape[0], heads, 1, k_cache.shape[3])
