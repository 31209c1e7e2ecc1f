"""A drafting pass's four projections at batch 1, timed alone: the engine's plain path
against ``tidar.decode_matmul`` at every tile of a sweep (SmolLM2-135M shapes, stacked
adapter weights, bf16, H100/H200).

    python benchmarks/matmul_kernels.py --rows 32 272 [--ops gate/up down] [--plain-weights]

A pass of one proposal block has 32 rows (16 clean, 16 mask), the full proposal set 272 (16
clean, 256 mask). The plain path is what the engine runs today: a cuBLAS matmul over the
stacked ``[W; W']`` weights, the mask rows' half selected, and the RMSNorm, SwiGLU and
residual add as inductor compiles them around it. ``decode_matmul`` fuses all of it and
reads one half of the weights per row tile; the sweep sets its tile (rows, outputs, warps)
in place of the module's; ``engine`` is the module's own, also timed without PDL. As in
``gemv_kernels.py``, each candidate runs for 30 layers' weights in turn inside one CUDA
graph, and the time is per call. ``--plain-weights``: weights without an adapted half, as a
model without a drafter has (every row reads the base weights; the goals are timed so).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from common import kernel_settings, write_json
from gemv_kernels import EPS, HIDDEN, LAYERS, SHAPES, rms_norm, time_candidates

from tidar import decode_matmul
from tidar.engine import COMPILE_OPTIONS

CLEAN = 16  # clean rows a sequence: the verified token and 15 drafts


def plain_op(name: str, start: int, width: int):
    """The engine's plain path for the op ``name`` over stacked weights (``start`` rows read
    the base half; all of them: plain weights)."""
    norm, residual, swiglu = "norm" in name, "residual" in name, "SwiGLU" in name

    def run(x, w, g, r):
        y = F.linear(rms_norm(x, g) if norm else x, w)
        if start < y.shape[0]:
            y = torch.cat([y[:start, :width], y[start:, width:]])
        if swiglu:
            y = F.silu(y[:, :HIDDEN]) * y[:, HIDDEN:]
        return r + y if residual else y
    return torch.compile(run, dynamic=False, options=COMPILE_OPTIONS)


def fused_op(name: str, rows: int, start: int, width: int,
             tile: tuple[int, int, int] | None, overlap: bool = True):
    """``decode_matmul`` for the op ``name`` at ``tile`` (rows, outputs, warps: twice as
    many past 1,024 inputs; the small tile's settings, at any row count) or, with None, the
    module's own (past ``MAX_PASS_ROWS`` its wide tile where the projection takes it);
    ``overlap`` False launches it without PDL."""
    norm, residual, swiglu = "norm" in name, "residual" in name, "SwiGLU" in name
    settings = [] if tile is None else [
        "MAX_PASS_ROWS=4096,ROWS_PER_BLOCK={},OUTPUTS_PER_BLOCK={},WARPS={}".format(*tile)]
    settings += [] if overlap else ["PDL=False"]

    def run(x, w, g, r):
        with kernel_settings(",".join(settings) or "engine"):
            return decode_matmul.decode_matmul(x, w, g if norm else None, None,
                                               r if residual else None, swiglu, EPS, rows,
                                               start, width)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 272])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--tile-rows", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--tile-outputs", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--ops", nargs="+", default=[],
                    help="only the projections whose names contain one of these")
    ap.add_argument("--plain-weights", action="store_true",
                    help="weights without an adapted half (no drafter)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "weights": "plain" if args.plain_weights else "stacked", "cells": {}}
    shapes = {k: v for k, v in SHAPES.items() if not args.ops or any(o in k for o in args.ops)}
    halves = 1 if args.plain_weights else 2
    for rows, (name, (n, k)) in itertools.product(args.rows, shapes.items()):
        start = rows if args.plain_weights else CLEAN
        weights = [torch.randn(halves * n, k, device=dev, dtype=dt) * 0.02
                   for _ in range(LAYERS)]
        x = torch.randn(rows, k, device=dev, dtype=dt)
        norm_weight = torch.rand(k, device=dev, dtype=dt) + 0.5
        residual = torch.randn(rows, n // 2 if "SwiGLU" in name else n, device=dev, dtype=dt)
        inputs = [(x, w, norm_weight, residual) for w in weights]
        reference = plain_op(name, start, n)
        expected = reference(*inputs[0]).float()
        candidates = {"plain": reference, "fused engine": fused_op(name, rows, start, n, None),
                      "fused engine, no PDL": fused_op(name, rows, start, n, None,
                                                       overlap=False)}
        for tile in itertools.product(args.tile_rows, args.tile_outputs, args.warps):
            candidates["fused m{} n{} w{}".format(*tile)] = fused_op(name, rows, start, n, tile)
        cell = {"weight_mb": halves * n * k * 2 / 1e6,
                **time_candidates(candidates, inputs, expected, args.repeats)}
        timed = {k: v["us"] for k, v in cell.items() if isinstance(v, dict) and "us" in v}
        best = min((k for k in timed if k.startswith("fused")), key=timed.get, default=None)
        cell["best_fused"] = best
        print(f"{rows} rows, {name}: plain {timed.get('plain')} us, fused engine "
              f"{timed.get('fused engine')} us, best {best} {timed.get(best)} us", flush=True)
        report["cells"][f"{rows} rows, {name}"] = cell
        write_json("matmul_kernels.json", report)


if __name__ == "__main__":
    main()
