"""The tuner's cost model: expected tokens per pass, and never a pick slower than AR."""

from __future__ import annotations

import pytest

from tidar.tuner import choose, expected_tokens_per_pass


def test_full_set_is_one_plus_sum_of_reach():
    reach = [0.5**j for j in range(1, 16)]
    assert expected_tokens_per_pass(reach, 16, tuple(range(16))) == pytest.approx(1 + sum(reach))
    assert expected_tokens_per_pass([1.0] * 15, 16, tuple(range(16))) == pytest.approx(16)
    assert expected_tokens_per_pass([0.0] * 15, 16, tuple(range(16))) == pytest.approx(1)


def test_partial_set_alternates_with_perfect_drafts():
    # S = {0}: 15 accepted, then a pass with no real drafts commits 1: (16 + 1) / 2.
    assert expected_tokens_per_pass([1.0] * 15, 16, (0,)) == pytest.approx(8.5)


def test_partial_set_never_beats_full_set():
    reach = [0.8**j for j in range(1, 8)]
    full = expected_tokens_per_pass(reach, 8, tuple(range(8)))
    for n in range(1, 8):
        assert expected_tokens_per_pass(reach, 8, tuple(range(n))) <= full + 1e-9


def test_choose_ar_when_passes_are_expensive():
    seconds = {1: 1.0, 8: 3.0, 12: 3.5, 16: 4.0, 20: 4.5}
    choice = choose(seconds, [0.5, 0.25, 0.1], "lossless", block_sizes=(4,))
    assert choice.sampler == "ar"


def test_choose_drafting_when_it_pays():
    seconds = {1: 1.0, 8: 1.1, 12: 1.2, 16: 1.3, 20: 1.5}
    choice = choose(seconds, [0.9, 0.8, 0.7], "lossless", block_sizes=(4,))
    assert choice.sampler == "lossless" and choice.tokens_per_second > 1.0
    best = max(
        expected_tokens_per_pass([0.9, 0.8, 0.7], 4, tuple(range(n))) / seconds[4 + 4 * n]
        for n in range(1, 5)
    )
    assert choice.tokens_per_second == pytest.approx(best)
