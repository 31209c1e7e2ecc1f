"""What FP8 matmuls would save in full-mode conversion: the step's GEMMs in bf16 against
``torch._scaled_mm`` in float8 (e4m3, row-wise scales), each shape timed alone (H100/H200).

    python benchmarks/fp8_matmul.py --batch 128 --seq-len 512

Full mode trains every weight on the doubled row (``2 * seq_len`` rows a sequence), so each
linear layer runs three GEMMs a step over ``M = batch * 2 * seq_len`` rows: forward
``x @ W.T``, the input's gradient ``dy @ W`` and the weight's gradient ``dy.T @ x``. The
head runs the same three over chunks of ``tidar.losses.CHUNK_ROWS`` rows (4,096). FP8 needs
its operands cast first, with a scale per row of the reduced dimension; for the weight's
gradient that means transposed copies of ``x`` and ``dy``. The casts are timed as standalone
compiled kernels, an upper bound: fused into the kernels that produce ``x`` and ``dy`` they would
cost less. A GEMM's FP8 time, its casts' time and the step totals (times each shape's count
a step) come out; compare the bf16 total with the matmul time of the step's profile
(``train_throughput.py --profile 2``, section 4 of docs/results.md).
"""

from __future__ import annotations

import argparse

import torch
from common import SMOLLM2, event_seconds, write_json

from tidar.losses import CHUNK_ROWS

torch._dynamo.config.recompile_limit = 64  # one compile of each cast per shape
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def layer_shapes(rows: int) -> list[tuple[str, int, int, int, int]]:
    """(name, rows M, inputs K, outputs N, GEMMs of this shape a step) of the full-mode step."""
    hidden, inter, layers = (SMOLLM2[k] for k in
                             ("hidden_size", "intermediate_size", "num_hidden_layers"))
    kv = SMOLLM2["num_key_value_heads"] * SMOLLM2["head_dim"]
    shapes = [("q", hidden, hidden, layers), ("k", hidden, kv, layers), ("v", hidden, kv, layers),
              ("o", hidden, hidden, layers), ("gate", hidden, inter, layers),
              ("up", hidden, inter, layers), ("down", inter, hidden, layers)]
    out = [(name, rows, k, n, count) for name, k, n, count in shapes]
    out.append(("head", CHUNK_ROWS, hidden, SMOLLM2["vocab_size"], rows // CHUNK_ROWS))
    return out


def rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` in float8 with one float32 scale a row: (``t / scale``, ``scale`` as (rows, 1))."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).to(FP8), scale


def transposed(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t.T`` in float8, contiguous, one scale a row of ``t.T`` (a column of ``t``)."""
    scale = t.abs().amax(dim=0, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).to(FP8).t().contiguous(), scale.t()


def time_shape(m: int, k: int, n: int, repeats: int) -> dict[str, float]:
    """Seconds of one shape's three GEMMs in bf16 and FP8, and of the FP8 casts they need."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 1e-3
    cast_rows = torch.compile(rowwise, dynamic=False)
    cast_cols = torch.compile(transposed, dynamic=False)
    x8, sx = cast_rows(x)
    w8, sw = cast_rows(w)  # (N, K): its .t() is the column-major (K, N) operand
    wt8, swt = cast_cols(w)  # (K, N): its .t() is the column-major (N, K) operand
    dy8, sdy = cast_rows(dy)
    dyt8, sdyt = cast_cols(dy)  # (N, M)
    xt8, sxt = cast_cols(x)  # (K, M): its .t() is the column-major (M, K) operand

    def fp8(a, b, sa, sb, fast):
        return lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)

    runs = {
        "bf16_forward": lambda: x @ w.t(),
        "bf16_input_grad": lambda: dy @ w,
        "bf16_weight_grad": lambda: dy.t() @ x,
        "fp8_forward": fp8(x8, w8.t(), sx, sw.t(), True),
        "fp8_input_grad": fp8(dy8, wt8.t(), sdy, swt.t(), False),
        "fp8_weight_grad": fp8(dyt8, xt8.t(), sdyt, sxt.t(), False),
        "cast_x": lambda: cast_rows(x),
        "cast_x_transposed": lambda: cast_cols(x),
        "cast_dy": lambda: cast_rows(dy),
        "cast_dy_transposed": lambda: cast_cols(dy),
    }
    out = {name: event_seconds(fn, repeats, warmup=5) for name, fn in runs.items()}
    ref = (x @ w.t()).float()
    got = torch._scaled_mm(x8, w8.t(), sx, sw.t(), out_dtype=torch.float32)
    out["forward_relative_error"] = ((got - ref).norm() / ref.norm()).item()
    return out


def step_totals(shapes: list[dict]) -> dict[str, float]:
    """Milliseconds a step, each shape's time times its count: all three GEMMs in bf16
    (``bf16``) or FP8 (``fp8``) and all four casts (``fp8_casts``); FP8 for the forward and
    the input's gradient with the weight's gradient in bf16 (``fp8_forward_input_grad``), which
    needs only the two row-wise casts (``its_casts``)."""
    parts = {"bf16": ("bf16_forward", "bf16_input_grad", "bf16_weight_grad"),
             "fp8": ("fp8_forward", "fp8_input_grad", "fp8_weight_grad"),
             "fp8_casts": ("cast_x", "cast_x_transposed", "cast_dy", "cast_dy_transposed"),
             "fp8_forward_input_grad": ("fp8_forward", "fp8_input_grad", "bf16_weight_grad"),
             "its_casts": ("cast_x", "cast_dy")}
    return {total: round(sum(s["per_step"] * s[k] for s in shapes for k in keys) * 1e3, 2)
            for total, keys in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = args.batch * 2 * args.seq_len
    shapes = []
    for name, m, k, n, count in layer_shapes(rows):
        t = time_shape(m, k, n, args.repeats)
        shapes.append({"name": name, "m": m, "k": k, "n": n, "per_step": count, **t})
        one = step_totals([{**shapes[-1], "per_step": 1}])
        print(f"{name:5} M={m} K={k} N={n} x{count}: bf16 {one['bf16']:.3f} ms, fp8 "
              f"{one['fp8']:.3f} ms + casts {one['fp8_casts']:.3f} ms "
              f"(forward error {t['forward_relative_error']:.4f})", flush=True)
    totals = step_totals(shapes)
    print("a step, ms:", totals)
    write_json("fp8_matmul.json", {"device": torch.cuda.get_device_name(),
                                   "torch": torch.__version__, "batch": args.batch,
                                   "seq_len": args.seq_len, "step_ms": totals,
                                   "shapes": shapes})


if __name__ == "__main__":
    main()
