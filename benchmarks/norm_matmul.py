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
decode weights, the stacked weights of mask-row adapters included; ``pass_latency.py
--norm-matmul off triton`` times it against the engine's path. The rounding follows the
model's (normalise in float32, round, scale in the weights' dtype; matmul outputs rounded
before SiLU and the adds); the accumulation order is the kernel's own. Not measured on a GPU
yet.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M, BLOCK_K = 32, 64
NUM_WARPS, NUM_STAGES = 4, 3  # Triton's defaults on Hopper
last_compiled = None  # the kernel of the last launch (time_kernels reports its PTX)
if os.environ.get("TIDAR_NORM_MATMUL"):  # e.g. m32_k128_w4_s3 (the names time_kernels prints)
    BLOCK_M, BLOCK_K, NUM_WARPS, NUM_STAGES = map(int, re.findall(
        r"\d+", os.environ["TIDAR_NORM_MATMUL"]))
MIN_PROGRAMS = 96  # about one thread block per SM of an H100: narrower output tiles below it


def output_tile(rows: int, n_out: int) -> int:
    """Columns per thread block: the widest of 64, 32, 16 that still gives ``MIN_PROGRAMS``
    blocks (a 32-row pass has only ``n_out / 64`` of them at 64), else 16."""
    for block_n in (64, 32):
        if triton.cdiv(rows, BLOCK_M) * triton.cdiv(n_out, block_n) >= MIN_PROGRAMS:
            return block_n
    return 16


@triton.jit
def _weights(W, n, k, sw, n_ok, k_ok):
    """Rows ``n`` of ``W``, columns ``k``, as a ``[BLOCK_K, BLOCK_N]`` operand."""
    return tl.load(W + n[None, :] * sw + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                   other=0.0)


@triton.jit
def _dot_loop(X, G, W, first, scale, m, n, m_ok, n_ok, n_out, dim, sx, sw,
              NORM: tl.constexpr, SWIGLU: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``f(X[m]) @ W[first + n]`` (and ``@ W[first + n_out + n]`` with ``SWIGLU``) over all
    of ``dim``: a loop with no branch in it, so that Triton pipelines its loads."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < dim
        x = tl.load(X + m[:, None] * sx + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if NORM:
            g = tl.load(G + k, mask=k_ok, other=0.0).to(x.dtype)
            x = g[None, :] * (x.to(tl.float32) * scale[:, None]).to(x.dtype)
        acc = tl.dot(x, _weights(W, first + n, k, sw, n_ok, k_ok), acc,
                     input_precision=PRECISION)
        if SWIGLU:
            acc_up = tl.dot(x, _weights(W, first + n_out + n, k, sw, n_ok, k_ok), acc_up,
                            input_precision=PRECISION)
    return acc, acc_up


@triton.jit
def _matmul_kernel(X, G, W, R, Out, rows, n_out, dim, eps, length, start, adapted,
                   sx, sw, sr, so,
                   NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Out[m, n] = f(X[m]) @ W[n]``: ``f`` the RMSNorm with weight ``G`` (``NORM``); with
    ``SWIGLU`` it is ``silu(f(X[m]) @ W[n]) * (f(X[m]) @ W[n_out + n])``; with ``RESIDUAL``
    it is added to ``R``. A mask row (``m % length >= start``) reads the rows ``adapted``
    further down ``W`` (the adapted half of a stacked weight ``[W; W']``; ``adapted`` 0:
    none). A tile computes a half only if one of its rows needs it."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < rows, n < n_out
    mask_row = ((m % length) >= start) & (adapted > 0)
    scale = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORM:
        squares = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + m[:, None] * sx + k[None, :], mask=m_ok[:, None] & (k < dim)[None, :],
                        other=0.0).to(tl.float32)
            squares += tl.sum(x * x, axis=1)
        scale = tl.rsqrt(squares / dim + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_mask = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_mask_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if tl.sum((m_ok & ~mask_row).to(tl.int32), axis=0) > 0:
        acc, acc_up = _dot_loop(X, G, W, 0, scale, m, n, m_ok, n_ok, n_out, dim, sx, sw,
                                NORM, SWIGLU, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if tl.sum((m_ok & mask_row).to(tl.int32), axis=0) > 0:
        acc_mask, acc_mask_up = _dot_loop(X, G, W, adapted, scale, m, n, m_ok, n_ok, n_out,
                                          dim, sx, sw, NORM, SWIGLU, PRECISION, BLOCK_M,
                                          BLOCK_N, BLOCK_K)
    dtype = Out.dtype.element_ty
    y = tl.where(mask_row[:, None], acc_mask, acc).to(dtype)
    if SWIGLU:
        gate = y.to(tl.float32)
        up = tl.where(mask_row[:, None], acc_mask_up, acc_up).to(dtype)
        y = (gate * tl.sigmoid(gate)).to(dtype) * up
    if RESIDUAL:
        y = tl.load(R + m[:, None] * sr + n[None, :], mask=m_ok[:, None] & n_ok[None, :]) + y
    tl.store(Out + m[:, None] * so + n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def _n_out(weight: Tensor, swiglu: bool, stacked: bool) -> int:
    """Output columns: the rows of ``W`` (before ``W'`` when stacked), halved by SwiGLU."""
    return weight.shape[0] // (2 if stacked else 1) // (2 if swiglu else 1)


def _launch(x: Tensor, weight: Tensor, swiglu: bool, stacked: bool, length: int, start: int,
            norm: Tensor | None = None, eps: float = 0.0,
            residual: Tensor | None = None) -> Tensor:
    rows, dim = x.shape
    n_out = _n_out(weight, swiglu, stacked)
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    block_n = output_tile(rows, n_out)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(n_out, block_n))
    global last_compiled
    last_compiled = _matmul_kernel[grid](
        x, x if norm is None else norm, weight, x if residual is None else residual, out,
        rows, n_out, dim, eps, length, start, weight.shape[0] // 2 if stacked else 0,
        x.stride(0), weight.stride(0), 0 if residual is None else residual.stride(0),
        out.stride(0),
        NORM=norm is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 exact, as cuBLAS
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


@torch.library.custom_op("tidar_bench::norm_matmul", mutates_args=())
def norm_matmul(x: Tensor, norm: Tensor, eps: float, weight: Tensor, swiglu: bool,
                stacked: bool, length: int, start: int) -> Tensor:
    """``rmsnorm(x) @ weight.T`` for rows ``x [M, K]`` (sequences of ``length`` rows); with
    ``swiglu``, ``weight`` is ``[gate; up]`` and the result ``silu(gate) * up``; ``stacked``:
    ``weight`` is ``[W; W']`` and rows from ``start`` of each sequence take ``W'``."""
    return _launch(x.contiguous(), weight, swiglu, stacked, length, start, norm, eps)


@norm_matmul.register_fake
def _(x, norm, eps, weight, swiglu, stacked, length, start):
    return x.new_empty(x.shape[0], _n_out(weight, swiglu, stacked))


@torch.library.custom_op("tidar_bench::matmul_add", mutates_args=())
def matmul_add(x: Tensor, weight: Tensor, residual: Tensor, stacked: bool, length: int,
               start: int) -> Tensor:
    """``residual + x @ weight.T`` for rows ``x [M, K]`` (``stacked`` as in ``norm_matmul``)."""
    return _launch(x.contiguous(), weight, False, stacked, length, start,
                   residual=residual.contiguous())


@matmul_add.register_fake
def _(x, weight, residual, stacked, length, start):
    return residual.new_empty(residual.shape)


def fused_block(block, x: Tensor, cos, sin, masks, kv, slots) -> Tensor:
    """``Block.forward`` through the four fused matmuls (decode weights)."""
    batch, length, dim = x.shape
    attn, mlp = block.self_attn, block.mlp
    start = attn.qkv.gate.start  # where each sequence's mask rows begin
    rows = x.reshape(batch * length, dim)
    norm = block.input_layernorm
    qkv = norm_matmul(rows, norm.weight, norm.eps, attn.qkv.weight, False, attn.qkv.stacked,
                      length, start)
    q, k, v = qkv.view(batch, length, -1).split(attn.qkv.sizes, dim=-1)
    context = attn.context(q, k, v, cos, sin, masks, kv, slots)
    o, o_stacked = _weight(attn.out, attn.o_proj)
    rows = matmul_add(context.reshape(batch * length, -1), o, rows, o_stacked, length, start)
    norm = block.post_attention_layernorm
    hidden = norm_matmul(rows, norm.weight, norm.eps, mlp.gate_up.weight, True,
                         mlp.gate_up.stacked, length, start)
    down, down_stacked = _weight(mlp.down, mlp.down_proj)
    return matmul_add(hidden, down, rows, down_stacked, length, start).view(batch, length, dim)


def _weight(group, layer) -> tuple[Tensor, bool]:
    """A one-layer group's decode weight: stacked when the layer carries an adapter, else the
    layer's own (``DecodeLinear`` leaves a plain single layer alone)."""
    return (group.weight, group.stacked) if group.active() else (layer.weight, False)


def fusable(block, x: Tensor) -> bool:
    """A pass of more than one query per row through a dense block on decode weights with no
    biases, q/k norms or clipping (mask-row adapters are fine)."""
    from torch import nn

    from tidar.model import MLP

    attn, mlp = block.self_attn, block.mlp
    if x.shape[1] == 1 or not isinstance(mlp, MLP):  # AR steps keep inductor's fusions
        return False
    singles = [(attn.out, attn.o_proj), (mlp.down, mlp.down_proj)]
    return (attn.cfg.qk_norm is None and attn.cfg.clip_qkv is None
            and all(g.active() and g.bias is None for g in (attn.qkv, mlp.gate_up))
            and all(g.bias is None if g.active() else type(p) is nn.Linear and p.bias is None
                    for g, p in singles))


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


def time_kernels(rows_list=(32, 272), calls: int = 30) -> list[dict]:
    """Microseconds per call of each fused matmul against its unfused layers (RMSNorm, cuBLAS
    matmul, SiLU-and-multiply, add) on the embedded default's shapes, bf16, each in a CUDA
    graph of ``calls`` calls, each call on weights of its own (as a pass's 30 layers: they
    come from memory, not L2), for each of ``LAUNCH_SETTINGS``."""
    from tidar.model import RMSNorm

    dim, hidden, qkv_out = 576, 1536, 576 + 2 * 192
    norm = RMSNorm(dim, 1e-5).cuda().to(torch.bfloat16)
    shapes = {"qkv": (qkv_out, dim), "gate_up": (2 * hidden, dim), "o": (dim, dim),
              "down": (dim, hidden)}
    layers = [{k: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[1] ** 0.5
               for k, shape in shapes.items()} for _ in range(calls)]
    return [row for rows in rows_list for row in _time_ops(rows, norm, layers, calls)]


def _time_ops(rows: int, norm, layers: list[dict[str, Tensor]], calls: int) -> list[dict]:
    import itertools

    import torch.nn.functional as F
    from common import graph_seconds

    x = torch.randn(rows, norm.weight.shape[0], device="cuda", dtype=torch.bfloat16)
    h = torch.randn(rows, layers[0]["down"].shape[1], device="cuda", dtype=torch.bfloat16)

    def swiglu(w):
        gate, up = F.linear(norm(x), w["gate_up"]).chunk(2, dim=-1)
        return F.silu(gate) * up

    unfused = {"qkv": lambda w: F.linear(norm(x), w["qkv"]), "gate_up": swiglu,
               "o": lambda w: x + F.linear(x, w["o"]),
               "down": lambda w: x + F.linear(h, w["down"])}
    fused = {"qkv": lambda w: _launch(x, w["qkv"], False, False, rows, rows, norm.weight,
                                      norm.eps),
             "gate_up": lambda w: _launch(x, w["gate_up"], True, False, rows, rows, norm.weight,
                                          norm.eps),
             "o": lambda w: _launch(x, w["o"], False, False, rows, rows, residual=x),
             "down": lambda w: _launch(h, w["down"], False, False, rows, rows, residual=x)}

    def seconds(fn) -> float:  # the next layer's weights at every call
        cycle = itertools.cycle(layers)
        return graph_seconds(lambda: fn(next(cycle)), calls)

    chosen = dict(BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, NUM_WARPS=NUM_WARPS, NUM_STAGES=NUM_STAGES)
    results = []
    for op in unfused:
        row = {"rows": rows, "op": op, "unfused_us": 1e6 * seconds(unfused[op])}
        torch.testing.assert_close(fused[op](layers[0]), unfused[op](layers[0]), atol=0.05,
                                   rtol=0.05)
        for setting in LAUNCH_SETTINGS:
            globals().update(setting)
            row[_setting_name(setting)] = 1e6 * seconds(fused[op])
            ptx = last_compiled.asm["ptx"]  # loads the compiler pipelined, and how
            row[_setting_name(setting).replace("_us", "_async")] = (
                f"cp.async {ptx.count('cp.async.')} bulk {ptx.count('cp.async.bulk')} "
                f"wgmma {ptx.count('wgmma.mma_async')}")
        globals().update(chosen)
        results.append(row)
        print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in row.items()), flush=True)
    return results


LAUNCH_SETTINGS = [dict(BLOCK_M=32, BLOCK_K=64, NUM_WARPS=4, NUM_STAGES=3),
                   dict(BLOCK_M=32, BLOCK_K=64, NUM_WARPS=4, NUM_STAGES=1),
                   dict(BLOCK_M=32, BLOCK_K=128, NUM_WARPS=4, NUM_STAGES=2),
                   dict(BLOCK_M=32, BLOCK_K=128, NUM_WARPS=4, NUM_STAGES=3),
                   dict(BLOCK_M=64, BLOCK_K=128, NUM_WARPS=4, NUM_STAGES=3),
                   dict(BLOCK_M=32, BLOCK_K=128, NUM_WARPS=8, NUM_STAGES=3)]


def _setting_name(setting: dict) -> str:
    return "m{BLOCK_M}_k{BLOCK_K}_w{NUM_WARPS}_s{NUM_STAGES}_us".format(**setting)


if __name__ == "__main__":
    from common import write_json

    rows = time_kernels()
    totals = {_setting_name(s): sum(r[_setting_name(s)] for r in rows) for s in LAUNCH_SETTINGS}

    best = min(totals, key=totals.get)
    write_json("norm_matmul_kernels.json", {"device": torch.cuda.get_device_name(),
                                            "rows": rows, "total_us": totals, "best": best})
    print(f"best: {best.removesuffix('_us')} (total over the timed ops {totals[best]:.1f} us, "
          f"unfused {sum(r['unfused_us'] for r in rows):.1f} us)")
