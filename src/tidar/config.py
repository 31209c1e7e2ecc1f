"""Per-family model configuration, read from a Hugging Face config.

One `ModelConfig` describes every supported family; the differences between families are
data (biases, q/k norms, MoE router details), never a separate modeling file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TidarError

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_FAMILIES = DENSE_FAMILIES + MOE_FAMILIES


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    expert_dim: int
    normalize_top_k: bool
    shared_expert_dim: int = 0  # qwen2_moe: a dense expert for every token, behind a gate
    sparse_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP (False)


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    tie_embeddings: bool
    max_position: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None  # "head" (qwen3: per head) or "full" (olmoe: whole projection)
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer, None for full attention
    moe: MoEConfig | None = None
    eos_token_ids: tuple[int, ...] = ()
    hf_config: object = field(default=None, compare=False, repr=False)

    @property
    def mask_id(self) -> int:
        """The input-only mask token: one row past the vocabulary."""
        return self.vocab_size


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _sliding_windows(hf, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    if hf.model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        window = None
    layer_types = getattr(hf, "layer_types", None)
    if window is None:
        return (None,) * n_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * n_layers


def _moe_config(hf, family: str, n_layers: int) -> MoEConfig | None:
    if family not in MOE_FAMILIES:
        return None
    if family == "mixtral":
        return MoEConfig(
            num_experts=hf.num_local_experts,
            top_k=hf.num_experts_per_tok,
            expert_dim=hf.intermediate_size,
            normalize_top_k=True,
            sparse_layers=(True,) * n_layers,
        )
    if family == "olmoe":
        return MoEConfig(
            num_experts=hf.num_experts,
            top_k=hf.num_experts_per_tok,
            expert_dim=hf.intermediate_size,
            normalize_top_k=bool(hf.norm_topk_prob),
            sparse_layers=(True,) * n_layers,
        )
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    dense_only = set(getattr(hf, "mlp_only_layers", []) or [])
    sparse = tuple(
        i not in dense_only and hf.num_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)
    )
    return MoEConfig(
        num_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok,
        expert_dim=hf.moe_intermediate_size,
        normalize_top_k=bool(hf.norm_topk_prob),
        shared_expert_dim=getattr(hf, "shared_expert_intermediate_size", 0) or 0,
        sparse_layers=sparse,
    )


def from_hf_config(hf) -> ModelConfig:
    """Build a ModelConfig from a transformers `PretrainedConfig` of a supported family."""
    family = getattr(hf, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise TidarError(
            f"unsupported architecture {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    n_layers = hf.num_hidden_layers
    n_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    qkv_bias = (
        family == "qwen2"
        or (family == "qwen2_moe" and bool(getattr(hf, "qkv_bias", True)))
        or attention_bias
    )
    qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(family)
    return ModelConfig(
        family=family,
        vocab_size=hf.vocab_size,
        dim=hf.hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        intermediate_size=hf.intermediate_size,
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position=hf.max_position_embeddings,
        qkv_bias=qkv_bias,
        o_bias=attention_bias and family in ("llama", "qwen3", "qwen3_moe", "olmoe"),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=qk_norm,
        clip_qkv=getattr(hf, "clip_qkv", None),
        sliding_windows=_sliding_windows(hf, n_layers),
        moe=_moe_config(hf, family, n_layers),
        eos_token_ids=_as_tuple(getattr(hf, "eos_token_id", None)),
        hf_config=hf,
    )
