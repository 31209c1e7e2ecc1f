"""Seconds of device work in named spans, timed without adding a host synchronisation."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator

import torch


class Spans:
    """Total seconds per name of the work done inside ``span(name)``. On CUDA a span is a
    pair of events on the current stream, read once they have completed (``seconds()``
    waits for them), so timing a span does not stall the host; elsewhere it is wall time.
    ``seconds`` may be asked from another thread than the one that times."""

    SETTLE_AFTER = 64  # spans waiting to be read before the completed ones are

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._done: Counter[str] = Counter()
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter()
            yield
            with self._lock:
                self._done[name] += time.perf_counter() - start
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        with self._lock:
            self._pending.append((name, start, end))
            crowded = len(self._pending) > self.SETTLE_AFTER
        if crowded:
            self._settle(wait=False)

    def seconds(self) -> dict[str, float]:
        self._settle(wait=True)
        with self._lock:
            return dict(self._done)

    def _settle(self, wait: bool) -> None:
        """Adds up the spans whose events have completed; with ``wait``, all of them."""
        with self._lock:
            pending, self._pending = self._pending, []
        measured: Counter[str] = Counter()
        left = []
        for name, start, end in pending:  # outside the lock: the timing thread goes on
            if wait:
                end.synchronize()
            elif not end.query():
                left.append((name, start, end))
                continue
            measured[name] += start.elapsed_time(end) / 1000
        with self._lock:
            self._done.update(measured)
            self._pending[:0] = left
