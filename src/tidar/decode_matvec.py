"""Matrix-vector products for the AR step: a Triton kernel with the RMSNorm before it, the
SwiGLU after it and the residual add fused in (GPU only).

With one row per sequence every projection of a block is a matrix-vector product, bound by
latency, not bandwidth: on the H200 inductor's fused reductions took 2.0-6.3 us for weights
that take 0.1-0.7 us to read (``benchmarks/gemv_kernels.py``, docs/results.md section 2).
Here each thread block loads its whole weight tile, ``BLOCK_N`` outputs by every input, in
one go before any arithmetic, then normalises the input itself: the norm's reduction costs
no kernel of its own and does not hold up the weight loads. Importing this module needs
Triton; the CPU keeps the plain layers, and the tests run the kernel in Triton's
interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl

# Rows (sequences) at most: each thread block reuses its tile for every row, in turn. Past 2
# rows decode_matmul's tiles, all rows at once, won: H100 AR step at batch 4, 0.85 -> 0.74 ms;
# at batch 2 the matvec, 0.59 against 0.71 (docs/results.md section 2).
MAX_ROWS = 2
MAX_INPUTS = 8192  # the whole input row is one register tile
FEW_PROGRAMS = 300  # thread blocks under which a tile is spread over 8 warps instead of 4
# Outputs a thread block, and warps (0: by FEW_PROGRAMS), up to 1,024 inputs and past it.
# Under PDL the H200 sweep favoured 8 outputs with 4 warps up to 1,024 inputs, by 0.1-0.2 us
# a call, but the AR step with them was no faster (session 17, pass_latency.py
# --kernel-settings engine NARROW_OUTPUTS=8,NARROW_WARPS=4; docs/results.md section 2).
NARROW_OUTPUTS, NARROW_WARPS = 4, 0
WIDE_OUTPUTS, WIDE_WARPS = 2, 0
DEVICES = ("cuda",)  # the tests add "cpu": Triton's interpreter


@triton.jit
def rms_norm(x, norm_w, K, eps):
    """``x`` (one row) as model.RMSNorm: normalised in float32, rounded, scaled in its dtype."""
    xf = x.to(tl.float32)
    x = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / K + eps)).to(x.dtype)
    return norm_w.to(x.dtype) * x


@triton.jit
def load_tile(W, rows, rows_ok, k, k_ok, stride_w):
    """Rows ``rows`` of ``W`` by inputs ``k``: a ``[len(rows), BLOCK_K]`` tile."""
    return tl.load(W + rows[:, None] * stride_w + k[None, :],
                   mask=rows_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _matvec_kernel(X, NormW, W, Bias, Res, Out, K, N, eps, stride_x, stride_w, stride_res,
                   stride_out, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                   BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """Outputs ``n`` of this program for every row: ``W @ f(x) (+ bias)`` with f the RMSNorm
    (``NORM``) or nothing; with ``SWIGLU`` the weight is gate rows then up rows and the output
    is ``silu(gate) * up``; with ``RESIDUAL`` ``Res`` is added. With ``PDL`` (``tidar.pdl``)
    the parameters load while the kernel before still runs."""
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w = load_tile(W, n, n_ok, k, k_ok, stride_w)
    if SWIGLU:
        w_up = load_tile(W, n + N, n_ok, k, k_ok, stride_w)
    if NORM:
        norm_w = tl.load(NormW + k, mask=k_ok, other=0.0)
    if BIAS:
        bias = tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)
        if SWIGLU:
            bias_up = tl.load(Bias + N + n, mask=n_ok, other=0.0).to(tl.float32)
    if PDL:  # the input and residual are earlier kernels' outputs
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for row in tl.static_range(ROWS):
        x = tl.load(X + row * stride_x + k, mask=k_ok, other=0.0)
        if NORM:
            x = rms_norm(x, norm_w, K, eps)
        x = x.to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * x[None, :], 1)
        if SWIGLU:
            up = tl.sum(w_up.to(tl.float32) * x[None, :], 1)
        if BIAS:
            acc += bias
        if SWIGLU:
            if BIAS:
                up += bias_up
            acc = acc * tl.sigmoid(acc) * up
        if RESIDUAL:
            acc += tl.load(Res + row * stride_res + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_out + n, acc.to(Out.dtype.element_ty), mask=n_ok)


def unit_stride(*tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors with their last dimension contiguous (copied where it is not)."""
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in tensors]


def new_output(x: Tensor, weight: Tensor, swiglu: bool, adapted: int = 0) -> Tensor:
    """A fused projection's output, uninitialised: ``x``'s rows by the weight's outputs (its
    base half's, from row ``adapted`` on the adapted half), halved by SwiGLU."""
    return x.new_empty(x.shape[0], (adapted or weight.shape[0]) // (2 if swiglu else 1))


def fits(x: Tensor, weight: Tensor, devices: tuple[str, ...], max_rows: int,
         max_inputs: int) -> bool:
    """Whether a fused projection kernel takes the rows of ``x`` ``[rows, ...]`` against
    ``weight`` ``[N, K]``: on one of ``devices``, 1 to ``max_rows`` rows, no gradient, at most
    ``max_inputs`` inputs (one register tile), a float dtype shared with the weight."""
    return (x.device.type in devices and 0 < x.shape[0] <= max_rows and not x.requires_grad
            and weight.shape[-1] <= max_inputs and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def supported(x: Tensor, weight: Tensor) -> bool:
    """The matvec takes a few rows (``MAX_ROWS``), on CUDA (``fits``)."""
    return fits(x, weight, DEVICES, MAX_ROWS, MAX_INPUTS)


def plan(outputs: int, inputs: int) -> tuple[int, int]:
    """(outputs per thread block, warps), from the H200 sweeps of ``gemv_kernels.py``: 4
    outputs a block (2 past 1,024 inputs), 8 warps when there are few blocks."""
    narrow = inputs <= 1024
    block_n = NARROW_OUTPUTS if narrow else WIDE_OUTPUTS
    warps = NARROW_WARPS if narrow else WIDE_WARPS
    return block_n, warps or (8 if triton.cdiv(outputs, block_n) <= FEW_PROGRAMS else 4)


@torch.library.custom_op("tidar::decode_matvec", mutates_args=())
def decode_matvec(x: Tensor, weight: Tensor, norm_weight: Tensor | None, bias: Tensor | None,
                  residual: Tensor | None, swiglu: bool, eps: float) -> Tensor:
    """``x`` ``[rows, K]`` times ``weight`` ``[N, K]`` (``[2N, K]``, gate rows then up rows,
    with ``swiglu``), after an RMSNorm with ``norm_weight`` if given, plus ``bias`` and
    ``residual`` ``[rows, N]`` if given. An opaque custom op, as ``decode_attention``: the
    compiled pass calls it as one external kernel."""
    rows, inputs = x.shape
    x, weight, residual = unit_stride(x, weight, residual)
    out = new_output(x, weight, swiglu)
    outputs = out.shape[1]
    block_n, warps = plan(outputs, inputs)
    overlap = pdl.enabled(x)
    _matvec_kernel[(triton.cdiv(outputs, block_n),)](
        x, x if norm_weight is None else norm_weight, weight, x if bias is None else bias,
        x if residual is None else residual, out, inputs, outputs, eps, x.stride(0),
        weight.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(inputs),
        NORM=norm_weight is not None, SWIGLU=swiglu, BIAS=bias is not None,
        RESIDUAL=residual is not None, PDL=overlap, num_warps=warps, launch_pdl=overlap)
    return out


@decode_matvec.register_fake
def _(x, weight, norm_weight, bias, residual, swiglu, eps):
    return new_output(x, weight, swiglu)
