"""Registers, spills and shared memory of the decode kernels at the embedded default's shapes
(``decode_moe``'s at OLMoE-1B-7B's), compiled for an H100/H200 (sm_90) without a GPU (Triton's
compiler and its bundled ptxas).

    python benchmarks/kernel_resources.py [--dtype fp32] [--head-dim 128]
        [--matmul-tiles 16x32x4 32x64x8 ...]

``--head-dim`` sets the attention kernel's (the default's is 64; most larger models have
128). Shared memory depends on the Triton version: the H100's (torch 2.11) gave
``decode_matmul``'s gate/up 294,912 bytes in float32, where Triton 3.9 gives 102,400.

A kernel that needs more registers than an SM can give several thread blocks runs fewer of
them at once, and a spill goes through local memory: both show before any timing. Integer
arguments and pointers are compiled as 16-divisible, as Triton specialises them at run time
(the vectorised loads then match a real launch). Each row is one kernel at one tile setting;
``engine`` marks the settings the engine launches.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile

import triton
from common import OLMOE_7B, write_json
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tidar import decode_attention, decode_matmul, decode_matvec, decode_moe, decode_qkv

TENSORS = {**dict.fromkeys(["X", "NormW", "W", "Bias", "Res", "Out", "Cos", "Sin", "Q", "KCache",
                            "VCache", "H", "Weight", "Logits"], "*bf16"), "Slots": "*i64",
           "Expert": "*i64"}
DIM, HIDDEN = 576, 1536  # SmolLM2-135M
ATTENTION = {**dict.fromkeys(["Q", "K", "V", "Final"], "*bf16"), "Mask": "*i1", "Out": "*fp32",
             "Lse": "*fp32"}


def compile_sm90(kernel, constexprs: dict, pointers: dict[str, str], warps: int = 4):
    """``kernel`` compiled for sm_90 with ``constexprs``: ``pointers`` typed as given, the
    other arguments as 32-bit integers (``eps`` as float); pointers, strides and sizes
    16-divisible, as Triton specialises them at run time."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(
        n, "fp32" if n == "eps" else "i32") for n in names}
    divisible = [n for n in names if n not in constexprs and (
        n in pointers or n.startswith("stride") or n in ("K", "N")
        or re.fullmatch(r"s[a-z]_[a-z]", n))]  # the attention kernels' strides
    source = ASTSource(kernel, signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})


def typed(pointers: dict[str, str], dtype: str) -> dict[str, str]:
    """``pointers`` with their bf16 tensors in ``dtype``."""
    return {n: f"*{dtype}" if t == "*bf16" else t for n, t in pointers.items()}


def resources(kernel, constexprs: dict, warps: int, dtype: str = "bf16") -> dict:
    """ptxas's report for ``kernel`` compiled with ``constexprs`` and ``warps``."""
    pointers = typed(ATTENTION if kernel is decode_attention._slice_kernel else TENSORS, dtype)
    compiled = compile_sm90(kernel, constexprs, pointers, warps=warps)
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


MATMUL_TILES = ((16, 16, 4), (16, 32, 4), (32, 32, 4), (16, 32, 8))  # rows, outputs, warps


def cases(fp32: bool = False, head_dim: int = 64, matmul_tiles=MATMUL_TILES,
          ) -> list[tuple[str, object, dict, int, bool]]:
    """(name, kernel, constexprs, warps, launched by the engine at batch 1 and 32 rows)."""
    out = []
    for name, inputs, extra in (("q/k/v", DIM, dict(NORM=True, SWIGLU=False, RESIDUAL=False)),
                                ("gate/up", DIM, dict(NORM=True, SWIGLU=True, RESIDUAL=False)),
                                ("o", DIM, dict(NORM=False, SWIGLU=False, RESIDUAL=True)),
                                ("down", HIDDEN, dict(NORM=False, SWIGLU=False, RESIDUAL=True))):
        outputs_per_block, warps = decode_matvec.plan(
            {"q/k/v": 960, "gate/up": HIDDEN, "o": DIM, "down": DIM}[name], inputs)
        out.append((f"matvec {name}", decode_matvec._matvec_kernel, dict(
            ROWS=1, BLOCK_N=outputs_per_block, BLOCK_K=triton.next_power_of_2(inputs),
            BIAS=False, PDL=True, **extra), warps, True))
        main, rest = decode_matmul.widths(inputs)
        own = (decode_matmul.ROWS_PER_BLOCK, decode_matmul.OUTPUTS_PER_BLOCK,
               decode_matmul.WARPS * (1 if inputs <= 1024 else 2))
        for rows, outputs, warps in matmul_tiles:
            engine = (rows, outputs, warps) == own
            out.append((f"matmul {name} {rows}x{outputs}", decode_matmul._matmul_kernel, dict(
                BLOCK_M=rows, BLOCK_N=outputs, BLOCK_K=main, BLOCK_R=rest, BIAS=False,
                FP32=fp32, PDL=True, **extra), warps, engine))
    qkv_warps = decode_matvec.plan(960, DIM)[1]
    for rows in (1, 4):
        out.append((f"q/k/v+RoPE rows={rows}", decode_qkv._qkv_kernel, dict(
            HEADS=9, KV_HEADS=3, HEAD_DIM=64, ROWS=rows, BLOCK_P=decode_qkv.PAIRS,
            BLOCK_K=triton.next_power_of_2(DIM), BIAS=False, PDL=True), qkv_warps,
            rows <= decode_qkv.MAX_SEQUENCES))
    attention = decode_attention
    for queries in (1, 272):  # the AR step; a full pass of 16 blocks, 1,024 keys
        block_m, _ = attention.plan(1, 3, 3 * queries, 1024)
        out.append((f"attention slices rows={3 * queries}", attention._slice_kernel, dict(
            qk_scale=head_dim**-0.5 * 1.4426950408889634, HEAD_DIM=head_dim, BLOCK_M=block_m,
            BLOCK_N=attention.BLOCK_N, FP32=fp32, ONE_SLICE=False, PDL=True,
            sm_s=1),  # a contiguous mask
            attention.NUM_WARPS, True))
    moe_dim, moe_hidden = OLMOE_7B["hidden_size"], OLMOE_7B["intermediate_size"]
    routing = dict(TOP_K=OLMOE_7B["num_experts_per_tok"], BLOCK_E=OLMOE_7B["num_experts"])
    for route in (False, True):
        moe = decode_moe.MOE_MAX_ROWS > 0 and decode_moe.ROUTE_IN_KERNELS == route
        name = " routed" if route else ""
        outputs_per_block, warps = decode_matvec.plan(moe_hidden, moe_dim)
        out.append((f"moe gate/up{name} (OLMoE)", decode_moe._gate_up_kernel, dict(
            ROUTE=route, BLOCK_N=outputs_per_block, BLOCK_K=triton.next_power_of_2(moe_dim),
            **routing), warps, moe))
        outputs_per_block, warps = decode_matvec.plan(moe_dim, moe_hidden)
        out.append((f"moe down{name} (OLMoE)", decode_moe._down_kernel, dict(
            ROUTE=route, NORMALIZE=OLMOE_7B["norm_topk_prob"], BLOCK_N=outputs_per_block,
            BLOCK_K=triton.next_power_of_2(moe_hidden), **routing), warps, moe))
    by_kernel = decode_moe.MOE_MAX_ROWS > 0 and decode_moe.ROUTE_KERNEL \
        and not decode_moe.ROUTE_IN_KERNELS
    out.append(("moe routing (OLMoE)", decode_moe._route_kernel, dict(
        NORMALIZE=OLMOE_7B["norm_topk_prob"],
        BLOCK_TOP=triton.next_power_of_2(OLMOE_7B["num_experts_per_tok"]), **routing), 1,
        by_kernel))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--head-dim", type=int, default=64, choices=[16, 32, 64, 128, 256])
    ap.add_argument("--matmul-tiles", nargs="+", metavar="ROWSxOUTPUTSxWARPS",
                    help="decode_matmul's tiles to compile (default: the small tile's sweep)")
    args = ap.parse_args()
    tiles = MATMUL_TILES if not args.matmul_tiles else [
        tuple(int(v) for v in t.split("x")) for t in args.matmul_tiles]
    rows = []
    for name, kernel, constexprs, warps, engine in cases(args.dtype == "fp32", args.head_dim,
                                                        tiles):
        row = {"kernel": name, "warps": warps, "engine": engine,
               **resources(kernel, constexprs, warps, args.dtype)}
        rows.append(row)
        print(f"{name:28s} warps {warps}  registers {row['registers']:3d}  spills "
              f"{row['spill_bytes']:5d} B  shared {row['shared_bytes']:6d} B"
              f"{'  (engine)' if engine else ''}", flush=True)
    write_json("kernel_resources.json", {"triton": triton.__version__, "target": "sm_90a",
                                         "dtype": args.dtype, "head_dim": args.head_dim,
                                         "kernels": rows})


if __name__ == "__main__":
    main()
