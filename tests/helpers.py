"""Tiny model builders shared by the engine tests: no GPU, no network, no weights on disk.

``tiny_model(family)`` is our ``Transformer`` with a tiny config of any supported family and
random weights at a scale where attention, RoPE, routing and the mask embedding all matter
(so drafts are nontrivial). ``ScriptedModel`` is a fake with the interface the engine uses,
whose predictions are a fixed function of the layout: for the never/sometimes/always-accept
trio.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tidar.config import ModelConfig, from_hf_config
from tidar.layouts import Layout, causal_layout, decode_layout
from tidar.model import KVCache, RowGate, Transformer
from tidar.sampling import accepted_prefix, sample, verify_sampled

MOE = dict(num_experts_per_tok=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (two threads on a loaded 2-core box are ~1000x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chi2_pvalue(counts, probs, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of ``counts`` to ``probs``; bins expecting < 5 are pooled.

    A count on a zero-probability outcome is an outright failure (p-value 0).
    """
    from scipy.stats import chisquare

    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if counts[probs <= 0].sum() > 0:
        return 0.0
    expected = probs / probs.sum() * counts.sum()
    big = expected >= min_expected
    obs, exp = list(counts[big]), list(expected[big])
    small = ~big & (probs > 0)
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    if len(obs) < 2:
        return 1.0
    return float(chisquare(obs, exp).pvalue)

# Every supported family, MoE ones with 4 experts and top-2 routing.
FAMILIES = {
    "llama": dict(family="llama"),
    "mistral": dict(family="mistral", sliding_window=5),
    "qwen2": dict(family="qwen2"),
    "qwen3": dict(family="qwen3", head_dim=16),
    "mixtral": dict(family="mixtral", num_local_experts=4, **MOE),
    "qwen2_moe": dict(
        family="qwen2_moe",
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        norm_topk_prob=False,
        **MOE,
    ),
    "qwen3_moe": dict(
        family="qwen3_moe", num_experts=4, moe_intermediate_size=16, norm_topk_prob=True, **MOE
    ),
    "olmoe": dict(family="olmoe", num_experts=4, norm_topk_prob=False, **MOE),
}


def tiny_config(family: str = "llama", vocab: int = 16, max_position: int = 256) -> ModelConfig:
    from transformers import AutoConfig

    spec = dict(FAMILIES[family])
    hf = AutoConfig.for_model(
        spec.pop("family"),
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=max_position,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        **spec,
    )
    return from_hf_config(hf)


def tiny_model(
    family: str = "llama",
    vocab: int = 16,
    seed: int = 0,
    std: float = 0.7,
    max_position: int = 256,
) -> Transformer:
    """A float32 ``Transformer`` with every parameter (mask embedding included) ~ N(0, std)."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(family, vocab, max_position))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def with_row_lora(model: Transformer, rank: int = 4) -> Transformer:
    """``model`` with mask-row adapters, and adapters and mask embedding random (not the
    zero-update start), so that mask rows differ from the base model's."""
    from tidar.drafter import add_row_lora

    add_row_lora(model, rank=rank, alpha=2 * rank)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.mask_embedding.normal_(generator=gen)
    return model


def ar_step_logits(model):
    """Logits of an AR step (one token per row, no proposals) over random caches."""
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(model.cfg, 2, 16, 8, torch.float32, "cpu")
    for buffer in cache.k + cache.v:
        buffer.copy_(torch.randn(buffer.shape, generator=gen))
    layout = decode_layout(torch.tensor([3, 5]), torch.tensor([[2], [6]]), [], 1, 16,
                           model.cfg.mask_id)
    with torch.inference_mode(), model.decode_weights():
        return model(layout, cache)


def kernel_on_cpu(monkeypatch, module, name: str, **settings) -> list[int]:
    """Let the Triton kernel ``module.name`` run on the CPU (the interpreter) with the
    module's ``settings``, recording the rows of each call in the returned list."""
    calls: list[int] = []
    op = getattr(module, name)
    monkeypatch.setattr(module, "DEVICES", ("cpu",))
    for setting, value in settings.items():
        monkeypatch.setattr(module, setting, value)
    monkeypatch.setattr(module, name, lambda *args: calls.append(args[0].shape[0]) or op(*args))
    return calls


def check_fused_logits(kernels, logits, family: str, calls: list, monkeypatch,
                       tol: float) -> None:
    """``logits(model)`` with the fused kernels of the module ``kernels`` (let onto the CPU,
    ``calls`` counting them) equals it with the plain layers, for a tiny ``family`` model
    with and without mask-row adapters; the fused path ran for every dense projection."""
    for adapters in (False, True):
        model = tiny_model(family, vocab=8, seed=3)
        model = with_row_lora(model) if adapters else model
        with monkeypatch.context() as plain_only:
            plain_only.setattr(kernels, "DEVICES", ())
            expected = logits(model)
        calls.clear()
        torch.testing.assert_close(logits(model), expected, atol=tol, rtol=tol)
        dense = family != "olmoe"
        assert len(calls) == model.cfg.n_layers * (4 if dense else 2)


def ar_distribution(model: Transformer, context: list[int]) -> Tensor:
    """The model's AR logits for the token after ``context`` (a full causal forward)."""
    with torch.inference_mode():
        return model(causal_layout(torch.tensor([context])))[0, -1]


class ScriptedModel(nn.Module):
    """Predictions are a fixed function of the layout, not of learned weights.

    The text is ``f(p)`` at position ``p`` (``f(p) = 1 + 3p % (vocab - 1)``, never 0, the
    engine's filler draft, so a filler is never right by accident). A clean (AR) query at
    position ``p`` whose input token is ``f(p)`` predicts ``f(p + 1)``; with any other input it
    predicts garbage (so a wrong verify token would derail the output). A mask query at
    position ``p`` predicts ``draft(p)``: ``f(p)`` always right, ``f(p) + 1`` never right, or
    right on some positions only.
    """

    def __init__(self, draft: str, vocab: int = 8, max_position: int = 512):
        super().__init__()
        self.draft = draft
        self.cfg = ModelConfig(
            family="llama",
            vocab_size=vocab,
            dim=vocab,
            n_layers=1,
            n_heads=1,
            n_kv_heads=1,
            head_dim=2,
            intermediate_size=1,
            norm_eps=1e-6,
            tie_embeddings=False,
            max_position=max_position,
        )
        self.dummy = nn.Parameter(torch.zeros(1))
        self.row_gate = RowGate()

    def decode_weights(self):
        """Part of the interface the engine uses; this fake has no adapters."""
        return contextlib.nullcontext()

    def f(self, pos: Tensor) -> Tensor:
        return 1 + (3 * pos) % (self.cfg.vocab_size - 1)

    def drafted(self, pos: Tensor) -> Tensor:
        right, wrong = self.f(pos), (self.f(pos) + 1) % self.cfg.vocab_size
        if self.draft == "always":
            return right
        if self.draft == "never":
            return wrong
        return torch.where(self.right(pos), right, wrong)

    def right(self, pos):
        """Whether the mask query at ``pos`` predicts the text (works on ints and tensors)."""
        if self.draft == "always":
            return pos >= 0
        if self.draft == "never":
            return pos < 0
        return (7 * pos) % 11 >= 4  # sometimes: irregularly

    def forward(self, layout: Layout, cache=None, hidden_only: bool = False) -> Tensor:
        pos, vocab = layout.positions, self.cfg.vocab_size
        on_track = layout.tokens == self.f(pos)
        ar = torch.where(on_track, self.f(pos + 1), (layout.tokens + 5) % vocab)
        target = torch.where(layout.block == 0, ar, self.drafted(pos))
        return 10.0 * nn.functional.one_hot(target, vocab).float()  # hidden == logits

    def head(self, hidden: Tensor) -> Tensor:
        return hidden

    # The engine's split of ``forward``: its block inputs are the layout, the norm is none.
    def prepare(self, layout: Layout, cache=None) -> Layout:
        return layout

    def run_blocks(self, layout: Layout, cache=None, blocks=None) -> Tensor:
        return self(layout)

    def norm(self, hidden: Tensor) -> Tensor:
        return hidden


EOS = 127


def repeating_doc(rng: random.Random, length: int = 48) -> str:
    """A random 3-token pattern of t10..t19, repeated: after one period the rest of the
    document is determined, so a whole block can be drafted in one step."""
    pattern = [f"t{10 + rng.randrange(10)}" for _ in range(3)]
    return " ".join(pattern[i % 3] for i in range(length))


def tiny_model_dir(path, seed: int = 0):
    """A random 2-layer Llama with a word-level tokenizer whose EOS (t127) is no substring
    of the prompts' words (transformers splits text on special-token strings)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=EOS, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(WordLevel(vocab={f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0",
                            eos_token=f"t{EOS}").save_pretrained(path)
    return path


# Deliberately wrong verifiers: statistical tests must reject them.
def always_accept(p, q, drafts, u_accept, u_final):
    return verify_sampled(p, q, drafts, torch.zeros_like(u_accept), u_final)


def residual_from_p(p, q, drafts, u_accept, u_final):
    """Wrong: after a rejection, draw from ``p`` instead of ``max(0, p - q)``."""
    p_d = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    k = accepted_prefix(u_accept * q_d < p_d)
    target = p.gather(1, k[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
    return k, sample(target, u_final)
