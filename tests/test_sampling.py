"""The sampling functions on hand-made logits: processing, drawing, and verification.

Speculative sampling is checked for exactness two ways: by quadrature over the uniforms
(deterministic, exact up to the grid step) and by chi-square over many random draws; the same
checks must reject deliberately wrong verifiers.
"""

from __future__ import annotations

import pytest
import torch
from helpers import always_accept, chi2_pvalue, one_thread, residual_from_p  # noqa: F401

from tidar.sampling import (
    SamplingParams,
    accepted_prefix,
    hash_uniforms,
    mix_logits,
    one_hot,
    probabilities,
    sample,
    verify_greedy,
    verify_sampled,
)

ALPHA = 1e-3


def _logits(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float).log()


# -- probabilities --------------------------------------------------------------------------


def test_greedy_is_one_hot_at_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    probs = probabilities(logits, SamplingParams())
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature(temperature):
    logits = torch.tensor([1.0, 2.0, -0.5, 0.3])
    probs = probabilities(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, -1))


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 4.0, 0.0, 3.0, 2.0])
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    expected = torch.zeros(5)
    expected[[1, 3]] = torch.softmax(torch.tensor([4.0, 3.0]), -1)
    torch.testing.assert_close(probs, expected)
    # top_k larger than the vocabulary keeps everything
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=50))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.3, [2]),  # the first token always stays, even past top_p on its own
        (0.45, [2]),
        (0.75, [2, 0]),  # 0.5 < 0.75 <= 0.5 + 0.3: the minimal prefix reaching top_p
        (0.81, [2, 0, 3]),
        (0.99, [2, 0, 3, 1]),
        (1.0, [2, 0, 3, 1]),
    ],
)
def test_top_p_keeps_the_minimal_prefix(top_p, kept):
    base = [0.3, 0.05, 0.5, 0.15]  # sorted: 2 (0.5), 0 (0.3), 3 (0.15), 1 (0.05)
    probs = probabilities(_logits(base), SamplingParams(temperature=1.0, top_p=top_p))
    expected = torch.zeros(4)
    expected[kept] = torch.tensor(base)[kept]
    torch.testing.assert_close(probs, expected / expected.sum())


def test_top_k_then_top_p_batched():
    logits = torch.stack([_logits([0.1, 0.2, 0.3, 0.4]), _logits([0.4, 0.3, 0.2, 0.1])])
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.6))
    # top-3 renormalised: 0.4/0.9, 0.3/0.9, 0.2/0.9; top-p 0.6 keeps the first two
    torch.testing.assert_close(probs, torch.tensor([[0, 0, 3 / 7, 4 / 7], [4 / 7, 3 / 7, 0, 0]]))


def test_mix_logits():
    a, d = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.equal(mix_logits(a, d, 1.0), a)
    torch.testing.assert_close(mix_logits(a, d, 0.0), d)
    torch.testing.assert_close(mix_logits(a, d, 0.25), 0.25 * a + 0.75 * d)


# -- sample ---------------------------------------------------------------------------------


def test_sample_never_picks_zero_probability_tokens():
    probs = torch.tensor(
        [
            [0.0, 0.5, 0.0, 0.5, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.3, 0.7, 0.0, 0.0],
        ]
    )
    below_one = 1.0 - 2.0**-24  # the largest float32 under 1 (torch.rand's maximum)
    u = torch.tensor([0.0, 1e-9, 0.25, 0.5 - 1e-7, 0.5, 0.75, 0.999999, below_one])
    u = torch.cat([u, torch.rand(5000, generator=torch.Generator().manual_seed(0))])
    for row in probs:
        # unnormalised rows too: sample normalises by the total mass
        for scale in (1.0, 0.37):
            tokens = sample((scale * row).expand(len(u), -1), u)
            assert (row[tokens] > 0).all(), row


def test_sample_frequencies_by_quadrature():
    """Midpoint-rule uniforms give each token its probability, up to the grid step."""
    probs = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4])
    n = 10_000
    u = (torch.arange(n) + 0.5) / n
    counts = torch.bincount(sample(probs.expand(n, -1), u), minlength=5)
    assert (counts / n - probs).abs().max() <= 1.0 / n + 1e-6


def test_sample_frequencies_chi_square():
    probs = torch.tensor([0.2, 0.3, 0.0, 0.5])
    n = 20_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(sample(probs.expand(n, -1), u), minlength=4)
    assert counts[2] == 0
    assert chi2_pvalue(counts, probs) > ALPHA


def test_one_hot():
    tokens = torch.tensor([[0, 3], [2, 2]])
    assert torch.equal(one_hot(tokens, 5), torch.nn.functional.one_hot(tokens, 5).float())


def test_hash_uniforms_are_uniform_independent_and_batch_invariant():
    n, slots = 4000, 8
    seeds, counter = torch.arange(n), torch.full((n,), 3)
    u = hash_uniforms(seeds, counter, slots)
    assert u.shape == (n, slots) and u.dtype == torch.float32
    assert (u >= 0).all() and (u < 1).all()
    # a pure function of (seed, counter, slot): a row's numbers ignore the batch around it
    assert torch.equal(hash_uniforms(seeds[7:9], counter[7:9], slots), u[7:9])
    assert torch.equal(hash_uniforms(torch.tensor([7, 7]), torch.tensor([3, 3]), slots), u[[7, 7]])
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert chi2_pvalue(counts, torch.full((20,), 0.05)) > ALPHA
    for j in range(slots):  # each slot on its own, too
        per_slot = torch.histc(u[:, j], bins=10, min=0.0, max=1.0)
        assert chi2_pvalue(per_slot, torch.full((10,), 0.1)) > ALPHA
    # nearly uncorrelated across slots, across passes (counters) and across adjacent seeds
    corr = torch.corrcoef(u.T) - torch.eye(slots)
    assert corr.abs().max() < 0.1
    nxt = hash_uniforms(seeds, counter + 1, slots)
    assert torch.corrcoef(torch.stack([u.flatten(), nxt.flatten()]))[0, 1].abs() < 0.05
    assert torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1].abs() < 0.05


# -- greedy verification --------------------------------------------------------------------


def test_accepted_prefix():
    ok = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert accepted_prefix(ok).tolist() == [2, 0, 4, 1]
    assert accepted_prefix(torch.zeros(3, 0, dtype=torch.bool)).tolist() == [0, 0, 0]


def test_verify_greedy_hand_made():
    # targets' argmax per position (b = 4): row 0: 1 2 3 0, row 1: 2 2 2 2, row 2: 0 1 0 1
    best = torch.tensor([[1, 2, 3, 0], [2, 2, 2, 2], [0, 1, 0, 1]])
    logits = torch.nn.functional.one_hot(best, 4).float() * 3 + 0.1 * torch.randn(3, 4, 4)
    drafts = torch.tensor(
        [
            [1, 2, 0],  # accept 2, reject the third: c = argmax p_3 = 3
            [2, 2, 2],  # accept all: c is the bonus, argmax p_4 = 2
            [3, 1, 0],  # reject the first (even though later ones match): c = 0
        ]
    )
    k, c = verify_greedy(logits, drafts)
    assert k.tolist() == [2, 3, 0]
    assert c.tolist() == [3, 2, 0]


def test_verify_greedy_without_drafts_is_argmax():
    logits = torch.tensor([[[0.0, 1.0, 0.5]], [[2.0, 1.0, 0.5]]])
    k, c = verify_greedy(logits, torch.zeros(2, 0, dtype=torch.long))
    assert k.tolist() == [0, 0] and c.tolist() == [1, 0]


def test_verify_sampled_with_one_hot_q_is_greedy_like():
    """q one-hot and p one-hot: accept exactly when the draft is p's token."""
    p = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3]]), 4).float()
    drafts = torch.tensor([[1, 0]])
    q = torch.nn.functional.one_hot(drafts, 4).float()
    for u in (0.0, 0.5, 0.99):
        k, c = verify_sampled(p, q, drafts, torch.full((1, 2), u), torch.tensor([u]))
        assert k.tolist() == [1] and c.tolist() == [2]


def test_verify_sampled_without_drafts_samples_p():
    """b = 1 (the ``ar`` sampler): no drafts, the token is drawn from ``p`` itself."""
    p = torch.tensor([[[0.0, 0.25, 0.75]]]).expand(4, 1, 3)
    q = torch.zeros(4, 0, 3)
    drafts = torch.zeros(4, 0, dtype=torch.long)
    k, c = verify_sampled(p, q, drafts, torch.zeros(4, 0), torch.tensor([0.0, 0.2, 0.3, 0.99]))
    assert k.tolist() == [0, 0, 0, 0] and c.tolist() == [1, 1, 2, 2]


# -- speculative sampling exactness ---------------------------------------------------------

P1 = torch.tensor([0.1, 0.5, 0.15, 0.25])
Q1 = torch.tensor([0.4, 0.1, 0.3, 0.2])


def _first_token_distribution(verify, p1, q1, grid: int = 300) -> torch.Tensor:
    """P(first committed token) for one draft (b = 2), by midpoint quadrature over uniforms.

    Exact enumeration over the draft, a ``grid x grid`` product rule over
    ``(u_accept, u_final)``: error at most about ``2 / grid``.
    """
    vocab = p1.shape[0]
    u = (torch.arange(grid) + 0.5) / grid
    ua, uf = torch.cartesian_prod(u, u).unbind(-1)
    n = ua.shape[0]
    p2 = torch.full((vocab,), 1.0 / vocab)
    p = torch.stack([p1, p2]).expand(n, -1, -1)
    q = q1.expand(n, 1, -1)
    dist = torch.zeros(vocab)
    for d in range(vocab):
        drafts = torch.full((n, 1), d)
        k, c = verify(p, q, drafts, ua[:, None], uf)
        first = torch.where(k >= 1, drafts[:, 0], c)
        dist += q1[d] * torch.bincount(first, minlength=vocab).float() / n
    return dist


def test_speculative_step_exact_by_quadrature():
    dist = _first_token_distribution(verify_sampled, P1, Q1)
    assert (dist - P1).abs().max() < 5e-3
    # when q == p every draft is accepted and the output is still p
    assert (_first_token_distribution(verify_sampled, P1, P1) - P1).abs().max() < 5e-3
    # q with zero mass where p has mass (the residual must supply it)
    q0 = torch.tensor([0.0, 0.0, 0.5, 0.5])
    assert (_first_token_distribution(verify_sampled, P1, q0) - P1).abs().max() < 5e-3


@pytest.mark.parametrize("wrong", [always_accept, residual_from_p])
def test_quadrature_rejects_wrong_verifiers(wrong):
    dist = _first_token_distribution(wrong, P1, Q1)
    assert (dist - P1).abs().max() > 0.05


def _speculative_positions(verify, p, q, n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Draw ``n`` speculative steps; per position ``j``, counts of ``x_j`` where committed.

    The targets ``p_j`` here do not depend on earlier tokens, so ``x_j`` given ``k >= j - 1``
    (the step reached position ``j``) must be distributed as ``p_j``.
    """
    b, vocab = p.shape
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q[i], n, True, generator=gen) for i in range(b - 1)], 1)
    u_accept = torch.rand(n, b - 1, generator=gen)
    u_final = torch.rand(n, generator=gen)
    k, c = verify(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, u_accept, u_final)
    tokens = torch.cat([drafts, torch.zeros(n, 1, dtype=torch.long)], 1)
    tokens[torch.arange(n), k] = c
    result = []
    for j in range(b):
        reached = k >= j
        result.append((torch.bincount(tokens[reached, j], minlength=vocab), int(reached.sum())))
    return result


def _targets():
    p = torch.stack(
        [P1, torch.tensor([0.4, 0.0, 0.3, 0.3]), torch.tensor([0.25, 0.25, 0.25, 0.25]),
         torch.tensor([0.7, 0.1, 0.1, 0.1])]
    )
    q = torch.stack([Q1, torch.tensor([0.1, 0.3, 0.3, 0.3]), torch.tensor([0.0, 0.6, 0.4, 0.0])])
    return p, q


def test_speculative_step_exact_chi_square():
    p, q = _targets()
    result = _speculative_positions(verify_sampled, p, q, 60_000, seed=0)
    for j, (counts, reached) in enumerate(result):
        assert reached > 2000, (j, reached)  # every position is tested with real power
        assert chi2_pvalue(counts, p[j]) > ALPHA, f"position {j + 1}"


@pytest.mark.parametrize("wrong", [always_accept, residual_from_p])
def test_chi_square_rejects_wrong_verifiers(wrong):
    p, q = _targets()
    result = _speculative_positions(wrong, p, q, 60_000, seed=0)
    assert min(chi2_pvalue(counts, p[j]) for j, (counts, _) in enumerate(result)) < ALPHA
