"""Experiment (not in the engine yet): multi-query decode passes with their RMSNorms, SiLU and
residual adds fused into Triton matmuls.

In the AR step inductor turns each one-row matmul into a reduction fused with the RMSNorm
before it and the SiLU after it. A pass of 16-272 query rows gets cuBLAS GEMMs with the norms,
SiLU and adds as kernels of their own (docs/results.md section 2), and the step from 1 to 32
queries is most of a drafting pass's extra cost. Here each block of such a pass runs as four
matmuls:

- q/k/v with the input RMSNorm applied to the rows as they are loaded;
- o with the residual add in its epilogue;
- gate/up with the post-attention RMSNorm on load and ``silu(gate) * up`` in its epilogue;
- down with the residual add in its epilogue.

``fused_blocks()`` patches ``Block.forward`` for passes of more than one query per row on
decode weights without mask-row adapters; ``pass_latency.py --norm-matmul off triton`` times
it against the engine's path. The rounding follows the model's (normalise in float32,
round, scale in the weights' dtype; matmul outputs rounded before SiLU and the adds); the
accumulation order is the kernel's own. Not measured on a GPU yet.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M, BLOCK_K = 32, 64
MIN_PROGRAMS = 96  # about one thread block per SM of an H100: narrower output tiles below it


def output_tile(rows: int, n_out: int) -> int:
    """Columns per thread block: the widest of 64, 32, 16 that still gives ``MIN_PROGRAMS``
    blocks (a 32-row pass has only ``n_out / 64`` of them at 64), else 16."""
    for block_n in (64, 32):
        if triton.cdiv(rows, BLOCK_M) * triton.cdiv(n_out, block_n) >= MIN_PROGRAMS:
            return block_n
    return 16


@triton.jit
def _matmul_kernel(X, G, W, R, Out, rows, n_out, dim, eps,
                   sx, sw, sr, so,
                   NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Out[m, n] = f(X) @ W[n]``: ``f`` the RMSNorm with weight ``G`` (``NORM``); with
    ``SWIGLU`` the output is ``silu(f(X) @ W[n]) * (f(X) @ W[n_out + n])``; with ``RESIDUAL``
    it is added to ``R``."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = m < rows, n < n_out
    if NORM:
        squares = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            k = k0 + kk
            x = tl.load(X + m[:, None] * sx + k[None, :], mask=m_ok[:, None] & (k < dim)[None, :],
                        other=0.0).to(tl.float32)
            squares += tl.sum(x * x, axis=1)
        scale = tl.rsqrt(squares / dim + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + kk
        k_ok = k < dim
        x = tl.load(X + m[:, None] * sx + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if NORM:
            g = tl.load(G + k, mask=k_ok, other=0.0).to(x.dtype)
            x = g[None, :] * (x.to(tl.float32) * scale[:, None]).to(x.dtype)
        w = tl.load(W + n[None, :] * sw + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if SWIGLU:
            w_up = tl.load(W + (n_out + n)[None, :] * sw + k[:, None],
                           mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=PRECISION)
    dtype = Out.dtype.element_ty
    y = acc.to(dtype)
    if SWIGLU:
        gate = y.to(tl.float32)
        y = (gate * tl.sigmoid(gate)).to(dtype) * acc_up.to(dtype)
    if RESIDUAL:
        y = tl.load(R + m[:, None] * sr + n[None, :], mask=m_ok[:, None] & n_ok[None, :]) + y
    tl.store(Out + m[:, None] * so + n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def _launch(x: Tensor, weight: Tensor, n_out: int, norm: Tensor | None, eps: float,
            swiglu: bool, residual: Tensor | None) -> Tensor:
    rows, dim = x.shape
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    block_n = output_tile(rows, n_out)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(n_out, block_n))
    _matmul_kernel[grid](
        x, x if norm is None else norm, weight, x if residual is None else residual, out,
        rows, n_out, dim, eps, x.stride(0), weight.stride(0),
        0 if residual is None else residual.stride(0), out.stride(0),
        NORM=norm is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 exact, as cuBLAS
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K)
    return out


@torch.library.custom_op("tidar_bench::norm_matmul", mutates_args=())
def norm_matmul(x: Tensor, norm: Tensor, eps: float, weight: Tensor, swiglu: bool) -> Tensor:
    """``rmsnorm(x) @ weight.T`` for rows ``x [M, K]``; with ``swiglu``, ``weight`` is
    ``[gate; up]`` and the result ``silu(gate) * up``."""
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    return _launch(x.contiguous(), weight, n_out, norm, eps, swiglu, None)


@norm_matmul.register_fake
def _(x, norm, eps, weight, swiglu):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if swiglu else weight.shape[0])


@torch.library.custom_op("tidar_bench::matmul_add", mutates_args=())
def matmul_add(x: Tensor, weight: Tensor, residual: Tensor) -> Tensor:
    """``residual + x @ weight.T`` for rows ``x [M, K]``."""
    return _launch(x.contiguous(), weight, weight.shape[0], None, 0.0, False,
                   residual.contiguous())


@matmul_add.register_fake
def _(x, weight, residual):
    return residual.new_empty(residual.shape)


def fused_block(block, x: Tensor, cos, sin, masks, kv, slots) -> Tensor:
    """``Block.forward`` through the four fused matmuls (decode weights, no adapters)."""
    batch, length, dim = x.shape
    attn, mlp = block.self_attn, block.mlp
    rows = x.reshape(batch * length, dim)
    qkv = norm_matmul(rows, block.input_layernorm.weight, block.input_layernorm.eps,
                      attn.qkv.weight, False)
    q, k, v = qkv.view(batch, length, -1).split(attn.qkv.sizes, dim=-1)
    context = attn.context(q, k, v, cos, sin, masks, kv, slots)
    rows = matmul_add(context.reshape(batch * length, -1), attn.o_proj.weight, rows)
    hidden = norm_matmul(rows, block.post_attention_layernorm.weight,
                         block.post_attention_layernorm.eps, mlp.gate_up.weight, True)
    return matmul_add(hidden, mlp.down_proj.weight, rows).view(batch, length, dim)


def fusable(block, x: Tensor) -> bool:
    """A pass of more than one query per row through a dense block on decode weights with no
    mask-row adapters, biases, q/k norms or clipping."""
    from torch import nn

    from tidar.model import MLP

    attn, mlp = block.self_attn, block.mlp
    if x.shape[1] == 1 or not isinstance(mlp, MLP):  # AR steps keep inductor's fusions
        return False
    fused = [attn.qkv, mlp.gate_up]
    plain = [attn.o_proj, mlp.down_proj]
    return (attn.cfg.qk_norm is None and attn.cfg.clip_qkv is None
            and all(g.active() and not g.stacked and g.bias is None for g in fused)
            and all(type(p) is nn.Linear and p.bias is None for p in plain))


@contextlib.contextmanager
def fused_blocks():
    """Within: multi-row passes run ``fused_block`` where ``fusable``."""
    from tidar.model import Block

    own = Block.forward

    def forward(self, x, cos, sin, masks, kv, slots):
        if fusable(self, x):
            return fused_block(self, x, cos, sin, masks, kv, slots)
        return own(self, x, cos, sin, masks, kv, slots)

    Block.forward = forward
    try:
        yield
    finally:
        Block.forward = own
