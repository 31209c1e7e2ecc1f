"""Time to the first tokens of a new batch on a runner that has decoded before: one eager
batched prefill (``Engine.start_by_joins`` off, the engine before session 27) or each prompt
admitted by the joins' captured graph for its padded length (on), alternating in one
process. Prompts of 35-62 tokens (one padded length, 64); the first round builds each
engine's runners (a batched prefill), the second captures the joins' graph. Wall time from
the call to ``stream`` to its first tokens (its first look copies them to the host), as a
client waits for them. Random weights of the default's shape (a prefill's cost does not
depend on them).

    python benchmarks/start_cost.py [--batch 1 4 8] [--sampler ar lossless] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from common import DEVICE, alternating, smollm2_shaped, write_json

from tidar.engine import DecodeConfig, Engine

LENGTHS = [40, 50, 60, 45, 55, 62, 35, 58]


def first_tokens_seconds(engine: Engine, batch: int, cfg: DecodeConfig,
                         gen: torch.Generator) -> float:
    """Seconds from ``stream``'s call to its first tokens, for ``batch`` fresh prompts."""
    vocab = engine.model.cfg.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in LENGTHS[:batch]]
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    stream = engine.stream(prompts, cfg)
    next(stream)
    seconds = time.perf_counter() - started
    stream.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--sampler", nargs="+", default=["ar", "lossless"],
                    choices=["ar", "lossless"])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    model = smollm2_shaped()
    gen = torch.Generator().manual_seed(0)
    engines = {"batched": Engine(model), "joins": Engine(model)}
    for name, engine in engines.items():
        engine.start_by_joins = name == "joins"  # on the CPU too, with eager admissions
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
              "torch": torch.__version__, "lengths": LENGTHS, "seconds": {},
              "median_ms_after_first_round": {}}
    for sampler in args.sampler:
        cfg = DecodeConfig(sampler=sampler, max_new_tokens=64)
        for batch in args.batch:
            key = f"{sampler} batch {batch}"
            times = alternating({name: partial(first_tokens_seconds, engine, batch, cfg, gen)
                                 for name, engine in engines.items()}, args.rounds)
            medians = {name: statistics.median(t[1:] or t) * 1000 for name, t in times.items()}
            report["seconds"][key] = times
            report["median_ms_after_first_round"][key] = medians
            write_json("start_cost.json", report)  # so far: a later cell may time out
            print(f"{key}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
                  + " to the first tokens (median of rounds 2-"
                  f"{args.rounds}; first round "
                  + ", ".join(f"{t[0] * 1000:.0f}" for t in times.values()) + " ms)", flush=True)


if __name__ == "__main__":
    main()
