"""Continuous batching (``Engine.stream(more=...)``): prompts that join a running batch in a
free row decode exactly as they would alone, token for token and pass for pass."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, with_row_lora

from tidar.engine import DecodeConfig, Engine
from tidar.sampling import SamplingParams

CONFIGS = [
    DecodeConfig(sampler="ar", max_new_tokens=12),
    DecodeConfig(block_size=4, proposals=(0, 1), max_new_tokens=12),
    DecodeConfig(block_size=4, max_new_tokens=12, seed=5,
                 sampling=SamplingParams(temperature=0.9, top_p=0.9)),
    DecodeConfig(sampler="mix", beta=0.5, block_size=3, max_new_tokens=12),
]


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 16, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return with_row_lora(tiny_model("llama", vocab=16, seed=11))


def solo(model, prompt, cfg, stop_ids=()):
    engine = Engine(model, stop_ids=stop_ids)
    out, stats = engine.generate([prompt], cfg)
    return out[0], stats.passes[0]


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["ar", "lossless", "sampled", "mix"])
def test_prompts_that_join_a_running_batch_decode_as_alone(model, cfg, multiple):
    """Three prompts (a batch bucket of four: one idle row) and three that join: at once into
    the idle row, then into rows that a stop token or the budget freed. The longest prompt
    ``more`` may give joins too. ``multiple``: joining prompts padded to a multiple of 8, as
    on CUDA (of 64), where the first two share one padded length and its buffers."""
    # the cache of 256 slots (one capacity bucket) and the 256-token context bound it
    b = cfg.resolved().block_size
    longest = min(256 - b - 1, 256 - 2 * b) - cfg.max_new_tokens
    first, joining = prompts([5, 3, 7], 1), prompts([4, 6, longest], 2)
    stop = solo(model, first[1], DecodeConfig(sampler="ar", max_new_tokens=12))[0][2]
    engine = Engine(model, stop_ids=(stop,))
    engine.join_length_multiple = multiple
    waiting, asked = list(joining), []

    def more(limit: int):
        asked.append(limit)
        return waiting.pop(0) if waiting else None

    got: dict[int, list[int]] = {}
    for row, tokens in engine.stream(first, cfg, more=more):
        got.setdefault(row, []).extend(tokens)
    everyone = first + joining
    assert sorted(got) == list(range(len(everyone)))  # each joined as the next row number
    assert set(asked) == {longest}
    stats = engine.last_stats
    for row, prompt in enumerate(everyone):
        expected, passes = solo(model, prompt, cfg, (stop,))
        assert got[row] == expected, row
        assert stats.tokens[row] == len(expected) and stats.passes[row] == passes


def test_joins_at_one_padded_length_take_each_stream_s_values(model):
    """A runner keeps its joins' buffers (on CUDA, their captured graphs) across streams:
    a later stream's beta, temperature, token budget and seed reach the prompts that join
    it."""
    engine = Engine(model)
    engine.join_length_multiple = 8
    for beta, temperature, budget, seed in ((0.5, 0.8, 12, 1), (0.9, 0.6, 7, 2)):
        cfg = DecodeConfig(sampler="mix", beta=beta, block_size=3, max_new_tokens=budget,
                           seed=seed, sampling=SamplingParams(temperature=temperature))
        first, joining = prompts([5], seed), prompts([3, 6], seed + 10)
        got: dict[int, list[int]] = {}
        for row, tokens in engine.stream(first, cfg, min_rows=4,
                                         more=lambda longest, w=list(joining): w.pop(0) if w
                                         else None):
            got.setdefault(row, []).extend(tokens)
        assert [got[r] for r in range(3)] == [solo(model, p, cfg)[0] for p in first + joining]
    assert len(engine._runners) == 1 and list(next(iter(engine._runners.values())).joins) == [8]


def test_a_joined_row_can_be_finished_by_its_number(model):
    cfg = DecodeConfig(block_size=4, max_new_tokens=12)
    engine = Engine(model)
    first, waiting = prompts([3, 4, 6], 5), prompts([5], 4)
    got: dict[int, list[int]] = {}
    for row, tokens in engine.stream(first, cfg, sync_every=1,
                                     more=lambda longest: waiting.pop() if waiting else None):
        got.setdefault(row, []).extend(tokens)
        if row == 3:
            engine.finish(3)
    expected = solo(model, prompts([5], 4)[0], cfg)[0]
    assert 0 < len(got[3]) < len(expected) and expected[: len(got[3])] == got[3]
    assert [got[r] for r in range(3)] == [solo(model, p, cfg)[0] for p in first]


def test_nothing_joins_once_every_row_has_ended(model):
    """A batch whose rows have all ended is over: a prompt offered then would run alone in
    a one-row batch while the rest of the queue waits; the caller starts a new batch."""
    cfg = DecodeConfig(sampler="ar", max_new_tokens=6)
    engine = Engine(model)
    asked = []
    out, _ = engine.generate(prompts([3], 6), cfg)  # a bucket of one row: never a free row
    for _ in engine.stream(prompts([3], 6), cfg, more=lambda longest: asked.append(1)):
        pass
    assert not asked and engine.last_stats.tokens == [len(out[0])]


def test_a_prompt_longer_than_the_batch_takes_is_refused():
    """``more`` must keep to ``longest``: the row's cache has no room past it."""
    from tidar.errors import TidarError

    cfg = DecodeConfig(sampler="ar", max_new_tokens=6)
    engine = Engine(tiny_model("llama", vocab=16, seed=2, max_position=1024))  # cache-bound
    with pytest.raises(TidarError, match="cannot join this batch"):
        for _ in engine.stream(prompts([3, 4, 5], 7), cfg,
                               more=lambda longest: [1] * (longest + 1)):
            pass


def test_spare_rows_let_prompts_join_a_batch_started_by_one(model):
    """``min_rows``: a batch of one prompt decodes four rows, so two prompts join it at once,
    each decoding as alone; without it the batch has no free row while its prompt runs."""
    cfg = DecodeConfig(block_size=4, proposals=(0, 1), max_new_tokens=12)
    first, joining = prompts([5], 7), prompts([3, 6], 8)
    for min_rows, joined in ((4, 2), (1, 0)):
        waiting = list(joining)
        engine = Engine(model)
        got: dict[int, list[int]] = {}
        for row, tokens in engine.stream(first, cfg, min_rows=min_rows,
                                         more=lambda longest, queue=waiting: (
                                             queue.pop(0) if queue else None)):
            got.setdefault(row, []).extend(tokens)
        assert len(got) == 1 + joined
        for row, prompt in enumerate((first + joining)[: 1 + joined]):
            assert got[row] == solo(model, prompt, cfg)[0], row


@pytest.mark.parametrize("used_before", [False, True], ids=["new", "used"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["ar", "lossless", "sampled", "mix"])
def test_a_batch_grows_into_larger_buckets_for_prompts_that_join(model, cfg, used_before):
    """``max_rows``: a batch of one prompt takes four more as they come, moving into the
    buckets of 2, 4 and 8 rows; each prompt decodes as alone, pass for pass. ``used``: the
    runners of those buckets decoded other prompts before, whose state their idle rows
    keep."""
    first, joining = prompts([5], 9), prompts([3, 6, 4, 7], 10)
    waiting, sizes = list(joining), []
    engine = Engine(model)
    if used_before:
        for rows in (2, 4, 8):
            engine.generate(prompts([7] * rows, 20 + rows), cfg)
    prefill, prefills = engine._prefill_state, []
    engine._prefill_state = lambda layout, *args: (prefills.append(layout.tokens.shape[0])
                                                   or prefill(layout, *args))

    def more(longest: int):
        sizes.append(engine._live.active.shape[0])
        return waiting.pop(0) if waiting else None

    got: dict[int, list[int]] = {}
    for row, tokens in engine.stream(first, cfg, sync_every=1, more=more, max_rows=5):
        got.setdefault(row, []).extend(tokens)
    # rows when asked: the fifth prompt moved the batch into a bucket of eight
    assert sizes[:4] == [1, 2, 4, 4] and engine._live.active.shape[0] == 8
    assert engine.moves == 3
    # the first prompt, the joining ones, and the new runners' first states (not when used)
    assert sorted(prefills) == [1] * 5 + ([] if used_before else [2, 4, 8])
    stalls = engine.stalls.seconds()  # wall time on the CPU: each move and join took some
    assert set(stalls) == {"move", "join"} and min(stalls.values()) > 0
    stats = engine.last_stats
    for row, prompt in enumerate(first + joining):
        expected, passes = solo(model, prompt, cfg)
        assert got[row] == expected, row
        assert stats.tokens[row] == len(expected) and stats.passes[row] == passes


def test_no_more_than_max_rows_sequences_decode_at_once(model):
    """With ``max_rows`` 3 a batch takes a fourth prompt only once one of its three ended
    (the caller finished it), though its bucket has a free row."""
    cfg = DecodeConfig(sampler="ar", max_new_tokens=8)
    engine = Engine(model)
    waiting, running = prompts([3, 4, 5], 11), []

    def more(longest: int):
        running.append(sum(seq is not None for seq in engine._sequence_in))
        return waiting.pop(0) if waiting else None

    got: dict[int, list[int]] = {}
    for row, tokens in engine.stream(prompts([6], 12), cfg, sync_every=1, more=more,
                                     max_rows=3):
        got.setdefault(row, []).extend(tokens)
        if row == 0 and len(got[0]) >= 3:
            engine.finish(0)
    assert max(running) < 3 and len(got) == 4
    assert engine._live.active.shape[0] == 4  # a bucket of four rows, one kept free


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["ar", "lossless", "sampled", "mix"])
def test_small_batches_started_by_joins_decode_as_a_batched_prefill(model, cfg, multiple):
    """A runner's later batches of a few prompts are admitted prompt by prompt, as joining
    prompts are (on CUDA by captured graphs): each row's tokens, passes and the acceptance
    counts are those of one batched prefill, with each row's own seed, for a smaller
    batch after a larger one (idle rows) and for a batch that fills its bucket."""
    batches = [(prompts([5, 3, 7, 2], 3), [4, 5, 6, 0]), (prompts([2, 9, 6], 4), [7, 8, 9]),
               (prompts([6, 1, 4, 8], 5), [1, 2, 3, 4])]
    runs = {}
    for by_joins in (False, True):
        engine = Engine(model)
        engine.start_by_joins = by_joins
        engine.join_length_multiple = multiple
        admitted = []
        own_admit = engine._admit
        engine._admit = lambda *args, seen=admitted, admit=own_admit: (
            seen.append(args[1]), admit(*args))
        runs[by_joins] = []
        for batch, seeds in batches:
            out, stats = engine.generate(batch, cfg, seeds)
            runs[by_joins].append((out, stats.passes, stats.committed_hist))
        # The first batch builds the runner (four rows); the next two are admitted row by row.
        assert admitted == ([0, 1, 2, 0, 1, 2, 3] if by_joins else [])
    assert runs[True] == runs[False]
