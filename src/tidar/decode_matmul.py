"""Matmuls for drafting passes: ``decode_matvec``'s fusions for tens to hundreds of rows, as a
Triton kernel on tensor cores (GPU only), for passes of at most ``MAX_PASS_ROWS`` rows, and
in wider tiles some projections of passes up to ``MAX_WIDE_ROWS`` rows (``wide``).

A drafting pass at small batch has 32-272 rows a sequence, still far too few for a GEMM to be
compute-bound: its projections ran as cuBLAS GEMMs of 3-4 us with the RMSNorm, the mask rows'
half of the stacked adapter weights, SwiGLU and the residual add as kernels of their own
(docs/results.md section 2). Here a thread block takes ``OUTPUTS_PER_BLOCK`` outputs by the
whole input width for one tile of rows of one sequence, all clean or all mask rows, so that
it reads the base or the adapted weights, not both (without mask rows, a tile takes rows of
several sequences: the AR step of 5-96 sequences). It loads that weight tile before it
waits for the kernel before it (``tidar.pdl``), then normalises its rows and multiplies with
``tl.dot``, and fuses what ``decode_matvec`` fuses. Importing this module needs Triton; the
tests run the kernel in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .decode_attention import launch_halving
from .decode_matvec import fits, new_output, unit_stride

# Rows a pass (all sequences) at most. On the H200 a pass of 32 rows took 0.91 ms against
# 1.19 on the plain path, one of 80 rows 1.02 against 1.26; 128 rows (batch 4) timed the
# same, 272 rows 1.97 against 1.42 (docs/results.md section 2).
MAX_PASS_ROWS = 96
MAX_WIDTH = 4096  # inputs at most: the whole input row is one tile
# A thread block's tile: 16 rows x 32 outputs with 4 warps (8 past 1,024 inputs) compiles
# for sm_90 without register spills at SmolLM2's shapes; 32 x 32, and 16 x 16 for gate/up,
# do not (benchmarks/kernel_resources.py).
ROWS_PER_BLOCK = 16  # tl.dot needs 16
OUTPUTS_PER_BLOCK = 32
WARPS = 4  # twice as many past 1,024 inputs
# Past MAX_PASS_ROWS the small tile reads each weight tile once per 16 rows and loses to
# cuBLAS; wide tiles of 64 outputs win it back up to MAX_WIDE_ROWS rows. q/k/v (16 rows,
# normalised in the tile) and o (32 rows), at most WIDE_MAX_INPUTS inputs, take them at every
# such row count (session 34). Gate/up (64 rows at 4 warps) and down take them only up to a
# bound, past which they lose or tie: for one sequence's pass WIDE_MLP_MAX_ROWS_ONE_SEQUENCE
# (288: the 272-query pass 8-9% faster over a drafter's stacked weights, 1-1.5% over plain
# ones); for several, WIDE_MLP_MAX_ROWS over plain weights (192: batch 4's 192-row pass 8%
# faster) and WIDE_STACKED_MLP_MAX_ROWS over stacked ones (160: 4% slower at 192 rows, 3% at
# 288). Each sequence's rows take whole tiles, so several sequences make more, part-empty
# ones; that this is why was not measured. All timed on the H100 at SmolLM2's 576 and 1,536
# inputs (sessions 34-42, docs/results.md section 2).
MAX_WIDE_ROWS = 288
WIDE_MAX_INPUTS = 1024
WIDE_MLP_MAX_ROWS_ONE_SEQUENCE = 288
WIDE_MLP_MAX_ROWS = 192
WIDE_STACKED_MLP_MAX_ROWS = 160
WIDE_NORMED_ROWS = 16
WIDE_ROWS = 32
WIDE_SWIGLU_ROWS = 64
WIDE_SWIGLU_WARPS = 4
WIDE_OUTPUTS = 64  # halved where the device refuses the thread block (shared memory)
# Wide tiles a device refused (more shared memory than a thread block may have), by (device,
# dtype, inputs, SwiGLU, tile): the count depends on the Triton version (the H100's gave
# float32 gate/up 2.9x the CPU's Triton 3.9), so launches find out (launch_halving).
_REFUSED: set[tuple] = set()
DEVICES = ("cuda",)  # the tests add "cpu": Triton's interpreter


@triton.jit
def _weights(W, first, n, n_ok, stride_w, k0, K, BLOCK: tl.constexpr):
    """Weight rows ``first + n`` by inputs ``k0`` to ``k0 + BLOCK`` (zero past ``K``)."""
    k = k0 + tl.arange(0, BLOCK)
    return tl.load(W + (first + n[:, None]) * stride_w + k[None, :],
                   mask=n_ok[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _inputs(X, rows, row_ok, stride_x, k0, K, BLOCK: tl.constexpr):
    k = k0 + tl.arange(0, BLOCK)
    return tl.load(X + rows[:, None] * stride_x + k[None, :],
                   mask=row_ok[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _normed(x, norm_w, scale):
    """As model.RMSNorm: normalise in float32, round, scale in the input dtype."""
    x = (x.to(tl.float32) * scale[:, None]).to(x.dtype)
    return norm_w.to(x.dtype)[None, :] * x


@triton.jit
def _dot(x, w, FP32: tl.constexpr):
    if FP32:
        return tl.dot(x, tl.trans(w), input_precision="ieee")
    return tl.dot(x, tl.trans(w))


@triton.jit
def _matmul_kernel(X, NormW, W, Bias, Res, Out, K, N, eps, length, start, adapted,
                   stride_x, stride_w, stride_res, stride_out,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                   BIAS: tl.constexpr, RESIDUAL: tl.constexpr, FP32: tl.constexpr,
                   PDL: tl.constexpr):
    """Outputs ``n`` of this program for one tile of rows: ``W @ f(x) (+ bias)`` as
    ``decode_matvec``'s kernel. Rows are ``length`` a sequence; those from ``start`` on
    (mask rows) read the weight rows from ``adapted`` on (the stacked adapted half). The
    inputs come as two tiles, ``BLOCK_K`` then ``BLOCK_R`` wide (0: none), so that a width
    such as 576 pads to 512 + 64, not to 1024 (registers)."""
    clean_tiles = tl.cdiv(start, BLOCK_M)
    tiles = clean_tiles + tl.cdiv(length - start, BLOCK_M)
    seq, tile = tl.program_id(1) // tiles, tl.program_id(1) % tiles
    masked = tile >= clean_tiles
    first = tl.where(masked, start + (tile - clean_tiles) * BLOCK_M, tile * BLOCK_M)
    t = first + tl.arange(0, BLOCK_M)
    row_ok = t < tl.where(masked, length, start)
    rows = (seq * length + t).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    offset = tl.where(masked, adapted, 0)  # first weight row of this tile's half
    w = _weights(W, offset, n, n_ok, stride_w, 0, K, BLOCK_K)
    if BLOCK_R:
        w_rest = _weights(W, offset, n, n_ok, stride_w, BLOCK_K, K, BLOCK_R)
    if SWIGLU:
        w_up = _weights(W, offset + N, n, n_ok, stride_w, 0, K, BLOCK_K)
        if BLOCK_R:
            w_up_rest = _weights(W, offset + N, n, n_ok, stride_w, BLOCK_K, K, BLOCK_R)
    if NORM:
        k_main = tl.arange(0, BLOCK_K)
        norm_w = tl.load(NormW + k_main, mask=k_main < K, other=0.0)
        if BLOCK_R:
            k_rest = BLOCK_K + tl.arange(0, BLOCK_R)
            norm_w_rest = tl.load(NormW + k_rest, mask=k_rest < K, other=0.0)
    if BIAS:
        bias = tl.load(Bias + offset + n, mask=n_ok, other=0.0).to(tl.float32)
        if SWIGLU:
            bias_up = tl.load(Bias + offset + N + n, mask=n_ok, other=0.0).to(tl.float32)
    if PDL:  # the input and residual are earlier kernels' outputs
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = _inputs(X, rows, row_ok, stride_x, 0, K, BLOCK_K)
    if BLOCK_R:
        x_rest = _inputs(X, rows, row_ok, stride_x, BLOCK_K, K, BLOCK_R)
    if NORM:
        squares = tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
        if BLOCK_R:
            squares += tl.sum(x_rest.to(tl.float32) * x_rest.to(tl.float32), 1)
        scale = tl.rsqrt(squares / K + eps)
        x = _normed(x, norm_w, scale)
        if BLOCK_R:
            x_rest = _normed(x_rest, norm_w_rest, scale)
    acc = _dot(x, w, FP32)
    if BLOCK_R:
        acc += _dot(x_rest, w_rest, FP32)
    if BIAS:
        acc += bias[None, :]
    if SWIGLU:
        up = _dot(x, w_up, FP32)
        if BLOCK_R:
            up += _dot(x_rest, w_up_rest, FP32)
        if BIAS:
            up += bias_up[None, :]
        acc = acc * tl.sigmoid(acc) * up
    out_ok = row_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        acc += tl.load(Res + rows[:, None] * stride_res + n[None, :], mask=out_ok,
                       other=0.0).to(tl.float32)
    tl.store(Out + rows[:, None] * stride_out + n[None, :], acc.to(Out.dtype.element_ty),
             mask=out_ok)


def widths(inputs: int) -> tuple[int, int]:
    """The two input tiles: the largest power of two within ``inputs``, then the rest
    padded to a power of two (at least 16, for ``tl.dot``), or 0."""
    main = max(16, 1 << (inputs.bit_length() - 1))
    rest = inputs - main
    return main, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


def shared_bytes(inputs: int, swiglu: bool, itemsize: int,
                 outputs: int = OUTPUTS_PER_BLOCK) -> int:
    """Shared memory a thread block of ``outputs`` takes: twice its weight tiles (gate and up
    with SwiGLU), as Triton lays them out for ``tl.dot`` (the count matches the 294,912 bytes
    the H100 reported for SmolLM2's gate/up in float32)."""
    main, rest = widths(inputs)
    return 2 * outputs * (main + rest) * (2 if swiglu else 1) * itemsize


def wide(rows: int, inputs: int, swiglu: bool, stacked: bool, sequences: int) -> bool:
    """Whether a projection of a pass of ``rows`` rows of ``sequences`` sequences takes the
    wide tile (``stacked``: its mask rows read the adapted half of stacked weights)."""
    if rows <= MAX_PASS_ROWS or rows > MAX_WIDE_ROWS:
        return False
    if sequences == 1:
        mlp_rows = WIDE_MLP_MAX_ROWS_ONE_SEQUENCE
    elif stacked:
        mlp_rows = WIDE_STACKED_MLP_MAX_ROWS
    else:
        mlp_rows = WIDE_MLP_MAX_ROWS
    return rows <= mlp_rows or (not swiglu and inputs <= WIDE_MAX_INPUTS)


def small_tile(inputs: int) -> tuple[int, int, int]:
    """(rows, outputs, warps) of the small tile: warps double past 1,024 inputs."""
    return ROWS_PER_BLOCK, OUTPUTS_PER_BLOCK, WARPS if inputs <= 1024 else 2 * WARPS


def tile(rows: int, inputs: int, swiglu: bool, norm: bool, stacked: bool,
         sequences: int) -> tuple[int, int, int]:
    """(rows, outputs, warps) of a thread block: the wide tile where ``wide`` says so, else
    the small tile (gate/up's wide tile has its own warps)."""
    small = small_tile(inputs)
    if not wide(rows, inputs, swiglu, stacked, sequences):
        return small
    if swiglu:
        return WIDE_SWIGLU_ROWS, WIDE_OUTPUTS, WIDE_SWIGLU_WARPS
    return WIDE_NORMED_ROWS if norm else WIDE_ROWS, WIDE_OUTPUTS, small[2]


def supported(x: Tensor, weight: Tensor, swiglu: bool, stacked: bool, sequences: int) -> bool:
    """The matmul takes passes of at most ``MAX_PASS_ROWS`` rows (``MAX_WIDE_ROWS`` where
    the wide tile is taken) and ``MAX_WIDTH`` inputs, on CUDA (``decode_matvec.fits``),
    whose small tile fits the GPU's shared memory by ``shared_bytes`` (SmolLM2's gate/up
    and down do not in float32; Triton's interpreter has no such limit). A wider tile the
    device refuses halves its outputs, then gives way to the small tile."""
    inputs = weight.shape[-1]
    taken = wide(x.shape[0], inputs, swiglu, stacked, sequences)
    most = MAX_WIDE_ROWS if taken else MAX_PASS_ROWS
    if not fits(x, weight, DEVICES, most, MAX_WIDTH):
        return False
    if x.device.type != "cuda":
        return True
    limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    return shared_bytes(inputs, swiglu, x.element_size()) <= limit


@torch.library.custom_op("tidar::decode_matmul", mutates_args=())
def decode_matmul(x: Tensor, weight: Tensor, norm_weight: Tensor | None, bias: Tensor | None,
                  residual: Tensor | None, swiglu: bool, eps: float, length: int, start: int,
                  adapted: int) -> Tensor:
    """``x`` ``[rows, K]``, sequences of ``length`` rows, times ``weight`` as
    ``decode_matvec`` does, except that rows from ``start`` on in each sequence read the
    weight (and bias) rows from ``adapted`` on. Without mask rows ``start`` is ``length``
    (``adapted`` then goes unread). An opaque custom op, as ``decode_matvec``."""
    rows, inputs = x.shape
    stacked, sequences = start < length, rows // length
    if not stacked:  # every row reads the base half: tile all sequences' rows together,
        length = start = rows  # not one tile a sequence (the AR step of 5-96 sequences)
    x, weight, residual = unit_stride(x, weight, residual)
    out = new_output(x, weight, swiglu, adapted)
    outputs = out.shape[1]
    main, rest = widths(inputs)
    block_m, block_n, warps = tile(rows, inputs, swiglu, norm_weight is not None, stacked,
                                   sequences)
    small = small_tile(inputs)
    overlap = pdl.enabled(x)

    def launch(block_m: int, block_n: int, warps: int) -> None:
        tiles = -(-start // block_m) + -(-(length - start) // block_m)
        _matmul_kernel[(triton.cdiv(outputs, block_n), rows // length * tiles)](
            x, x if norm_weight is None else norm_weight, weight, x if bias is None else bias,
            x if residual is None else residual, out, inputs, outputs, eps, length, start,
            adapted, x.stride(0), weight.stride(0),
            0 if residual is None else residual.stride(0), out.stride(0), BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=main, BLOCK_R=rest, NORM=norm_weight is not None,
            SWIGLU=swiglu, BIAS=bias is not None, RESIDUAL=residual is not None,
            FP32=x.dtype == torch.float32, PDL=overlap, num_warps=warps, launch_pdl=overlap)

    # A wide tile the device refuses halves its outputs, then gives way to the small tile.
    # The small tile is launched as it is (``supported`` checked it): a refusal there is an
    # error.
    if (block_m, block_n, warps) == small or launch_halving(
            lambda block_n: launch(block_m, block_n, warps), block_n, OUTPUTS_PER_BLOCK,
            lambda block_n: (x.device, x.dtype, inputs, swiglu, block_m, block_n, warps),
            _REFUSED) is None:
        launch(*small)
    return out


@decode_matmul.register_fake
def _(x, weight, norm_weight, bias, residual, swiglu, eps, length, start, adapted):
    return new_output(x, weight, swiglu, adapted)
