"""Resolve a model spec (embedded default, local HF directory, ``.gguf`` file or hub id),
then build our model, its tokenizer and a fingerprint of its weights."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import default_model
from .config import ModelConfig, from_hf_config
from .errors import TidarError
from .files import give_plain_mode
from .model import Transformer, rope_frequencies
from .weights import load_native, read_safetensors_dir, to_native


@dataclass
class Loaded:
    model: Transformer
    tokenizer: object
    config: ModelConfig
    source: str
    fingerprint: str
    is_default: bool = False


def _quiet_transformers():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short hash of parameter names, shapes and leading values: identifies a base model."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1)[:64].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_gguf(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise TidarError(f"{path} is not a readable GGUF file (corrupt or truncated?): {exc}") \
            from None
    cfg = from_hf_config(hf_config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    except Exception as exc:
        raise TidarError(f"cannot read tensors of {path} (corrupt or truncated?): {exc}") from None
    return cfg, parsed["tensors"]


def _read_hf_dir(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise TidarError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise TidarError(f"cannot read {path / 'config.json'}: {exc}") from None
    cfg = from_hf_config(hf_config)
    return cfg, read_safetensors_dir(path)


def _load_tokenizer(path: Path, gguf: bool):
    from transformers import AutoTokenizer

    try:
        if gguf:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise TidarError(f"cannot load a tokenizer from {path}: {exc}") from None
    return tok


def _from_hub(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as exc:
        raise TidarError(f"model {spec!r} is not a local path and could not be fetched: {exc}") \
            from None


def _default_model_dir() -> Path:
    """The embedded default as a Hugging Face directory, converted from its GGUF once.

    Parsing the GGUF's 49k-token vocabulary takes half a minute; the converted directory
    (fp32 safetensors, config, tokenizer) loads in seconds. Written atomically.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    target = default_model.cache_dir() / default_model.NAME / "hf"
    if (target / "config.json").exists():
        return target
    gguf = default_model.gguf_path()
    print("tidar: converting the default model to a cached directory (once)", file=sys.stderr)
    cfg, state = _read_gguf(gguf)
    tokenizer = _load_tokenizer(gguf, gguf=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        cfg.hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        for path in (tmp / "model.safetensors", tmp):
            give_plain_mode(path)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_default():
    """The cached default's directory and contents; a damaged cache is converted again."""
    import shutil

    path = _default_model_dir()
    try:
        return path, _read_hf_dir(path)
    except TidarError as exc:
        print(f"tidar: the cached default model is unreadable ({exc}); converting it again",
              file=sys.stderr)
        shutil.rmtree(path)
        path = _default_model_dir()
        return path, _read_hf_dir(path)


def load_model(spec: str | None = None, device: str = "cpu", dtype=torch.float32) -> Loaded:
    """Load a model by spec; ``None`` means the embedded default."""
    _quiet_transformers()
    is_default = spec is None or spec == default_model.NAME
    if is_default:
        path, (cfg, hf_state) = _read_default()
        gguf = False
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
                path = _from_hub(spec)
            else:
                raise TidarError(f"model path {spec} does not exist")
        gguf = path.is_file()
        if gguf and path.suffix != ".gguf":
            raise TidarError(f"{path} is a file but not a .gguf: give a .gguf or a model directory")
        cfg, hf_state = _read_gguf(path) if gguf else _read_hf_dir(path)
    state = to_native(cfg, hf_state)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.inv_freq.copy_(rope_frequencies(cfg)[0])  # to_empty left buffers uninitialised
    load_native(model, state)
    model.init_mask_embedding()
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = _load_tokenizer(path, gguf)
    return Loaded(model, tokenizer, cfg, str(path), fingerprint(state), is_default)
