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
