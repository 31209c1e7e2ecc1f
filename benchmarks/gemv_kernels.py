"""The AR step's matmuls at batch 1, timed alone: inductor's fused reductions (what the
compiled engine runs) against a Triton GEMV that loads its whole weight tile at once
(SmolLM2-135M shapes, bf16, H100/H200).

    python benchmarks/gemv_kernels.py

At batch 1 every matmul of the AR step is a matrix-vector product, and the profile puts
them at 1.9-3.8 us each (docs/results.md section 2) where reading their weights takes
0.1-0.7 us. Each candidate runs the op for 30 layers' weights in turn inside one CUDA
graph, so the weights come from memory, not L2; the time is per call. The Triton GEMV
computes ``BLOCK_N`` outputs per thread block with the whole reduction in one load, and
fuses what inductor fuses around it: the RMSNorm before q/k/v and gate/up, SwiGLU after
gate/up, the residual after o and down.
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from common import graph_seconds, write_json

from tidar.engine import COMPILE_OPTIONS

DIM, HIDDEN, QKV, LAYERS, EPS = 576, 1536, 960, 30, 1e-5


@triton.jit
def _gemv(X, NormW, W, Res, Out, K, N, half, eps,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
          SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
    """``BLOCK_N`` outputs of ``W @ f(x)``: f is the RMSNorm (``NORM``) or nothing; with
    ``SWIGLU`` output n is ``silu(row n) * row (n + half)``; with ``RESIDUAL`` ``Res`` is
    added."""
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    x = tl.load(X + k, mask=k_ok, other=0.0)
    if NORM:  # as model.RMSNorm: normalise in float32, round, scale in the input dtype
        xf = x.to(tl.float32)
        x = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / K + eps)).to(x.dtype)
        x = tl.load(NormW + k, mask=k_ok, other=0.0) * x
    x = x.to(tl.float32)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_ok = (n < N)[:, None] & k_ok[None, :]
    w = tl.load(W + n[:, None] * K + k[None, :], mask=tile_ok, other=0.0)
    acc = tl.sum(w.to(tl.float32) * x[None, :], 1)
    if SWIGLU:
        up = tl.load(W + (n[:, None] + half) * K + k[None, :], mask=tile_ok, other=0.0)
        acc = acc * tl.sigmoid(acc) * tl.sum(up.to(tl.float32) * x[None, :], 1)
    if RESIDUAL:
        acc += tl.load(Res + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(Out + n, acc.to(Out.dtype.element_ty), mask=n < N)


def triton_gemv(x, weight, norm_weight=None, residual=None, swiglu=False, *, block_n=8,
                num_warps=4):
    """``x`` ``[K]``, ``weight`` ``[N, K]`` (``[2N, K]``, gate then up, with ``swiglu``)."""
    k = x.shape[-1]
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = x.new_empty(n)
    _gemv[(triton.cdiv(n, block_n),)](
        x, norm_weight if norm_weight is not None else x, weight,
        residual if residual is not None else x, out, k, n, n, EPS,
        BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k), NORM=norm_weight is not None,
        SWIGLU=swiglu, RESIDUAL=residual is not None, num_warps=num_warps)
    return out


def rms_norm(x, weight):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def swiglu(gate_up):
    return F.silu(gate_up[:HIDDEN]) * gate_up[HIDDEN:]


def reference_ops() -> dict:
    """The engine's expressions for the four matmuls of a block at batch 1."""
    return {
        "qkv (norm)": lambda x, w, g, r: F.linear(rms_norm(x, g), w),
        "gate/up (norm, SwiGLU)": lambda x, w, g, r: swiglu(F.linear(rms_norm(x, g), w)),
        "o (+ residual)": lambda x, w, g, r: r + F.linear(x, w),
        "down (+ residual)": lambda x, w, g, r: r + F.linear(x, w),
    }


SHAPES = {"qkv (norm)": (QKV, DIM), "gate/up (norm, SwiGLU)": (2 * HIDDEN, DIM),
          "o (+ residual)": (DIM, DIM), "down (+ residual)": (DIM, HIDDEN)}


def triton_op(name: str, settings: dict):
    norm = "norm" in name
    residual = "residual" in name
    swiglu = "SwiGLU" in name
    return lambda x, w, g, r: triton_gemv(x, w, g if norm else None, r if residual else None,
                                          swiglu, **settings)


def run_layers(fn, inputs) -> None:
    for args in inputs:
        fn(*args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--block-n", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ops": {}}
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)]
        x = torch.randn(k, device=dev, dtype=dt)
        norm_weight = torch.rand(k, device=dev, dtype=dt) + 0.5
        out_n = n // 2 if "SwiGLU" in name else n
        residual = torch.randn(out_n, device=dev, dtype=dt)
        reference = torch.compile(reference_ops()[name], dynamic=False, options=COMPILE_OPTIONS)
        expected = reference(x, weights[0], norm_weight, residual).float()
        candidates = {"inductor (engine)": reference}
        for block_n, warps in itertools.product(args.block_n, args.warps):
            candidates[f"triton n{block_n} w{warps}"] = triton_op(
                name, {"block_n": block_n, "num_warps": warps})
        row = {"weight_mb": n * k * 2 / 1e6}
        for label, fn in candidates.items():
            inputs = [(x, w, norm_weight, residual) for w in weights]
            try:
                err = (fn(*inputs[0]).float() - expected).abs().max()
                us = graph_seconds(partial(run_layers, fn, inputs), 1, args.repeats)
                us *= 1e6 / LAYERS
                row[label] = {"us": round(us, 2), "max_abs_err": err.item()}
            except Exception as exc:  # one failing setting must not end the sweep
                row[label] = {"error": repr(exc)[:300]}
        timed = {k: v["us"] for k, v in row.items() if isinstance(v, dict) and "us" in v}
        best = min((k for k in timed if k.startswith("triton")), key=timed.get, default=None)
        row["best_triton"] = best
        print(f"{name}: inductor {timed.get('inductor (engine)')} us, best {best} "
              f"{timed.get(best)} us", flush=True)
        report["ops"][name] = row
        write_json("gemv_kernels.json", report)


if __name__ == "__main__":
    main()

