"""Named spans of work (``tidar.spans``): totals per name, read from any thread. The CUDA
events path needs a GPU; it is the tuner's pass timing there (``Engine.time_passes``)."""

from __future__ import annotations

import threading
import time

import torch

from tidar.spans import Spans


def test_spans_add_up_per_name_and_read_from_another_thread():
    spans = Spans(torch.device("cpu"))
    assert spans.seconds() == {}
    for _ in range(2):
        with spans.span("wait"):
            time.sleep(0.02)
    with spans.span("other"):
        pass
    read: list[dict] = []
    reader = threading.Thread(target=lambda: read.append(spans.seconds()))
    reader.start()
    reader.join()
    assert set(read[0]) == {"wait", "other"}
    assert 0.04 <= read[0]["wait"] < 1 and read[0]["other"] < read[0]["wait"]
    assert spans.seconds() == read[0]  # reading does not reset the totals


def test_a_span_that_raises_is_not_counted():
    spans = Spans(torch.device("cpu"))
    try:
        with spans.span("failed"):
            raise ValueError
    except ValueError:
        pass
    assert spans.seconds() == {}


class FakeEvent:
    """A CUDA event stand-in: a span's end completes when the test says so."""

    clock = 0.0

    def __init__(self, enable_timing: bool):
        self.done, self.at, self.waited = False, 0.0, False

    def record(self):
        FakeEvent.clock += 1.0
        self.at = FakeEvent.clock

    def query(self) -> bool:
        return self.done

    def synchronize(self):
        self.waited = self.done = True

    def elapsed_time(self, end) -> float:  # milliseconds, as torch's
        return (end.at - self.at) * 1000


def test_cuda_spans_are_read_once_their_events_complete(monkeypatch):
    """On CUDA a span is two events: a crowd of unread spans is settled without waiting for
    the ones still running; ``seconds`` waits for all."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    spans = Spans(torch.device("cuda"))
    monkeypatch.setattr(spans, "SETTLE_AFTER", 2)
    for _ in range(2):
        with spans.span("join"):
            pass
    for _, _, end in spans._pending:
        end.done = True  # the device finished these two
    with spans.span("move"):  # a third: settles the finished ones, not this one
        pass
    assert [name for name, _, _ in spans._pending] == ["move"]
    assert not spans._pending[0][2].waited
    assert spans.seconds() == {"join": 2.0, "move": 1.0} and not spans._pending
