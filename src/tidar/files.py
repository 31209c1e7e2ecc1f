"""Files written whole or not at all: a killed run never leaves a partial one behind."""

from __future__ import annotations

import functools
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@functools.cache
def _umask() -> int:
    mask = os.umask(0o22)  # Python can only read the umask by setting it
    os.umask(mask)
    return mask


def give_plain_mode(path: Path, like: Path | None = None) -> None:
    """Set ``path``'s permissions to those of ``like`` if it exists, else to what a file or
    directory made with ``open`` or ``mkdir`` gets under the umask. safetensors (0.8.1 on)
    and ``tempfile`` create theirs readable by their owner alone, which would keep a drafter
    or checkpoint from the other users of a machine."""
    if like is not None and like.exists():
        mode = stat.S_IMODE(like.stat().st_mode)
    else:
        mode = (0o777 if path.is_dir() else 0o666) & ~_umask()
    os.chmod(path, mode)


def _check_writing_in(directory: Path, what: str) -> None:
    """A one-line error now, not a traceback after the work: ``directory`` must exist (it is
    made if missing) and take a new file."""
    from .errors import TidarError

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise TidarError(f"{what} cannot be written: {exc.strerror or exc}") from None


def check_writable(path: Path, flag: str) -> None:
    """``path``, a file to be written after long work, can be."""
    _check_writing_in(path.parent, f"{flag} {path}")


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a directory a command writes into: made if missing, checked before the
    work."""
    from .errors import TidarError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TidarError(f"{flag} {path} exists and is not a directory")
    _check_writing_in(path, f"{flag} {path}")
    return path


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` (with ``path``'s
    permissions, or a new file's) when the block ends without an error, and is removed when
    it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        give_plain_mode(tmp, like=path)
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
