"""Pick block size and proposal set from measured pass costs and the acceptance profile.

Speed of a setting = E[tokens per pass] / t(queries per pass) (DESIGN.md section 4). With a
partial proposal set ``S`` the next pass may carry fewer real drafts. Where the drafter's
calibration replayed its output with each proposal count (``tidar.acceptance``), the tuner
takes those tokens per pass; otherwise they come from the stationary distribution of a
Markov chain over "real drafts carried", which counts carried drafts as fresh ones: one
block 1.92 tokens a pass where the default with the shipped drafter decodes 1.75
(docs/results.md section 3, session 48).
A batch runs until its slowest row is done: drafting spreads the rows' pass counts, so at
batch B the speed is divided by the expected passes of the slowest of B rows over a mean
row's (``batch_slowdown``); AR rows move in step. Plain AR (one query per pass, one token) is
always a candidate: the tuner never picks a setting slower than AR by its own model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .engine import DecodeConfig, batch_bucket, proposal_floor, proposal_set
from .files import write_text_atomic

# The least expected gain over AR for which the tuner picks drafting. Benches measured
# 0.85-0.98 of the expected speedup (docs/results.md section 3): a pick expected at 1.04x
# decoded at 0.92x.
MARGIN = 0.10
COST_NOISE = 0.05  # how much a measured pass may come out cheaper than a smaller one
TUNER_CONTEXT = 128  # tokens in the cache while the tuner times a pass
PASS_REVISION = 14  # in the cache key of measured pass costs: bump when a pass or its timing does


@dataclass(frozen=True)
class Choice:
    sampler: str  # "ar" or the requested drafting sampler
    block_size: int
    proposals: tuple[int, ...]
    tokens_per_pass: float  # a row's, on average
    seconds_per_pass: float
    batch_slowdown: float = 1.0  # the batch's passes over a mean row's (>= 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_pass / self.seconds_per_pass / self.batch_slowdown


@dataclass(frozen=True)
class Acceptance:
    """A drafter's acceptance as the tuner reads it: ``reach`` (``reach[j-1] = P(k >= j)``
    with the full proposal set) and, where its calibration replayed them, the tokens a pass
    commits with ``n`` proposal blocks at its ``block_size``, ``{n: [mean, variance]}``."""

    reach: list[float] = field(default_factory=list)  # none: no draft is ever accepted
    block_size: int = 0
    by_proposals: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def of_drafter(cls, info) -> Acceptance:
        """From a drafter file's metadata (``drafter.DrafterInfo``)."""
        extra = info.extra or {}
        replayed = extra.get("tokens_per_pass_by_proposals", {})
        return cls(extra.get("acceptance_by_position", []), info.block_size,
                   {int(n): list(m) for n, m in replayed.items()})

    def moments(self, block_size: int, proposals: tuple[int, ...]) -> tuple[float, float]:
        """Mean and variance of the tokens a pass commits: replayed where measured, else
        the chain's (``tokens_per_pass_moments``)."""
        replayed = (self.by_proposals.get(len(proposals))
                    if block_size == self.block_size and proposals == tuple(range(len(proposals)))
                    else None)
        if replayed:
            return replayed[0], replayed[1]
        return tokens_per_pass_moments(self.reach, block_size, proposals)


def expected_tokens_per_pass(reach: list[float], block_size: int, proposals: tuple[int, ...]):
    """E[committed tokens per pass] in steady state.

    ``reach[j-1] = P(k >= j)`` for draft positions ``j = 1 ..``: the chance that the first
    ``j`` drafts of a pass are all accepted, given they are real.
    """
    return tokens_per_pass_moments(reach, block_size, proposals)[0]


def tokens_per_pass_moments(reach: list[float], block_size: int,
                            proposals: tuple[int, ...]) -> tuple[float, float]:
    """Mean and variance of the tokens a pass commits, in steady state (as
    ``expected_tokens_per_pass``)."""
    b = block_size
    p_reach = [1.0] + [reach[j - 1] if j - 1 < len(reach) else 0.0 for j in range(1, b)]
    floor = proposal_floor(proposals, b)
    # State n = real drafts carried into the pass (0 .. b-1).
    transition = torch.zeros(b, b, dtype=torch.float64)
    tokens = torch.zeros(b, dtype=torch.float64)
    squares = torch.zeros(b, dtype=torch.float64)
    for n in range(b):
        for k in range(n + 1):  # P(exactly k accepted | n real drafts)
            stop = 1.0 if k == n else 1.0 - p_reach[k + 1] / max(p_reach[k], 1e-12)
            prob = p_reach[k] * stop
            tokens[n] += prob * (k + 1)
            squares[n] += prob * (k + 1) ** 2
            transition[n, b - 1 - (k - floor[k])] += prob
    dist = torch.full((b,), 1.0 / b, dtype=torch.float64)
    for _ in range(500):
        dist = dist @ transition
    mean = float(dist @ tokens)
    return mean, max(0.0, float(dist @ squares) - mean**2)


def expected_max_normal(count: int) -> float:
    """E[max of ``count`` independent standard normals] (0 for one), by quadrature."""
    if count <= 1:
        return 0.0
    x = torch.linspace(-8.0, 8.0, 16001, dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    density = count * normal.log_prob(x).exp() * normal.cdf(x) ** (count - 1)
    return float(torch.trapezoid(x * density, x))


def batch_slowdown(mean: float, variance: float, new_tokens: int, rows: int) -> float:
    """Expected passes of the slowest of ``rows`` rows over a mean row's, each row committing
    ``new_tokens`` at ``mean`` tokens a pass with this per-pass ``variance``: a row's pass
    count is about normal, mean ``N / m``, variance ``N v / m^3`` (renewal theory)."""
    if rows <= 1 or variance <= 0.0 or new_tokens <= 0:
        return 1.0
    return 1.0 + expected_max_normal(rows) * (variance / (new_tokens * mean)) ** 0.5


def choose(
    pass_seconds: dict[int, float],
    acceptance: Acceptance,
    sampler: str,
    block_sizes: tuple[int, ...] = (4, 8, 16),
    rows: int = 1,
    new_tokens: int = 0,
) -> Choice:
    """The fastest of AR and every ``(b, S = {0 .. n-1})`` whose query count was measured,
    for batches of ``rows`` rows of ``new_tokens`` each (0: no batch term)."""
    ar = best = Choice("ar", 1, (), 1.0, pass_seconds[1])
    for b in block_sizes:
        for n in range(1, b + 1):
            queries = b + n * b
            if queries not in pass_seconds:
                continue
            proposals = proposal_set(n, b)
            tpp, variance = acceptance.moments(b, proposals)
            if tpp <= 1.0:  # no more tokens than an AR step: faster only by timing noise
                continue
            cand = Choice(sampler, b, proposals, tpp, pass_seconds[queries],
                          batch_slowdown(tpp, variance, new_tokens, rows))
            if cand.tokens_per_second > best.tokens_per_second:
                best = cand
    # Timings are noisy: drafting must beat AR by a margin, not by a rounding error.
    return best if best.tokens_per_second > ar.tokens_per_second * (1 + MARGIN) else ar


def proposal_counts(block_size: int) -> list[int]:
    """The proposal blocks a pass the tuner weighs carries: 1, 2, 4, .. (up to all)."""
    return sorted({n for n in (1, 2, 4, 8, 16, 32, 64) if n < block_size} | {block_size})


def pass_shapes(block_size: int) -> dict:
    """The passes the tuner weighs, by query tokens per sequence: AR, and proposal sets of
    ``proposal_counts`` blocks."""
    return {1: DecodeConfig(sampler="ar")} | {
        block_size + n * block_size: DecodeConfig(block_size=block_size,
                                                 proposals=proposal_set(n, block_size))
        for n in proposal_counts(block_size)}


def measure_pass_seconds(engine, block_size: int, batch: int = 1, context: int = TUNER_CONTEXT,
                         repeats: int = 5, acceptance: Acceptance | None = None,
                         known: dict[int, float] | None = None,
                         new_tokens: int = 0) -> dict[int, float]:
    """``t(q)`` of the engine's own pass (captured and compiled as it decodes) for the shapes
    of ``pass_shapes``, in order of query count, kept with the ``known`` ones. Given the
    drafter's ``acceptance``, only the shapes ``worth_measuring`` (each costs a compile with
    ``--compile``), judged by a first timing of each; the shapes measured are then timed
    again taking turns (``Engine.time_passes``), so that the costs compared were measured
    alike. A bar on stderr while it measures."""
    from tqdm import tqdm

    seconds = dict(known or {})
    measured = {}
    bar = None
    for q, cfg in pass_shapes(block_size).items():
        if q in seconds or (acceptance is not None
                            and not worth_measuring(q, seconds, acceptance, block_size, batch,
                                                    new_tokens)):
            continue
        if bar is None:
            bar = tqdm(desc=f"pass costs, batch {batch}", unit="shape", file=sys.stderr)
        seconds[q] = engine.time_passes({q: cfg}, batch, context, repeats)[q]
        measured[q] = cfg
        bar.update()
    if bar is not None:
        bar.close()
    if len(measured) > 1:
        seconds.update(engine.time_passes(measured, batch, context, repeats))
    return seconds


def worth_measuring(queries: int, seconds: dict[int, float], acceptance: Acceptance,
                    block_size: int, rows: int = 1, new_tokens: int = 0) -> bool:
    """Whether a pass of ``queries`` could still be the tuner's pick, given the costs
    ``seconds`` measured for fewer queries. A pass costs at least what a smaller one does
    (up to ``COST_NOISE``), so its speed is at most its expected tokens over the largest
    cost so far; it must beat the best pick so far and AR by ``MARGIN``."""
    if 1 not in seconds:
        return True
    n = queries // block_size - 1
    tokens, variance = acceptance.moments(block_size, proposal_set(n, block_size))
    if tokens <= 1.0:  # as in choose: never a pick
        return False
    tokens /= batch_slowdown(tokens, variance, new_tokens, rows)
    best = choose(seconds, acceptance, "lossless", (block_size,), rows, new_tokens)
    bar = max(best.tokens_per_second, (1 + MARGIN) / seconds[1])
    floor = max(t for q, t in seconds.items() if q < queries)
    return tokens / (floor * (1 - COST_NOISE)) > bar


def auto_config(engine, fingerprint: str, cfg, acceptance: Acceptance, batch: int = 1):
    """``--proposals auto``: the tuner's pick for ``cfg``'s sampler and block size from this
    device's measured pass costs (cached per model, device, dtype, threads, block size and
    batch bucket), the drafter's ``acceptance`` and ``batch`` rows of ``cfg.max_new_tokens``;
    plain ``ar`` when no drafting setting is expected to be faster. Only the shapes that
    could be picked are measured (each costs a compile with ``--compile``); a later drafter
    that could use more shapes adds them to the cache. Returns the configuration and a
    summary."""
    device, dtype = engine.device, str(engine.dtype).replace("torch.", "")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu{torch.get_num_threads()}")
    compiled = "-compiled" if engine.compiled else ""
    b = cfg.block_size
    key = (f"{fingerprint}-{where.replace(' ', '_')}-{dtype}{compiled}-b{b}"
           f"-batch{batch_bucket(batch)}-pass{PASS_REVISION}")
    path = profile_dir() / f"{key}.json"
    seconds = cached_pass_seconds(path)
    repeats = 9 if device.type == "cuda" else 2
    seconds = measure_pass_seconds(engine, b, batch, repeats=repeats, acceptance=acceptance,
                                   known=seconds, new_tokens=cfg.max_new_tokens)
    choice = choose(seconds, acceptance, cfg.sampler, (b,), batch, cfg.max_new_tokens)
    save_profile(path, seconds, choice)
    info = {"choice": choice.sampler, "block_size": choice.block_size,
            "proposals": len(choice.proposals),
            "expected_tokens_per_pass": round(choice.tokens_per_pass, 3),
            "expected_batch_slowdown": round(choice.batch_slowdown, 3),
            "expected_speedup": round(choice.tokens_per_second * seconds[1], 3),
            "shapes_measured": sorted(seconds)}
    if choice.sampler == "ar":
        return DecodeConfig(sampler="ar", sampling=cfg.sampling, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed).resolved(), info
    return replace(cfg, block_size=choice.block_size, proposals=choice.proposals).resolved(), info


def profile_dir() -> Path:
    """Where measured pass costs are kept, one file per model, device and batch bucket."""
    from . import default_model

    return default_model.cache_dir() / "tuner"


def cached_pass_seconds(path: Path) -> dict[int, float]:
    """The pass costs measured before, by query count; none for a missing or unreadable file
    (then they are measured again)."""
    if not path.exists():
        return {}
    try:
        return {int(q): float(t) for q, t in json.loads(path.read_text())["pass_seconds"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        print(f"tidar: ignoring the unreadable tuner cache {path}; measuring again",
              file=sys.stderr)
        return {}


def save_profile(path: Path, pass_seconds: dict[int, float], choice: Choice) -> None:
    write_text_atomic(path, json.dumps({"pass_seconds": pass_seconds, "choice": asdict(choice)}))
