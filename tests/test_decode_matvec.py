"""The fused matvec of the AR step (``tidar.decode_matvec``), run in Triton's CPU interpreter
(``conftest.py``): against the plain expressions it replaces, and inside the model, where
decoding with it must give the plain layers' logits and tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ar_step_logits,
    check_fused_logits,
    kernel_on_cpu,
    tiny_model,
    with_row_lora,
)

decode_matvec = pytest.importorskip("tidar.decode_matvec")
from tidar.engine import DecodeConfig, Engine  # noqa: E402
from tidar.layouts import decode_layout  # noqa: E402
from tidar.model import KVCache, RMSNorm  # noqa: E402
from tidar.sampling import SamplingParams  # noqa: E402


def plain(x, weight, norm, bias, residual, swiglu):
    h = x if norm is None else norm(x)
    y = F.linear(h, weight, bias)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("inputs", "outputs"), [(48, 10), (1100, 7)])  # 4 and 2 outputs a block
@pytest.mark.parametrize(("use_norm", "use_bias", "swiglu", "use_residual"), [
    (True, False, False, False),   # q/k/v
    (True, True, False, False),    # q/k/v with biases (qwen2)
    (True, False, True, False),    # gate/up and SwiGLU
    (True, True, True, False),
    (False, False, False, True),   # o and down, residual added
    (False, True, False, True),
])
def test_matches_the_plain_expressions(dtype, rows, inputs, outputs, use_norm, use_bias,
                                       swiglu, use_residual):
    gen = torch.Generator().manual_seed(rows * 100 + inputs + outputs)
    width = 2 * outputs if swiglu else outputs
    x = torch.randn(rows, inputs, generator=gen).to(dtype)
    weight = (torch.randn(width, inputs, generator=gen) / inputs**0.5).to(dtype)
    norm = None
    if use_norm:
        norm = RMSNorm(inputs, 1e-5).to(dtype)
        norm.weight.data = (torch.rand(inputs, generator=gen) + 0.5).to(dtype)
    bias = torch.randn(width, generator=gen).to(dtype) if use_bias else None
    residual = torch.randn(rows, outputs, generator=gen).to(dtype) if use_residual else None
    got = decode_matvec.decode_matvec(x, weight, None if norm is None else norm.weight, bias,
                                      residual, swiglu, 1e-5)
    expected = plain(x.float(), weight.float(), None if norm is None else norm.float(),
                     None if bias is None else bias.float(),
                     None if residual is None else residual.float(), swiglu)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (rows, outputs)
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


def test_the_plan_follows_its_settings_and_every_tile_gives_the_same_result(monkeypatch):
    """``plan``: 4 outputs a block up to 1,024 inputs, 2 past it, 8 warps for a small grid,
    unless the module's settings say otherwise (the GPU A/B's candidate: 8 outputs, 4 warps);
    the kernel computes the same under either."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, generator=gen)
    weight = torch.randn(24, 64, generator=gen) / 8
    norm = torch.rand(64, generator=gen) + 0.5
    assert decode_matvec.plan(960, 576) == (4, 8) and decode_matvec.plan(576, 1536) == (2, 8)
    assert decode_matvec.plan(4000, 576) == (4, 4)  # 1,000 thread blocks
    before = decode_matvec.decode_matvec(x, weight, norm, None, None, True, 1e-5)
    monkeypatch.setattr(decode_matvec, "NARROW_OUTPUTS", 8)
    monkeypatch.setattr(decode_matvec, "NARROW_WARPS", 4)
    assert decode_matvec.plan(960, 576) == (8, 4) and decode_matvec.plan(576, 1536) == (2, 8)
    after = decode_matvec.decode_matvec(x, weight, norm, None, None, True, 1e-5)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Let the model take the fused path on the CPU (the interpreter), counting its calls."""
    return kernel_on_cpu(monkeypatch, decode_matvec, "decode_matvec")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "olmoe"])
def test_the_ar_step_with_fused_matvecs_gives_the_plain_logits(family, fused_on_cpu,
                                                               monkeypatch):
    """Biases (qwen2), q/k norms (qwen3), experts (olmoe: attention fused, experts plain), and
    mask-row adapters, whose stacked weights' base half the AR step reads."""
    check_fused_logits(decode_matvec, ar_step_logits, family, fused_on_cpu, monkeypatch,
                       tol=1e-5)
    assert set(fused_on_cpu) == {2}


def test_inputs_too_wide_for_one_tile_keep_the_plain_layers(fused_on_cpu, monkeypatch):
    """The down projection reads the MLP's hidden width, wider than the block's input: with
    ``MAX_INPUTS`` between the two, attention takes the matvecs and the MLP does not."""
    model = tiny_model("llama", vocab=8, seed=3)
    dim, hidden = model.cfg.dim, model.cfg.intermediate_size
    assert dim < hidden
    with monkeypatch.context() as plain_only:
        plain_only.setattr(decode_matvec, "DEVICES", ())
        expected = ar_step_logits(model)
    monkeypatch.setattr(decode_matvec, "MAX_INPUTS", dim)
    torch.testing.assert_close(ar_step_logits(model), expected, atol=1e-5, rtol=1e-5)
    assert len(fused_on_cpu) == 2 * model.cfg.n_layers  # q/k/v and o only


def test_many_rows_and_mask_rows_keep_the_plain_layers(fused_on_cpu):
    """Past ``MAX_ROWS`` rows, and in a drafting pass (mask rows need the adapted half)."""
    model = with_row_lora(tiny_model("llama", vocab=8, seed=4))
    layout = decode_layout(torch.tensor([3, 5]), torch.randint(0, 8, (2, 4)), [0, 1], 4, 16,
                           model.cfg.mask_id)
    with torch.inference_mode(), model.decode_weights():
        model(layout, KVCache(model.cfg, 2, 16, 12, torch.float32, "cpu"))
    assert not fused_on_cpu


def test_decoding_with_fused_matvecs_gives_the_same_tokens(fused_on_cpu, monkeypatch):
    """Greedy and sampled `ar` decode the same tokens with its steps fused (drafting passes
    have too many rows for it)."""
    model = with_row_lora(tiny_model("llama", vocab=16, seed=5))
    prompts = [torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 3)]
    for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9)):
        cfg = DecodeConfig(sampler="ar", max_new_tokens=10, sampling=sampling)
        fused_on_cpu.clear()
        got, _ = Engine(model).generate(prompts, cfg)
        assert len(fused_on_cpu) == 9 * 4 * model.cfg.n_layers  # every step after the prefill
        with monkeypatch.context() as plain_only:
            plain_only.setattr(decode_matvec, "DEVICES", ())
            expected, _ = Engine(model).generate(prompts, cfg)
        assert got == expected
