"""Where a decode pass spends its GPU time: CUDA kernel time by kernel name, for the AR step,
a 32-query pass (one proposal block) and the full 272-query pass, eager and with compiled
blocks (batch 1, random weights of SmolLM2's shape, or another of ``common.SHAPES``).

    python benchmarks/profile_pass.py --context 1024
    python benchmarks/profile_pass.py --compiled-only --ar-only --shape olmoe-7b
    python benchmarks/profile_pass.py --compiled-only
    python benchmarks/profile_pass.py --compiled-only --ar-only \
        --kernel-settings engine NARROW_OUTPUTS=16

``--kernel-settings`` profiles each setting of the decode kernels' constants in turn
(``common.kernel_settings``), each compiled afresh.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from common import SHAPES, format_profile, kernel_settings, profile_cuda, random_model, write_json

from tidar.engine import DecodeConfig, Engine


def kernel_table(engine: Engine, cfg: DecodeConfig, context: int, passes: int = 5) -> dict:
    """GPU time per pass by kernel name over ``passes`` uncaptured passes."""
    cfg = cfg.resolved()
    runner = engine._runner(1, context + 64, cfg)
    prompt = [[(7 * i) % 1000 for i in range(context)]]
    with torch.inference_mode(), engine.model.decode_weights():
        st = engine._start(runner, prompt, cfg, [0])
        for _ in range(2):
            engine._pass(st, cfg, runner.cache, runner.consts)
        return profile_cuda(lambda: engine._pass(st, cfg, runner.cache, runner.consts), passes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES),
                    help="the random-weight model's shape (common.SHAPES)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--compiled-only", action="store_true", help="skip the eager blocks")
    ap.add_argument("--ar-only", action="store_true", help="profile the AR step alone")
    ap.add_argument("--kernel-settings", nargs="+", default=["engine"],
                    help="NAME=VALUE,... (see common.kernel_settings), one profile each")
    args = ap.parse_args()
    model = random_model(args.shape)
    report = {"device": torch.cuda.get_device_name(), "shape": args.shape,
              "context": args.context}
    kinds = ["compiled"] if args.compiled_only else ["eager", "compiled"]
    configs = {"ar": DecodeConfig(sampler="ar"),
               "lossless_b16_one_block": DecodeConfig(block_size=16, proposals=(0,)),
               "lossless_b16_full": DecodeConfig(block_size=16)}
    if args.ar_only:
        configs = {"ar": configs["ar"]}
    for spec, kind in itertools.product(args.kernel_settings, kinds):
        torch._dynamo.reset()  # compile under this setting afresh
        with kernel_settings(spec):
            engine = Engine(model, cuda_graphs=False, compile=kind == "compiled")
            for label, cfg in configs.items():
                table = kernel_table(engine, cfg, args.context)
                name = f"{kind}/{label}" + ("" if spec == "engine" else f" {spec}")
                report[name] = table
                print(f"== {name}\n{format_profile(table, 12)}", flush=True)
    write_json("profile_pass.json", report)


if __name__ == "__main__":
    main()
