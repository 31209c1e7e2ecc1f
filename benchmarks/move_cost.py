"""What moving a running batch into a larger bucket costs (``Engine._grow``): a batch of
one prompt that four prompts join moves three times (into 2, 4 and 8 rows). Timed with the
larger buckets' runners new (each allocates its caches and is prefilled once to build
its state: every move prefilled so before session 18) and used before (their rows' state
copied over, nothing prefilled), alternating in one process; ``Engine.stalls`` gives the
moves' seconds (CUDA events on a GPU, wall time on the CPU).

    python benchmarks/move_cost.py [--device cuda --dtype bfloat16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from common import alternating, write_json

from tidar.engine import DecodeConfig, Engine
from tidar.loading import load_model


def moves_seconds(model, used: bool, gen: torch.Generator) -> float:
    vocab = model.cfg.vocab_size
    ids = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
    cfg = DecodeConfig(sampler="ar", max_new_tokens=24)
    engine = Engine(model)
    if used:
        for rows in (2, 4, 8):
            engine.generate([ids(40) for _ in range(rows)], cfg)
    waiting = [ids(30) for _ in range(4)]
    for _ in engine.stream([ids(30)], cfg, max_rows=5,
                           more=lambda longest: waiting.pop(0) if waiting else None):
        pass
    assert engine.moves == 3
    return engine.stalls.seconds()["move"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = load_model(None, device=torch.device(args.device),
                       dtype=getattr(torch, args.dtype)).model
    gen = torch.Generator().manual_seed(0)
    times = alternating({kind: partial(moves_seconds, model, kind == "used", gen)
                         for kind in ("new", "used")}, args.rounds)
    report = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "three_moves_seconds": times,
              "median_ms": {k: statistics.median(t) * 1000 for k, t in times.items()}}
    write_json("move_cost.json", report)
    for kind, t in times.items():
        print(f"runners {kind}: three moves {statistics.median(t) * 1000:.1f} ms (median of "
              f"{len(t)})", flush=True)


if __name__ == "__main__":
    main()
