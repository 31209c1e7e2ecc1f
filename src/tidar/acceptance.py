"""Greedy tokens per pass of every proposal set, from one decode's output.

With the full proposal set each pass verifies drafts made for exactly the prefix it accepted,
and the drafter's acceptance profile (``P(k >= j)``) says all there is to say. With fewer
blocks, after ``k`` accepted drafts the next pass verifies the rest of block ``k' < k``,
drafted without the tokens after ``k'``; a model that counts those drafts as fresh ones
projected one block at 2.09 tokens a pass on HumanEval prompts where the H100 committed 1.81
(docs/results.md section 3, session 47).

Greedy decoding needs no model of it: the tokens are the AR model's greedy output, whatever
the proposal set, and the block drafted after a prefix depends on that prefix alone. So one
output and the drafts of the block starting at each of its positions replay the decoding of
any proposal set exactly (``replay``, as ``engine.Engine._leave_pass`` verifies and picks).
The drafts come from ``block_size`` forwards of the doubled training row, one per block
offset (``block_drafts``), cheaper than decoding once with each set.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .engine import proposal_floor, proposal_set
from .layouts import training_layout


@torch.no_grad()
def block_drafts(model, tokens: list[int], block_size: int) -> Tensor:
    """``[len(tokens), block_size]``: row ``p`` holds the greedy drafts of the mask block at
    positions ``p .. p+b-1`` that sees ``tokens[:p]`` (the prefill's block for a prompt of
    ``p`` tokens, and a decode pass's block ``B_k`` with ``s+k+1 = p``)."""
    b, length = block_size, len(tokens)
    device = next(model.parameters()).device
    # Padded so that the last positions' blocks are whole; no block sees the padding.
    row = torch.tensor(tokens + [0] * b, device=device)[None]
    drafts = torch.empty(length, b, dtype=torch.long)
    for offset in range(b):
        layout = training_layout(row, b, torch.tensor([offset]), model.cfg.mask_id)
        hidden = model(layout, hidden_only=True)[0, layout.clean:]
        starts = torch.arange(offset, length, b)
        picked = hidden[(starts[:, None] + torch.arange(b)).to(device)]
        drafts[starts] = model.head(picked).argmax(-1).cpu()
    return drafts


def replay(drafts: Tensor, truth: list[int], start: int, block_size: int,
           proposals: tuple[int, ...], budget: int) -> list[int]:
    """Committed tokens of each greedy decode pass with the proposal set ``proposals``, for
    a prompt of ``start`` tokens whose greedy output begins ``truth`` (the prefill commits
    ``truth[0]``), until ``budget`` tokens are generated; ``drafts`` from ``block_drafts`` of
    the prompt and ``truth``. A pass counts the tokens it accepts even where the budget cuts
    them, as ``engine.Stats`` does. ``truth`` must hold ``budget + block_size - 1`` tokens."""
    b = block_size
    if len(truth) < budget + b - 1:
        raise ValueError(f"replaying {budget} tokens takes {budget + b - 1} known, "
                         f"got {len(truth)}")
    floor = proposal_floor(proposals, b)
    committed = []
    current = drafts[start, 1:].tolist()  # the prefill's block, after truth[0]
    generated = 1
    while generated < budget:
        i = generated - 1  # truth[i] is the pass's first token (g)
        k = 0
        while k < b - 1 and current[k] == truth[i + 1 + k]:
            k += 1
        committed.append(k + 1)
        generated += k + 1
        # Block k' covers positions from truth[i+k'+1] on; the drafts after c are the real
        # ones, the rest fillers (token 0, as the engine's).
        shift = k - floor[k]
        block = drafts[start + i + floor[k] + 1].tolist()
        current = [block[shift + j] if shift + j < b else 0 for j in range(1, b)]
    return committed


def tokens_per_pass_by_proposals(model, sequences: Iterable[tuple[list[int], list[int]]],
                                 block_size: int, counts: list[int]) -> dict[int, list[float]]:
    """``{n: [mean, variance]}`` of the tokens a greedy decode pass commits with ``n``
    proposal blocks, replayed over ``(prompt, greedy output)`` pairs (each output replayed
    up to ``block_size - 1`` tokens before its end, which later passes would verify)."""
    passes = {n: [] for n in counts}
    for prompt, output in sequences:
        budget = len(output) - block_size + 1
        if budget < 2:
            continue
        drafts = block_drafts(model, prompt + output, block_size)
        for n in counts:
            passes[n] += replay(drafts, output, len(prompt), block_size,
                                proposal_set(n, block_size), budget)
    moments = {}
    for n, committed in passes.items():
        if committed:
            values = torch.tensor(committed, dtype=torch.float64)
            moments[n] = [float(values.mean()), float(values.var(unbiased=False))]
    return moments
