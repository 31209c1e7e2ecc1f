"""Frozen-AR's mask-half attention (far keys through the flash kernel, near and own keys as
small matmuls, merged by log-sum-exp) against SDPA with the layout's dense mask."""

import pytest
import torch

from tidar import prefix_attention
from tidar.layouts import dense_mask, key_meta, training_layout
from tidar.model import dense_attention
from tidar.prefix_attention import PrefixBlockMask, prefix_block_attention
from tidar.train import mask_half

# (rows, clean length, block size, query heads, KV heads); lengths not a multiple of the
# block, a single partial block, and a row shorter than a block.
SHAPES = [(3, 24, 4, 6, 2), (2, 40, 16, 4, 4), (4, 9, 3, 2, 1), (2, 5, 8, 2, 1), (2, 33, 16, 3, 1)]
# The Triton kernels' blocks: 16 to 64 tokens (with a head size of 16 here).
TRITON_SHAPES = [(2, 40, 16, 4, 2), (2, 33, 16, 3, 1), (2, 10, 16, 2, 2), (2, 70, 32, 2, 1)]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a CUDA device (run through the device tool)"))]


def _reference_and_ours(shape, seed: int, dtype, device="cpu", dim: int = 8):
    rows, length, block, heads, kv_heads = shape
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, block, (rows,), generator=gen)
    layout = training_layout(torch.zeros(rows, length, dtype=torch.long), block, offsets, 1)
    slots = 2 * length + 3  # a cache rounded up past the mask half, as on CUDA
    drafts = mask_half(layout, length, length)
    mask = dense_mask(drafts, key_meta(drafts, slots)).to(device)
    offsets = offsets.to(device)

    def randn(*size):
        x = torch.randn(*size, generator=gen, dtype=torch.float64).to(device, dtype)
        return x.requires_grad_()

    q, grad = randn(rows, heads, length, dim), randn(rows, heads, length, dim).detach()
    k, v = randn(rows, kv_heads, slots, dim), randn(rows, kv_heads, slots, dim)
    group = heads // kv_heads
    expected = dense_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                               mask)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    got = prefix_block_attention(q, k, v, PrefixBlockMask.for_offsets(offsets, block, length))
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    return (expected, *expected_grads), (got, *got_grads), length


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_dense_mask(shape, dtype, seed, device):
    """Float32 and float64: the aten flash ops on the CPU, plain matmuls on CUDA."""
    expected, got, length = _reference_and_ours(shape, seed, dtype, device)
    _check(expected, got, length)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_matmul_fallback_matches_the_dense_mask(shape, monkeypatch):
    """The far keys' path where no flash kernel runs (float32 on CUDA), here on the CPU."""
    monkeypatch.setattr(prefix_attention, "flash_kernel", lambda q: "math")
    expected, got, length = _reference_and_ours(shape, 0, torch.float32)
    _check(expected, got, length)


@pytest.mark.skipif(prefix_attention.prefix_kernels is None, reason="needs Triton")
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_kernels_match_the_dense_mask(shape, seed, monkeypatch):
    """The Triton kernels (the CUDA path: near keys, the far keys' query gradient), here in
    Triton's interpreter."""
    monkeypatch.setattr(prefix_attention, "near_kernel", lambda q, block: "triton")
    expected, got, length = _reference_and_ours(shape, seed, torch.float32, dim=16)
    _check(expected, got, length)


@pytest.mark.skipif(prefix_attention.prefix_kernels is None, reason="needs Triton")
def test_triton_kernels_take_keys_and_values_of_different_layouts(monkeypatch):
    """The kernels index keys and values with one set of strides; values laid out otherwise
    (``[B, S, Hkv, D]`` memory) must give the same result."""
    monkeypatch.setattr(prefix_attention, "near_kernel", lambda q, block: "triton")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 16, generator=gen)
    k, v = torch.randn(2, 2, 80, 16, generator=gen), torch.randn(2, 2, 80, 16, generator=gen)
    mask = PrefixBlockMask.for_offsets(torch.tensor([0, 5]), 16, 40)
    results = []
    for values in (v, v.transpose(1, 2).contiguous().transpose(1, 2)):
        inputs = [x.clone().requires_grad_() for x in (q, k, values)]
        out = prefix_block_attention(*inputs, mask)
        results.append([out, *torch.autograd.grad(out.square().sum(), inputs)])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.skipif(prefix_attention.prefix_kernels is None, reason="needs Triton")
@pytest.mark.parametrize("length", [1, 64, 65, 150])
@pytest.mark.parametrize("tiles", [(64, 64), (32, 16)])
def test_far_query_grad_kernel_matches_autograd(length, tiles, monkeypatch):
    """The far keys' query gradient (a Triton kernel in place of the flash backward, which
    also computes the keys' gradients): several query and key tiles, grouped heads, and a
    softmax over more keys than the kernel sees (the output and log-sum-exp passed in are the
    whole attention's)."""
    kernels = prefix_attention.prefix_kernels
    launch = {**kernels.LAUNCH["far_query_grad"], "BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
    monkeypatch.setitem(kernels.LAUNCH, "far_query_grad", launch)
    gen = torch.Generator().manual_seed(length)
    q, grad = (torch.randn(2, 4, length, 16, generator=gen, dtype=torch.float64)
               for _ in range(2))
    k, v, extra = (torch.randn(2, 2, length, 16, generator=gen, dtype=torch.float64)
                   for _ in range(3))
    q.requires_grad_()
    scores = q @ k.repeat_interleave(2, 1).mT / 4
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), -torch.inf)
    scores = torch.cat([scores, (q @ extra.repeat_interleave(2, 1).mT / 4)[..., :3]], dim=-1)
    values = torch.cat([v.repeat_interleave(2, 1), extra.repeat_interleave(2, 1)[:, :, :3]], 2)
    out = scores.softmax(-1) @ values
    lse = scores.logsumexp(-1)
    (expected,) = torch.autograd.grad(out, q, grad)
    # The extra keys' share of the gradient is not the kernel's; take it out of the reference.
    probs_extra = torch.exp(scores[..., length:] - lse[..., None])
    rowdot = (grad * out).sum(-1, keepdim=True)
    extra_share = (probs_extra * (grad @ values[:, :, length:].mT - rowdot)) @ \
        extra.repeat_interleave(2, 1)[:, :, :3] / 4
    got = kernels.far_query_grad(
        *(x.float().detach() for x in (grad, q, k, v, out, lse)))
    torch.testing.assert_close(got, (expected - extra_share).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_under_autocast_stays_close_to_float32(shape, device):
    """bf16 inputs (the flash kernel on CUDA) under autocast, which must not round the local
    scores: the float32 result up to bf16 rounding."""
    expected, _, _ = _reference_and_ours(shape, 0, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        _, got, _ = _reference_and_ours(shape, 0, torch.bfloat16, device)
    assert got[0].dtype == torch.bfloat16
    for ours, theirs in zip(got[:2], expected[:2], strict=True):  # output, queries' gradient
        torch.testing.assert_close(ours.float(), theirs, atol=3e-2, rtol=3e-2)


def _check(expected, got, length):
    torch.testing.assert_close(got[0], expected[0])  # output
    torch.testing.assert_close(got[1], expected[1])  # queries
    for ours, theirs in zip(got[2:], expected[2:], strict=True):  # keys, values
        # The mask half's keys get the full gradient; the clean half is a constant cache.
        torch.testing.assert_close(ours[:, :, length : 2 * length],
                                   theirs[:, :, length : 2 * length])
        assert not ours[:, :, :length].any()
        assert not ours[:, :, 2 * length :].any()
