"""The decoding engine on tiny random models and on a scripted fake: no GPU, no weights.

- greedy ``lossless`` (and ``mix`` at beta 1) gives the AR output token for token, for every
  family, block size and proposal set, alone and batched;
- sampled ``lossless`` has the AR model's exact output distribution (chi-square against the
  distribution enumerated from full forwards), and a deliberately wrong verifier fails it;
- the never/sometimes/always-accept trio (litgpt) pins tokens per pass;
- batch invariance, KV-cache contents, stop tokens, budgets, streaming, input validation.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from helpers import (  # noqa: F401
    FAMILIES,
    ScriptedModel,
    always_accept,
    ar_distribution,
    chi2_pvalue,
    one_thread,
    residual_from_p,
    tiny_model,
    with_row_lora,
)

import tidar.engine as engine_module
from tidar.engine import DecodeConfig, Engine
from tidar.errors import TidarError
from tidar.layouts import causal_layout
from tidar.model import KVCache
from tidar.sampling import (
    SamplingParams,
    probabilities,
)

ALPHA = 1e-3
GREEDY_CASES = [  # (block size, proposal set S; None is full)
    (2, None),
    (4, None),
    (4, (0, 1)),
    (8, (0, 2, 5)),
    (16, None),
    (16, (0,)),
]


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full causal forwards, no cache, no engine."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(ar_distribution(model, seq).argmax()))
    return seq[len(prompt) :]


# -- a. greedy exactness ---------------------------------------------------------------------


@pytest.mark.parametrize("vocab, seed", [(8, 0), (32, 1)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lossless_greedy_equals_ar(family, vocab, seed):
    model = tiny_model(family, vocab=vocab, seed=seed)
    engine = Engine(model)
    prompts = _prompts(vocab, [5, 1, 9], seed)
    n = 20
    ar, ar_stats = engine.generate(prompts, DecodeConfig(sampler="ar", max_new_tokens=n))
    assert ar[0] == _naive_greedy(model, prompts[0], n)  # the baseline itself is right
    assert ar_stats.passes == [n] * 3 and ar_stats.tokens_per_pass == 1.0
    hist = [0] * 17
    for b, proposals in GREEDY_CASES:
        cfg = DecodeConfig(block_size=b, proposals=proposals, max_new_tokens=n)
        out, stats = engine.generate(prompts, cfg)
        assert out == ar, (b, proposals)
        assert stats.tokens == [n] * 3
        for i, count in enumerate(stats.committed_hist):
            hist[i] += count
        if b in (4, 8):  # batch of one, each prompt alone
            for prompt, expected in zip(prompts, ar, strict=True):
                assert engine.generate([prompt], cfg)[0] == [expected], (b, proposals)
    mix_cfg = DecodeConfig(sampler="mix", beta=1.0, block_size=4, max_new_tokens=n)
    mix, _ = engine.generate(prompts, mix_cfg)
    assert mix == ar
    # Drafts were accepted (k > 0) somewhere, or the comparison proved little.
    assert sum(hist[2:]) > 0, hist
    if vocab == 8:
        assert sum(hist[3:]) > 0, hist


def test_greedy_accepts_many_lengths():
    """Over a few small-vocabulary models, every acceptance length k = 0 .. 3 occurs (b = 4)."""
    hist = [0] * 5
    for seed in range(3):
        model = tiny_model("llama", vocab=6, seed=seed)
        engine = Engine(model)
        prompts = _prompts(6, [3, 6, 2, 8], seed)
        ar, _ = engine.generate(prompts, DecodeConfig(sampler="ar", max_new_tokens=30))
        out, stats = engine.generate(prompts, DecodeConfig(block_size=4, max_new_tokens=30))
        assert out == ar
        hist = [a + b for a, b in zip(hist, stats.committed_hist, strict=True)]
    assert all(h > 0 for h in hist[1:]), hist


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mix_beta_zero_accepts_every_draft(temperature):
    """At beta = 0 the target is the drafting distribution itself: every draft is accepted."""
    model = tiny_model("qwen3", vocab=16, seed=3)
    b, passes = 4, 5
    n = 1 + passes * b
    cfg = DecodeConfig(
        sampler="mix", beta=0.0, block_size=b, max_new_tokens=n,
        sampling=SamplingParams(temperature=temperature),
    )
    out, stats = Engine(model).generate([[1, 2, 3]], cfg)
    assert len(out[0]) == n
    assert stats.passes == [1 + passes] and stats.committed_hist[b] == passes
    assert stats.acceptance == [1.0] * (b - 1)


def test_mix_beta_one_sampled_equals_lossless():
    model = tiny_model("llama", vocab=8, seed=4, std=0.5)
    cfg = DecodeConfig(block_size=4, sampling=SamplingParams(temperature=1.0), max_new_tokens=20)
    prompts, seeds = _prompts(8, [3, 5, 2], 4), [7, 8, 9]
    engine = Engine(model)
    lossless, _ = engine.generate(prompts, cfg, seeds)
    mix, _ = engine.generate(prompts, replace(cfg, sampler="mix", beta=1.0), seeds)
    assert mix == lossless


@pytest.mark.parametrize("sampler, temperature", [("lossless", 0.0), ("lossless", 1.0),
                                                  ("mix", 1.0)])
def test_one_head_gemm_decodes_as_two(sampler, temperature, monkeypatch):
    """Small passes run the head once over all their rows (``ONE_HEAD_MAX_ROWS``): the same
    tokens as a head over the verify rows and one over the block rows picked after them."""
    model = tiny_model("llama", vocab=16, seed=5, std=0.5)
    calls = {}
    own_head = model.head

    def counted_head(h):
        calls[rows] += 1
        return own_head(h)

    monkeypatch.setattr(model, "head", counted_head)
    prompts, results = _prompts(16, [3, 6], 5), {}
    for rows in (0, 1 << 30):
        monkeypatch.setattr(engine_module, "ONE_HEAD_MAX_ROWS", rows)
        calls[rows], engine = 0, Engine(model)
        results[rows] = []
        for b, proposals in [(4, None), (4, (0, 2)), (8, (0,))]:
            cfg = DecodeConfig(sampler=sampler, beta=0.5, block_size=b, proposals=proposals,
                               sampling=SamplingParams(temperature), max_new_tokens=24)
            out, stats = engine.generate(prompts, cfg, seeds=[1, 2])
            results[rows].append((out, stats.committed_hist))
    assert results[0] == results[1 << 30]
    assert calls[1 << 30] < calls[0]  # the switch took the one-GEMM path


# -- b. sampling exactness -------------------------------------------------------------------

N_S = 6000
PROMPT_S = [1, 2]


@pytest.fixture(scope="module")
def sampling_models():
    return {v: tiny_model("llama", vocab=v, seed=0, std=0.5) for v in (3, 4)}


def _exact_distribution(model, params: SamplingParams, new: int) -> torch.Tensor:
    """P(x_1 .. x_new) over all V^new continuations, from the model's own full forwards."""
    vocab = model.cfg.vocab_size
    outcomes = list(itertools.product(range(vocab), repeat=new))
    probs = torch.ones(len(outcomes), dtype=torch.float64)
    cond = {}
    for i, seq in enumerate(outcomes):
        for j in range(new):
            prefix = seq[:j]
            if prefix not in cond:
                logits = ar_distribution(model, PROMPT_S + list(prefix))
                cond[prefix] = probabilities(logits, params).double()
            probs[i] *= cond[prefix][seq[j]]
    return probs


def _pvalue(model, cfg: DecodeConfig, check_acceptance: bool = True) -> float:
    """Chi-square p-value of ``N_S`` engine samples (one row per seed) against the exact AR law."""
    vocab, new = model.cfg.vocab_size, cfg.max_new_tokens
    out, stats = Engine(model).generate([PROMPT_S] * N_S, cfg, seeds=list(range(N_S)))
    assert all(len(o) == new for o in out)
    index = {seq: i for i, seq in enumerate(itertools.product(range(vocab), repeat=new))}
    counts = torch.zeros(len(index))
    for o in out:
        counts[index[tuple(o)]] += 1
    if cfg.sampler != "ar" and check_acceptance:
        assert sum(stats.committed_hist[2:]) > N_S // 4  # drafts were accepted often
        assert stats.committed_hist[1] > N_S // 4  # and rejected often
    return chi2_pvalue(counts, _exact_distribution(model, cfg.sampling, new))


T1 = SamplingParams(temperature=1.0)
SAMPLED_CASES = {  # vocabulary, sampler, b, S, sampling, new tokens
    "ar": (4, "ar", 2, None, T1, 3),
    "lossless-b2": (4, "lossless", 2, None, T1, 3),
    "lossless-b4": (4, "lossless", 4, None, T1, 3),
    "lossless-b4-top-p": (4, "lossless", 4, None, SamplingParams(0.8, top_p=0.7), 3),
    "lossless-b2-top-k": (4, "lossless", 2, None, SamplingParams(1.5, top_k=3), 3),
    # b = 2, S = {0}: after a full acceptance the next pass verifies a filler draft (x_4)
    "lossless-b2-S0-fillers": (3, "lossless", 2, (0,), T1, 4),
}


@pytest.mark.parametrize("case", list(SAMPLED_CASES))
def test_sampled_output_distribution_is_ar(sampling_models, case):
    vocab, sampler, b, proposals, params, new = SAMPLED_CASES[case]
    cfg = DecodeConfig(
        sampler=sampler, block_size=b, proposals=proposals, sampling=params, max_new_tokens=new
    )
    assert _pvalue(sampling_models[vocab], cfg) > ALPHA


@pytest.mark.parametrize("wrong", [always_accept, residual_from_p])
def test_wrong_sampler_is_rejected(sampling_models, monkeypatch, wrong):
    monkeypatch.setattr(engine_module, "verify_sampled", wrong)
    cfg = DecodeConfig(block_size=4, sampling=T1, max_new_tokens=3)
    assert _pvalue(sampling_models[4], cfg, check_acceptance=False) < ALPHA


# -- c. the never / sometimes / always-accept trio -------------------------------------------


def _trio(draft: str, b: int, max_new: int, prompt_len: int = 5):
    model = ScriptedModel(draft)
    prompt = model.f(torch.arange(prompt_len)).tolist()
    expected = model.f(torch.arange(prompt_len, prompt_len + max_new)).tolist()
    cfg = DecodeConfig(block_size=b, max_new_tokens=max_new)
    out, stats = Engine(model).generate([prompt], cfg)
    ar, _ = Engine(model).generate([prompt], DecodeConfig(sampler="ar", max_new_tokens=max_new))
    assert ar == [expected]
    assert out == [expected]
    return stats


@pytest.mark.parametrize("b", [2, 4, 8])
def test_trioalways_accept(b):
    passes = 5
    stats = _trio("always", b, 1 + passes * b)
    assert stats.passes == [1 + passes]  # the prefill pass commits the first token
    assert stats.tokens_per_pass == (1 + passes * b) / (1 + passes)
    assert stats.committed_hist[b] == passes and sum(stats.committed_hist) == passes
    assert stats.acceptance == [1.0] * (b - 1)


@pytest.mark.parametrize("b", [2, 4, 8])
def test_trio_never_accept(b):
    stats = _trio("never", b, 21)
    assert stats.passes == [21]
    assert stats.tokens_per_pass == 1.0
    assert stats.committed_hist[1] == 20
    assert stats.acceptance == [0.0] * (b - 1)


@pytest.mark.parametrize("b", [4, 8])
def test_trio_sometimes_accept(b):
    n = 21
    stats = _trio("sometimes", b, n)
    passes = 1 + (n - 1 + b - 1) // b
    assert 1.0 < stats.tokens_per_pass < n / passes
    assert sum(1 for count in stats.committed_hist if count) >= 2  # varied acceptance


def _simulate(model: ScriptedModel, b: int, proposals, prompt_len: int, max_new: int):
    """DESIGN.md section 3 in prose: passes and the committed-per-pass histogram.

    After the prefill, ``g`` is at position ``m`` with ``b - 1`` real drafts. A pass accepts
    real drafts while they are right, commits ``k + 1``, and the block for
    ``k' = max{j in S: j <= k}`` leaves ``b - 1 - (k - k')`` real drafts for the next pass.
    """
    S = tuple(range(b)) if proposals is None else proposals
    s, real, emitted, passes, hist = prompt_len, b - 1, 1, 1, [0] * (b + 1)
    while emitted < max_new:
        k = 0
        while k < real and model.right(s + 1 + k):
            k += 1
        hist[k + 1] += 1
        passes += 1
        emitted += k + 1
        real = b - 1 - (k - max(j for j in S if j <= k))
        s += k + 1
    return passes, hist


@pytest.mark.parametrize("draft", ["always", "never", "sometimes"])
@pytest.mark.parametrize(
    "b, proposals", [(4, None), (8, None), (4, (0,)), (8, (0, 1)), (8, (0, 2, 5)), (16, (0, 3, 7))]
)
def test_scripted_pass_accounting(draft, b, proposals):
    """Per pass, which drafts exist and get accepted, for full and partial proposal sets."""
    model, m, n = ScriptedModel(draft), 5, 40
    prompt = model.f(torch.arange(m)).tolist()
    cfg = DecodeConfig(block_size=b, proposals=proposals, max_new_tokens=n)
    out, stats = Engine(model).generate([prompt], cfg)
    assert out == [model.f(torch.arange(m, m + n)).tolist()]
    passes, hist = _simulate(model, b, proposals, m, n)
    assert stats.passes == [passes]
    assert stats.committed_hist == hist


# -- d. batch invariance ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
@pytest.mark.parametrize(
    "cfg",
    [
        DecodeConfig(block_size=4, proposals=(0, 1, 2), max_new_tokens=16),
        DecodeConfig(block_size=4, sampling=SamplingParams(temperature=1.0), max_new_tokens=16),
        DecodeConfig(
            sampler="mix", beta=0.5, block_size=8, proposals=(0, 3),
            sampling=SamplingParams(temperature=0.9, top_p=0.9), max_new_tokens=16,
        ),
        DecodeConfig(sampler="ar", sampling=SamplingParams(temperature=1.0), max_new_tokens=16),
    ],
    ids=["greedy", "sampled", "mix-sampled", "ar-sampled"],
)
def test_batch_gives_each_row_its_own_tokens(family, cfg):
    model = tiny_model(family, vocab=16, seed=5, std=0.5)
    engine = Engine(model, stop_ids=(3,))  # rows stop at different passes
    prompts, seeds = _prompts(16, [4, 1, 7, 3], 5), [11, 12, 13, 14]
    batched, stats = engine.generate(prompts, cfg, seeds)
    for r, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone, alone_stats = engine.generate([prompt], cfg, [seed])
        assert alone == [batched[r]]
        assert alone_stats.passes == [stats.passes[r]]  # per-row pass counts, too
        assert alone_stats.tokens == [stats.tokens[r]]
    if not cfg.sampling.greedy:  # rows with different seeds differ
        assert len({tuple(o) for o in batched}) > 1


# -- e. KV cache contents --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "mistral", "mixtral"])
def test_kv_cache_equals_causal_forward(family, monkeypatch):
    caches = []

    class RecordingCache(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(engine_module, "KVCache", RecordingCache)
    model = tiny_model(family, vocab=8, seed=6)
    engine = Engine(model)
    prompts = _prompts(8, [6, 2, 9], 6)
    cfg = DecodeConfig(block_size=4, proposals=(0, 1, 3), max_new_tokens=18)
    final, _ = engine.generate(prompts, cfg)
    # K/V at position p depend on tokens <= p only: one causal forward per row is the reference.
    refs = []
    for prompt, out in zip(prompts, final, strict=True):
        tokens = torch.tensor([prompt + out])
        ref = KVCache(model.cfg, 1, tokens.shape[1], 0, torch.float32, "cpu")
        with torch.inference_mode():
            model(causal_layout(tokens, with_slots=True), ref)
        refs.append(ref)

    emitted = [0] * len(prompts)
    checks = 0
    for row, tokens in engine.stream(prompts, cfg):
        emitted[row] += len(tokens)
        cache = caches[-1]
        n = len(prompts[row]) + emitted[row] - 1  # the newest token is not in the cache yet
        for layer in range(model.cfg.n_layers):
            for got, want in ((cache.k, refs[row].k), (cache.v, refs[row].v)):
                torch.testing.assert_close(
                    got[layer][row, :, :n], want[layer][0, :, :n], atol=1e-5, rtol=0
                )
        checks += 1
    assert checks > len(prompts)  # after the prefill and after later passes


# -- f. stop tokens, budgets, streaming ------------------------------------------------------


def test_stop_token_mid_pass():
    """Always-accept drafts: the stop token arrives inside a pass of b tokens."""
    model = ScriptedModel("always")
    prompt = model.f(torch.arange(5)).tolist()
    text = model.f(torch.arange(5, 30)).tolist()
    stop = text[6]
    assert stop not in text[:6]
    out, stats = Engine(model, stop_ids=(stop,)).generate(
        [prompt], DecodeConfig(block_size=4, max_new_tokens=25)
    )
    assert out == [text[:7]] and stats.tokens == [7]


@pytest.mark.parametrize("sampler", ["ar", "lossless"])
def test_stop_token_random_model(sampler):
    model = tiny_model("llama", vocab=16, seed=8)
    prompts = _prompts(16, [3, 6, 1], 8)
    ar, _ = Engine(model).generate(prompts, DecodeConfig(sampler="ar", max_new_tokens=24))
    stop = ar[0][5]
    out, _ = Engine(model, stop_ids=(stop,)).generate(
        prompts, DecodeConfig(sampler=sampler, block_size=4, max_new_tokens=24)
    )
    for full, got in zip(ar, out, strict=True):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert got == expected
    assert out[0][-1] == stop and len(out[0]) <= 6


def test_stop_token_first_token():
    model = ScriptedModel("always")
    prompt = model.f(torch.arange(5)).tolist()
    first = int(model.f(torch.tensor(5)))
    out, stats = Engine(model, stop_ids=(first,)).generate([prompt], DecodeConfig(block_size=4))
    assert out == [[first]] and stats.passes == [1]


@pytest.mark.parametrize("max_new", [1, 2, 5, 7, 13])
@pytest.mark.parametrize("sampler", ["ar", "lossless", "mix"])
def test_max_new_tokens_exact(max_new, sampler):
    model = ScriptedModel("always")
    prompt = model.f(torch.arange(5)).tolist()
    cfg = DecodeConfig(sampler=sampler, beta=0.5, block_size=4, max_new_tokens=max_new)
    out, stats = Engine(model).generate([prompt, prompt[:2]], cfg)
    assert out[0] == model.f(torch.arange(5, 5 + max_new)).tolist()
    assert [len(o) for o in out] == [max_new, max_new]
    assert stats.tokens == [max_new, max_new]


def test_max_new_tokens_random_model():
    model = tiny_model("olmoe", vocab=8, seed=9)
    prompts = _prompts(8, [2, 7], 9)
    for n in (1, 3, 10):
        out, _ = Engine(model).generate(prompts, DecodeConfig(block_size=8, max_new_tokens=n))
        assert [len(o) for o in out] == [n, n]


def test_finish_ends_one_row_only():
    model = tiny_model("llama", vocab=8, seed=3)
    engine = Engine(model)
    prompts = _prompts(8, [4, 2, 6], 11)
    cfg = DecodeConfig(block_size=4, max_new_tokens=20)
    out, _ = engine.generate(prompts, cfg)
    got = [[] for _ in prompts]
    for row, tokens in engine.stream(prompts, cfg):
        got[row].extend(tokens)
        if row == 1:
            engine.finish(1)  # e.g. a stop string appeared in its text
    assert got[1] == out[1][: len(got[1])] and len(got[1]) < len(out[1])
    assert got[0] == out[0] and got[2] == out[2]
    assert engine.last_stats.tokens[1] == len(got[1])


def test_stream_matches_generate():
    model = tiny_model("qwen3_moe", vocab=8, seed=10)
    engine = Engine(model, stop_ids=(7,))
    prompts = _prompts(8, [4, 2, 6], 10)
    cfg = DecodeConfig(block_size=4, sampling=SamplingParams(temperature=1.0), max_new_tokens=20)
    out, _ = engine.generate(prompts, cfg, seeds=[1, 2, 3])
    streamed = [[] for _ in prompts]
    events = 0
    for row, tokens in engine.stream(prompts, cfg, seeds=[1, 2, 3]):
        assert tokens, "empty chunk"
        assert streamed[row] == out[row][: len(streamed[row])]  # chunks arrive in order
        streamed[row].extend(tokens)
        events += 1
    assert streamed == out
    assert events > len(prompts)


@pytest.mark.parametrize("max_new, sync_every", [(5, 8), (12, 8), (5, 1)])
def test_stream_runs_no_pass_past_the_budget(max_new, sync_every):
    """Between two looks at the state, AR runs no more passes than the tokens rows may
    still emit: a generation of n tokens replays n - 1 passes after its prefill."""
    engine = Engine(tiny_model("llama", vocab=8, seed=5))
    cfg = DecodeConfig(sampler="ar", max_new_tokens=max_new)
    chunks = list(engine.stream(_prompts(8, [3, 4], 7), cfg, sync_every=sync_every))
    assert sum(len(t) for _, t in chunks) == 2 * max_new
    assert int(engine._live.counter[0]) - 1 == max_new - 1  # the counter counts every pass


@pytest.mark.parametrize("sampler", ["ar", "lossless"])
def test_stream_stops_queueing_passes_after_a_stop_token(sampler):
    """Between two looks, at most one pass runs after every row has finished: the engine
    reads the rows' liveness from two passes back before it queues the next one."""
    model = ScriptedModel("never")  # drafts never accepted: one token a pass either way
    prompt = model.f(torch.arange(5)).tolist()
    text = model.f(torch.arange(5, 40)).tolist()
    stop = text[3]
    assert stop not in text[:3]
    engine = Engine(model, stop_ids=(stop,))
    cfg = DecodeConfig(sampler=sampler, block_size=4, max_new_tokens=30)
    out = [t for _, chunk in engine.stream([prompt], cfg, sync_every=16) for t in chunk]
    assert out == text[:4]
    needed = 3  # the prefill commits the first token, each replay one more
    assert needed <= int(engine._live.counter[0]) - 1 <= needed + 1  # was 16 replays


def test_stream_is_lazy():
    """The first token comes out after the prefill, before the rest is decoded."""
    model = ScriptedModel("never")
    prompt = model.f(torch.arange(3)).tolist()
    stream = Engine(model).stream([prompt], DecodeConfig(block_size=4, max_new_tokens=50))
    assert next(stream) == (0, [int(model.f(torch.tensor(3)))])
    stream.close()


# -- g. input validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sampler="greedy"),
        dict(sampler="mix", beta=-0.1),
        dict(sampler="mix", beta=1.5),
        dict(sampling=SamplingParams(temperature=-1.0)),
        dict(sampling=SamplingParams(temperature=float("nan"))),
        dict(sampling=SamplingParams(temperature=float("inf"))),
        dict(sampling=SamplingParams(temperature=1.0, top_p=0.0)),
        dict(sampling=SamplingParams(temperature=1.0, top_p=1.5)),
        dict(sampling=SamplingParams(temperature=1.0, top_k=-1)),
        dict(block_size=1),
        dict(block_size=65),
        dict(sampler="mix", block_size=1),
        dict(block_size=4, proposals=(1, 2)),
        dict(block_size=4, proposals=(0, 4)),
        dict(block_size=4, proposals=()),
        dict(max_new_tokens=0),
        dict(max_new_tokens=100),  # 10 + 100 tokens beyond the 64-token context
    ],
)
def test_bad_config_raises(kwargs):
    engine = Engine(tiny_model("llama", vocab=8, max_position=64))
    with pytest.raises(TidarError):
        engine.generate([list(range(8)) + [0, 1]], DecodeConfig(**kwargs))


@pytest.mark.parametrize("prompts", [[], [[]], [[1, 2], []], [[1, 8]], [[-1]]])
def test_bad_prompts_raise(prompts):
    engine = Engine(tiny_model("llama", vocab=8, max_position=64))
    with pytest.raises(TidarError):
        engine.generate(prompts, DecodeConfig(block_size=4, max_new_tokens=4))


@pytest.mark.parametrize(
    "cfg",
    [
        DecodeConfig(block_size=2, proposals=(0,), max_new_tokens=3),
        DecodeConfig(sampler="mix", beta=0.0, block_size=64, max_new_tokens=3),
        DecodeConfig(sampler="ar", block_size=1, max_new_tokens=3),
        DecodeConfig(block_size=2, sampling=SamplingParams(1.0, top_k=0, top_p=1.0)),
    ],
)
def test_valid_edges_run(cfg):
    engine = Engine(tiny_model("llama", vocab=8, max_position=256))
    cfg = replace(cfg, max_new_tokens=3)
    out, _ = engine.generate([[1]], cfg)
    assert len(out[0]) == 3


# -- h. kept runners and mask-row adapters ---------------------------------------------------


@pytest.mark.parametrize("cfg", [
    DecodeConfig(block_size=4, max_new_tokens=12),
    DecodeConfig(block_size=4, sampling=SamplingParams(temperature=1.0), max_new_tokens=12),
])
def test_runner_is_reused_across_calls(cfg):
    """Later calls of the same shape reuse the cache, state and (on CUDA) graph: their output
    is what a fresh engine gives, whatever the previous call left behind."""
    model = tiny_model("llama", vocab=8, seed=4)
    engine = Engine(model, stop_ids=(7,))
    calls = [(_prompts(8, [5, 3], 1), 12), (_prompts(8, [2, 9], 2), 5), (_prompts(8, [5, 3], 1), 9)]
    for prompts, n in calls:
        got, stats = engine.generate(prompts, replace(cfg, max_new_tokens=n), seeds=[3, 4])
        fresh, fresh_stats = Engine(model, stop_ids=(7,)).generate(
            prompts, replace(cfg, max_new_tokens=n), seeds=[3, 4])
        assert got == fresh and stats.passes == fresh_stats.passes
    assert len(engine._runners) == 1


def test_timing_a_pass_leaves_later_generations_unchanged():
    """``time_pass`` runs bursts of passes on the runner a generation of its shape reuses."""
    model = tiny_model("llama", vocab=8, seed=2)
    cfg = DecodeConfig(block_size=4, sampling=SamplingParams(temperature=1.0), max_new_tokens=9)
    engine = Engine(model)
    assert engine.time_pass(cfg, batch=2, context=3, repeats=2, burst=3) > 0
    prompts = _prompts(8, [3, 5], 6)
    assert len(engine._runners) == 1
    got, stats = engine.generate(prompts, cfg, seeds=[1, 2])
    assert len(engine._runners) == 1  # the timed runner served the generation
    fresh, fresh_stats = Engine(model).generate(prompts, cfg, seeds=[1, 2])
    assert got == fresh and stats.passes == fresh_stats.passes


def test_timing_passes_takes_turns_between_shapes():
    """``time_passes`` times one burst of each shape a round, on each shape's own runner."""
    model = tiny_model("llama", vocab=8, seed=2)
    cfgs = {1: DecodeConfig(sampler="ar"), 8: DecodeConfig(block_size=4, proposals=(0,))}
    engine = Engine(model)
    started = []
    own_start = engine._start

    def start(runner, prompts, cfg, seeds):
        started.append(cfg.sampler)
        return own_start(runner, prompts, cfg, seeds)

    engine._start = start
    seconds = engine.time_passes(cfgs, batch=1, context=3, repeats=3, burst=2)
    assert sorted(seconds) == [1, 8] and all(t > 0 for t in seconds.values())
    assert started == ["ar", "lossless"] * 3
    assert len(engine._runners) == 2


def test_row_adapters_decode_exactly_and_leave_ar_alone():
    base = tiny_model("qwen2", vocab=8, seed=5)
    adapted = with_row_lora(tiny_model("qwen2", vocab=8, seed=5))
    prompts = _prompts(8, [6, 3], 5)
    ar, _ = Engine(base).generate(prompts, DecodeConfig(sampler="ar", max_new_tokens=16))
    engine = Engine(adapted)
    assert engine.generate(prompts, DecodeConfig(sampler="ar", max_new_tokens=16))[0] == ar
    plain, plain_stats = Engine(base).generate(prompts, DecodeConfig(block_size=4,
                                                                    max_new_tokens=16))
    out, stats = engine.generate(prompts, DecodeConfig(block_size=4, max_new_tokens=16))
    assert out == ar == plain
    assert stats.committed_hist != plain_stats.committed_hist  # the adapters did draft


@pytest.mark.parametrize("stacked", [True, False])
def test_row_adapter_fast_path_matches_autograd_path(stacked, monkeypatch):
    """When decoding, adapted layers run as stacked matmuls (q/k/v and gate/up fused), or as
    trained where layers are too large for that; either way they must equal the adapters as
    trained, and follow in-place weight updates (an optimizer step between evaluations)."""
    import tidar.model
    from tidar.layouts import decode_layout

    if not stacked:
        monkeypatch.setattr(tidar.model, "DECODE_LINEAR_MAX_ELEMENTS", 0)
    model = with_row_lora(tiny_model("qwen2", vocab=8, seed=6))  # qwen2: q/k/v biases
    committed = torch.tensor([3, 5])
    layout = decode_layout(committed, torch.randint(0, 8, (2, 4)), [0, 1, 3], 4, 16,
                           model.cfg.mask_id)
    attn = model.layers[0].self_attn
    results = []
    for _ in range(2):
        with torch.inference_mode(), model.decode_weights():
            assert model.row_gate.decoding
            assert attn.qkv.active() == attn.out.active() == stacked
            fast = model(layout, KVCache(model.cfg, 2, 16, 12, torch.float32, "cpu")).clone()
        assert not model.row_gate.decoding and not attn.qkv.active()
        slow = model(layout, KVCache(model.cfg, 2, 16, 12, torch.float32, "cpu")).detach()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        results.append(fast)
        with torch.no_grad():
            attn.q_proj.lora_B.add_(0.5)
    assert not torch.allclose(*results)  # the update changed the logits


def test_fused_projections_match_separate_ones():
    """A model without adapters decodes q/k/v and gate/up as one matmul each: same logits."""
    from tidar.layouts import decode_layout

    model = tiny_model("qwen2", vocab=8, seed=9)
    keys = set(model.state_dict())
    layout = decode_layout(torch.tensor([3, 5]), torch.randint(0, 8, (2, 4)), [0, 2], 4, 16,
                           model.cfg.mask_id)
    with torch.inference_mode():
        separate = model(layout, KVCache(model.cfg, 2, 16, 8, torch.float32, "cpu"))
        with model.decode_weights():
            mlp = model.layers[0].mlp
            assert mlp.gate_up.active() and not mlp.gate_up.stacked  # no adapters: one half
            assert not mlp.down.active()  # a single plain layer runs as it is: no copy
            fused = model(layout, KVCache(model.cfg, 2, 16, 8, torch.float32, "cpu"))
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == keys  # decode weights are never saved


def test_compiled_blocks_follow_adapter_updates():
    """Compiled code cannot check the stacked-weight cache: the engine refreshes it before
    decoding, and a training-time evaluation (no grad, compiled blocks) does not use it."""
    from tidar.train import TrainConfig, evaluate

    model = with_row_lora(tiny_model("llama", vocab=8, seed=7))
    reference = with_row_lora(tiny_model("llama", vocab=8, seed=7))
    for block in model.layers:
        block.compile(backend="eager", dynamic=False)
    prompts = _prompts(8, [6, 3], 7)
    cfg = DecodeConfig(block_size=4, max_new_tokens=12)
    rows = torch.randint(0, 8, (2, 16), generator=torch.Generator().manual_seed(1))
    train_cfg = TrainConfig(out="", data=["-"], block_size=4, seq_len=16, batch_size=2)
    engine = Engine(model)
    for _ in range(2):  # before and after an optimizer step
        got = evaluate(model, rows, train_cfg, flex=False)["eval/diff_loss"]
        assert got == pytest.approx(evaluate(reference, rows, train_cfg, flex=False)[
            "eval/diff_loss"], rel=1e-5)
        out, stats = engine.generate(prompts, cfg)
        expected, expected_stats = Engine(reference).generate(prompts, cfg)
        assert out == expected and stats.committed_hist == expected_stats.committed_hist
        with torch.no_grad():  # an optimizer step
            for m in (model, reference):
                for name, p in m.named_parameters():
                    if "lora_B" in name:
                        p.mul_(-2.0)


def test_row_adapters_compile_without_graph_breaks():
    """A graph break in every adapter would split each compiled block into small graphs."""
    model = with_row_lora(tiny_model("llama", vocab=8, seed=8))
    attn = model.layers[0].self_attn
    x = torch.randn(1, 6, attn.o_proj.base.in_features)
    model.row_gate.start = 3
    for layer in (attn.q_proj, attn.o_proj):
        assert torch._dynamo.explain(layer)(x).graph_break_count == 0  # training
    with torch.inference_mode(), model.decode_weights():
        assert attn.qkv.active() and attn.out.active() and attn.out.stacked
        for layer in (attn.qkv, attn.out):
            assert torch._dynamo.explain(layer)(x).graph_break_count == 0  # decoding


def test_compiled_pass_matches_eager_without_graph_breaks():
    """``compile=True`` compiles the pass in three parts (inputs, blocks, head and
    bookkeeping) with inductor: the same tokens and acceptance as eager, and no graph break
    (one would leave the bookkeeping's many small kernels unfused)."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", vocab=32, seed=3)
    prompts = _prompts(32, [5, 3], 4)
    sampled = SamplingParams(temperature=0.8, top_k=5)
    counters.clear()
    for cfg in (DecodeConfig(block_size=4, max_new_tokens=10),
                DecodeConfig(sampler="mix", beta=0.5, block_size=4, proposals=(0, 2),
                             max_new_tokens=10, sampling=sampled)):
        got, got_stats = Engine(model, compile=True).generate(prompts, cfg)
        expected, stats = Engine(model).generate(prompts, cfg)
        assert got == expected and got_stats.committed_hist == stats.committed_hist
    assert not counters["graph_break"]


def test_small_passes_compile_with_programmatic_dependent_launch(monkeypatch):
    """The AR step's graphs, and a drafting pass's of at most ``PDL_DRAFT_ROWS`` rows over
    all sequences, take inductor's PDL option (``compile_options``); larger drafting passes'
    graphs do not (PDL made them slower on the H200)."""
    import tidar.engine

    ran = []

    def recording(fn, options=None):
        pdl = bool(options and options.get("triton.enable_pdl"))
        return lambda *args: ran.append(pdl) or fn(*args)

    monkeypatch.setattr(tidar.engine, "compile_static", recording)
    monkeypatch.setattr(tidar.engine, "PDL_DRAFT_ROWS", 16)
    model = tiny_model("llama", vocab=32, seed=3)
    ar = DecodeConfig(sampler="ar", max_new_tokens=6)
    one_block = DecodeConfig(block_size=4, proposals=(0,), max_new_tokens=6)  # 8 rows a sequence
    for prompts, cfg, pdl in ((_prompts(32, [5, 3, 4], 4), ar, True),
                              (_prompts(32, [5, 3], 4), one_block, True),  # batch 2: 16 rows
                              (_prompts(32, [5, 3, 4], 4), one_block, False),  # bucket 4: 32
                              (_prompts(32, [5], 4), DecodeConfig(block_size=4, max_new_tokens=6),
                               False)):  # 4 proposal blocks: 20 rows
        ran.clear()
        Engine(model, compile=True).generate(prompts, cfg)
        assert ran and set(ran) == {pdl}
    monkeypatch.setattr(tidar.engine, "INDUCTOR_PDL", False)
    ran.clear()
    Engine(model, compile=True).generate(_prompts(32, [5, 3], 4), ar)
    assert ran and set(ran) == {False}


def test_compiled_pass_compiles_once_per_pass_shape():
    """Longer prompts land in larger cache-capacity buckets, and ``mix`` runs at several
    betas: the compiled pass keeps the cache's slot count symbolic and reads beta as data, so
    all of them decode as eager does, from the graphs the first run compiled."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", vocab=32, seed=3, max_position=1024)
    engine, eager = Engine(model, compile=True), Engine(model)
    counters.clear()
    graphs = []
    # capacity buckets of 256, 512 and 768 slots; beta 1 is ar's target exactly
    for longest, beta in ((5, 0.7), (300, 0.7), (600, 0.3), (5, 1.0)):
        cfg = DecodeConfig(sampler="mix", beta=beta, block_size=4, proposals=(0, 2),
                           max_new_tokens=10)
        prompts = _prompts(32, [longest, 3], longest)
        got, got_stats = engine.generate(prompts, cfg)
        expected, stats = eager.generate(prompts, cfg)
        assert got == expected and got_stats.committed_hist == stats.committed_hist
        graphs.append(counters["stats"]["unique_graphs"])
    assert got == eager.generate(prompts, replace(cfg, sampler="ar"))[0]
    assert len({capacity for _, capacity, _ in engine._runners}) == 3
    assert graphs[0] > 0 and graphs == graphs[:1] * 4


def test_compiled_pass_reads_sampling_values_as_data():
    """Temperature and top-p are data too: sampling at several values runs on one runner and
    the graphs the first value compiled, and draws what a fresh eager engine draws."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", vocab=32, seed=3)
    engine = Engine(model, compile=True)
    prompts = _prompts(32, [5, 3], 6)
    counters.clear()
    graphs, outputs = [], []
    for temperature, top_p in ((0.8, 0.9), (1.5, 0.9), (0.5, 0.6)):
        sampling = SamplingParams(temperature=temperature, top_p=top_p)
        cfg = DecodeConfig(block_size=4, proposals=(0, 1), max_new_tokens=10, seed=1,
                           sampling=sampling)
        got, got_stats = engine.generate(prompts, cfg)
        expected, stats = Engine(model).generate(prompts, cfg)
        assert got == expected and got_stats.committed_hist == stats.committed_hist
        graphs.append(counters["stats"]["unique_graphs"])
        outputs.append(got)
    assert len(engine._runners) == 1
    assert graphs[0] > 0 and graphs == graphs[:1] * 3
    assert outputs[0] != outputs[1] != outputs[2]  # the values reached the draws


def test_compiled_pass_runs_moe_models_in_fp32_on_the_cpu():
    """torch's grouped GEMM checks for bf16 under torch.compile even on the CPU, where it
    runs fp32 eagerly: compiled MoE passes take the per-expert path and decode as eager."""
    model = tiny_model("qwen3_moe", vocab=32, seed=2)
    prompts = _prompts(32, [6, 2], 5)
    cfg = DecodeConfig(block_size=4, proposals=(0, 1), max_new_tokens=10)
    got, got_stats = Engine(model, compile=True).generate(prompts, cfg)
    expected, stats = Engine(model).generate(prompts, cfg)
    assert got == expected and got_stats.committed_hist == stats.committed_hist


def test_batches_share_the_runner_of_their_batch_bucket():
    """Batches of 3 and 4 run on one runner of 4 rows (a batch of 3 adds an idle row): each
    prompt decodes as it does alone, and the stats cover the real rows only."""
    from tidar.engine import batch_bucket

    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 64)] == [1, 2, 4, 8, 8, 16, 24, 64]
    engine = Engine(tiny_model("llama", vocab=32, seed=4))
    cfg = DecodeConfig(block_size=4, max_new_tokens=9)
    prompts = _prompts(32, [5, 2, 7, 3], 6)
    three, stats = engine.generate(prompts[:3], cfg)
    four, _ = engine.generate(prompts, cfg)
    assert [key[0] for key in engine._runners] == [4]
    solo = [engine.generate([p], cfg)[0][0] for p in prompts]
    assert three == solo[:3] and four == solo
    assert stats.tokens == [len(out) for out in three] and len(stats.passes) == 3
    assert sum(stats.committed_hist) == sum(stats.passes) - 3  # decode passes: prefill aside


def test_ar_caches_end_at_their_capacity():
    """AR passes have no mask tokens: their cache has no scratch slots past the capacity,
    so every AR step reads only the capacity's keys."""
    engine = Engine(tiny_model("llama", vocab=32, seed=4))
    engine.generate([[1, 2, 3]], DecodeConfig(sampler="ar", max_new_tokens=5))
    engine.generate([[1, 2, 3]], DecodeConfig(block_size=4, proposals=(0, 1), max_new_tokens=5))
    slots = {cfg.sampler: (runner.cache.slots, capacity)
             for (_, capacity, cfg), runner in engine._runners.items()}
    assert slots["ar"] == (256, 256) and slots["lossless"] == (256 + 8, 256)
