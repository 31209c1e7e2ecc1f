"""Checkpoint reading and the per-family mapping from Hugging Face parameter names to ours.

Our parameter names are Hugging Face's minus the ``model.`` prefix, with each MoE layer's
experts stacked into two tensors. The per-family differences are the expert names only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import TidarError

# Per-expert names of each family's checkpoints: (module, gate, up, down).
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def read_safetensors_dir(path: Path) -> dict[str, Tensor]:
    """All tensors of a Hugging Face directory: one safetensors file or an indexed shard set."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise TidarError(f"no .safetensors weights in {path}")
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        try:
            tensors.update(load_file(path / shard))
        except Exception as exc:  # safetensors raises several types for a bad file
            raise TidarError(f"cannot read weights {path / shard}: {exc}") from None
    return tensors


def to_native(cfg: ModelConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face state dict to ours, stacking per-expert weights."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[int, str], dict[int, Tensor]] = {}
    module, gate, up, down = EXPERT_NAMES.get(cfg.family, ("mlp", "", "", ""))
    expert_re = re.compile(rf"layers\.(\d+)\.{module}\.experts\.(\d+)\.(\w+)\.weight$")
    for name, tensor in hf.items():
        name = name.removeprefix("model.")
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        match = expert_re.match(name)
        if match and cfg.moe is not None:
            layer, index, kind = int(match[1]), int(match[2]), match[3]
            role = {gate: "gate", up: "up", down: "down"}[kind]
            experts.setdefault((layer, role), {})[index] = tensor
            continue
        if module != "mlp":
            name = name.replace(f".{module}.", ".mlp.")
        out[name] = tensor
    n_experts = cfg.moe.num_experts if cfg.moe else 0
    for layer in sorted({layer for layer, _ in experts}):

        def stack(role: str, layer: int = layer) -> Tensor:
            parts = experts.get((layer, role), {})
            missing = [i for i in range(n_experts) if i not in parts]
            if missing:
                raise TidarError(f"checkpoint lacks expert {missing[0]} ({role}) of layer {layer}")
            return torch.stack([parts[i] for i in range(n_experts)])

        prefix = f"layers.{layer}.mlp.experts"
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack("gate"), stack("up")], dim=1)
        out[f"{prefix}.down_proj"] = stack("down")
    return out


def load_native(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into ``model``; every model parameter but the mask embedding must be there."""
    expected = {k for k in model.state_dict() if k != "mask_embedding"}
    missing = sorted(expected - state.keys())
    if missing:
        raise TidarError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    own = model.state_dict()
    for name in expected:
        if tuple(state[name].shape) != tuple(own[name].shape):
            raise TidarError(
                f"tensor {name} has shape {tuple(state[name].shape)}, "
                f"config expects {tuple(own[name].shape)}"
            )
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=False)
