"""Pick block size and proposal set from measured pass costs and the acceptance profile.

Speed of a setting = E[tokens per pass] / t(queries per pass) (DESIGN.md section 4). With a
partial proposal set ``S`` the next pass may carry fewer real drafts, so the expected tokens
per pass come from the stationary distribution of a Markov chain over "real drafts carried".
Plain AR (one query per pass, one token) is always a candidate: the tuner never picks a
setting slower than AR by its own model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Choice:
    sampler: str  # "ar" or the requested drafting sampler
    block_size: int
    proposals: tuple[int, ...]
    tokens_per_pass: float
    seconds_per_pass: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_pass / self.seconds_per_pass


def expected_tokens_per_pass(reach: list[float], block_size: int, proposals: tuple[int, ...]):
    """E[committed tokens per pass] in steady state.

    ``reach[j-1] = P(k >= j)`` for draft positions ``j = 1 ..``: the chance that the first
    ``j`` drafts of a pass are all accepted, given they are real.
    """
    b = block_size
    p_reach = [1.0] + [reach[j - 1] if j - 1 < len(reach) else 0.0 for j in range(1, b)]
    floor = [max(j for j in proposals if j <= k) for k in range(b)]
    # State n = real drafts carried into the pass (0 .. b-1).
    transition = torch.zeros(b, b, dtype=torch.float64)
    tokens = torch.zeros(b, dtype=torch.float64)
    for n in range(b):
        for k in range(n + 1):  # P(exactly k accepted | n real drafts)
            stop = 1.0 if k == n else 1.0 - p_reach[k + 1] / max(p_reach[k], 1e-12)
            prob = p_reach[k] * stop
            tokens[n] += prob * (k + 1)
            transition[n, b - 1 - (k - floor[k])] += prob
    dist = torch.full((b,), 1.0 / b, dtype=torch.float64)
    for _ in range(500):
        dist = dist @ transition
    return float(dist @ tokens)


def choose(
    pass_seconds: dict[int, float],
    reach: list[float],
    sampler: str,
    block_sizes: tuple[int, ...] = (4, 8, 16),
) -> Choice:
    """The fastest of AR and every ``(b, S = {0 .. n-1})`` whose query count was measured."""
    best = Choice("ar", 1, (), 1.0, pass_seconds[1])
    for b in block_sizes:
        for n in range(1, b + 1):
            queries = b + n * b
            if queries not in pass_seconds:
                continue
            proposals = tuple(range(n))
            tpp = expected_tokens_per_pass(reach, b, proposals)
            cand = Choice(sampler, b, proposals, tpp, pass_seconds[queries])
            if cand.tokens_per_second > best.tokens_per_second:
                best = cand
    return best


@torch.inference_mode()
def measure_pass_seconds(model, queries: list[int], context: int = 256, batch: int = 1,
                         repeats: int = 5) -> dict[int, float]:
    """Median wall time of one cached pass with ``q`` query tokens after ``context`` tokens."""
    from .layouts import causal_layout
    from .model import KVCache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = {}
    for q in queries:
        cache = KVCache(model.cfg, batch, context + q, 0, dtype, device)
        tokens = torch.zeros(batch, q, dtype=torch.long, device=device)
        layout = causal_layout(tokens, context, with_slots=True)
        times = []
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(layout, cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[q] = sorted(times[1:])[len(times[1:]) // 2]
    return out


def cached_profile(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def save_profile(path: Path, pass_seconds: dict[int, float], choice: Choice) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pass_seconds": pass_seconds, "choice": asdict(choice)}))
    tmp.replace(path)
