"""The fused multi-query matmuls of ``benchmarks/norm_matmul.py`` (an experiment the engine
does not use yet), in Triton's CPU interpreter (``conftest.py``), float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
fused = pytest.importorskip("norm_matmul")

from tidar.engine import DecodeConfig, Engine  # noqa: E402
from tidar.model import RMSNorm  # noqa: E402


@pytest.mark.parametrize(("rows", "dim", "n_out"), [
    (37, 80, 70), (1, 64, 64), (70, 32, 130),  # 16-column tiles
    (300, 32, 700),  # 64-column tiles
])
def test_kernels_match_the_unfused_layers(rows, dim, n_out):
    gen = torch.Generator().manual_seed(rows + dim)
    x, residual = torch.randn(rows, dim, generator=gen), torch.randn(rows, n_out, generator=gen)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
    w, w_pair = torch.randn(n_out, dim, generator=gen), torch.randn(2 * n_out, dim, generator=gen)
    with torch.no_grad():
        normed = norm(x)
        got = fused.norm_matmul(x, norm.weight, norm.eps, w, False)
        torch.testing.assert_close(got, F.linear(normed, w), atol=1e-4, rtol=1e-4)
        gate, up = F.linear(normed, w_pair).split(n_out, dim=-1)
        got = fused.norm_matmul(x, norm.weight, norm.eps, w_pair, True)
        torch.testing.assert_close(got, F.silu(gate) * up, atol=1e-4, rtol=1e-4)
        got = fused.matmul_add(x, w, residual)
        torch.testing.assert_close(got, residual + F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_fused_blocks_decode_the_same_tokens(monkeypatch):
    """Greedy lossless decoding through the fused blocks gives the engine's own tokens, and
    the prefill and every decode pass did go through them."""
    model = tiny_model("llama", vocab=32, seed=3, std=0.3)
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
    assert got == expected and got_stats.passes == stats.passes
    layers, prefill = model.cfg.n_layers, (2, 5 + 4, model.cfg.dim)  # longest prompt + block
    decode = (2, 4 + 4 * 4, model.cfg.dim)  # verify block + one block per proposal
    assert shapes == [prefill] * layers + [decode] * layers * (max(stats.passes) - 1)
