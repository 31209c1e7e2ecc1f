"""Where a decode pass spends its GPU time: CUDA kernel time by kernel name, for the AR step
and the full 272-query pass, eager and with compiled blocks (batch 1, SmolLM2 shape).

    python benchmarks/profile_pass.py --context 1024
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from common import smollm2_shaped, write_json
from torch.profiler import ProfilerActivity, profile

from tidar.engine import DecodeConfig, Engine


def kernel_table(engine: Engine, cfg: DecodeConfig, context: int, passes: int = 5) -> dict:
    """Per kernel name: total GPU microseconds per pass over ``passes`` uncaptured passes."""
    cfg = cfg.resolved()
    runner = engine._runner(1, context + 64, cfg)
    prompt = [[(7 * i) % 1000 for i in range(context)]]
    st = engine._start(runner, prompt, cfg, [0])
    with torch.inference_mode():
        for _ in range(2):
            engine._pass(st, cfg, runner.cache, runner.consts)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(passes):
                engine._pass(st, cfg, runner.cache, runner.consts)
            torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            totals[e.name[:90]] += e.device_time / passes
            counts[e.name[:90]] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return {"total_us": sum(totals.values()), "kernels": sum(counts.values()) // passes,
            "top": [{"name": n, "us": round(t, 1), "per_pass": counts[n] // passes}
                    for n, t in ranked[:15]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    model = smollm2_shaped()
    report = {"device": torch.cuda.get_device_name(), "context": args.context}
    for name, engine in {"eager": Engine(model, cuda_graphs=False),
                         "compiled": Engine(model, cuda_graphs=False, compile=True)}.items():
        for label, cfg in {"ar": DecodeConfig(sampler="ar"),
                           "lossless_b16_full": DecodeConfig(block_size=16)}.items():
            table = kernel_table(engine, cfg, args.context)
            report[f"{name}/{label}"] = table
            print(f"== {name} {label}: {table['total_us']:.0f} us GPU time, "
                  f"{table['kernels']} kernels per pass", flush=True)
            for row in table["top"][:8]:
                print(f"   {row['us']:8.1f} us  x{row['per_pass']:<4} {row['name']}", flush=True)
    write_json("profile_pass.json", report)


if __name__ == "__main__":
    main()
