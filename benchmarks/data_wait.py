"""How long a training step waits for its batch: the data pipeline called in the training
thread (as `tidar convert` did) against batches made ahead in a thread (``Prefetched``).

    python benchmarks/data_wait.py DATA [DATA ...] --batch 64 --seq-len 512 --step-ms 155

Each step sleeps ``--step-ms`` in place of the GPU's work (a step the host waits out), then
takes the next batch: the embedded default's tokenizer, packed rows, as in training.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import write_json

from tidar.data import PackedRows, load_tokenizer
from tidar.prefetch import Prefetched


def waits(source, steps: int, step_seconds: float) -> list[float]:
    """Seconds each of ``steps`` steps spent waiting in ``next_batch``."""
    out = []
    for _ in range(steps):
        time.sleep(step_seconds)
        t0 = time.perf_counter()
        source.next_batch()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="+", help="training data, as `tidar convert --data` takes it")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--step-ms", type=float, default=155.0)
    args = ap.parse_args()
    tokenizer = load_tokenizer(None)
    results = {"batch": args.batch, "seq_len": args.seq_len, "step_ms": args.step_ms,
               "steps": args.steps}
    for name in ("in the training thread", "prefetched"):
        rows = PackedRows(args.data, tokenizer, 0, args.seq_len, args.batch, seed=0)
        source = Prefetched(rows) if name == "prefetched" else rows
        try:
            w = waits(source, args.steps, args.step_ms / 1e3)
        finally:
            if name == "prefetched":
                source.close()
        results[name] = {"mean_wait_ms": 1e3 * statistics.mean(w),
                         "max_wait_ms": 1e3 * max(w), "total_wait_s": sum(w)}
        print(f"{name}: mean wait {1e3 * statistics.mean(w):.1f} ms per step, "
              f"max {1e3 * max(w):.0f} ms", flush=True)
    write_json("data_wait.json", results)


if __name__ == "__main__":
    main()
