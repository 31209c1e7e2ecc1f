"""The fused multi-query matmuls of ``benchmarks/norm_matmul.py`` (an experiment the engine
does not use yet), in Triton's CPU interpreter (``conftest.py``), float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model, with_row_lora

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
fused = pytest.importorskip("norm_matmul")

from tidar.engine import DecodeConfig, Engine  # noqa: E402
from tidar.model import RMSNorm  # noqa: E402


def _per_row(base: torch.Tensor, adapted: torch.Tensor, length: int, start: int):
    """Rows ``t >= start`` of each sequence of ``length`` rows from ``adapted``."""
    mask_row = torch.arange(base.shape[0]) % length >= start
    return torch.where(mask_row[:, None], adapted, base)


@pytest.mark.parametrize(("rows", "dim", "n_out", "length", "start"), [
    (37, 80, 70, 37, 37),  # 16-column tiles, no mask rows
    (1, 64, 64, 1, 1),
    (70, 32, 130, 35, 16),  # two sequences of 16 clean and 19 mask rows
    (300, 32, 700, 300, 100),  # 64-column tiles, tiles of only clean or only mask rows
])
@pytest.mark.parametrize("stacked", [False, True])
def test_kernels_match_the_unfused_layers(rows, dim, n_out, length, start, stacked):
    gen = torch.Generator().manual_seed(rows + dim)
    x, residual = torch.randn(rows, dim, generator=gen), torch.randn(rows, n_out, generator=gen)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
    halves = 2 if stacked else 1
    w = torch.randn(halves * n_out, dim, generator=gen)
    w_pair = torch.randn(halves * 2 * n_out, dim, generator=gen)

    def linear(inputs, weight):  # a DecodeLinear: mask rows take the stacked second half
        if not stacked:
            return F.linear(inputs, weight)
        base, adapted = weight.chunk(2)
        return _per_row(F.linear(inputs, base), F.linear(inputs, adapted), length, start)

    args = (stacked, length, start)
    with torch.no_grad():
        normed = norm(x)
        got = fused.norm_matmul(x, norm.weight, norm.eps, w, False, *args)
        torch.testing.assert_close(got, linear(normed, w), atol=1e-4, rtol=1e-4)
        gate, up = linear(normed, w_pair).split(n_out, dim=-1) if not stacked else (
            linear(normed, torch.cat([w_pair[:n_out], w_pair[2 * n_out : 3 * n_out]])),
            linear(normed, torch.cat([w_pair[n_out : 2 * n_out], w_pair[3 * n_out :]])))
        got = fused.norm_matmul(x, norm.weight, norm.eps, w_pair, True, *args)
        torch.testing.assert_close(got, F.silu(gate) * up, atol=1e-4, rtol=1e-4)
        got = fused.matmul_add(x, w, residual, *args)
        torch.testing.assert_close(got, residual + linear(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("adapters", [False, True])
def test_fused_blocks_decode_the_same_tokens(monkeypatch, adapters):
    """Greedy lossless decoding through the fused blocks gives the engine's own tokens, with
    and without mask-row adapters (stacked weights), and the prefill and every decode pass did
    go through them."""
    model = tiny_model("llama", vocab=32, seed=3, std=0.3)
    if adapters:
        model = with_row_lora(model)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    cfg = DecodeConfig(block_size=4, max_new_tokens=10)
    expected, stats = Engine(model).generate(prompts, cfg)
    shapes = []
    own = fused.fused_block

    def counted(block, x, *args):
        shapes.append(tuple(x.shape))
        return own(block, x, *args)

    monkeypatch.setattr(fused, "fused_block", counted)
    with fused.fused_blocks():
        got, got_stats = Engine(model).generate(prompts, cfg)
    # lossless: the tokens hold whatever the drafts; the acceptance shows the drafts held too
    assert got == expected and got_stats.committed_hist == stats.committed_hist
    layers, prefill = model.cfg.n_layers, (2, 5 + 4, model.cfg.dim)  # longest prompt + block
    decode = (2, 4 + 4 * 4, model.cfg.dim)  # verify block + one block per proposal
    assert shapes == [prefill] * layers + [decode] * layers * (max(stats.passes) - 1)
