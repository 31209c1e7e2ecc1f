"""Pass latency t(q) of the engine's CUDA-graphed decode pass, and the AR step's floor.

    python benchmarks/pass_latency.py --context 1024 --batch 1 4 16 64
"""

from __future__ import annotations

import argparse

import torch
from common import SMOLLM2, smollm2_shaped, write_json

from tidar.engine import DecodeConfig, Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="torch.compile the pass forward")
    args = ap.parse_args()
    model = smollm2_shaped()
    engine = Engine(model, compile=args.compile)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": name, "compile": args.compile, "context": args.context,
               "params": params, "curves": {}}
    for batch in args.batch:
        ar = engine.time_pass(DecodeConfig(sampler="ar"), batch, args.context, args.repeats)
        curve = {1: ar}
        for b in args.block_sizes:
            for n in sorted({1, 2, 3, 4, 6, 8, 12, 16} & set(range(1, b + 1))):
                cfg = DecodeConfig(block_size=b, proposals=tuple(range(n)))
                curve[b + n * b] = engine.time_pass(cfg, batch, args.context, args.repeats)
        results["curves"][batch] = curve
        print(f"batch {batch}: " + "  ".join(f"t({q})={t * 1e3:.2f}ms" for q, t in
                                            sorted(curve.items())), flush=True)
    # Memory floor of one AR step: every weight read once, plus the KV cache of the context.
    kv = 2 * SMOLLM2["num_hidden_layers"] * SMOLLM2["num_key_value_heads"] * 64 * 2
    weight_bytes = params * 2
    results["ar_floor_bytes"] = {"weights": weight_bytes, "kv_per_token": kv}
    results["notes"] = "t(q) in seconds, median of CUDA-event-timed graph replays"
    write_json(f"pass_latency{'_compiled' if args.compile else ''}.json", results)


if __name__ == "__main__":
    main()
