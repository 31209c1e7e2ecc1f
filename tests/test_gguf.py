"""Numerics on the real embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

Our model, loaded by `load_model()` (the default spec), against transformers' own GGUF
loader on the same file. Each model is loaded once for the module (about 40 s and 20 s).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from tidar.layouts import causal_layout
from tidar.model import KVCache

TOL = 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")
# fp32 KV-cached decoding reorders the matmul reductions (one query row against a whole
# prefix); over 30 layers with logits near 35 that alone moves logits by about 1e-4, and
# transformers' own DynamicCache decoding differs from its full forward by as much. So the
# fp32 cached check gets this bound, and the 1e-4 check of the cache runs in float64.
FP32_CACHE_TOL = 5e-4

PROMPTS = {
    "english": "The capital of France is",
    "python": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
}


@pytest.fixture(scope="module")
def ours(default_gguf):
    from tidar.loading import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def hf(default_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def prompts(ours):
    tok = ours.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    texts = {**PROMPTS, "chat": chat}
    return {name: torch.tensor([tok(text)["input_ids"]]) for name, text in texts.items()}


def _cached(model, cfg, tokens: torch.Tensor, prefill: int, dtype) -> torch.Tensor:
    """Logits of ``tokens``: a cached prefill of ``prefill`` tokens, then one token at a time."""
    batch, length = tokens.shape
    cache = KVCache(cfg, batch, length, 0, dtype, "cpu")
    parts = [model(causal_layout(tokens[:, :prefill], 0, with_slots=True), cache)]
    for i in range(prefill, length):
        parts.append(model(causal_layout(tokens[:, i : i + 1], i, with_slots=True), cache))
    return torch.cat(parts, dim=1)


def test_default_model_is_smollm2(ours, default_gguf):
    cfg = ours.config
    assert ours.is_default
    assert default_gguf.stat().st_size == 98_362_432
    shape = (cfg.family, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads)
    assert shape == ("llama", 30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_embeddings


@pytest.mark.parametrize("name", ["english", "python", "chat"])
def test_full_forward_matches_transformers(ours, hf, prompts, name):
    tokens = prompts[name]
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = ours.model(causal_layout(tokens, 0))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_batch_of_two_matches_transformers(ours, hf):
    tokens = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = ours.model(causal_layout(tokens, 0))
    assert (got - expected).abs().max().item() <= TOL


def test_greedy_continuation_is_sensible(ours, prompts):
    with torch.no_grad():
        logits = ours.model(causal_layout(prompts["english"], 0))
    assert ours.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.parametrize("name", ["english", "python", "chat"])
def test_kv_cached_fp32_matches_transformers(ours, hf, prompts, name):
    tokens = prompts[name]
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = _cached(ours.model, ours.config, tokens, tokens.shape[1] // 2, torch.float32)
    assert (got - expected).abs().max().item() <= FP32_CACHE_TOL


@contextmanager
def _float64(*models):
    """Run ``models`` in float64, then back: fp32 -> fp64 -> fp32 is exact, so no copy.

    ``nn.Module``'s own methods: transformers refuses ``.float()`` on a GGUF-loaded model.
    """
    try:
        yield tuple(torch.nn.Module.double(m) for m in models)
    finally:
        for m in models:
            torch.nn.Module.float(m)


def test_kv_cached_fp64_matches_transformers(ours, hf, prompts):
    with _float64(ours.model, hf) as (ours64, hf64), torch.no_grad():
        tokens = prompts["python"]
        expected = hf64(input_ids=tokens).logits
        full = ours64(causal_layout(tokens, 0))
        got = _cached(ours64, ours.config, tokens, tokens.shape[1] // 3, torch.float64)
    assert (full - expected).abs().max().item() <= TOL
    assert (got - expected).abs().max().item() <= TOL
