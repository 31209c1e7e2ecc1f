"""The AR step's matmuls at batch 1, timed alone: inductor's fused reductions (what the
compiled engine ran before session 14) against ``tidar.decode_matvec`` (what it runs now)
at every tile setting of a sweep (SmolLM2-135M shapes, bf16, H100/H200).

    python benchmarks/gemv_kernels.py

At batch 1 every matmul of the AR step is a matrix-vector product, and the profile put them
at 1.9-3.8 us each (docs/results.md section 2) where reading their weights takes 0.1-0.7
us. Each candidate runs the op for 30 layers' weights in turn inside one CUDA graph, so the
weights come from memory, not L2; the time is per call. ``decode_matvec`` computes
``BLOCK_N`` outputs per thread block with the whole reduction in one load, and fuses what
inductor fuses around it: the RMSNorm before q/k/v and gate/up, SwiGLU after gate/up, the
residual after o and down. The sweep sets its tile (outputs per block, warps) in place of
``decode_matvec.plan``; ``engine`` is the plan's own pick, timed also without programmatic
dependent launch (``tidar.pdl``: with it, each call loads its weights while the call
before it still runs).
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import torch.nn.functional as F
from common import graph_seconds, write_json

from tidar import decode_matvec, pdl
from tidar.engine import COMPILE_OPTIONS

DIM, HIDDEN, QKV, LAYERS, EPS = 576, 1536, 960, 30, 1e-5


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


def triton_op(name: str, tile: tuple[int, int] | None, overlap: bool = True):
    """``decode_matvec`` for the op ``name``, at ``tile`` (outputs per block, warps) or, with
    None, the engine's plan; ``overlap`` False launches it without PDL."""
    norm, residual, swiglu = "norm" in name, "residual" in name, "SwiGLU" in name

    def run(x, w, g, r):
        own_plan, own_pdl = decode_matvec.plan, pdl.PDL
        if tile is not None:
            decode_matvec.plan = lambda outputs, inputs: tile
        pdl.PDL = overlap and own_pdl
        try:
            return decode_matvec.decode_matvec(x[None], w, g if norm else None, None,
                                               r[None] if residual else None, swiglu, EPS)[0]
        finally:
            decode_matvec.plan, pdl.PDL = own_plan, own_pdl
    return run


def run_layers(fn, inputs) -> None:
    for args in inputs:
        fn(*args)


def time_candidates(candidates: dict, inputs: list, expected, repeats: int) -> dict:
    """Per candidate ``fn``: microseconds per call over the layers' ``inputs`` in one CUDA
    graph, and the largest difference from ``expected`` on the first; or its error."""
    row = {}
    for label, fn in candidates.items():
        try:
            err = (fn(*inputs[0]).float() - expected).abs().max()
            us = graph_seconds(partial(run_layers, fn, inputs), 1, repeats)
            row[label] = {"us": round(us * 1e6 / len(inputs), 2), "max_abs_err": err.item()}
        except Exception as exc:  # one failing setting must not end the sweep
            row[label] = {"error": repr(exc)[:300]}
    return row


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
        candidates = {"inductor": reference, "triton engine": triton_op(name, None),
                      "triton engine, no PDL": triton_op(name, None, overlap=False)}
        for block_n, warps in itertools.product(args.block_n, args.warps):
            candidates[f"triton n{block_n} w{warps}"] = triton_op(name, (block_n, warps))
        inputs = [(x, w, norm_weight, residual) for w in weights]
        row = {"weight_mb": n * k * 2 / 1e6,
               **time_candidates(candidates, inputs, expected, args.repeats)}
        timed = {k: v["us"] for k, v in row.items() if isinstance(v, dict) and "us" in v}
        best = min((k for k in timed if k.startswith("triton")), key=timed.get, default=None)
        row["best_triton"] = best
        print(f"{name}: inductor {timed.get('inductor')} us, engine's plan "
              f"{timed.get('triton engine')} us, best {best} "
              f"{timed.get(best)} us", flush=True)
        report["ops"][name] = row
        write_json("gemv_kernels.json", report)


if __name__ == "__main__":
    main()

