"""Shared fixtures: a tiny tokenizer for random checkpoints and the embedded default GGUF."""

from __future__ import annotations

import os

import pytest

# Triton kernels (GPU code) run in Triton's CPU interpreter in the tests. The switch is read
# when a kernel is defined, so it must be set before ``tidar`` is imported.
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def tuner_profiles(tmp_path, monkeypatch):
    """Pass costs the tuner measures in a test stay in the test: in the user's cache they
    would stand in for real measurements of the same model (the embedded default's)."""
    import tidar.tuner

    monkeypatch.setattr(tidar.tuner, "profile_dir", lambda: tmp_path / "tuner")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A 128-token word-level tokenizer saved once; `load_model` needs one beside the weights."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1")
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_gguf():
    """The embedded default model's GGUF, fetched into $TIDAR_CACHE once per session."""
    from tidar import default_model
    from tidar.errors import TidarError

    try:
        return default_model.gguf_path()
    except TidarError as exc:  # no network and no cached copy
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module: on a loaded 2-core machine more threads of tiny
    matmuls oversubscribe the cores and run orders of magnitude slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
