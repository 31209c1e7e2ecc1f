"""``tidar bench``'s report: written atomically after every cell, resumed by ``--resume``,
and printed as a table."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TidarError
from .files import write_text_atomic

# What makes two runs' cells comparable: everything but the cells asked for and the curve.
RESUME_KEYS = ("device", "device_type", "dtype", "torch", "transformers", "model_fingerprint",
               "drafter", "block_size", "proposals", "compile", "prompt_set", "raw",
               "prompts_in_set", "num_prompts", "betas", "methods", "repeats")


def resume_cells(out_dir: Path, report: dict) -> dict[tuple[int, int], list[dict]]:
    """The rows of ``out_dir``'s earlier report by (length, batch size) cell, for the cells
    this run asks for. Each cell was measured in one process (its rows' ``measured`` time
    says which); cells of different runs were not alternated with each other."""
    path = out_dir / "bench.json"
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
        meta, rows = earlier["meta"], earlier["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise TidarError(f"--resume: {path} is not a bench report") from None
    for key in RESUME_KEYS:
        if meta.get(key) != report["meta"][key]:
            raise TidarError(f"--resume: {path} has {key} {meta.get(key)!r}, this run "
                             f"{report['meta'][key]!r}; use another --out")
    wanted = {(n, b) for n in report["meta"]["max_new_tokens"]
              for b in report["meta"]["batch_sizes"]}
    kept: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        cell = (row["max_new_tokens"], row["batch_size"])
        if cell in wanted:
            kept.setdefault(cell, []).append(row | {"measured": row.get("measured", meta["time"])})
    report["meta"]["resumed_from"] = meta["time"]
    return kept


def save_report(out_dir: Path, report: dict) -> None:
    write_text_atomic(out_dir / "bench.json", json.dumps(report, indent=1, default=str))


# -- output ------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    head = ("method", "len", "batch", "tok/s", "e2e tok/s", "speedup", "tok/pass",
            "rows busy", "TTFT ms", "same as ar")
    rows = [head]
    for r in results:
        rows.append((r["method"], str(r["max_new_tokens"]), str(r["batch_size"]),
                     _fmt(r["decode_tokens_per_second"], ".1f"),
                     _fmt(r["tokens_per_second"], ".1f"), _fmt(r["speedup"], ".2f"),
                     _fmt(r["tokens_per_pass"], ".2f"), _fmt(r.get("row_utilisation"), ".2f"),
                     _fmt(r["ttft_ms"], ".1f"), _fmt(r["identical_to_ar"], ".2f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    return "\n".join(lines)
