"""The AR step's routed experts as two Triton kernels (GPU only): the chosen experts'
gate/up with SwiGLU, then their down projections summed with the routing weights and the
residual added.

The grouped-matmul path (``model.Experts``) sorts the rows by expert, counts, gathers, runs
two grouped GEMMs and scatters the result back, a chain of small kernels for one or two rows.
Here each thread block reads the expert ids of its row and loads that expert's weight tile,
as ``decode_matvec`` loads a dense one. On the H100, random weights of OLMoE-1B-7B's shape
took 1.61-1.69 ms an AR step at batch 1 in 236 kernels, against 2.15-2.23 ms in 412 through
the grouped path (session 46, docs/results.md section 2: ``pass_latency.py --shape olmoe-7b
--ar-only --kernel-settings engine MOE_MAX_ROWS=2``). Off (``MOE_MAX_ROWS`` 0) until its
tokens are checked on the GPU: ``gpu_exactness.py --runs eager --families olmoe qwen3_moe
--kernel-settings MOE_MAX_ROWS=1``. Importing this module needs Triton; the tests run it in
Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import decode_matvec
from .decode_matvec import fits, load_tile, plan, unit_stride

MOE_MAX_ROWS = 0  # rows (sequences of one query) at most; 0: the grouped-matmul path always
DEVICES = ("cuda",)  # the tests add "cpu": Triton's interpreter


@triton.jit
def _gate_up_kernel(X, W, Expert, Out, K, N, top_k, stride_x, stride_e, stride_w,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Outputs ``n`` of the SwiGLU of row ``r``'s ``j``-th expert, program (n-tile, r*k+j):
    ``silu(gate @ x) * (up @ x)``, the weight ``[E, 2N, K]`` gate rows then up rows."""
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    slot = tl.program_id(1)  # row * top_k + j
    expert = tl.load(Expert + slot)
    x = tl.load(X + (slot // top_k) * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
    weights = W + expert.to(tl.int64) * stride_e
    gate = tl.sum(load_tile(weights, n, n_ok, k, k_ok, stride_w).to(tl.float32) * x[None, :], 1)
    up = tl.sum(load_tile(weights, n + N, n_ok, k, k_ok, stride_w).to(tl.float32) * x[None, :],
                1)
    tl.store(Out + slot * N + n, (gate * tl.sigmoid(gate) * up).to(Out.dtype.element_ty),
             mask=n_ok)


@triton.jit
def _down_kernel(H, W, Expert, Weight, Res, Out, K, N, stride_e, stride_w, stride_res,
                 stride_out, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Outputs ``n`` of row ``r`` (program (n-tile, r)): the residual plus the routing
    weights times each chosen expert's down projection of its SwiGLU output ``H``."""
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    row = tl.program_id(1)
    acc = tl.load(Res + row * stride_res + n, mask=n_ok, other=0.0).to(tl.float32)
    for j in tl.static_range(TOP_K):
        slot = row * TOP_K + j
        expert = tl.load(Expert + slot)
        h = tl.load(H + slot * K + k, mask=k_ok, other=0.0).to(tl.float32)
        w = load_tile(W + expert.to(tl.int64) * stride_e, n, n_ok, k, k_ok, stride_w)
        w = w.to(tl.float32)
        acc += tl.load(Weight + slot).to(tl.float32) * tl.sum(w * h[None, :], 1)
    tl.store(Out + row * stride_out + n, acc.to(Out.dtype.element_ty), mask=n_ok)


def supported(x: Tensor, gate_up: Tensor, down: Tensor) -> bool:
    """The kernels take 1 to ``MOE_MAX_ROWS`` rows ``x`` ``[rows, D]`` against experts'
    ``gate_up`` ``[E, 2H, D]`` and ``down`` ``[E, D, H]``, on CUDA, each input row one
    register tile as in the matvec (``decode_matvec.fits``, its ``MAX_INPUTS``)."""
    most = decode_matvec.MAX_INPUTS
    return (fits(x, gate_up[0], DEVICES, MOE_MAX_ROWS, most)
            and down.shape[-1] <= most and down.dtype == x.dtype
            and gate_up.stride(-1) == 1 and down.stride(-1) == 1)


@torch.library.custom_op("tidar::decode_moe", mutates_args=())
def decode_moe(x: Tensor, gate_up: Tensor, down: Tensor, expert: Tensor, weight: Tensor,
               residual: Tensor) -> Tensor:
    """``residual + sum_j weight[:, j] * down[e_j] @ swiglu(gate_up[e_j] @ x)`` for the
    (already normalised) rows ``x`` ``[rows, D]`` and their ``top_k`` experts ``expert`` and
    routing weights ``weight`` ``[rows, top_k]``. An opaque custom op, as ``decode_matvec``:
    the compiled pass calls its two kernels as external ones."""
    rows, inputs = x.shape
    top_k = expert.shape[1]
    hidden = down.shape[-1]
    x, residual = unit_stride(x, residual)
    expert, weight = expert.contiguous(), weight.contiguous()
    swiglu = x.new_empty(rows * top_k, hidden)
    block_n, warps = plan(hidden, inputs)
    _gate_up_kernel[(triton.cdiv(hidden, block_n), rows * top_k)](
        x, gate_up, expert, swiglu, inputs, hidden, top_k, x.stride(0), gate_up.stride(0),
        gate_up.stride(1), BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(inputs),
        num_warps=warps)
    out = x.new_empty(rows, inputs)
    block_n, warps = plan(inputs, hidden)
    _down_kernel[(triton.cdiv(inputs, block_n), rows)](
        swiglu, down, expert, weight, residual, out, hidden, inputs, down.stride(0),
        down.stride(1), residual.stride(0), out.stride(0), TOP_K=top_k, BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(hidden), num_warps=warps)
    return out


@decode_moe.register_fake
def _(x, gate_up, down, expert, weight, residual):
    return x.new_empty(x.shape)
