"""The AR step's q/k/v projection with RoPE and the cache writes fused in
(``tidar.decode_qkv``), run in Triton's CPU interpreter: against the model's own
projection, rotation and cache write, and inside the engine, where decoding with it must give
the same tokens and the same cache."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, with_row_lora

decode_qkv = pytest.importorskip("tidar.decode_qkv")
from tidar import decode_matvec  # noqa: E402
from tidar.engine import DecodeConfig, Engine  # noqa: E402
from tidar.model import RMSNorm, rotate  # noqa: E402
from tidar.sampling import SamplingParams  # noqa: E402


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The fused q/k/v kernel on for up to 4 sequences, on the CPU (the interpreter),
    counting its calls."""
    calls = []
    op = decode_qkv.decode_qkv
    monkeypatch.setattr(decode_qkv, "MAX_SEQUENCES", 4)
    monkeypatch.setattr(decode_matvec, "DEVICES", ("cpu",))
    monkeypatch.setattr(decode_qkv, "decode_qkv",
                        lambda *args: calls.append(args[0].shape[0]) or op(*args))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_the_projection_rotation_and_cache_write(dtype, rows, use_bias):
    """Three q heads over one KV head of 8 dims (pairs of a block straddle q, k and v), rows
    at different slots; cache slots other than the step's keep their values."""
    heads, kv_heads, dim, inputs, slots = 3, 1, 8, 24, 6
    gen = torch.Generator().manual_seed(rows + 10 * use_bias)
    x = torch.randn(rows, inputs, generator=gen).to(dtype)
    width = (heads + 2 * kv_heads) * dim
    weight = (torch.randn(width, inputs, generator=gen) / inputs**0.5).to(dtype)
    bias = torch.randn(width, generator=gen).to(dtype) if use_bias else None
    norm = RMSNorm(inputs, 1e-5).to(dtype)
    norm.weight.data = (torch.rand(inputs, generator=gen) + 0.5).to(dtype)
    angles = torch.rand(rows, 1, 1, dim // 2, generator=gen) * 6
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    k_cache = torch.randn(rows, kv_heads, slots, dim, generator=gen).to(dtype)
    v_cache = torch.randn(rows, kv_heads, slots, dim, generator=gen).to(dtype)
    at = torch.tensor([[1], [4], [5]])[:rows]
    k_expected, v_expected = k_cache.clone(), v_cache.clone()

    projected = torch.nn.functional.linear(norm(x), weight, bias)  # the plain path
    q, k, v = projected.view(rows, 1, heads + 2 * kv_heads, dim).transpose(1, 2).split(
        [heads, kv_heads, kv_heads], dim=1)
    q_expected = rotate(q.float(), cos.float(), sin.float()).to(dtype)
    for r in range(rows):
        k_expected[r, :, at[r]] = rotate(k.float(), cos.float(), sin.float()).to(dtype)[r]
        v_expected[r, :, at[r]] = v[r]

    got = decode_qkv.decode_qkv(x, weight, norm.weight, bias, 1e-5, cos, sin, k_cache,
                                v_cache, at, heads)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (rows, heads, 1, dim) and got.dtype == dtype
    torch.testing.assert_close(got, q_expected, atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache, k_expected, atol=tol, rtol=tol)
    torch.testing.assert_close(v_cache, v_expected, atol=tol, rtol=tol)


def test_on_for_one_sequence_and_one_query(monkeypatch):
    one, two, weight = torch.zeros(1, 8), torch.zeros(2, 8), torch.zeros(24, 8)
    assert not decode_qkv.supported(one, weight, 1)  # not on the CPU
    monkeypatch.setattr(decode_matvec, "DEVICES", ("cpu",))
    assert decode_qkv.supported(one, weight, 1)
    assert not decode_qkv.supported(one, weight, 2) and not decode_qkv.supported(two, weight, 1)
    monkeypatch.setattr(decode_qkv, "ENABLED", False)
    assert not decode_qkv.supported(one, weight, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_decoding_with_the_fused_projection_gives_the_same_tokens(family, fused_on_cpu,
                                                                  monkeypatch):
    """`ar` (greedy and sampled) and `lossless` decode the same tokens with the AR steps'
    q/k/v fused with RoPE and the cache writes: llama, qwen2 (biases); qwen3's q/k norms
    keep the plain path."""
    model = with_row_lora(tiny_model(family, vocab=16, seed=5))
    prompts = [torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 3)]
    for cfg in (DecodeConfig(sampler="ar", max_new_tokens=10),
                DecodeConfig(sampler="ar", max_new_tokens=10,
                             sampling=SamplingParams(temperature=0.8, top_p=0.9)),
                DecodeConfig(block_size=4, proposals=(0, 1), max_new_tokens=10)):
        fused_on_cpu.clear()
        got, _ = Engine(model).generate(prompts, cfg)
        with monkeypatch.context() as plain_only:
            plain_only.setattr(decode_qkv, "ENABLED", False)
            expected, _ = Engine(model).generate(prompts, cfg)
        assert got == expected
        if family == "qwen3":
            assert not fused_on_cpu
        elif cfg.sampler == "ar":
            assert len(fused_on_cpu) == 9 * model.cfg.n_layers  # every step after the prefill
