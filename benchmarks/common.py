"""Shared helpers for the GPU benchmark scripts (run through the device tool)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import LlamaConfig

from tidar.config import from_hf_config
from tidar.model import Transformer

# SmolLM2-135M-Instruct's architecture (the embedded default): timings do not depend on
# weight values, so random weights of this shape measure the real pass cost.
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0,
)


DEVICE = os.environ.get("TIDAR_BENCH_DEVICE", "cuda")


def smollm2_shaped(device=DEVICE, dtype=torch.bfloat16, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(from_hf_config(LlamaConfig(**SMOLLM2)))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.to(device=device, dtype=dtype).eval()


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "bench-out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, data) -> Path:
    path = out_dir() / name
    path.write_text(json.dumps(data, indent=1))
    return path
