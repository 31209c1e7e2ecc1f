"""The decoding engine: prefill, then verify/propose passes over one shared KV cache.

It sees token ids, not text. Each pass verifies the previous pass's drafts with the AR head
and proposes the next drafts for every acceptance length in the proposal set ``S``
(DESIGN.md section 3); ``ar`` is the same engine with ``b = 1`` and no proposals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .errors import TidarError
from .layouts import decode_layout, prefill_layout
from .model import KVCache, Transformer
from .sampling import (
    SamplingParams,
    mix_logits,
    probabilities,
    sample,
    verify_greedy,
    verify_sampled,
)

SAMPLERS = ("ar", "lossless", "mix")


@dataclass(frozen=True)
class DecodeConfig:
    sampler: str = "lossless"
    block_size: int = 16
    proposals: tuple[int, ...] | None = None  # the set S; None is every length 0 .. b-1
    beta: float = 1.0
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 256
    seed: int = 0

    def resolved(self) -> DecodeConfig:
        """Validated, with ``ar`` turned into ``b = 1, S = {}`` and ``S`` made explicit."""
        if self.sampler not in SAMPLERS:
            raise TidarError(
                f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise TidarError(f"--beta must be in [0, 1], got {self.beta}")
        p = self.sampling
        if p.temperature < 0 or not 0.0 < p.top_p <= 1.0 or p.top_k < 0:
            raise TidarError("need temperature >= 0, 0 < top-p <= 1 and top-k >= 0")
        if self.max_new_tokens < 1:
            raise TidarError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.sampler == "ar":
            return replace(self, block_size=1, proposals=(), beta=1.0)
        b = self.block_size
        if not 2 <= b <= 64:
            raise TidarError(f"--block-size must be between 2 and 64, got {b}")
        proposals = tuple(sorted(set(range(b) if self.proposals is None else self.proposals)))
        if not proposals or proposals[0] != 0 or proposals[-1] >= b:
            raise TidarError(f"the proposal set must contain 0 and lie in 0 .. {b - 1}")
        return replace(self, proposals=proposals)


def proposal_set(count: int, block_size: int) -> tuple[int, ...]:
    """``count`` proposal blocks: the shortest acceptance lengths, the most likely ones."""
    if count < 1:
        raise TidarError(f"--proposals must be at least 1, got {count}")
    return tuple(range(min(count, block_size)))


@dataclass
class Stats:
    """Per run: passes (prefill included), tokens, and what each pass accepted."""

    block_size: int
    passes: list[int] = field(default_factory=list)  # per row
    tokens: list[int] = field(default_factory=list)  # per row
    committed_hist: list[int] = field(default_factory=list)  # [n] = passes committing n tokens
    reached: list[int] = field(default_factory=list)  # [j] = passes with k >= j (j >= 1)
    decode_passes: int = 0

    def record(self, committed: list[int]) -> None:
        for n in committed:
            self.committed_hist[n] += 1
            for j in range(1, n):
                self.reached[j] += 1
        self.decode_passes += len(committed)

    @property
    def tokens_per_pass(self) -> float:
        return sum(self.tokens) / max(1, sum(self.passes))

    @property
    def acceptance(self) -> list[float]:
        """``P(k >= j)`` for draft positions ``j = 1 .. b-1`` over decode passes."""
        return [self.reached[j] / max(1, self.decode_passes) for j in range(1, self.block_size)]

    def as_dict(self) -> dict:
        return {
            "passes": sum(self.passes),
            "num_tokens": sum(self.tokens),
            "tokens_per_pass": self.tokens_per_pass,
            "committed_per_pass_histogram": self.committed_hist[1:],
            "acceptance_by_position": self.acceptance,
        }


@dataclass
class _State:
    """Per-row decoding state; every tensor has the batch as its first dimension."""

    committed: Tensor  # tokens in the cache
    next_token: Tensor  # g: committed, not yet in the cache
    drafts: Tensor  # [B, b-1]
    draft_logits: Tensor | None  # [B, b-1, V] z_D of the drafting block (mix)
    draft_probs: Tensor | None  # [B, b-1, V] q (sampling)
    draft_valid: Tensor  # [B, b-1] False for fillers of a partial proposal set


class Engine:
    def __init__(self, model: Transformer, stop_ids: tuple[int, ...] = ()):
        self.model = model
        self.stop_ids = set(stop_ids)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # -- public API -------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], cfg: DecodeConfig, seeds: list[int] | None = None
    ) -> tuple[list[list[int]], Stats]:
        outputs: list[list[int]] = [[] for _ in prompts]
        for row, tokens in self.stream(prompts, cfg, seeds):
            outputs[row].extend(tokens)
        return outputs, self.last_stats

    def stream(
        self, prompts: list[list[int]], cfg: DecodeConfig, seeds: list[int] | None = None
    ) -> Iterator[tuple[int, list[int]]]:
        """Yield ``(row, tokens)`` as tokens are committed; stats end up in ``last_stats``.

        Each row draws its randomness from its own generator (seed ``seeds[row]``, default
        ``cfg.seed``), so a row gets the same tokens in a batch as alone.
        """
        cfg = cfg.resolved()
        self._check_prompts(prompts, cfg)
        b, batch = cfg.block_size, len(prompts)
        self.last_stats = stats = Stats(
            b, passes=[0] * batch, tokens=[0] * batch,
            committed_hist=[0] * (b + 1), reached=[0] * (b + 1),
        )
        seeds = seeds if seeds is not None else [cfg.seed] * batch
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        capacity = max(map(len, prompts)) + cfg.max_new_tokens + b + 1
        scratch = max(len(cfg.proposals) * b, b)
        cache = KVCache(self.model.cfg, batch, capacity, scratch, self.dtype, self.device)
        with torch.inference_mode():
            state = self._prefill(prompts, cfg, cache, gens)
            emitted = [0] * batch
            active = [True] * batch
            first = state.next_token.tolist()
            for r in range(batch):
                stats.passes[r] += 1
                new, active[r] = self._cut([first[r]], emitted[r], cfg)
                emitted[r] += len(new)
                yield r, new
            while any(active):
                drafts = state.drafts.tolist()
                k, c, state = self._pass(state, cfg, cache, gens, active)
                k_list, c_list = k.tolist(), c.tolist()
                committed = []
                for r in range(batch):
                    if not active[r]:
                        continue
                    stats.passes[r] += 1
                    tokens = drafts[r][: k_list[r]] + [c_list[r]]
                    committed.append(len(tokens))
                    new, active[r] = self._cut(tokens, emitted[r], cfg)
                    emitted[r] += len(new)
                    if new:
                        yield r, new
                stats.record(committed)
            for r in range(batch):
                stats.tokens[r] = emitted[r]

    # -- internals --------------------------------------------------------------------
    def _check_prompts(self, prompts: list[list[int]], cfg: DecodeConfig) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TidarError("every prompt needs at least one token")
        limit = self.model.cfg.max_position
        longest = max(map(len, prompts))
        if longest + cfg.max_new_tokens + 2 * cfg.block_size > limit:
            raise TidarError(
                f"prompt ({longest} tokens) plus --max-new-tokens ({cfg.max_new_tokens}) exceeds "
                f"the model's context of {limit} tokens"
            )
        vocab = self.model.cfg.vocab_size
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise TidarError(f"prompt token ids must lie in 0 .. {vocab - 1}")

    def _cut(self, tokens: list[int], emitted: int, cfg: DecodeConfig) -> tuple[list[int], bool]:
        """Tokens to emit, stopping after a stop token or at the token budget; still active?"""
        room = cfg.max_new_tokens - emitted
        out = tokens[:room]
        for i, t in enumerate(out):
            if t in self.stop_ids:
                return out[: i + 1], False
        return out, emitted + len(out) < cfg.max_new_tokens

    def _uniforms(self, gens, count: int) -> Tensor:
        """``count`` uniforms per row, each row from its own generator (batch-invariant)."""
        return torch.stack([torch.rand(count, generator=g, device=self.device) for g in gens])

    def _draw(self, logits: Tensor, cfg: DecodeConfig, u: Tensor) -> tuple[Tensor, Tensor | None]:
        """Tokens (and their distributions when sampling) from logits ``[..., V]``."""
        if cfg.sampling.greedy:
            return logits.argmax(-1), None
        probs = probabilities(logits, cfg.sampling)
        return sample(probs, u), probs

    def _prefill(self, prompts, cfg: DecodeConfig, cache: KVCache, gens) -> _State:
        b = cfg.block_size
        n_mask = 0 if cfg.sampler == "ar" else b
        mask_id = self.model.cfg.mask_id
        layout = prefill_layout(prompts, n_mask, cache.capacity, mask_id, self.device)
        hidden = self.model(layout, cache, hidden_only=True)
        rows = torch.arange(len(prompts), device=self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        max_len = max(map(len, prompts))
        z_ar = self.model.head(hidden[rows, last])  # [B, V], target for position m
        z_block = self.model.head(hidden[:, max_len:])  # [B, n_mask, V], positions m ..
        u = self._uniforms(gens, 2 * b)
        target = z_ar if n_mask == 0 else mix_logits(z_ar, z_block[:, 0], cfg.beta)
        first, _ = self._draw(target, cfg, u[:, 0])
        committed = last + 1
        return self._next_drafts(first, z_block[:, 1:], cfg, u[:, b:], committed, len(prompts))

    def _next_drafts(self, next_token, block_logits, cfg, u, committed, batch) -> _State:
        """State after a pass: ``block_logits [B, n, V]`` predict the ``n`` positions after g."""
        b = cfg.block_size
        n = block_logits.shape[1] if block_logits is not None else 0
        drafts = torch.zeros(batch, b - 1, dtype=torch.long, device=self.device)
        valid = torch.zeros(batch, b - 1, dtype=torch.bool, device=self.device)
        logits = probs = None
        if n:
            d, q = self._draw(block_logits, cfg, u[:, :n])
            drafts[:, :n] = d
            valid[:, :n] = True
            if cfg.sampler == "mix":
                logits = block_logits.new_zeros(batch, b - 1, block_logits.shape[-1])
                logits[:, :n] = block_logits
            if q is not None:
                probs = q.new_zeros(batch, b - 1, q.shape[-1])
                probs[:, :n] = q
        return _State(committed, next_token, drafts, logits, probs, valid)

    def _pass(self, st: _State, cfg: DecodeConfig, cache: KVCache, gens, active):
        b, S = cfg.block_size, cfg.proposals
        batch = st.next_token.shape[0]
        model = self.model
        verify = torch.cat([st.next_token[:, None], st.drafts], dim=1)
        layout = decode_layout(st.committed, verify, list(S), b, cache.capacity, model.cfg.mask_id)
        logits = model(layout, cache)
        vocab = logits.shape[-1]
        z_ar = logits[:, :b]
        z_blocks = logits[:, b:].reshape(batch, len(S), b, vocab)
        target = z_ar
        if cfg.sampler == "mix" and b > 1:
            # Drafted positions mix with their drafting block; the bonus position with the
            # first position of the block that would cover it.
            last = len(S) - 1
            bonus = z_blocks[:, last, b - 1 - S[-1]]
            z_d = torch.cat([st.draft_logits, bonus[:, None]], dim=1)
            valid = torch.cat([st.draft_valid, st.draft_valid.new_ones(batch, 1)], dim=1)
            target = torch.where(valid[..., None], mix_logits(z_ar, z_d, cfg.beta), z_ar.float())
        u = self._uniforms(gens, 2 * b)
        if cfg.sampling.greedy:
            k, c = verify_greedy(target, st.drafts)
        else:
            p = probabilities(target, cfg.sampling)
            q = st.draft_probs
            if q is None:
                q = p.new_zeros(batch, b - 1, vocab)
            # Fillers of a partial proposal set are drafts with a one-hot q.
            filler_q = torch.nn.functional.one_hot(st.drafts, vocab).float()
            q = torch.where(st.draft_valid[..., None], q, filler_q)
            k, c = verify_sampled(p, q, st.drafts, u[:, : b - 1], u[:, b - 1])
        live = torch.tensor(active, device=self.device)
        committed = st.committed + (k + 1) * live
        if not S:
            return k, c, _State(committed, c, st.drafts, None, None, st.draft_valid)
        # The block for the largest proposed length <= k; it covers positions s+k'+1 ..
        floor = _floor_lookup(S, b, self.device)[k]
        slot = torch.searchsorted(torch.tensor(S, device=self.device), floor)
        block = z_blocks[torch.arange(batch, device=self.device), slot]  # [B, b, V]
        shift = k - floor  # c sits at index `shift` of that block
        idx = shift[:, None] + torch.arange(1, b, device=self.device)  # positions after c
        real = idx < b
        ahead = block.gather(1, idx.clamp(max=b - 1)[..., None].expand(-1, -1, vocab))
        state = self._next_drafts(c, ahead, cfg, u[:, b:], committed, batch)
        state.draft_valid &= real
        state.drafts = torch.where(real, state.drafts, torch.zeros_like(state.drafts))
        return k, c, state


def _floor_lookup(proposals: tuple[int, ...], b: int, device) -> Tensor:
    """``table[k] = max{j in S : j <= k}`` for ``k = 0 .. b-1``."""
    table = [max(j for j in proposals if j <= k) for k in range(b)]
    return torch.tensor(table, device=device)
