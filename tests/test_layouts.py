"""Attention layouts against masks written out by hand from DESIGN.md sections 2 and 3.

The expectations below are plain loops over the rules in prose (who may see whom), not calls
to ``visible``; the last tests check that the same rule evaluated elementwise, the way a
flex_attention ``mask_mod`` evaluates it, gives the dense mask.
"""

from __future__ import annotations

import pytest
import torch
from helpers import one_thread  # noqa: F401

from tidar.layouts import (
    causal_layout,
    decode_layout,
    dense_mask,
    flex_block_mask,
    key_meta,
    prefill_layout,
    training_layout,
    visible,
)

MASK = 99


def _dense(layout, cache_slots=None, window=None):
    return dense_mask(layout, key_meta(layout, cache_slots), window)[:, 0]


def test_causal_layout_is_causal():
    tokens = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    layout = causal_layout(tokens, start=torch.tensor([0, 3]), with_slots=True)
    assert layout.positions.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert layout.slots.tolist() == layout.positions.tolist()
    mask = _dense(layout)
    expected = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(mask[0], expected) and torch.equal(mask[1], expected)


def _expected_training(length: int, b: int, offset: int) -> torch.Tensor:
    """DESIGN.md section 2, literally: a ``[2L, 2L]`` mask over ``[clean | mask]``."""

    def block_start(i: int) -> int:  # the block of mask position i starts at o + t*b, or 0
        if i < offset:
            return 0
        return offset + (i - offset) // b * b

    expected = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            expected[i, j] = j <= i  # clean sees clean causally, never a mask token
            expected[length + i, j] = j < block_start(i)  # mask: clean strictly before its block
            expected[length + i, length + j] = block_start(i) == block_start(j)  # own block
    return expected


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_training_layout_matches_design(block_size):
    length = 11
    gen = torch.Generator().manual_seed(block_size)
    tokens = torch.randint(0, 50, (5, length), generator=gen)
    offsets = torch.randint(0, block_size, (5,), generator=gen)
    offsets[:2] = torch.tensor([0, block_size - 1])  # aligned and maximally shifted rows
    layout = training_layout(tokens, block_size, offsets, MASK)
    assert torch.equal(layout.tokens[:, :length], tokens)
    assert (layout.tokens[:, length:] == MASK).all()
    idx = torch.arange(length)
    assert torch.equal(layout.positions, torch.cat([idx, idx]).expand(5, -1))
    mask = _dense(layout)
    for r in range(5):
        expected = _expected_training(length, block_size, int(offsets[r]))
        assert torch.equal(mask[r], expected), f"row {r}, offset {int(offsets[r])}"


def test_training_layout_blocks_are_separate_and_sized():
    # Offset 2, b = 4, L = 10: blocks [0, 2), [2, 6), [6, 10) of the mask half.
    layout = training_layout(torch.zeros(1, 10, dtype=torch.long), 4, torch.tensor([2]), MASK)
    mask = _dense(layout)[0, 10:, 10:]
    groups = [tuple(mask[i].nonzero().flatten().tolist()) for i in range(10)]
    assert groups == [(0, 1)] * 2 + [(2, 3, 4, 5)] * 4 + [(6, 7, 8, 9)] * 4
    clean_seen = _dense(layout)[0, 10:, :10].sum(-1).tolist()
    assert clean_seen == [0, 0, 2, 2, 2, 2, 6, 6, 6, 6]


def test_prefill_layout_matches_design():
    prompts, b, capacity = [[5, 6, 7, 8], [9, 3]], 3, 12
    layout = prefill_layout(prompts, b, capacity, MASK)
    max_len = 4
    assert layout.tokens[:, max_len:].eq(MASK).all()
    assert layout.tokens[0, :4].tolist() == [5, 6, 7, 8] and layout.tokens[1, :2].tolist() == [9, 3]
    assert layout.positions.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 2, 3, 4]]
    assert layout.slots.tolist() == [[0, 1, 2, 3, 12, 13, 14]] * 2
    slots = capacity + b
    mask = _dense(layout, slots)
    for r, prompt in enumerate(prompts):
        expected = torch.zeros(max_len + b, slots, dtype=torch.bool)
        for i in range(max_len):  # clean queries (prompt, then padding): causal over slots
            expected[i, : i + 1] = True
        for j in range(b):  # the mask block: the whole prompt, and the block itself
            expected[max_len + j, : len(prompt)] = True
            expected[max_len + j, capacity : capacity + b] = True
        assert torch.equal(mask[r], expected), f"row {r}"


def test_decode_layout_matches_design():
    committed, b, proposals, capacity = torch.tensor([3, 6]), 4, [0, 1, 3], 16
    verify = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    layout = decode_layout(committed, verify, proposals, b, capacity, MASK)
    n = len(proposals)
    assert layout.tokens.shape == (2, b + n * b)
    assert torch.equal(layout.tokens[:, :b], verify) and layout.tokens[:, b:].eq(MASK).all()
    slots = capacity + n * b
    mask = _dense(layout, slots)
    for r, s in enumerate(committed.tolist()):
        pos = layout.positions[r].tolist()
        assert pos[:b] == [s + i for i in range(b)]  # V at s .. s+b-1
        assert layout.slots[r, :b].tolist() == pos[:b]
        expected = torch.zeros(b + n * b, slots, dtype=torch.bool)
        for i in range(b):  # verify segment: the cache, then causal among V
            expected[i, : s + i + 1] = True
        for t, k in enumerate(proposals):  # B_k: cache, V[0..k], itself
            q0 = b + t * b
            assert pos[q0 : q0 + b] == [s + k + 1 + j for j in range(b)]
            scratch = layout.slots[r, q0 : q0 + b].tolist()
            assert all(x >= capacity for x in scratch)
            for j in range(b):
                expected[q0 + j, : s + k + 1] = True
                expected[q0 + j, scratch] = True
        assert torch.equal(mask[r], expected), f"row {r}"
    # Scratch slots of different blocks never overlap, and never touch committed slots.
    assert len(set(layout.slots[0, b:].tolist())) == n * b


def test_decode_layout_ignores_stale_slots_and_padding():
    """Slots past what a pass writes (stale drafts, prefill padding) are invisible to all."""
    layout = decode_layout(torch.tensor([2]), torch.tensor([[1, 2, 3]]), [0, 2], 3, 10, MASK)
    mask = _dense(layout, 16)[0]
    assert not mask[:, 5:10].any()  # positions s+b .. capacity-1 hold nothing this pass sees


def test_window_rule():
    """A sliding window drops clean keys more than ``window - 1`` before the horizon."""
    layout = causal_layout(torch.zeros(1, 8, dtype=torch.long))
    mask = _dense(layout, window=3)[0]
    for i in range(8):
        for j in range(8):
            assert bool(mask[i, j]) == (i - 3 < j <= i)


def _layouts():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (3, 13), generator=gen)
    train = training_layout(tokens, 4, torch.tensor([0, 1, 3]), MASK)
    prefill = prefill_layout([[1, 2, 3], [4], [5, 6, 7, 8, 9]], 4, 20, MASK)
    verify = torch.randint(0, 50, (3, 5), generator=gen)
    decode = decode_layout(torch.tensor([4, 9, 1]), verify, [0, 1, 2, 4], 5, 20, MASK)
    return {
        "training": (train, None),
        "prefill": (prefill, 24),
        "decode": (decode, 40),
    }


@pytest.mark.parametrize("name", ["training", "prefill", "decode"])
@pytest.mark.parametrize("window", [None, 4])
def test_mask_mod_matches_dense(name, window):
    """``visible`` evaluated per (query, key) index pair, as flex_attention does, == dense."""
    from torch.nn.attention.flex_attention import create_mask

    layout, slots = _layouts()[name]
    keys = key_meta(layout, slots)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(
            layout.horizon[b, q_idx],
            layout.block[b, q_idx],
            keys.positions[b, kv_idx],
            keys.block[b, kv_idx],
            window,
        )

    batch, q_len = layout.tokens.shape
    kv_len = keys.positions.shape[1]
    dense = dense_mask(layout, keys, window)
    assert dense.any() and not dense.all()
    elementwise = create_mask(mask_mod, batch, 1, q_len, kv_len, device="cpu")
    assert torch.equal(elementwise, dense)
    # Block-sparse form (flex_block_mask, at the tile it is given): a block is present
    # exactly where the dense mask has any True.
    for bs in (4, 8):
        block_mask = flex_block_mask(layout, keys, window, block=bs)
        nq, nk = -(-q_len // bs), -(-kv_len // bs)
        padded = torch.zeros(batch, 1, nq * bs, nk * bs, dtype=torch.bool)
        padded[..., :q_len, :kv_len] = dense
        any_in_block = padded.reshape(batch, 1, nq, bs, nk, bs).any(-1).any(-2)
        assert block_mask.BLOCK_SIZE == (bs, bs)
        assert torch.equal(block_mask.to_dense().bool(), any_in_block)
