"""Numerics: our one model against transformers' own, for every supported family.

Each case builds a tiny random checkpoint with transformers' config and model classes, saves
it, loads it with `tidar.loading.load_model` and compares logits (full forward and KV-cached
decoding). Weights are re-drawn at unit scale so attention, RoPE and routing actually matter.
"""

from __future__ import annotations

import shutil
import zlib

import pytest
import torch

from tidar.config import SUPPORTED_FAMILIES, from_hf_config
from tidar.errors import TidarError
from tidar.layouts import causal_layout
from tidar.loading import load_model
from tidar.model import KVCache

VOCAB, BATCH, SEQ, PREFILL = 128, 2, 16, 7
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)
MOE = dict(num_experts_per_tok=2)


def _case(family: str, **overrides) -> dict:
    return {"family": family, **COMMON, **overrides}


CASES = {
    "llama": _case("llama"),
    "llama-tied": _case("llama", tie_word_embeddings=True),
    "llama-bias": _case("llama", attention_bias=True, mlp_bias=True),
    "llama-rope-llama3": _case(
        "llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "llama-rope-linear": _case(
        "llama", rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)
    ),
    "llama-rope-yarn": _case(
        "llama",
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32
        ),
    ),
    "mistral-window": _case("mistral", sliding_window=5),
    "mistral-tied": _case("mistral", sliding_window=None, tie_word_embeddings=True),
    "qwen2-qkv-bias": _case("qwen2"),
    "qwen2-tied": _case("qwen2", tie_word_embeddings=True),
    "qwen2-window-layer1": _case(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "qwen3": _case("qwen3", head_dim=32),
    "qwen3-tied": _case("qwen3", tie_word_embeddings=True),
    "qwen3-window-layer1": _case(
        "qwen3", use_sliding_window=True, sliding_window=5, max_window_layers=1
    ),
    "mixtral": _case("mixtral", num_local_experts=4, **MOE),
    "mixtral-window": _case("mixtral", num_local_experts=4, sliding_window=6, **MOE),
    "qwen2_moe-shared-step2": _case(
        "qwen2_moe",
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=2,
        norm_topk_prob=False,
        **MOE,
    ),
    "qwen2_moe-mlp-only-norm": _case(
        "qwen2_moe",
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[0],
        norm_topk_prob=True,
        **MOE,
    ),
    "qwen2_moe-window-layer0": _case(
        "qwen2_moe",
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        **MOE,
    ),
    "qwen3_moe": _case(
        "qwen3_moe", num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, **MOE
    ),
    "qwen3_moe-mlp-only-tied": _case(
        "qwen3_moe",
        num_experts=4,
        moe_intermediate_size=32,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        tie_word_embeddings=True,
        **MOE,
    ),
    "qwen3_moe-window": _case(
        "qwen3_moe",
        num_experts=4,
        moe_intermediate_size=32,
        use_sliding_window=True,
        sliding_window=5,
        **MOE,
    ),
    "olmoe-clip": _case("olmoe", num_experts=8, clip_qkv=0.8, norm_topk_prob=False, **MOE),
    "olmoe-norm-topk": _case("olmoe", num_experts=4, norm_topk_prob=True, **MOE),
}


def _hf_config(spec: dict):
    from transformers import AutoConfig

    kwargs = dict(spec)
    return AutoConfig.for_model(kwargs.pop("family"), **kwargs)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale weights: 1/sqrt(fan_in) matrices, norms around 1, small biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory, tiny_tokenizer_dir):
    """(transformers model, our loaded model) for one case, built once per module."""
    from transformers import AutoModelForCausalLM

    spec = CASES[request.param]
    torch.manual_seed(0)
    hf_config = _hf_config(spec)
    hf = AutoModelForCausalLM.from_config(
        hf_config, dtype=torch.float32, attn_implementation="eager"
    )
    _randomize(hf, seed=zlib.crc32(request.param.encode()))
    hf.eval()
    path = tmp_path_factory.mktemp(request.param.replace("-", "_"))
    hf.save_pretrained(path)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    ours = load_model(str(path)).model
    return hf, ours


def _tokens(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def test_full_forward_matches_transformers(pair):
    hf, ours = pair
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = ours(causal_layout(tokens, 0))
    assert got.shape == expected.shape
    assert expected.abs().max() > 1.0  # the weights are large enough for the check to bite
    assert (got - expected).abs().max().item() <= TOL


def test_kv_cached_decoding_matches_full_forward(pair):
    hf, ours = pair
    tokens = _tokens(seed=2)
    cfg = ours.cfg
    # Spare committed slots and a scratch area: slots nobody wrote must stay invisible.
    cache = KVCache(cfg, BATCH, SEQ + 5, 4, torch.float32, "cpu")
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        full = ours(causal_layout(tokens, 0))
        parts = [ours(causal_layout(tokens[:, :PREFILL], 0, with_slots=True), cache)]
        for i in range(PREFILL, SEQ):
            parts.append(ours(causal_layout(tokens[:, i : i + 1], i, with_slots=True), cache))
    got = torch.cat(parts, dim=1)
    assert (got - full).abs().max().item() <= TOL
    assert (got - expected).abs().max().item() <= TOL


def test_parameter_counts(pair):
    hf, ours = pair
    total, active = ours.num_parameters()
    assert total == sum(p.numel() for p in hf.parameters())
    if ours.cfg.moe is None:
        assert active == total
    else:
        assert active < total


def test_cases_cover_every_family():
    assert {spec["family"] for spec in CASES.values()} == set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize(
    "name, windows",
    [
        ("mistral-window", (5, 5)),
        ("mixtral-window", (6, 6)),
        ("qwen2-window-layer1", (None, 4)),
        ("qwen3-window-layer1", (None, 5)),
        ("qwen2_moe-window-layer0", (4, None)),
        ("qwen3_moe-window", (5, 5)),
        ("qwen2-qkv-bias", (None, None)),
        ("qwen2_moe-shared-step2", (None, None)),
        ("qwen3_moe", (None, None)),
    ],
)
def test_sliding_windows_per_layer(name, windows):
    """Windows shorter than the sequence, so the numerics tests above see them matter."""
    assert from_hf_config(_hf_config(CASES[name])).sliding_windows == windows


def test_moe_cases_mix_dense_and_sparse_layers():
    for name in ("qwen2_moe-shared-step2", "qwen2_moe-mlp-only-norm", "qwen3_moe-mlp-only-tied"):
        cfg = from_hf_config(_hf_config(CASES[name]))
        assert set(cfg.moe.sparse_layers) == {True, False}, name


# --- errors a user can cause -------------------------------------------------------------


def test_unsupported_architecture_names_it_and_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(TidarError) as info:
        from_hf_config(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    message = str(info.value)
    assert "gpt2" in message
    for family in SUPPORTED_FAMILIES:
        assert family in message


def test_load_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TidarError, match="config.json"):
        load_model(str(tmp_path))


def test_load_unsupported_architecture_directory(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(TidarError, match="gpt2"):
        load_model(str(tmp_path))


def test_load_directory_without_weights(tmp_path):
    _hf_config(CASES["llama"]).save_pretrained(tmp_path)
    with pytest.raises(TidarError, match="safetensors"):
        load_model(str(tmp_path))


def test_load_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TidarError, match="config.json"):
        load_model(str(tmp_path))


def test_load_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(TidarError, match="gguf"):
        load_model(str(path))


def test_load_missing_path(tmp_path):
    with pytest.raises(TidarError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_load_garbage_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(TidarError):
        load_model(str(path))


def test_load_truncated_gguf(tmp_path, default_gguf):
    path = tmp_path / "truncated.gguf"
    with default_gguf.open("rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(TidarError):
        load_model(str(path))


def test_a_damaged_default_cache_is_converted_again(tmp_path, monkeypatch, capsys):
    """The embedded default's converted directory is a cache: unreadable, it is rebuilt."""
    import tidar.loading as loading

    target, conversions = tmp_path / "hf", []

    def convert():  # stands in for the GGUF conversion: a small model directory
        if not (target / "config.json").exists():
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_config(_hf_config(CASES["llama"])).save_pretrained(target)
            conversions.append(target)
        return target

    monkeypatch.setattr(loading, "_default_model_dir", convert)
    _, (cfg, state) = loading._read_default()
    (target / "config.json").write_text("{damaged")
    _, (cfg_again, state_again) = loading._read_default()
    assert len(conversions) == 2 and "converting it again" in capsys.readouterr().err
    assert cfg_again.n_layers == cfg.n_layers and state_again.keys() == state.keys()
