"""What drafting would gain on other models' shapes: each ``pass_latency.py --shape`` curve
weighed by the tuner's cost model with an acceptance profile, and the tokens a pass of the
full proposal set must commit to break even with ``ar`` and to reach ``--target`` times it.

    python benchmarks/project_speedup.py docs/results/session45_h100/pass_latency_*.json \
        --bench docs/results/bench/session44_h100/humaneval/bench.json --plot shapes.png

Profiles (``reach[j-1]``: the chance that a pass's first j drafts are all accepted): the
drafter's calibration profile, the one ``--proposals auto`` reads (the shipped drafter's by
default), and with ``--bench`` the profile each drafting method of that ``tidar bench`` run
measured at batch 1. Applied to another model's curve, a profile is a projection for a
drafter of that model that accepts as this one does, not a measurement of one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tidar.drafter import read_drafter
from tidar.engine import proposal_set
from tidar.generate import shipped_drafter
from tidar.tuner import Acceptance, choose, expected_tokens_per_pass


def profiles(drafter: Path, bench: Path | None) -> dict[str, list[float]]:
    info = read_drafter(drafter)[1]
    found = {"calibration": (info.extra or {}).get("acceptance_by_position", [])}
    if bench is not None:
        for row in json.loads(bench.read_text())["results"]:
            if row["batch_size"] == 1 and row.get("acceptance_by_position"):
                found.setdefault(row["method"], row["acceptance_by_position"])
    return found


def project(curve: dict[int, float], reach: list[float], block_size: int, batch: int,
            new_tokens: int) -> dict:
    """The tuner's pick on ``curve`` (t(q) in seconds by queries) and its expected speedup
    over ``ar``, and the full set's expected tokens per pass and speedup."""
    ar = curve[1]
    full = block_size * (block_size + 1)
    pick = choose(curve, Acceptance(reach), "lossless", (block_size,), batch, new_tokens)
    tokens = expected_tokens_per_pass(reach, block_size, proposal_set(block_size, block_size))
    blocks = len(pick.proposals)
    return {"pick": "ar" if pick.sampler == "ar" else f"{blocks} block{'s' * (blocks > 1)}",
            "pick_speedup": pick.tokens_per_second * ar,
            "full_set_tokens_per_pass": tokens,
            "full_set_speedup": tokens * ar / curve[full] if full in curve else None}


def joined_curves(paths: list[Path]) -> dict[tuple[str, str, int], tuple[dict, dict]]:
    """t(q) in seconds by (shape, variant, batch), with its file's data. Curves of one key
    from several files (processes) join on the AR step: a later file adds the queries the
    earlier ones lack, scaled by the ratio of their t(1), so each keeps its own t(q)/t(1)."""
    joined: dict[tuple[str, str, int], tuple[dict, dict]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        for variant, measured in data["variants"].items():
            for batch, raw in measured["curves"].items():
                curve = {int(q): t for q, t in raw.items()}
                key = (data.get("shape", "smollm2-135m"), variant, int(batch))
                if key not in joined:
                    joined[key] = (curve, data)
                    continue
                known = joined[key][0]
                scale = known[1] / curve[1]
                for q, t in curve.items():
                    known.setdefault(q, t * scale)
    return joined


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("curves", nargs="+", type=Path, help="pass_latency.py JSON files")
    ap.add_argument("--drafter", type=Path, default=shipped_drafter("smollm2-135m-instruct"))
    ap.add_argument("--bench", type=Path, help="a tidar bench JSON: its batch-1 profiles too")
    ap.add_argument("--target", type=float, default=4.6,
                    help="a speedup over ar: the tokens per pass it needs are reported")
    ap.add_argument("--new-tokens", type=int, default=128, help="a row's, for the batch term")
    ap.add_argument("--plot", type=Path, help="t(q)/t(1) at batch 1 against q, a line a shape")
    ap.add_argument("--out", type=Path, default=Path("project_speedup.json"))
    args = ap.parse_args()
    for path in [*args.curves, args.drafter, args.bench]:
        if path is not None and not path.is_file():
            raise SystemExit(f"project_speedup: {path} does not exist")
    found = profiles(args.drafter, args.bench)
    rows, lines = [], {}
    for (shape, variant, batch), (curve, data) in joined_curves(args.curves).items():
        b = data["block_size"]
        full = b * (b + 1)
        ar = curve[1]
        row = {"shape": shape, "variant": variant, "batch": batch, "ar_ms": 1e3 * ar,
               "ar_over_memory_floor": 1e3 * ar / data["memory_floor_ms"],
               "full_pass_over_ar": curve[full] / ar if full in curve else None,
               "curve_ms": {q: 1e3 * t for q, t in sorted(curve.items())},
               "profiles": {name: project(curve, reach, b, batch, args.new_tokens)
                            for name, reach in found.items()}}
        rows.append(row)
        if batch == 1:
            lines[shape] = sorted((q, t / ar) for q, t in curve.items())
    args.out.write_text(json.dumps({"target": args.target, "profiles": found, "rows": rows},
                                   indent=1))
    names = list(found)
    print("| shape | batch | AR step ms | / memory floor | t(full)/t(1) | tokens/pass for "
          f"{args.target:g}x | " + " | ".join(f"{n}: pick, speedup" for n in names) + " |")
    print("|---" * (6 + len(names)) + "|")
    for r in rows:
        full_ratio = r["full_pass_over_ar"]
        cells = [f"{p['pick']}, {p['pick_speedup']:.2f}x"
                 for p in (r["profiles"][n] for n in names)]
        shape = r["shape"] + ("" if r["variant"] == "graphed+compiled" else f" ({r['variant']})")
        print(f"| {shape} | {r['batch']} | {r['ar_ms']:.3f} | "
              f"{r['ar_over_memory_floor']:.2f}x | "
              + ("–" if full_ratio is None else f"{full_ratio:.2f}") + " | "
              + ("–" if full_ratio is None else f"{args.target * full_ratio:.1f}")
              + " | " + " | ".join(cells) + " |")
    for name in names:
        tokens = next(iter(rows))["profiles"][name]["full_set_tokens_per_pass"]
        print(f"{name}: {tokens:.2f} tokens a pass expected with the full proposal set")
    if args.plot:
        plot(lines, args.plot)


def plot(lines: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for shape, points in lines.items():
        ax.plot([q for q, _ in points], [r for _, r in points], "o-", label=shape)
    ax.axhline(1.5, color="grey", ls="--", lw=1, label="1.5x the AR step (goal)")
    ax.set_xlabel("query tokens per pass (batch 1)")
    ax.set_ylabel("t(q) / t(1)")
    ax.set_title("pass cost against the AR step, by model shape")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
