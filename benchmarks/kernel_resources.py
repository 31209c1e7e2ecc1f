"""Registers, spills and shared memory of the decode kernels at the embedded default's shapes,
compiled for an H100/H200 (sm_90) without a GPU (Triton's compiler and its bundled ptxas).

    python benchmarks/kernel_resources.py

A kernel that needs more registers than an SM can give several thread blocks runs fewer of
them at once, and a spill goes through local memory: both show before any timing. Integer
arguments and pointers are compiled as 16-divisible, as Triton specialises them at run time
(the vectorised loads then match a real launch). Each row is one kernel at one tile setting;
``engine`` marks the settings the engine launches.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from common import write_json
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tidar import decode_matmul, decode_matvec, decode_qkv

TENSORS = {**dict.fromkeys(["X", "NormW", "W", "Bias", "Res", "Out", "Cos", "Sin", "Q", "KCache",
                            "VCache"], "*bf16"), "Slots": "*i64"}
DIM, HIDDEN = 576, 1536  # SmolLM2-135M


def compile_sm90(kernel, constexprs: dict, pointers: dict[str, str] = TENSORS,
                 warps: int = 4):
    """``kernel`` compiled for sm_90 with ``constexprs``: ``pointers`` typed as given, the
    other arguments as 32-bit integers (``eps`` as float); pointers, strides and sizes
    16-divisible, as Triton specialises them at run time."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(
        n, "fp32" if n == "eps" else "i32") for n in names}
    divisible = [n for n in names if n in pointers or n.startswith("stride") or n in ("K", "N")]
    source = ASTSource(kernel, signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})


def resources(kernel, constexprs: dict, warps: int) -> dict:
    """ptxas's report for ``kernel`` compiled with ``constexprs`` and ``warps``."""
    compiled = compile_sm90(kernel, constexprs, warps=warps)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(os.path.join(bin_dir, name) for name in ("ptxas-blackwell", "ptxas")
                 if os.path.exists(os.path.join(bin_dir, name)))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", ptx + ".cubin"],
                                capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"),
            "spill_bytes": number(r"(\d+) bytes spill stores"),
            "shared_bytes": compiled.metadata.shared}


def cases() -> list[tuple[str, object, dict, int, bool]]:
    """(name, kernel, constexprs, warps, launched by the engine)."""
    out = []
    for name, inputs, extra in (("q/k/v", DIM, dict(NORM=True, SWIGLU=False, RESIDUAL=False)),
                                ("gate/up", DIM, dict(NORM=True, SWIGLU=True, RESIDUAL=False)),
                                ("o", DIM, dict(NORM=False, SWIGLU=False, RESIDUAL=True)),
                                ("down", HIDDEN, dict(NORM=False, SWIGLU=False, RESIDUAL=True))):
        outputs_per_block, warps = decode_matvec.plan(
            {"q/k/v": 960, "gate/up": HIDDEN, "o": DIM, "down": DIM}[name], inputs)
        for one_sum in (False, True) if extra["SWIGLU"] else (False,):
            out.append((f"matvec {name}{' one_sum' if one_sum else ''}",
                        decode_matvec._matvec_kernel, dict(
                            ROWS=1, BLOCK_N=outputs_per_block,
                            BLOCK_K=triton.next_power_of_2(inputs), BIAS=False, PDL=True,
                            ONE_SUM=one_sum, **extra), warps,
                        one_sum == (extra["SWIGLU"] and decode_matvec.SWIGLU_ONE_SUM)))
        main, rest = decode_matmul.widths(inputs)
        own = (decode_matmul.ROWS_PER_BLOCK, decode_matmul.OUTPUTS_PER_BLOCK,
               decode_matmul.WARPS * (1 if inputs <= 1024 else 2))
        for rows, outputs, warps in ((16, 16, 4), (16, 32, 4), (32, 32, 4), (16, 32, 8)):
            engine = (rows, outputs, warps) == own
            out.append((f"matmul {name} {rows}x{outputs}", decode_matmul._matmul_kernel, dict(
                BLOCK_M=rows, BLOCK_N=outputs, BLOCK_K=main, BLOCK_R=rest, BIAS=False,
                FP32=False, PDL=True, **extra), warps, engine))
    qkv_warps = decode_matvec.plan(960, DIM)[1]
    for rows in (1, 4):
        for one_sum in (False, True):
            out.append((f"q/k/v+RoPE rows={rows} one_sum={one_sum}", decode_qkv._qkv_kernel,
                        dict(HEADS=9, KV_HEADS=3, HEAD_DIM=64, ROWS=rows,
                             BLOCK_P=decode_qkv.PAIRS, BLOCK_K=triton.next_power_of_2(DIM),
                             BIAS=False, PDL=True, ONE_SUM=one_sum), qkv_warps,
                        rows <= decode_qkv.MAX_SEQUENCES and one_sum == decode_qkv.ONE_SUM))
    return out


def main() -> None:
    rows = []
    for name, kernel, constexprs, warps, engine in cases():
        row = {"kernel": name, "warps": warps, "engine": engine,
               **resources(kernel, constexprs, warps)}
        rows.append(row)
        print(f"{name:28s} warps {warps}  registers {row['registers']:3d}  spills "
              f"{row['spill_bytes']:5d} B  shared {row['shared_bytes']:6d} B"
              f"{'  (engine)' if engine else ''}", flush=True)
    write_json("kernel_resources.json", {"triton": triton.__version__, "target": "sm_90a",
                                         "kernels": rows})


if __name__ == "__main__":
    main()
