"""Replaying greedy decoding from one output: the tokens each pass commits with any proposal
set, without decoding again (``tidar.acceptance``)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, with_row_lora

from tidar.acceptance import block_drafts, replay, tokens_per_pass_by_proposals
from tidar.engine import DecodeConfig, Engine, proposal_set
from tidar.layouts import prefill_layout


def greedy_output(model, prompt: list[int], tokens: int) -> list[int]:
    out, _ = Engine(model).generate([prompt], DecodeConfig(sampler="ar", max_new_tokens=tokens))
    return out[0]


@pytest.mark.parametrize("family,block_size,seed", [("llama", 4, 0), ("llama", 8, 1),
                                                    ("qwen3_moe", 4, 2), ("llama", 16, 3)])
def test_replay_commits_what_the_engine_commits(family, block_size, seed):
    """As the engine decodes with each proposal set: the same tokens committed a pass, pass
    for pass in the histogram (the budget cuts the last pass's count as in
    ``engine.Stats``)."""
    model = tiny_model(family, vocab=6, seed=seed)
    if seed % 2:
        model = with_row_lora(model)
    prompt, budget = [1, 2, 3, 4, 5][: 2 + seed], 40
    truth = greedy_output(model, prompt, budget + block_size - 1)
    drafts = block_drafts(model, prompt + truth, block_size)
    accepted_some = False
    for n in sorted({1, 2, block_size // 2, block_size}):
        cfg = DecodeConfig(block_size=block_size, proposals=proposal_set(n, block_size),
                           max_new_tokens=budget)
        out, stats = Engine(model).generate([prompt], cfg)
        committed = replay(drafts, truth, len(prompt), block_size, cfg.proposals, budget)
        histogram = [committed.count(c) for c in range(1, block_size + 1)]
        assert out[0] == truth[:budget]
        assert histogram == stats.committed_hist[1:], n
        accepted_some |= max(committed) > 1
    assert accepted_some  # the drafts of this tiny vocabulary are accepted at times


def test_the_drafts_are_the_prefill_blocks():
    """Row ``p`` is the mask block a prefill of the first ``p`` tokens drafts."""
    model = with_row_lora(tiny_model("llama", vocab=16, seed=4))
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    drafts = block_drafts(model, tokens, 4)
    for p in (1, 5, len(tokens) - 1):
        layout = prefill_layout([tokens[:p]], 4, 64, model.cfg.mask_id)
        with torch.no_grad():
            logits = model(layout)[0, layout.clean:]
        assert drafts[p].tolist() == logits.argmax(-1).tolist()


def test_replay_needs_the_tokens_its_last_pass_verifies():
    with pytest.raises(ValueError, match="takes 12 known"):
        replay(torch.zeros(20, 4, dtype=torch.long), [0] * 11, 3, 4, (0,), 9)


def test_moments_by_proposal_count():
    """Perfect drafts: the full set commits whole blocks; one block alternates a whole block
    with a pass of fillers (one token: no 0 in the output to match them): 8 passes of 4
    and 7 of 1 to the budget of 37."""
    model = tiny_model("llama", vocab=6, seed=0)
    truth = [1, 2, 3, 4, 5] * 8

    class Oracle:  # drafts every position right
        cfg = model.cfg

        def parameters(self):
            return model.parameters()

        def __call__(self, layout, hidden_only):
            assert hidden_only
            length = layout.clean
            row = layout.tokens[0, :length]
            return torch.nn.functional.one_hot(row, 8).float()[None].repeat(1, 2, 1)

        def head(self, hidden):
            return hidden

    moments = tokens_per_pass_by_proposals(Oracle(), [([1, 2], truth)], 4, [1, 4])
    assert moments[4] == [4.0, 0.0]
    assert moments[1] == pytest.approx([39 / 15, 135 / 15 - (39 / 15) ** 2])  # 4, 1, .., 4
