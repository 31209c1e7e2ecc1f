"""Training data for conversion: read documents, tokenise them, mix sources, pack rows.

A training row is ``L`` tokens of documents packed back to back, each followed by EOS
(DESIGN.md section 2); a row may start mid-document. Sources:

- text files (``.txt``, ``.md``, ``.py``, ...): one file is one document; a directory is
  every file under it with a known extension (recursively, hidden folders skipped);
- JSONL: one document per line, a ``text`` field or ``messages`` (a chat, rendered with the
  tokenizer's chat template);
- Parquet: a ``text`` (or ``messages``) column;
- a Hugging Face ``datasets`` directory written by ``save_to_disk`` (read with pyarrow, no
  ``datasets`` needed): a ``text`` or ``messages`` column; the ``train`` split of a
  ``DatasetDict``.

A spec is ``PATH`` or ``PATH:WEIGHT``: ``chat.jsonl:0.6 code/:0.4`` draws the next document
from ``chat.jsonl`` with probability 0.6. Sources repeat when exhausted (epochs are
counted); each epoch visits a source's documents in a fresh seeded order (``shuffle``).

Held-out documents: ``held_out`` documents of each source, spread evenly through it, are
never used for training; :func:`held_out_rows` packs them into evaluation rows.

Bad rows (malformed JSON, no ``text``/``messages``, non-string or empty text) are counted
and skipped, with a one-line summary on stderr after a source's first pass; a source with
no usable row at all is a :class:`TidarError`.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import TidarError
from .humaneval import contains_humaneval
from .readers import (
    STRUCTURED_EXTENSIONS,
    TEXT_EXTENSIONS,
    ColumnarFile,
    datasets_files,
    is_datasets_dir,
    reader_for,
    supported_inputs,
    walk,
)

HELD_OUT = 64  # documents per source kept for evaluation (at most a tenth of the source)
_PREFETCH_DOCS = 64  # documents tokenised per call (the fast tokenizer batches in Rust)
_PREFETCH_CHARS = 1 << 20
_MASK63 = (1 << 63) - 1


# -- specs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    path: Path
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}"


def parse_spec(spec: str | SourceSpec) -> SourceSpec:
    """``PATH`` or ``PATH:WEIGHT`` (the weight is a positive number)."""
    if isinstance(spec, SourceSpec):
        return spec
    path, weight = str(spec), 1.0
    head, sep, tail = path.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            pass  # a colon that is part of the path
        else:
            path = head
            if not weight > 0 or weight == float("inf"):
                raise TidarError(f"data source {spec!r}: the weight must be a positive number")
    return SourceSpec(Path(path).expanduser(), weight)


def parse_specs(specs: str | SourceSpec | Iterable[str | SourceSpec]) -> list[SourceSpec]:
    if isinstance(specs, (str, SourceSpec)):
        specs = [specs]
    parsed = [parse_spec(s) for s in specs]
    if not parsed:
        raise TidarError("no data sources given")
    return parsed


# -- a source: its files' items laid end to end ---------------------------------------------------


class Source:
    """One data source (a file or directory) with ``n_items`` rows addressed by index.

    ``read(i)`` gives ``(text, None)`` or ``(None, reason)`` (``reason`` is None for blank
    lines, which are not counted as bad rows).
    """

    def __init__(self, spec: str | SourceSpec, tokenizer=None,
                 extensions: Iterable[str] | None = None):
        self.spec = parse_spec(spec)
        self.path, self.weight = self.spec.path, self.spec.weight
        self.tokenizer = tokenizer
        path = self.path
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower()
                     for e in (extensions or TEXT_EXTENSIONS + STRUCTURED_EXTENSIONS))
        if not path.exists():
            raise TidarError(f"data source {path} does not exist")
        if is_datasets_dir(path):
            self.readers = [ColumnarFile(f, "arrow") for f in datasets_files(path)]
        elif path.is_dir():
            self.readers = [reader_for(f) for f in walk(path, exts)]
            if not self.readers:
                raise TidarError(f"data directory {path} has no files with a supported "
                                 f"extension ({supported_inputs()})")
        else:
            if path.suffix.lower() not in TEXT_EXTENSIONS + STRUCTURED_EXTENSIONS:
                raise TidarError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                                 f"supported: {supported_inputs()}")
            self.readers = [reader_for(path)]
        sizes = [r.n_items for r in self.readers]
        self.n_items = sum(sizes)
        if self.n_items == 0:
            raise TidarError(f"data source {path} is empty")
        self._starts = np.cumsum([0] + sizes)
        self._blocks = np.array([n for r in self.readers for n in r.blocks], dtype=np.int64)
        self._last: int | None = None

    def read(self, item: int) -> tuple[str | None, str | None]:
        r = int(np.searchsorted(self._starts, item, side="right")) - 1
        if r != self._last:  # at most one JSONL file open per source
            if self._last is not None and hasattr(self.readers[self._last], "close"):
                self.readers[self._last].close()
            self._last = r
        return self.readers[r].read(item - int(self._starts[r]), self.tokenizer)

    def held_items(self, held_out: int | float) -> np.ndarray:
        """Indices of held-out items: ``held_out`` (at most a tenth of the source) if an int,
        a fraction of the source if a float, spread evenly through it."""
        n = self.n_items
        if isinstance(held_out, float) and not isinstance(held_out, bool):
            if not 0.0 <= held_out < 1.0:
                raise TidarError(f"held-out fraction must be in [0, 1), got {held_out}")
            count = int(held_out * n)
        else:
            if held_out < 0:
                raise TidarError(f"held-out documents must be >= 0, got {held_out}")
            count = min(int(held_out), n // 10)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        return np.unique((np.arange(count, dtype=np.int64) * n) // count)

    def epoch_order(self, seed: int, epoch: int, exclude: np.ndarray,
                    shuffle: bool = True) -> np.ndarray:
        """The items of one epoch, without ``exclude``: blocks (Parquet row groups, Arrow
        batches; single items otherwise) in a seeded random order, items shuffled inside them."""
        n = self.n_items
        if shuffle:
            rng = np.random.default_rng([seed & _MASK63, epoch, _path_key(self.path)])
            block_rank = rng.permutation(len(self._blocks))
            key = np.repeat(block_rank, self._blocks).astype(np.float64) + rng.random(n)
            order = np.argsort(key, kind="stable")
        else:
            order = np.arange(n, dtype=np.int64)
        if len(exclude):
            order = order[~np.isin(order, exclude)]
        return order

    def close(self):
        for r in self.readers:
            if hasattr(r, "close"):
                r.close()

    def __repr__(self) -> str:
        return f"Source({str(self.path)!r}, weight={self.weight:g}, items={self.n_items})"


def _path_key(path: Path) -> int:
    """Of the name alone: the same data in another directory trains in the same order."""
    return int.from_bytes(hashlib.sha256(path.name.encode()).digest()[:4], "little")


def _summary(reasons: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in reasons.most_common())


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    try:
        out = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:  # a tokenizer without the `verbose` flag
        out = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in out]


# -- one source's training stream -----------------------------------------------------------------


class _Stream:
    """A source's training documents, cycling through epochs, tokenised ahead in batches."""

    def __init__(self, source: Source, seed: int, held: np.ndarray, shuffle: bool,
                 doc_filter: Callable[[str], bool] | None):
        self.source, self.seed, self.held, self.shuffle = source, seed, held, shuffle
        self.doc_filter = doc_filter
        self.epoch, self.pos, self.good = 0, 0, 0  # read position (ahead of consumption)
        self.order = source.epoch_order(seed, 0, held, shuffle)
        self.bad: Counter = Counter()
        self.filtered = 0
        self.reported = False
        self.ahead: deque = deque()  # (tokens, (epoch, pos, good) after this document)
        self.consumed = (0, 0, 0)

    def _new_epoch(self):
        if self.good == 0:
            seen = len(self.order)
            reasons = _summary(self.bad) or "none usable"
            extra = f", {self.filtered} filtered out" if self.filtered else ""
            raise TidarError(
                f"data source {self.source.path} has no usable rows: {seen} rows read for "
                f"training, none usable ({reasons}{extra})"
            )
        if self.epoch == 0 and not self.reported:
            self.reported = True
            if self.bad or self.filtered:
                parts = [_summary(self.bad)] if self.bad else []
                if self.filtered:
                    parts.append(f"{self.filtered} filtered out")
                print(f"tidar: warning: {self.source.path}: skipped "
                      f"{sum(self.bad.values()) + self.filtered} of {len(self.order)} rows "
                      f"({', '.join(parts)})", file=sys.stderr)
        self.epoch, self.pos, self.good = self.epoch + 1, 0, 0
        self.order = self.source.epoch_order(self.seed, self.epoch, self.held, self.shuffle)

    def _fill(self):
        texts, marks, chars = [], [], 0
        while len(texts) < _PREFETCH_DOCS and chars < _PREFETCH_CHARS:
            if self.pos >= len(self.order):
                self._new_epoch()
                if texts:
                    break
            item = int(self.order[self.pos])
            self.pos += 1
            text, why = self.source.read(item)
            if text is None:
                if why is not None and self.epoch == 0:
                    self.bad[why] += 1
                continue
            if self.doc_filter is not None and not self.doc_filter(text):
                if self.epoch == 0:
                    self.filtered += 1
                continue
            self.good += 1
            texts.append(text)
            marks.append((self.epoch, self.pos, self.good))
            chars += len(text)
        self.ahead.extend(zip(_tokenize(self.source.tokenizer, texts), marks, strict=True))

    def next_tokens(self) -> list[int]:
        if not self.ahead:
            self._fill()
        tokens, self.consumed = self.ahead.popleft()
        return tokens

    def seek(self, state: tuple[int, int, int]):
        epoch, pos, good = state
        self.ahead.clear()
        if epoch != self.epoch or not len(self.order):
            self.order = self.source.epoch_order(self.seed, epoch, self.held, self.shuffle)
        self.epoch, self.pos, self.good = epoch, pos, good
        self.consumed = (epoch, pos, good)
        self.reported = self.reported or epoch > 0


def _as_sources(sources, tokenizer, extensions) -> list[Source]:
    if isinstance(sources, Source):
        return [sources]
    if isinstance(sources, (str, SourceSpec, os.PathLike)):
        sources = [sources]
    out = []
    for s in sources:
        if isinstance(s, Source):
            s.tokenizer = s.tokenizer or tokenizer
            out.append(s)
        else:
            out.append(Source(parse_spec(str(s) if isinstance(s, os.PathLike) else s),
                              tokenizer, extensions))
    if not out:
        raise TidarError("no data sources given")
    return out


class _Packer:
    """Concatenate ``doc + [eos]`` and cut rows of exactly ``seq_len`` tokens."""

    def __init__(self, eos_id: int, seq_len: int):
        if seq_len < 1:
            raise TidarError(f"sequence length must be at least 1, got {seq_len}")
        self.eos_id, self.seq_len = int(eos_id), seq_len
        self.carry: list[int] = []
        self.start = 0

    def need(self) -> bool:
        return len(self.carry) - self.start < self.seq_len

    def add(self, tokens: list[int]):
        if self.start > (1 << 16):  # compact the consumed prefix now and then
            del self.carry[: self.start]
            self.start = 0
        self.carry.extend(tokens)
        self.carry.append(self.eos_id)

    def row(self) -> list[int]:
        row = self.carry[self.start : self.start + self.seq_len]
        self.start += self.seq_len
        return row

    def pending(self) -> list[int]:
        return self.carry[self.start :]

    def restore(self, tokens: list[int]):
        self.carry, self.start = list(tokens), 0


# -- the training stream --------------------------------------------------------------------------


class PackedRows:
    """Deterministic, resumable batches ``[batch_size, seq_len]`` of packed training rows.

    ``sources``: spec strings (``PATH`` or ``PATH:WEIGHT``) or :class:`Source` objects. The
    next document's source is drawn by weight with ``random.Random(seed)``; each source
    cycles through epochs in a seeded order, skipping its held-out documents. Resume with
    ``load_state_dict(state_dict())`` (instant) or ``skip(n_batches)`` (replays the stream).
    """

    def __init__(
        self,
        sources,
        tokenizer,
        eos_id: int,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        *,
        held_out: int | float = HELD_OUT,
        shuffle: bool = True,
        extensions: Iterable[str] | None = None,
        doc_filter: Callable[[str], bool] | None = None,
    ):
        if batch_size < 1:
            raise TidarError(f"batch size must be at least 1, got {batch_size}")
        self.sources = _as_sources(sources, tokenizer, extensions)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.held_out, self.shuffle = held_out, shuffle
        self.weights = [s.weight for s in self.sources]
        total = sum(self.weights)
        self._cum = list(np.cumsum([w / total for w in self.weights]))
        self.streams = [
            _Stream(s, seed * 1_000_003 + i, s.held_items(held_out), shuffle, doc_filter)
            for i, s in enumerate(self.sources)
        ]
        self.rng = random.Random(seed)
        self.packer = _Packer(eos_id, seq_len)
        self.batches = 0
        self.documents = [0] * len(self.sources)
        for stream in self.streams:  # fail now, not mid-run, on a source with no usable row
            stream._fill()

    def _pick(self) -> int:
        if len(self.streams) == 1:
            return 0
        return self.rng.choices(range(len(self.streams)), cum_weights=self._cum)[0]

    def _rows(self, n: int) -> list[list[int]]:
        rows = []
        for _ in range(n):
            while self.packer.need():
                i = self._pick()
                self.packer.add(self.streams[i].next_tokens())
                self.documents[i] += 1
            rows.append(self.packer.row())
        return rows

    def next_batch(self) -> torch.Tensor:
        rows = self._rows(self.batch_size)
        self.batches += 1
        return torch.tensor(rows, dtype=torch.long)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def skip(self, n_batches: int) -> None:
        """Advance by ``n_batches`` as if they had been drawn (replays the stream)."""
        for _ in range(n_batches):
            self._rows(self.batch_size)
            self.batches += 1

    @property
    def epochs(self) -> list[float]:
        """Per source: epochs consumed so far (fractional)."""
        return [s.consumed[0] + s.consumed[1] / max(1, len(s.order)) for s in self.streams]

    @property
    def bad_rows(self) -> dict[str, dict[str, int]]:
        return {str(s.source.path): dict(s.bad) for s in self.streams}

    def _config(self) -> dict:
        return {
            "sources": [str(s.spec) for s in self.sources],
            "items": [s.n_items for s in self.sources],
            "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed,
            "held_out": self.held_out, "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue this exact stream (JSON-serialisable)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "config": self._config(),
            "batches": self.batches,
            "documents": list(self.documents),
            "rng": [version, list(internal), gauss],
            "streams": [list(s.consumed) for s in self.streams],
            "carry": self.packer.pending(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine, theirs = self._config(), state.get("config", {})
        if mine != theirs:
            diff = [k for k in mine if mine[k] != theirs.get(k)]
            raise TidarError(
                f"cannot resume the data stream: its {', '.join(diff)} changed since the "
                "checkpoint (the data or the data settings differ)"
            )
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for stream, consumed in zip(self.streams, state["streams"], strict=True):
            stream.seek(tuple(consumed))
        self.packer.restore(state["carry"])
        self.batches = state["batches"]
        self.documents = list(state["documents"])

    def close(self):
        for s in self.sources:
            s.close()


# -- held-out evaluation data ---------------------------------------------------------------------


def held_out_documents(source, tokenizer=None, held_out: int | float = HELD_OUT,
                       extensions: Iterable[str] | None = None) -> list[str]:
    """The held-out documents of one source (those :class:`PackedRows` never trains on)."""
    (src,) = _as_sources([source], tokenizer, extensions)
    docs = []
    for item in src.held_items(held_out):
        text, _ = src.read(int(item))
        if text is not None:
            docs.append(text)
    return docs


def held_out_rows(
    sources,
    tokenizer,
    eos_id: int,
    seq_len: int,
    n_rows: int,
    *,
    held_out: int | float = HELD_OUT,
    seed: int = 0,
    extensions: Iterable[str] | None = None,
) -> torch.Tensor:
    """Up to ``n_rows`` evaluation rows ``[n, seq_len]`` packed from held-out documents.

    Sources are mixed by weight (a source leaves the mix when its held-out documents run
    out). When the sources are too small to hold any document out, the rows come from the
    training stream instead, with a warning (the evaluation then overlaps training).
    """
    srcs = _as_sources(sources, tokenizer, extensions)
    if n_rows <= 0:
        return torch.zeros(0, seq_len, dtype=torch.long)
    docs: list[deque] = []
    for src in srcs:
        texts = [t for t, _ in (src.read(int(i)) for i in src.held_items(held_out))
                 if t is not None]
        docs.append(deque(_tokenize(tokenizer, texts)))
    weights = [s.weight for s in srcs]
    rng, packer, rows = random.Random(seed), _Packer(eos_id, seq_len), []
    while len(rows) < n_rows:
        while packer.need():
            live = [i for i, d in enumerate(docs) if d]
            if not live:
                break
            i = rng.choices(live, weights=[weights[j] for j in live])[0]
            packer.add(docs[i].popleft())
        if packer.need():
            break
        rows.append(packer.row())
    if not rows:
        print("tidar: warning: the data is too small to hold documents out: evaluation rows "
              "come from the training data", file=sys.stderr)
        stream = PackedRows(srcs, tokenizer, eos_id, seq_len, n_rows, seed + 1, held_out=0)
        return stream.next_batch()
    if len(rows) < n_rows:
        print(f"tidar: warning: held-out documents fill {len(rows)} evaluation rows, not "
              f"{n_rows}", file=sys.stderr)
    return torch.tensor(rows, dtype=torch.long)


# -- whole-source passes (stats, tools) -----------------------------------------------------------


def iter_documents(source, tokenizer=None, extensions: Iterable[str] | None = None,
                   bad: Counter | None = None) -> Iterator[str]:
    """Every usable document of one source once, in file order; bad rows go to ``bad``."""
    (src,) = _as_sources([source], tokenizer, extensions)
    try:
        for item in range(src.n_items):
            text, why = src.read(item)
            if text is not None:
                yield text
            elif why is not None and bad is not None:
                bad[why] += 1
    finally:
        src.close()


def source_stats(source, tokenizer=None, extensions: Iterable[str] | None = None,
                 max_docs: int | None = None, count_tokens: bool = True,
                 humaneval: bool = False) -> dict:
    """Rows, usable documents, bad rows by reason, characters and (with a tokenizer and
    ``count_tokens``) tokens, EOS included; with ``humaneval``, the documents that contain a
    HumanEval prompt. Chat rows need the tokenizer's template."""
    count_tokens = count_tokens and tokenizer is not None
    bad: Counter = Counter()
    docs = chars = tokens = contaminated = 0
    batch: list[str] = []

    def flush():
        nonlocal tokens
        tokens += sum(len(t) + 1 for t in _tokenize(tokenizer, batch))  # + EOS
        batch.clear()

    spec = parse_spec(source) if not isinstance(source, Source) else source.spec
    (src,) = _as_sources([spec], tokenizer, extensions)
    for text in iter_documents(src, tokenizer, extensions, bad):
        docs += 1
        chars += len(text)
        contaminated += humaneval and contains_humaneval(text)
        if count_tokens:
            batch.append(text)
            if len(batch) >= _PREFETCH_DOCS:
                flush()
        if max_docs is not None and docs >= max_docs:
            break
    if count_tokens:
        flush()
    out = {"source": str(spec.path), "weight": spec.weight, "rows": src.n_items,
           "documents": docs, "bad_rows": dict(bad), "chars": chars}
    if count_tokens:
        out["tokens"] = tokens
    if humaneval:
        out["humaneval_documents"] = contaminated
    return out


def load_tokenizer(spec: str | None):
    """Only the tokenizer of a model spec (``None``: the embedded default)."""
    from . import default_model
    from .loading import _default_model_dir, _load_tokenizer, _quiet_transformers

    _quiet_transformers()
    if spec is None or spec == default_model.NAME:
        return _load_tokenizer(_default_model_dir(), gguf=False)
    path = Path(spec).expanduser()
    if not path.exists():
        raise TidarError(f"model path {spec} does not exist")
    return _load_tokenizer(path, gguf=path.is_file())
