"""``tidar bench``'s PNG plots: speedup against batch size, tokens per pass, and ``t(q)``."""

from __future__ import annotations

import sys
from pathlib import Path


def plot(report: dict, out_dir: Path) -> list[str]:
    """PNG plots; none (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed: no plots (pip install matplotlib)",
              file=sys.stderr)
        return []
    written = []
    results = report["results"]
    lengths = report["meta"]["max_new_tokens"]

    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for name in dict.fromkeys(r["method"] for r in results):
            pts = [(r["batch_size"], r["speedup"]) for r in results
                   if r["method"] == name and r["max_new_tokens"] == length
                   and r["speedup"] is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=name, linestyle="--" if name == "ar" else "-")
        ax.set_xscale("log", base=2)
        measured = sorted({r["batch_size"] for r in results})  # a stopped run: fewer
        ax.set_xticks(measured, map(str, measured))
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode speedup over our ar")
        ax.set_title(f"{report['meta']['device']}, {length} new tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "speedup_vs_batch.png"))

    hists: dict[str, list[int]] = {}
    for r in results:
        if r.get("sampler") in ("lossless", "mix"):
            h = r["committed_per_pass_histogram"]
            old = hists.get(r["method"], [0] * len(h))
            hists[r["method"]] = [a + b for a, b in zip(old, h, strict=True)]
    if hists:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / len(hists)
        for i, (name, h) in enumerate(hists.items()):
            total = max(1, sum(h))
            xs = [n + 1 + (i - (len(hists) - 1) / 2) * width for n in range(len(h))]
            mean = sum((n + 1) * c for n, c in enumerate(h)) / total
            ax.bar(xs, [c / total for c in h], width, label=f"{name} (mean {mean:.2f})")
        ax.set_xlabel("tokens committed per decode pass")
        ax.set_ylabel("fraction of passes")
        ax.set_title("tokens per pass (all batch sizes and lengths)")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "tokens_per_pass_hist.png"))

    curve = report.get("pass_latency")
    if curve:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for c in curve["curves"]:
            xs = [p["q_per_sequence"] for p in c["points"]]
            ax1.plot(xs, [p["ms"] for p in c["points"]], marker="o",
                     label=f"batch {c['batch_size']}")
            ax2.plot(xs, [p["relative_to_ar"] for p in c["points"]], marker="o",
                     label=f"batch {c['batch_size']}")
        qs = sorted({p["q_per_sequence"] for c in curve["curves"] for p in c["points"]})
        for ax, ylabel in ((ax1, "ms per pass"), (ax2, "t(q) / t(1)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(qs, map(str, qs))
            ax.set_xlabel("query tokens per sequence q")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax1.set_title(f"pass latency, context {curve['context']}")
        written.append(_save(fig, out_dir / "pass_latency.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
