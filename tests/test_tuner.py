"""The tuner's cost model: expected tokens per pass, and never a pick slower than AR."""

from __future__ import annotations

import json

import pytest
import torch

from tidar.engine import DecodeConfig
from tidar.tuner import (
    Acceptance,
    auto_config,
    batch_slowdown,
    choose,
    expected_max_normal,
    expected_tokens_per_pass,
    measure_pass_seconds,
    tokens_per_pass_moments,
    worth_measuring,
)


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


@pytest.mark.parametrize("rows", [2, 4, 16])
def test_batch_slowdown_matches_a_simulated_batch(rows):
    """Rows that each commit 128 tokens, a pass's tokens drawn as the full proposal set
    commits them (the bench's acceptance): the batch's passes (its slowest row's) over a
    mean row's, simulated, against the model."""
    reach = [0.38, 0.125, 0.047, 0.014, 0.002]
    mean, variance = tokens_per_pass_moments(reach, 8, tuple(range(8)))
    p = [1.0] + reach + [0.0] * 3
    probs = torch.tensor([p[k] - p[k + 1] for k in range(8)], dtype=torch.float64)
    trials, new_tokens = 4000, 128
    gen = torch.Generator().manual_seed(rows)
    draws = torch.multinomial(probs, trials * rows * new_tokens, replacement=True,
                              generator=gen).view(trials, rows, new_tokens) + 1
    passes = (draws.cumsum(-1) < new_tokens).sum(-1) + 1  # passes until a row has 128
    simulated = passes.max(-1).values.double().mean() / passes.double().mean()
    model = batch_slowdown(mean, variance, new_tokens, rows)
    assert model > 1.0 and float(simulated) == pytest.approx(model, abs=0.01)


def test_replayed_tokens_per_pass_stand_in_for_the_chain():
    """Session 47's cell (session 44's profile, rounded): the chain counts one block's
    carried drafts as fresh and projects 1.24x, past the margin; the 1.81 tokens a pass the
    run committed make it 1.08x, and AR wins. The
    replay holds for its own block size and proposal sets of the first blocks only."""
    reach = [0.546, 0.289, 0.151, 0.057, 0.021, 0.006, 0.002, 0.002]
    seconds = {1: 1.0, 32: 1.67}
    chain = Acceptance(reach)
    replayed = Acceptance(reach, 16, {1: [1.81, 0.9]})
    assert chain.moments(16, (0,))[0] == pytest.approx(2.07, abs=0.01)
    assert choose(seconds, chain, "lossless", (16,)).sampler == "lossless"
    assert replayed.moments(16, (0,)) == (1.81, 0.9)
    assert choose(seconds, replayed, "lossless", (16,)).sampler == "ar"
    assert replayed.moments(8, (0,)) == chain.moments(8, (0,))
    other_pair = Acceptance(reach, 16, {2: [9.0, 0.0]})
    assert other_pair.moments(16, (0, 2)) == chain.moments(16, (0, 2))


def test_acceptance_of_a_drafter_file(tmp_path):
    from tidar.drafter import DrafterInfo

    extra = {"acceptance_by_position": [0.5, 0.2], "tokens_per_pass_by_proposals":
             json.loads(json.dumps({1: [1.4, 0.3], 4: [1.6, 0.5]}))}  # keys as JSON has them
    got = Acceptance.of_drafter(DrafterInfo(4, "frozen-ar", "x", extra=extra))
    assert got == Acceptance([0.5, 0.2], 4, {1: [1.4, 0.3], 4: [1.6, 0.5]})
    assert Acceptance.of_drafter(DrafterInfo(4, "frozen-ar", "x")) == Acceptance([], 4)


def test_expected_max_normal():
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(2) == pytest.approx(1 / torch.pi**0.5, abs=1e-6)
    assert expected_max_normal(4) == pytest.approx(1.0294, abs=1e-4)


def test_the_slowest_row_of_a_batch_can_make_drafting_lose():
    """Expected 1.11x for one row (the session-14 bench cell) clears the margin; four rows
    of 128 tokens each wait for the slowest one, and AR wins."""
    reach = [0.38, 0.125, 0.047, 0.014, 0.002]
    tpp = expected_tokens_per_pass(reach, 16, (0,))
    seconds = {1: 1.0, 32: tpp / 1.115}
    assert choose(seconds, Acceptance(reach), "lossless", (16,)).sampler == "lossless"
    slowed = choose(seconds, Acceptance(reach), "lossless", (16,), rows=4, new_tokens=128)
    assert slowed.sampler == "ar"
    ar_rows = choose({1: 1.0, 32: 0.5}, Acceptance([0.0] * 5), "lossless", (16,), rows=4,
                     new_tokens=128)
    assert ar_rows.batch_slowdown == 1.0  # AR rows move in step


def test_choose_ar_when_passes_are_expensive():
    seconds = {1: 1.0, 8: 3.0, 12: 3.5, 16: 4.0, 20: 4.5}
    choice = choose(seconds, Acceptance([0.5, 0.25, 0.1]), "lossless", block_sizes=(4,))
    assert choice.sampler == "ar"


def test_choose_drafting_when_it_pays():
    seconds = {1: 1.0, 8: 1.1, 12: 1.2, 16: 1.3, 20: 1.5}
    choice = choose(seconds, Acceptance([0.9, 0.8, 0.7]), "lossless", block_sizes=(4,))
    assert choice.sampler == "lossless" and choice.tokens_per_second > 1.0
    best = max(
        expected_tokens_per_pass([0.9, 0.8, 0.7], 4, tuple(range(n))) / seconds[4 + 4 * n]
        for n in range(1, 5)
    )
    assert choice.tokens_per_second == pytest.approx(best)


def test_worth_measuring_skips_shapes_that_cannot_win():
    weak = Acceptance([0.4, 0.1, 0.02])  # about 1.5 tokens per pass at most
    assert worth_measuring(8, {}, weak, 4)  # nothing measured yet: AR comes first
    # A one-block pass at 1.6 AR steps: no larger set's 1.5 tokens can pay for that.
    expensive = {1: 1.0, 8: 1.6}
    assert not any(worth_measuring(q, expensive, weak, 4) for q in (12, 20))
    # At 1.1 AR steps the next sets might still be the pick.
    assert worth_measuring(12, {1: 1.0, 8: 1.1}, weak, 4)
    # Only smaller passes bound a pass's cost (a cached larger one says nothing about it).
    assert worth_measuring(12, {1: 1.0, 8: 1.1, 20: 3.0}, weak, 4)
    # An untrained drafter (never accepted) needs no drafting pass at all.
    assert not worth_measuring(8, {1: 1.0}, Acceptance(), 4)


class TimedEngine:
    """What ``auto_config`` uses of an engine, with pass costs from a formula."""

    device, dtype, compiled = torch.device("cpu"), torch.float32, False

    def __init__(self, per_query: float):
        self.per_query, self.timed, self.calls = per_query, [], []

    def time_passes(self, cfgs, batch, context, repeats):
        self.calls.append(sorted(cfgs))
        seconds = {}
        for key, cfg in cfgs.items():
            queries = 1 if cfg.sampler == "ar" else cfg.block_size * (1 + len(cfg.proposals))
            assert key == queries
            seconds[key] = 1.0 + self.per_query * (queries - 1)
        if len(cfgs) == 1:  # a shape's first timing: what the tuner chose to measure
            self.timed += list(cfgs)
        return seconds


def test_auto_config_measures_only_what_could_be_picked():
    """An expensive pass with a weak drafter stops after the first drafting shape; a strong
    drafter on the same device later adds the shapes it could use to the cached costs."""
    cfg = DecodeConfig(block_size=4).resolved()
    engine = TimedEngine(per_query=0.1)  # t(8) = 1.7 AR steps
    got, info = auto_config(engine, "model", cfg, Acceptance([0.4, 0.1, 0.02]))
    assert got.sampler == "ar" and engine.timed == [1, 8]
    assert info["shapes_measured"] == [1, 8]
    engine.timed.clear()
    got, info = auto_config(engine, "model", cfg, Acceptance([0.99, 0.98, 0.97]))
    assert engine.timed == [12, 20]  # t(1) and t(8) come from the cache
    assert got.sampler == "lossless" and info["shapes_measured"] == [1, 8, 12, 20]
    engine.timed.clear()
    auto_config(engine, "model", cfg, Acceptance([0.99, 0.98, 0.97]))
    assert engine.timed == []


def test_the_shapes_measured_are_timed_again_together():
    """After a first timing of each shape (which decides what else to measure), the shapes
    this process measured are timed once more taking turns, and those costs are the ones
    kept; a single shape needs no second timing."""
    cfg = DecodeConfig(block_size=4).resolved()
    engine = TimedEngine(per_query=0.1)
    auto_config(engine, "model", cfg, Acceptance([0.4, 0.1, 0.02]))
    assert engine.calls == [[1], [8], [1, 8]]
    engine.calls.clear()
    auto_config(engine, "model", cfg, Acceptance([0.99, 0.98, 0.97]))
    assert engine.calls == [[12], [20], [12, 20]]

    class Drifting(TimedEngine):  # first timings 20% high: the joint timing must win
        def time_passes(self, cfgs, batch, context, repeats):
            seconds = super().time_passes(cfgs, batch, context, repeats)
            return {k: t * (1.2 if len(cfgs) == 1 else 1.0) for k, t in seconds.items()}

    seconds = measure_pass_seconds(Drifting(per_query=0.1), 4,
                                   acceptance=Acceptance([0.4, 0.1, 0.02]))
    assert seconds == pytest.approx({1: 1.0, 8: 1.7})


@pytest.mark.parametrize("content", ["{broken", '{"pass_seconds": [1, 2]}', '{"other": 1}'])
def test_an_unreadable_cache_is_measured_again(content, tmp_path, capsys):
    from tidar.tuner import profile_dir

    cfg = DecodeConfig(block_size=4).resolved()
    engine = TimedEngine(per_query=0.1)
    auto_config(engine, "model", cfg, Acceptance([0.4, 0.1, 0.02]))
    (cached,) = profile_dir().glob("*.json")
    cached.write_text(content)
    engine.timed.clear()
    got, _ = auto_config(engine, "model", cfg, Acceptance([0.4, 0.1, 0.02]))
    assert got.sampler == "ar" and engine.timed == [1, 8]
    assert "unreadable tuner cache" in capsys.readouterr().err
    assert json.loads(cached.read_text())["pass_seconds"]  # written afresh
