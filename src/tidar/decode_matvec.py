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

from . import decode_attention, pdl

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
# The AR step's output projection merges its attention's key slices itself
# (``decode_attention_out``), one kernel a layer fewer. Off until timed on a GPU (session 30
# built it and had no machine to time it on: docs/results.md section 5).
FOLD_MERGE = False
# Partial outputs a thread block holds while it merges the key slices into its input
# (``merged_heads``): the slices a merge step takes.
MERGED_INPUT_ELEMENTS = 16384


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
def merged_heads(Part, Lse, stride_part, stride_lse, parts, K, HEADS: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr):
    """One query's attention output over all its heads, merged from its key slices as
    ``decode_attention``'s merge kernel does (``BLOCK_P`` slices a step, a running peak):
    slice ``p``'s partial outputs are the ``K`` contiguous values at ``Part + p *
    stride_part``, head by head, and its log2-sum-exps the heads' values at ``Lse + p *
    stride_lse``. Returns the ``HEADS * HEAD_DIM`` inputs of the output projection (zero past
    ``K``), in float32."""
    head = tl.arange(0, HEADS)
    d = tl.arange(0, HEAD_DIM)
    head_ok = head * HEAD_DIM < K
    peak = tl.full([HEADS], float("-inf"), tl.float32)
    total = tl.zeros([HEADS], tl.float32)
    acc = tl.zeros([HEADS, HEAD_DIM], tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p[:, None] < parts) & head_ok[None, :]
        lse = tl.load(Lse + p[:, None] * stride_lse + head[None, :], mask=ok,
                      other=float("-inf"))
        part = tl.load(Part + p[:, None, None] * stride_part + head[None, :, None] * HEAD_DIM
                       + d[None, None, :], mask=ok[:, :, None], other=0.0)
        peak, total, acc = decode_attention.merge_step(peak, total, acc, lse, part)
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    return tl.reshape(out, [HEADS * HEAD_DIM])


@triton.jit
def _matvec_kernel(X, NormW, W, Bias, Res, Out, Part, Lse, K, N, eps, stride_x, stride_w,
                   stride_res, stride_out, stride_part_row, stride_part, stride_lse_row,
                   stride_lse, parts, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                   BIAS: tl.constexpr, RESIDUAL: tl.constexpr, MERGE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """Outputs ``n`` of this program for every row: ``W @ f(x) (+ bias)`` with f the RMSNorm
    (``NORM``) or nothing; with ``SWIGLU`` the weight is gate rows then up rows and the output
    is ``silu(gate) * up``; with ``RESIDUAL`` ``Res`` is added. With ``MERGE`` a row's input
    is its attention's key slices (``Part``, ``Lse``), merged here (``merged_heads``) and
    rounded to the weight's dtype, as the merge kernel's output would be. With ``PDL``
    (``tidar.pdl``) the parameters load while the kernel before still runs."""
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
        if MERGE:
            x = merged_heads(Part + row * stride_part_row, Lse + row * stride_lse_row,
                             stride_part, stride_lse, parts, K, BLOCK_K // HEAD_DIM, HEAD_DIM,
                             BLOCK_P).to(W.dtype.element_ty)
        else:
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


def launch(x: Tensor, weight: Tensor, norm_weight: Tensor | None, bias: Tensor | None,
           residual: Tensor | None, swiglu: bool, eps: float,
           slices: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``decode_matvec``'s kernel. With ``slices`` (partial outputs ``[rows, parts, K]`` and
    log2-sum-exps ``[rows, parts, heads]``, each of a slice's heads contiguous) the kernel
    merges a row's input from them; ``x`` then gives only its shape and dtype."""
    rows, inputs = x.shape
    x, weight, residual = unit_stride(x, weight, residual)
    out = new_output(x, weight, swiglu)
    outputs = out.shape[1]
    block_n, warps = plan(outputs, inputs)
    overlap = pdl.enabled(x)
    part, lse = slices or (x, x)
    parts = part.shape[1] if slices else 1
    head_dim = inputs // lse.shape[2] if slices else 1
    block_k = triton.next_power_of_2(inputs)
    _matvec_kernel[(triton.cdiv(outputs, block_n),)](
        x, x if norm_weight is None else norm_weight, weight, x if bias is None else bias,
        x if residual is None else residual, out, part, lse, inputs, outputs, eps, x.stride(0),
        weight.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
        part.stride(0), part.stride(1), lse.stride(0), lse.stride(1), parts,
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm_weight is not None,
        SWIGLU=swiglu, BIAS=bias is not None, RESIDUAL=residual is not None,
        MERGE=slices is not None, HEAD_DIM=head_dim,
        BLOCK_P=min(triton.next_power_of_2(parts), max(1, MERGED_INPUT_ELEMENTS // block_k)),
        PDL=overlap, num_warps=warps, launch_pdl=overlap)
    return out


@torch.library.custom_op("tidar::decode_matvec", mutates_args=())
def decode_matvec(x: Tensor, weight: Tensor, norm_weight: Tensor | None, bias: Tensor | None,
                  residual: Tensor | None, swiglu: bool, eps: float) -> Tensor:
    """``x`` ``[rows, K]`` times ``weight`` ``[N, K]`` (``[2N, K]``, gate rows then up rows,
    with ``swiglu``), after an RMSNorm with ``norm_weight`` if given, plus ``bias`` and
    ``residual`` ``[rows, N]`` if given. An opaque custom op, as ``decode_attention``: the
    compiled pass calls it as one external kernel."""
    return launch(x, weight, norm_weight, bias, residual, swiglu, eps)


@decode_matvec.register_fake
def _(x, weight, norm_weight, bias, residual, swiglu, eps):
    return new_output(x, weight, swiglu)


def folds_merge(q: Tensor, weight: Tensor) -> bool:
    """Whether ``decode_attention_out`` takes attention ``q`` with output projection
    ``weight``: one query a sequence (the AR step), as many sequences as the matvec takes
    rows."""
    batch, heads, length, dim = q.shape
    return (FOLD_MERGE and length == 1 and weight.shape[-1] == heads * dim
            and decode_attention.supported(q) and supported(q.flatten(1), weight))


@torch.library.custom_op("tidar::decode_attention_out", mutates_args=())
def decode_attention_out(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, weight: Tensor,
                         bias: Tensor | None, residual: Tensor) -> Tensor:
    """``residual + weight @ heads (+ bias)`` where ``heads`` is ``decode_attention(q, k, v,
    mask)`` for one query a sequence, its heads side by side (``folds_merge``), and
    ``residual`` is ``[B, N]``. The matvec merges the key slices itself (``merged_heads``):
    two kernels where the separate ops launch three."""
    q, k, v = unit_stride(q, k, v)
    out = decode_attention.new_output(q)
    slices = decode_attention.launch_slices(q, k, v, mask, out, slices_outer=True)
    if slices is None:  # the device refused the attention's tiles
        from .model import dense_attention  # the model imports this module

        out.copy_(dense_attention(q, k, v, mask))
    batch = q.shape[0]
    if slices:  # [B, Hkv, parts, group, D] views of slice-major buffers
        part, lse = (x.transpose(1, 2) for x in slices)
        slices = (part.reshape(batch, part.shape[1], -1), lse.reshape(batch, lse.shape[1], -1))
    return launch(out.transpose(1, 2).reshape(batch, -1), weight, None, bias, residual, False,
                  0.0, slices or None)


@decode_attention_out.register_fake
def _(q, k, v, mask, weight, bias, residual):
    return q.new_empty(q.shape[0], weight.shape[0])
