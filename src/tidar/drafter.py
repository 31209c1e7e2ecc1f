"""The drafter checkpoint: what the decoder needs on top of a base model.

One safetensors file holding the mask embedding and LoRA adapters (or replaced weights), with
JSON metadata: format version, block size, training mode, adapter shape and the fingerprint of
the base model it was trained for. Written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import TidarError
from .files import replaced_atomically
from .model import MLP, RowLoRA, Transformer

FORMAT = "tidar-drafter/1"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DrafterInfo:
    block_size: int
    mode: str  # "frozen-ar" (adapters on mask rows only) or "full"
    base_fingerprint: str
    lora_rank: int = 0
    lora_alpha: float = 0.0
    extra: dict | None = None  # training summary: tokens seen, steps, recipe

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "block_size": str(self.block_size),
            "mode": self.mode,
            "base_fingerprint": self.base_fingerprint,
            "lora_rank": str(self.lora_rank),
            "lora_alpha": str(self.lora_alpha),
            "extra": json.dumps(self.extra or {}),
        }


def add_row_lora(model: Transformer, rank: int, alpha: float, targets=LORA_TARGETS) -> None:
    """Wrap the attention and dense-MLP linear layers named in ``targets`` with mask-row-only
    adapters (MoE experts flatten the sequence, so their rows carry no position: left alone)."""
    for block in model.layers:
        modules = [block.self_attn] + ([block.mlp] if isinstance(block.mlp, MLP) else [])
        for module in modules:
            for child_name, child in list(module.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    setattr(module, child_name, RowLoRA(child, rank, alpha, model.row_gate))


def save_drafter(path: str | Path, tensors: dict[str, torch.Tensor], info: DrafterInfo,
                 dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write atomically; bf16 by default (half the size, and what the GPU computes in), each
    tensor's own dtype with ``dtype=None``."""
    from safetensors.torch import save_file

    with replaced_atomically(Path(path)) as tmp:
        save_file({k: v.to(dtype or v.dtype).contiguous().cpu() for k, v in tensors.items()},
                  str(tmp), metadata=info.metadata())


def read_drafter(path: str | Path, fingerprint: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], DrafterInfo]:
    """The drafter's tensors and metadata; with ``fingerprint``, refuse one trained for
    another base model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TidarError(f"drafter {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise TidarError(f"{path} is not a readable drafter checkpoint: {exc}") from None
    if meta.get("format") != FORMAT:
        raise TidarError(f"{path} is not a tidar drafter (format {meta.get('format')!r})")
    info = DrafterInfo(
        block_size=int(meta["block_size"]),
        mode=meta["mode"],
        base_fingerprint=meta["base_fingerprint"],
        lora_rank=int(meta.get("lora_rank", 0)),
        lora_alpha=float(meta.get("lora_alpha", 0)),
        extra=json.loads(meta.get("extra", "{}")),
    )
    if fingerprint is not None and info.base_fingerprint != fingerprint:
        raise TidarError(
            f"drafter {path} was trained for another base model "
            f"(fingerprint {info.base_fingerprint}, this model is {fingerprint})"
        )
    return tensors, info


def apply_drafter(model: Transformer, path: str | Path, fingerprint: str) -> DrafterInfo:
    """Load a drafter into ``model``; refuse one trained for another base model."""
    tensors, info = read_drafter(path, fingerprint)
    device, dtype = model.mask_embedding.device, model.mask_embedding.dtype
    lora = {k: v for k, v in tensors.items() if k.endswith((".lora_A", ".lora_B"))}
    if lora and info.mode == "frozen-ar":
        add_row_lora(model, info.lora_rank, info.lora_alpha)
    with torch.no_grad():
        model.mask_embedding.copy_(tensors["mask_embedding"])
        if info.mode == "full":
            _merge_lora(model, lora, info)
            for name, param in model.named_parameters():
                if f"weights.{name}" in tensors:
                    param.copy_(tensors[f"weights.{name}"])
        else:
            state = model.state_dict()
            for key, value in lora.items():
                if key not in state:
                    raise TidarError(f"drafter {path} has an adapter for unknown module {key}")
                state[key].copy_(value)
    model.to(device=device, dtype=dtype)
    return info


def _merge_lora(model: Transformer, lora: dict[str, torch.Tensor], info: DrafterInfo) -> None:
    """Full-mode adapters apply to every row: fold them into the base weights."""
    modules = dict(model.named_modules())
    scale = info.lora_alpha / max(1, info.lora_rank)
    for key in lora:
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            linear = modules[name]
            delta = lora[name + ".lora_B"].float() @ lora[key].float() * scale
            linear.weight.add_(delta.to(linear.weight.dtype))
