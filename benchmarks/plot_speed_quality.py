"""The speed/quality curve: HumanEval pass@1 (``humaneval_eval.py``) against the batch-1
speedup over our compiled ``ar`` (``tidar bench`` on HumanEval prompts), one point per method.

    python benchmarks/plot_speed_quality.py docs/results/humaneval/humaneval_bf16.json \
        docs/results/flagship/bench_humaneval/bench.json \
        docs/results/flagship/bench_humaneval_betas/bench.json --out speed_quality.png

Where several bench files measure a method, the first one given wins.
"""

from __future__ import annotations

import argparse
import json


def bench_speedups(paths: list[str], batch: int) -> dict[str, float]:
    speedups: dict[str, float] = {}
    for path in paths:
        for row in json.load(open(path))["results"]:
            if row["batch_size"] == batch:
                speedups.setdefault(row["method"].replace("@", "-"), row["speedup"])
    return speedups


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("humaneval", help="humaneval_eval.py's JSON")
    ap.add_argument("bench", nargs="+", help="tidar bench JSON files (HumanEval prompts)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default="speed_quality.png")
    args = ap.parse_args()
    quality = json.load(open(args.humaneval))
    speedups = bench_speedups(args.bench, args.batch)
    points = [(speedups[r["method"]], 100 * r["pass@1"], r["method"], r["tokens_per_pass"])
              for r in quality["results"] if r["method"] in speedups]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o")
    for x, y, name, tpp in points:
        ax.annotate(f"{name} ({tpp:.2f} tok/pass)", (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ar = next(p[1] for p in points if p[2] == "ar")
    ax.axhspan(ar - 2, ar + 2, color="grey", alpha=0.15, label="ar ± 2 points")
    ax.set_xlabel(f"speedup over compiled ar, batch {args.batch}")
    ax.set_ylabel("HumanEval pass@1 (%)")
    ax.set_title(f"speed against quality ({quality['dtype']})")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    for x, y, name, tpp in points:
        print(f"{name:10s} {x:5.2f}x  pass@1 {y:5.1f}%  {tpp:.2f} tok/pass")


if __name__ == "__main__":
    main()
