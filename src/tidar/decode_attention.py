"""Masked attention over the KV cache for decode passes: a Triton split-KV kernel (GPU only).

A decode pass has few queries over a long cache. A fused attention kernel then gets only a
handful of thread blocks, each walking every key in turn. Here each thread block takes a
tile of query rows (the query heads sharing a KV head are folded into rows, so the cache is
read once per KV head) and one slice of the keys; a second kernel merges the slices by their
log-sum-exp, as flash-decoding does (when one slice covers the cache, the slice kernel
writes the output itself). The visibility rule comes as the dense boolean mask
the engine already builds on the device. Importing this module needs Triton; on the CPU the
model keeps SDPA, and the tests run these kernels in Triton's interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from . import pdl

BLOCK_N = 64  # keys per inner step; a key slice is a whole number of these
NUM_WARPS = 4  # per thread block of the slice kernel
TARGET_PROGRAMS = 264  # about two thread blocks per SM of an H100
MIN_CHUNK = 256  # the shortest key slice plan() makes for rows of several tiles
MANY_ROWS_TILE = 64  # rows per tile past 32 rows
# Rows that fit one tile (the AR step: the query heads of one KV head) have a grid of only
# batch x KV heads x slices, and each thread block waits on its loads in turn: shorter slices,
# merged all at once, pay there (benchmarks/attention_kernels.py --triton-sweep slices).
FEW_ROWS = 16  # the smallest row tile (tl.dot needs 16)
FEW_ROWS_MIN_CHUNK = 64
# ... but not more slices than this: past it the merge costs more than the slices gain (H200,
# 4-8k keys: 22-44 slices a row tile timed best at batch 1 and 4)
FEW_ROWS_MAX_SLICES = 32
FEW_ROWS_MERGE_ALL = True  # False: one slice a merge step, as for many rows
MERGE_ROWS = 16  # rows per merge thread block for many rows: no matmul, so small tiles
MERGE_ELEMENTS = 8192  # partial outputs a merge step may hold (its slices x rows x dim)
MERGE_ALWAYS = False  # benchmarks only: merge even one slice (pass_latency --short-caches old)
# Row tiles a device refused (more shared memory than a thread block may have), by (device,
# dtype, head dim, tile): how much a tile takes depends on the Triton version (its layout of
# the same kernel differed up to 3x between the H100's and the CPU's), so launches find out.
_REFUSED: set[tuple] = set()


def launch_halving(launch, size: int, smallest: int, key, refused: set) -> int | None:
    """``launch(size)`` with the largest tile size from ``size`` down to ``smallest``
    (halving) that the device accepts: Triton raises ``OutOfResources`` (shared memory)
    before it launches anything. Refused sizes go into ``refused`` as ``key(size)`` and are
    skipped later. The size launched, or None where every size was refused."""
    while size >= smallest:
        if key(size) not in refused:
            try:
                launch(size)
                return size
            except OutOfResources:
                refused.add(key(size))
        size //= 2
    return None


@triton.jit
def _slice_kernel(Q, K, V, Mask, Out, Lse, Final,
                  sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_t, sm_s,
                  so_b, so_h, so_s, so_r, sl_b, sl_h, sl_s, sd_b, sd_h, sd_t,
                  length, slots, rows, kv_heads, group, chunk,
                  qk_scale: tl.constexpr,  # 1/sqrt(HEAD_DIM) in log2 units: one per head size
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  FP32: tl.constexpr, ONE_SLICE: tl.constexpr, PDL: tl.constexpr):
    """One (row tile, key slice, sequence x KV head): normalised partial output and its
    log2-sum-exp over the slice's visible keys (-inf where a row sees none of them). With
    ``ONE_SLICE`` the slice is the whole cache: the output goes straight to ``Final``, in
    its dtype and layout, and no merge follows. With ``PDL`` it starts while the kernel
    before it finishes, and waits for it before reading (``tidar.pdl``)."""
    tile, part, seq_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # int64: a large batch of long caches passes 2^31 elements
    b, h = (seq_head // kv_heads).to(tl.int64), seq_head % kv_heads
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    head, t = h * group + r // length, r % length
    d = tl.arange(0, HEAD_DIM)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    q = tl.load(Q + b * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                mask=row_ok[:, None], other=0.0)
    peak = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start = part * chunk
    for n0 in range(start, tl.minimum(start + chunk, slots), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < slots
        k = tl.load(K + b * sk_b + h * sk_h + n[None, :] * sk_s + d[:, None],
                    mask=n_ok[None, :], other=0.0)
        if FP32:
            scores = tl.dot(q, k, input_precision="ieee")
        else:
            scores = tl.dot(q, k)
        seen = tl.load(Mask + b * sm_b + t[:, None] * sm_t + n[None, :] * sm_s,
                       mask=row_ok[:, None] & n_ok[None, :], other=0) != 0
        scores = tl.where(seen, scores * qk_scale, float("-inf"))
        new_peak = tl.maximum(peak, tl.max(scores, 1))
        shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # no -inf - -inf
        p = tl.exp2(scores - shift[:, None])
        scale = tl.exp2(peak - shift)
        total = total * scale + tl.sum(p, 1)
        v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_s + d[None, :],
                    mask=n_ok[:, None], other=0.0)
        if FP32:
            acc = acc * scale[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * scale[:, None] + tl.dot(p.to(v.dtype), v)
        peak = new_peak
    seen_any = total > 0
    out = acc / tl.where(seen_any, total, 1.0)[:, None]
    if ONE_SLICE:
        tl.store(Final + b * sd_b + head[:, None] * sd_h + t[:, None] * sd_t + d[None, :],
                 out.to(Final.dtype.element_ty), mask=row_ok[:, None])
        return
    base = b * so_b + h * so_h + part * so_s
    tl.store(Out + base + r[:, None] * so_r + d[None, :], out, mask=row_ok[:, None])
    lse = tl.where(seen_any, peak + tl.log2(tl.where(seen_any, total, 1.0)), float("-inf"))
    tl.store(Lse + b * sl_b + h * sl_h + part * sl_s + r, lse, mask=row_ok)


@triton.jit
def _merge_kernel(Part, Lse, Out, so_b, so_h, so_s, so_r, sl_b, sl_h, sl_s,
                  sd_b, sd_h, sd_t, length, rows, kv_heads, group, parts,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                  PDL: tl.constexpr):
    """Weight each slice's output by its share of the row's total exp-sum and add them up,
    ``BLOCK_P`` slices a step with a running peak. A step waits for its loads, so a few rows
    take every slice in one step; many rows take one a step (registers)."""
    tile, seq_head = tl.program_id(0), tl.program_id(1)
    b, h = (seq_head // kv_heads).to(tl.int64), seq_head % kv_heads
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    d = tl.arange(0, HEAD_DIM)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    peak = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        i = p0 + tl.arange(0, BLOCK_P)
        ok = (i[:, None] < parts) & row_ok[None, :]
        lse = tl.load(Lse + b * sl_b + h * sl_h + i[:, None] * sl_s + r[None, :], mask=ok,
                      other=float("-inf"))
        part = tl.load(Part + b * so_b + h * so_h + i[:, None, None] * so_s
                       + r[None, :, None] * so_r + d[None, None, :], mask=ok[:, :, None],
                       other=0.0)
        new_peak = tl.maximum(peak, tl.max(lse, 0))
        shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # no -inf - -inf
        scale = tl.exp2(peak - shift)
        weight = tl.exp2(lse - shift[None, :])
        total = total * scale + tl.sum(weight, 0)
        acc = acc * scale[:, None] + tl.sum(weight[:, :, None] * part, 0)
        peak = new_peak
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    head, t = h * group + r // length, r % length
    tl.store(Out + b * sd_b + head[:, None] * sd_h + t[:, None] * sd_t + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def supported(q: Tensor) -> bool:
    """The kernels need a power-of-two head dimension from 16 (``tl.dot`` tiles) to 256 (a
    row tile's accumulator lives in registers)."""
    dim = q.shape[-1]
    return q.dtype in (torch.float32, torch.bfloat16, torch.float16) and 16 <= dim <= 256 \
        and dim & (dim - 1) == 0


def plan(batch: int, kv_heads: int, rows: int, slots: int) -> tuple[int, int]:
    """(rows per tile, keys per slice). Slices halve while the grid has fewer than
    ``TARGET_PROGRAMS`` thread blocks, down to ``MIN_CHUNK`` keys (for one tile of rows
    ``FEW_ROWS_MIN_CHUNK``, or as many keys as ``FEW_ROWS_MAX_SLICES`` slices leave): on the
    H100/H200 more, shorter slices cost more in the merge than they gain in parallelism
    (``benchmarks/attention_kernels.py``)."""
    block_m = FEW_ROWS if rows <= FEW_ROWS else 32 if rows <= 32 else MANY_ROWS_TILE
    shortest = MIN_CHUNK
    if rows <= FEW_ROWS:
        shortest = max(FEW_ROWS_MIN_CHUNK, BLOCK_N * -(-slots // (FEW_ROWS_MAX_SLICES * BLOCK_N)))
    programs = batch * kv_heads * -(-rows // block_m)
    chunk = BLOCK_N * -(-slots // BLOCK_N)
    while chunk > shortest and programs * -(-slots // chunk) < TARGET_PROGRAMS:
        chunk = max(shortest, BLOCK_N * -(-chunk // (2 * BLOCK_N)))
    return block_m, chunk


def merge_plan(rows: int, parts: int, dim: int) -> tuple[int, int]:
    """(rows per merge thread block, slices per merge step)."""
    if rows > FEW_ROWS or not FEW_ROWS_MERGE_ALL:
        return MERGE_ROWS, 1
    block_m = max(2, triton.next_power_of_2(rows))
    return block_m, min(triton.next_power_of_2(parts), max(1, MERGE_ELEMENTS // block_m // dim))


@torch.library.custom_op("tidar::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of ``q`` ``[B, H, T, D]`` over the cache ``k, v`` ``[B, Hkv, S, D]`` where the
    boolean ``mask`` ``[B, 1, T, S]`` is True. Returns ``[B, H, T, D]``, laid out as
    ``[B, T, H, D]`` so that merging the heads afterwards is a view.

    An opaque custom op: compiled blocks call it as an external kernel (inductor 2.11 failed
    to schedule these kernels inlined through ``triton_op`` at some shapes), and the
    engine's CUDA graphs capture its one or two launches. A row tile the device refuses
    (shared memory) halves; where even 16 rows are refused, SDPA computes it."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    batch, heads, length, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows = group * length
    block_m, chunk = plan(batch, kv_heads, rows, slots)
    parts = -(-slots // chunk)
    out = q.new_empty(batch, length, heads, dim).transpose(1, 2)
    part = q.new_empty(batch, kv_heads, parts, rows, dim, dtype=torch.float32)
    lse = q.new_empty(batch, kv_heads, parts, rows, dtype=torch.float32)
    one_slice = parts == 1 and not MERGE_ALWAYS
    overlap = pdl.enabled(q)

    def launch(block_m: int) -> None:
        _slice_kernel[(-(-rows // block_m), parts, batch * kv_heads)](
            q, k, v, mask, part, lse, out,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(2),
            mask.stride(3), part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1),
            out.stride(2), length, slots, rows, kv_heads, group, chunk,
            dim**-0.5 * math.log2(math.e), HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
            FP32=q.dtype == torch.float32, ONE_SLICE=one_slice, PDL=overlap,
            num_warps=NUM_WARPS, launch_pdl=overlap)

    # A row tile the device refuses halves; past FEW_ROWS, SDPA computes it.
    if launch_halving(launch, block_m, FEW_ROWS,
                      lambda block_m: (q.device, q.dtype, dim, block_m), _REFUSED) is None:
        from .model import dense_attention  # the model imports this module

        return out.copy_(dense_attention(q, k, v, mask))
    if one_slice:
        return out
    merge_rows, merge_step = merge_plan(rows, parts, dim)
    _merge_kernel[(-(-rows // merge_rows), batch * kv_heads)](
        part, lse, out, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1),
        out.stride(2), length, rows, kv_heads, group, parts, HEAD_DIM=dim, BLOCK_M=merge_rows,
        BLOCK_P=merge_step, PDL=overlap, launch_pdl=overlap)
    return out


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    batch, heads, length, dim = q.shape
    return q.new_empty(batch, length, heads, dim).transpose(1, 2)
