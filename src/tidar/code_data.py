"""``tidar data code``: Python source and documentation from installed packages, the standard
library or given directories, decontaminated against HumanEval, into JSONL shards
``{"text": ..., "path": ...}``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .errors import TidarError
from .files import write_jsonl_atomic, write_text_atomic

CODE_SHARD = "code-{:05d}.jsonl"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _package_files(names: list[str] | None, exts: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``(label, path)`` of the files of installed distributions (all when ``names`` is None)."""
    from importlib import metadata

    wanted = None if names is None else {_canonical(n) for n in names}
    found, seen_names = [], set()
    for dist in metadata.distributions():
        name = _canonical(dist.metadata["Name"] or "")
        if wanted is not None and name not in wanted:
            continue
        seen_names.add(name)
        for f in dist.files or ():
            parts = Path(str(f)).parts
            if f.suffix.lower() not in exts or any(
                p.endswith((".dist-info", ".egg-info")) or p == "__pycache__" or p == ".."
                for p in parts
            ):
                continue
            found.append((str(f), Path(dist.locate_file(f))))
    if wanted is not None and wanted - seen_names:
        raise TidarError(f"not installed: {', '.join(sorted(wanted - seen_names))}")
    return found


def _tree_files(root: Path, exts: tuple[str, ...], label: str) -> list[tuple[str, Path]]:
    skip = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() in exts:
                found.append((f"{label}/{path.relative_to(root)}", path))
    return found


def _looks_generated(text: str) -> bool:
    lines = text.splitlines()
    return max(map(len, lines), default=0) > 1000 or len(text) / max(1, len(lines)) > 200


def collect_code(
    out: str | Path,
    *,
    packages: list[str] | None = None,
    dirs: Iterable[str | Path] = (),
    stdlib: bool = False,
    extensions: Iterable[str] = (".py", ".md", ".rst"),
    max_mb: float = 100.0,
    shard_mb: float = 16.0,
    max_file_kb: float = 256.0,
    min_chars: int = 200,
    decontaminate: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Source and docs into JSONL shards ``{"text", "path"}`` under ``out`` (at most
    ``max_mb`` MB of text). Files are visited in a seeded random order (so a cap samples
    across packages), deduplicated by content, filtered (size, generated-looking code) and,
    with ``decontaminate``, dropped if they contain a HumanEval prompt."""
    import sysconfig

    from tqdm import tqdm

    from .humaneval import contains_humaneval, humaneval_prompts

    if not all(0 < value < math.inf for value in (max_mb, shard_mb, max_file_kb)):
        raise TidarError("--max-mb, --shard-mb and --max-file-kb must be positive and finite")
    if decontaminate:
        humaneval_prompts()  # fail now if HumanEval is not installed
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    candidates: list[tuple[str, Path]] = []
    if packages is not None:
        candidates += _package_files(packages or None, exts)
    if stdlib:
        candidates += _tree_files(Path(sysconfig.get_paths()["stdlib"]), exts, "stdlib")
    for d in dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise TidarError(f"{root} is not a directory")
        candidates += _tree_files(root, exts, root.resolve().name)
    unique = {}
    for label, path in sorted(candidates):
        unique.setdefault(path.resolve(), label)
    files = sorted((label, path) for path, label in unique.items())
    random.Random(seed).shuffle(files)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    limit, shard_limit = max_mb * 1e6, shard_mb * 1e6
    dropped: Counter = Counter()
    hashes: set[bytes] = set()
    shard, shard_bytes, total, shards, kept = [], 0, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, shards
        if shard:
            write_jsonl_atomic(out / CODE_SHARD.format(shards), shard)
            shards += 1
            shard, shard_bytes = [], 0

    bar = tqdm(total=int(limit), desc="code", unit="B", unit_scale=True, disable=not progress,
               file=sys.stderr)
    try:
        for label, path in files:
            if total >= limit:
                break
            try:
                if path.stat().st_size > max_file_kb * 1024:
                    dropped["too large"] += 1
                    continue
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                dropped["unreadable"] += 1
                continue
            if len(text.strip()) < min_chars:
                dropped["too short"] += 1
                continue
            if _looks_generated(text):
                dropped["generated"] += 1
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if digest in hashes:
                dropped["duplicate"] += 1
                continue
            hashes.add(digest)
            if decontaminate and contains_humaneval(text):
                dropped["humaneval"] += 1
                continue
            size = len(text.encode())
            shard.append({"text": text, "path": label})
            shard_bytes += size
            total += size
            kept += 1
            bar.update(size)
            if shard_bytes >= shard_limit:
                flush()
        flush()
    finally:
        bar.close()
    for stale in out.glob("code-*.jsonl"):  # from an earlier, larger run
        m = re.fullmatch(r"code-(\d+)\.jsonl", stale.name)
        if m and int(m.group(1)) >= shards:
            stale.unlink()
    summary = {"out": str(out), "candidates": len(files), "documents": kept, "bytes": total,
               "shards": shards, "dropped": dict(dropped), "decontaminated": decontaminate}
    write_text_atomic(out / "code.json", json.dumps(summary, indent=1) + "\n")
    return summary


def run_code(args) -> int:
    packages = args.packages
    if packages is None and not args.dirs and not args.stdlib:
        packages, stdlib = [], True  # nothing chosen: every installed package and the stdlib
    else:
        stdlib = args.stdlib
    summary = collect_code(
        args.out, packages=packages, dirs=args.dirs, stdlib=stdlib,
        extensions=args.extensions, max_mb=args.max_mb, shard_mb=args.shard_mb,
        max_file_kb=args.max_file_kb, min_chars=args.min_chars,
        decontaminate=not args.no_decontaminate, seed=args.seed, progress=not args.quiet,
    )
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(summary["dropped"].items()))
    print(f"tidar: {summary['documents']} files, {summary['bytes'] / 1e6:.1f} MB in "
          f"{summary['shards']} shards in {summary['out']} (dropped: {dropped or 'none'})",
          file=sys.stderr)
    return 0
