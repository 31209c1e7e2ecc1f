"""Compile the decode kernels for an H100 (sm_90) without a GPU (as
``benchmarks/kernel_resources.py`` does) and count, in their PTX, the global loads before and
after their grid-dependency wait. Run as a script in a process without Triton's interpreter
(the tests set it, and the interpreter's library functions cannot be compiled): ``python
tests/pdl_ptx.py`` prints a JSON object, case -> counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernel_resources import compile_sm90  # noqa: E402

from tidar import decode_attention, decode_matmul, decode_matvec, decode_qkv  # noqa: E402

WAIT = "griddepcontrol.wait"
MATVEC = dict.fromkeys(["X", "NormW", "W", "Bias", "Res", "Out"], "*bf16")  # and matmul
SLICE = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Mask": "*i8", "Out": "*fp32",
         "Lse": "*fp32", "Final": "*bf16"}
MERGE = {"Part": "*fp32", "Lse": "*fp32", "Out": "*bf16"}
QKV = {**dict.fromkeys(["X", "NormW", "W", "Bias", "Cos", "Sin", "Q", "KCache", "VCache"],
                       "*bf16"), "Slots": "*i64"}


def ptx_lines(kernel, pointers: dict[str, str], constexprs: dict) -> list[str]:
    """``kernel``'s PTX for sm_90, its ``pointers`` typed as given."""
    compiled = compile_sm90(kernel, constexprs, pointers)
    return [line.strip() for line in compiled.asm["ptx"].splitlines()]


def count(lines: list[str]) -> dict:
    """Waits, and global loads before the first wait and after it."""
    waits = [i for i, line in enumerate(lines) if line.startswith(WAIT)]
    loads = [i for i, line in enumerate(lines) if "ld.global" in line]
    first = waits[0] if waits else len(lines)
    return {"waits": len(waits), "loads_before": sum(i < first for i in loads),
            "loads_after": sum(i > first for i in loads)}


def cases() -> dict:
    matvec = dict(ROWS=1, BLOCK_N=4, BLOCK_K=64, NORM=True, BIAS=False, RESIDUAL=True)
    attention = dict(qk_scale=0.18, HEAD_DIM=64, BLOCK_M=16, BLOCK_N=64, FP32=False)
    out = {}
    for pdl in (True, False):
        for swiglu in (False, True):
            out[f"matvec swiglu={swiglu} pdl={pdl}"] = count(ptx_lines(
                decode_matvec._matvec_kernel, MATVEC, {**matvec, "SWIGLU": swiglu, "PDL": pdl}))
    for swiglu in (False, True):
        out[f"matmul swiglu={swiglu}"] = count(ptx_lines(
            decode_matmul._matmul_kernel, MATVEC,
            dict(BLOCK_M=decode_matmul.ROWS_PER_BLOCK, BLOCK_N=decode_matmul.OUTPUTS_PER_BLOCK,
                 BLOCK_K=512, BLOCK_R=64, NORM=True, SWIGLU=swiglu, BIAS=True, RESIDUAL=True,
                 FP32=False, PDL=True)))
    for one_slice in (False, True):
        out[f"slice one_slice={one_slice}"] = count(ptx_lines(
            decode_attention._slice_kernel, SLICE,
            {**attention, "ONE_SLICE": one_slice, "PDL": True}))
    out["qkv"] = count(ptx_lines(decode_qkv._qkv_kernel, QKV, dict(
        HEADS=9, KV_HEADS=3, HEAD_DIM=64, ROWS=1, BLOCK_P=2, BLOCK_K=1024, BIAS=False,
        PDL=True)))
    out["merge"] = count(ptx_lines(decode_attention._merge_kernel, MERGE,
                                   dict(HEAD_DIM=64, BLOCK_M=16, BLOCK_P=1, PDL=True)))
    return out


if __name__ == "__main__":
    print(json.dumps(cases()))
