"""How long a running batch stands still while a prompt joins it (``Engine._admit``): the
joining prompt's prefill, eager (as before session 19) or replayed from the runner's
captured graph for its padded length, alternating in one process. One prompt starts a
batch of eight rows and seven of 35-62 tokens join it (one padded length, 64); the first
round captures that graph. ``Engine.stalls`` gives the joins' seconds (CUDA events on a
GPU). Random weights of the default's shape (a join's cost does not depend on them).

    python benchmarks/join_cost.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from common import DEVICE, alternating, smollm2_shaped, write_json

from tidar.engine import DecodeConfig, Engine

LENGTHS = [40, 50, 60, 45, 55, 62, 35]


def join_seconds(engine: Engine, gen: torch.Generator) -> float:
    """Seconds the batch stood still, per join."""
    vocab = engine.model.cfg.vocab_size
    ids = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
    waiting = [ids(n) for n in LENGTHS]
    before = engine.stalls.seconds().get("join", 0.0)
    for _ in engine.stream([ids(30)], DecodeConfig(sampler="ar", max_new_tokens=48),
                           sync_every=1, min_rows=8,
                           more=lambda longest: waiting.pop(0) if waiting else None):
        pass
    assert not waiting
    return (engine.stalls.seconds()["join"] - before) / len(LENGTHS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = smollm2_shaped()
    gen = torch.Generator().manual_seed(0)
    engines = {"eager": Engine(model), "graphs": Engine(model)}
    engines["eager"].join_graphs = False
    engines["eager"].join_length_multiple = 1
    times = alternating({name: partial(join_seconds, engine, gen)
                         for name, engine in engines.items()}, args.rounds)
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
              "lengths": LENGTHS, "seconds_per_join": times,
              "median_ms_after_first_round": {
                  k: statistics.median(t[1:] or t) * 1000 for k, t in times.items()}}
    write_json("join_cost.json", report)
    for name, t in times.items():
        print(f"joins {name}: {statistics.median(t[1:] or t) * 1000:.2f} ms a join (median of "
              f"rounds 2-{len(t)}; first round {t[0] * 1000:.1f} ms)", flush=True)


if __name__ == "__main__":
    main()
