"""Files written whole or not at all: a killed run never leaves a partial one behind."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends
    without an error, and is removed when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> int:
    """Write ``text`` to ``path`` whole (synced before it replaces ``path``); returns bytes."""
    with replaced_atomically(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
    return size


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> int:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                           for r in rows))
