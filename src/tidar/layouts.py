"""Attention layouts: which query token may see which key, for training and decoding.

Every layout is described by three numbers per query token and the same numbers per key:

- ``position``: the RoPE position;
- ``block``: 0 for a clean (causal) token, ``> 0`` for a mask token, shared by the mask tokens
  of one block (they see each other, bidirectionally);
- ``horizon``: the last clean position the token may see (its own position for a clean token,
  the position before its block starts for a mask token).

A key is visible to a query when it is clean and at or before the query's horizon, or when it
belongs to the query's own mask block. The TiDAR training layout (DESIGN.md section 2), the
prefill with its mask block and the verify/propose decode pass (section 3) are all instances.
The one rule feeds both the dense boolean mask (CPU, reference) and flex_attention's mask_mod.

With a KV cache, each query token also has a *slot*: clean tokens write their keys and values
at ``slot == position``; mask tokens go to scratch slots past ``capacity``, so proposals never
overwrite committed entries and committing tokens only moves a length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class Layout:
    tokens: Tensor  # [B, T] token ids (mask tokens are ``mask_id``)
    positions: Tensor  # [B, T]
    horizon: Tensor  # [B, T]
    block: Tensor  # [B, T]
    clean: int  # the first ``clean`` query tokens are clean, every later one is a mask token
    slots: Tensor | None = None  # [B, T] cache slot of each token, None without a cache


@dataclass
class KeyMeta:
    positions: Tensor  # [B, K]
    block: Tensor  # [B, K]; -1 marks a slot no query may see


class CausalMask:
    """Plain causal attention of a pass's ``T`` clean tokens over the first ``T`` keys, where
    they sit (a cache filled from slot 0, or no cache): fused causal SDPA, no mask to build."""


def visible(q_horizon, q_block, kv_pos, kv_block, window: int | None = None) -> Tensor:
    """The visibility rule, elementwise over broadcastable query and key tensors."""
    clean = (kv_block == 0) & (kv_pos <= q_horizon)
    if window is not None:
        clean = clean & (kv_pos > q_horizon - window)
    return clean | ((q_block > 0) & (kv_block == q_block))


def key_meta(layout: Layout, cache_slots: int | None = None) -> KeyMeta:
    """Key metadata: the pass's own tokens (no cache), or every slot of a cache of that size."""
    if cache_slots is None:
        return KeyMeta(layout.positions, layout.block)
    batch = layout.positions.shape[0]
    device = layout.positions.device
    pos = torch.arange(cache_slots, device=device).expand(batch, cache_slots).clone()
    # Clean slots hold committed tokens (or ones this pass writes before it reads them);
    # scratch slots are visible only to the mask block written there in this pass.
    block = torch.zeros(batch, cache_slots, dtype=torch.long, device=device)
    pos.scatter_(1, layout.slots, layout.positions)
    block.scatter_(1, layout.slots, layout.block)
    return KeyMeta(pos, block)


def dense_mask(layout: Layout, keys: KeyMeta, window: int | None = None) -> Tensor:
    """Boolean mask ``[B, 1, T, K]`` (True = attend) for scaled_dot_product_attention."""
    return visible(
        layout.horizon[:, :, None],
        layout.block[:, :, None],
        keys.positions[:, None, :],
        keys.block[:, None, :],
        window,
    )[:, None]


# flex_attention's default BlockMask tile, which its default kernel tiles divide.
FLEX_MASK_BLOCK = 128


def flex_block_mask(layout: Layout, keys: KeyMeta, window: int | None = None,
                    block: int = FLEX_MASK_BLOCK):
    """The same rule as a flex_attention ``BlockMask`` (GPU): fully masked ``block x block``
    tiles are skipped. Its kernels' tiles must divide ``block``."""
    from torch.nn.attention.flex_attention import create_block_mask

    # int32: the mask function's loads and compares are a measurable share of flex's time.
    q_h, q_b, kv_p, kv_b = (t.to(torch.int32) for t in (
        layout.horizon, layout.block, keys.positions, keys.block))

    def mask_mod(b, h, q, kv):
        return visible(q_h[b, q], q_b[b, q], kv_p[b, kv], kv_b[b, kv], window)

    batch, length = layout.positions.shape
    device = layout.positions.device
    return create_block_mask(mask_mod, batch, None, length, kv_p.shape[1], device=device,
                             BLOCK_SIZE=block, _compile=device.type == "cuda")


def causal_layout(tokens: Tensor, start: Tensor | int = 0, with_slots: bool = False) -> Layout:
    """Plain causal decoding of ``tokens`` placed at positions ``start, start+1, ...``."""
    batch, length = tokens.shape
    start = torch.as_tensor(start, device=tokens.device).reshape(-1, 1)
    positions = (start + torch.arange(length, device=tokens.device)).expand(batch, length)
    return Layout(
        tokens=tokens,
        positions=positions,
        horizon=positions,
        block=torch.zeros_like(positions),
        clean=length,
        slots=positions if with_slots else None,
    )


def training_layout(tokens: Tensor, block_size: int, offsets: Tensor, mask_id: int) -> Layout:
    """The doubled TiDAR training row: ``L`` clean tokens, then ``L`` mask tokens in blocks.

    Mask blocks start at ``offset + t * block_size`` (plus a partial block at the start when
    the offset is positive); a mask token sees the clean tokens before its block starts.
    """
    batch, length = tokens.shape
    device = tokens.device
    idx = torch.arange(length, device=device).expand(batch, length)
    offsets = offsets.reshape(-1, 1).to(device)
    block_index = torch.div(idx - offsets, block_size, rounding_mode="floor")  # -1 before offset
    block_start = (offsets + block_index * block_size).clamp(min=0)
    return Layout(
        tokens=torch.cat([tokens, torch.full_like(tokens, mask_id)], dim=1),
        positions=torch.cat([idx, idx], dim=1),
        horizon=torch.cat([idx, block_start - 1], dim=1),
        block=torch.cat([torch.zeros_like(idx), block_index + 2], dim=1),
        clean=length,
    )


def prefill_layout(
    prompts: list[list[int]], block_size: int, capacity: int, mask_id: int, device=None,
    length: int | None = None,
) -> Layout:
    """Prompts (right-padded to the longest, or to ``length``, causal) followed by one mask
    block per row at ``len(prompt)``.

    Query ``max_len + j`` of row ``r`` is mask token ``j`` of that row's block, at position
    ``len(prompts[r]) + j``. Padding tokens are clean tokens past the prompt: they write slots
    that are not yet committed and nobody reads their outputs.
    """
    batch = len(prompts)
    max_len = max(max(len(p) for p in prompts), length or 0)
    tokens = torch.zeros(batch, max_len + block_size, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        tokens[r, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    tokens[:, max_len:] = mask_id
    lengths = torch.tensor([len(p) for p in prompts]).reshape(-1, 1)
    clean_pos = torch.arange(max_len).expand(batch, max_len)
    mask_pos = lengths + torch.arange(block_size)
    positions = torch.cat([clean_pos, mask_pos], dim=1)
    layout = Layout(
        tokens=tokens,
        positions=positions,
        horizon=torch.cat([clean_pos, (lengths - 1).expand(batch, block_size)], dim=1),
        block=torch.cat([torch.zeros_like(clean_pos), torch.ones_like(mask_pos)], dim=1),
        clean=max_len,
        slots=torch.cat([clean_pos, (capacity + torch.arange(block_size)).expand(batch, -1)], 1),
    )
    return _to(layout, device)


def decode_layout(
    committed: Tensor,
    verify: Tensor,
    proposals: list[int] | Tensor,
    block_size: int,
    scratch_start: int,
    mask_id: int,
) -> Layout:
    """One verify/propose pass (DESIGN.md section 3).

    ``committed[r]`` tokens are in row ``r``'s cache; ``verify[r]`` is ``[g, d_1 .. d_{b-1}]``
    at positions ``s .. s+b-1``. For each ``k`` in ``proposals`` a block of ``b`` mask tokens
    at ``s+k+1 .. s+k+b`` sees the cache and ``verify[:, :k+1]``; the mask tokens take the
    slots from ``scratch_start`` (at or past the capacity) on. Everything is arithmetic on
    ``committed``, so building the layout needs no host synchronisation.
    """
    batch, b = verify.shape
    device = verify.device
    s = committed.reshape(-1, 1)
    offsets = torch.arange(b, device=device)
    ks = torch.as_tensor(proposals, dtype=torch.long, device=device)
    n = len(proposals)
    verify_pos = s + offsets
    prop_pos = (s[:, :, None] + ks[None, :, None] + 1 + offsets).reshape(batch, n * b)
    prop_horizon = (s + ks).repeat_interleave(b, dim=1)
    prop_block = (torch.arange(n, device=device) + 1).repeat_interleave(b).expand(batch, -1)
    scratch = (scratch_start + torch.arange(n * b, device=device)).expand(batch, -1)
    return Layout(
        tokens=torch.cat([verify, torch.full((batch, n * b), mask_id, device=device)], dim=1),
        positions=torch.cat([verify_pos, prop_pos], dim=1),
        horizon=torch.cat([verify_pos, prop_horizon], dim=1),
        block=torch.cat([torch.zeros_like(verify_pos), prop_block], dim=1),
        clean=b,
        slots=torch.cat([verify_pos, scratch], dim=1),
    )


def _to(layout: Layout, device) -> Layout:
    if device is None:
        return layout
    return replace(layout, **{
        name: getattr(layout, name).to(device)
        for name in ("tokens", "positions", "horizon", "block", "slots")
    })
