"""Readers of training data files: one file (or ``datasets`` shard) each, its documents
addressed by index, so a source can shuffle and resume without reading everything first.
``read`` returns ``(text, None)``, or ``(None, why)`` for a bad row (``(None, None)`` for a
blank line)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import TidarError

TEXT_EXTENSIONS = (
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs",
    ".go", ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html",
    ".css", ".tex",
)
STRUCTURED_EXTENSIONS = (".jsonl", ".parquet")
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", ".git"}


def text_or_reason(record, tokenizer, path: Path) -> tuple[str | None, str | None]:
    """The document of one record (a dict), or why there is none."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if record.get("text") is not None:
        text = record["text"]
        if not isinstance(text, str):
            return None, "non-string text"
        return (text, None) if text.strip() else (None, "empty text")
    messages = record.get("messages")
    if messages is None:
        return None, "no text or messages field"
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages
    ):
        return None, "malformed messages"
    if not any(m["content"].strip() for m in messages):
        return None, "empty text"
    return render_chat(tokenizer, messages, path)


def render_chat(tokenizer, messages: list[dict], path: Path | str = "data"):
    """``(text, None)``: a chat rendered with the tokenizer's template; ``(None, why)`` if the
    template rejects it. No template at all is an error: every chat row would be unusable."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TidarError(
            f"{path} has chat rows (`messages`) but the tokenizer has no chat template"
        )
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False
        )
    except Exception:
        return None, "messages rejected by the chat template"
    return text, None


class TextFile:
    kind = "text"

    def __init__(self, path: Path):
        self.path, self.n_items, self.blocks = path, 1, [1]

    def read(self, item: int, tokenizer):
        try:
            text = self.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return None, "not UTF-8"
        except OSError as exc:
            raise TidarError(f"cannot read {self.path}: {exc.strerror}") from None
        return (text, None) if text.strip() else (None, "empty text")


class JsonlFile:
    kind = "jsonl"

    def __init__(self, path: Path):
        self.path = path
        self.starts = line_starts(path)
        self.n_items = len(self.starts)
        self.blocks = [1] * self.n_items  # random access: shuffle line by line
        self._handle = None

    def read(self, item: int, tokenizer):
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 (kept open across reads)
        self._handle.seek(int(self.starts[item]))
        line = self._handle.readline()
        if not line.strip():
            return None, None  # a blank line: not a row, not an error
        try:
            record = json.loads(line)
        except ValueError:
            return None, "bad JSON"
        return text_or_reason(record, tokenizer, self.path)

    def close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def line_starts(path: Path) -> np.ndarray:
    """Byte offsets where the lines of a file start (a final line without newline counts)."""
    starts, base, last = [np.zeros(1, dtype=np.int64)], 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            starts.append(newlines.astype(np.int64) + base + 1)
            base += len(chunk)
            last = chunk[-1:]
    out = np.concatenate(starts)
    if base == 0:
        return out[:0]
    return out[:-1] if last == b"\n" else out


def pyarrow_modules():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise TidarError(
            "reading Parquet or `datasets` directories needs pyarrow: pip install pyarrow"
        ) from None
    return sys.modules["pyarrow"]


class ColumnarFile:
    """Parquet file or Arrow stream (a ``datasets`` shard): blocks are row groups / batches."""

    def __init__(self, path: Path, kind: str):
        pa = pyarrow_modules()
        self.path, self.kind = path, kind
        try:
            if kind == "parquet":
                self._file = pa.parquet.ParquetFile(path)
                meta = self._file.metadata
                self.blocks = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                names = self._file.schema_arrow.names
            else:
                self._table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
                self._batches = self._table.to_batches()
                self.blocks = [b.num_rows for b in self._batches]
                names = self._table.schema.names
        except (OSError, pa.ArrowException) as exc:
            raise TidarError(f"{path} is not a readable {kind} file: {exc}") from None
        if "text" in names:
            self.column = "text"
        elif "messages" in names:
            self.column = "messages"
        else:
            raise TidarError(
                f"{path} has no `text` or `messages` column (columns: {', '.join(names)})"
            )
        self.n_items = sum(self.blocks)
        self._block_starts = np.cumsum([0] + self.blocks)
        self._cached: tuple[int, list] | None = None

    def _block(self, b: int) -> list:
        if self._cached is None or self._cached[0] != b:
            if self.kind == "parquet":
                table = self._file.read_row_group(b, columns=[self.column])
                values = table.column(self.column).to_pylist()
            else:
                values = self._batches[b].column(self.column).to_pylist()
            self._cached = (b, values)
        return self._cached[1]

    def read(self, item: int, tokenizer):
        b = int(np.searchsorted(self._block_starts, item, side="right")) - 1
        value = self._block(b)[item - int(self._block_starts[b])]
        if value is None:
            return None, f"missing {self.column}"
        return text_or_reason({self.column: value}, tokenizer, self.path)


def datasets_files(path: Path) -> list[Path]:
    """The Arrow shards of a ``save_to_disk`` directory (a ``DatasetDict``: its train split)."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError):
            raise TidarError(f"{path / 'dataset_dict.json'} is malformed") from None
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise TidarError(
                f"{path} holds splits {', '.join(splits)} and none is `train`: give the split's "
                f"directory, e.g. {path / splits[0]}"
            )
        path = path / split
    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise TidarError(f"{path} is not a `datasets` directory (bad state.json)") from None
    for f in files:
        if not f.is_file():
            raise TidarError(f"{path}: the datasets shard {f.name} is missing")
    return files


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def supported_inputs() -> str:
    return ", ".join(TEXT_EXTENSIONS + STRUCTURED_EXTENSIONS) + ", or a `datasets` directory"


def reader_for(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JsonlFile(path)
    if suffix == ".parquet":
        return ColumnarFile(path, "parquet")
    return TextFile(path)


def walk(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                found.append(Path(dirpath) / name)
    return sorted(found)
