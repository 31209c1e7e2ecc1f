"""Samplers as small pure functions over logits (DESIGN.md section 3).

Vocabulary follows vLLM: a pass *accepts* ``k`` drafts, then commits one more token, which is
*recovered* (drawn from the residual after a rejection) or a *bonus* (all drafts accepted).
Randomness comes in as uniform numbers so that callers decide which generator draws them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: Tensor, params: SamplingParams, temperature: Tensor | None = None,
                  top_p: Tensor | None = None) -> Tensor:
    """The distribution a token is drawn from: temperature, top-k, top-p, in float32.

    Greedy is the one-hot distribution at the argmax, so the sampled verification rule
    below reduces to greedy verification. ``temperature`` and ``top_p``, 0-dim tensors, stand
    in for ``params``' values: compiled code reads them as data, and ``params`` only decides
    which steps run.
    """
    logits = logits.float()
    if params.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / (params.temperature if temperature is None else temperature)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= (params.top_p if top_p is None else top_p)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def mix_logits(ar_logits: Tensor, draft_logits: Tensor, beta: float | Tensor) -> Tensor:
    """Logit mixing: ``beta * z_AR + (1 - beta) * z_D``; ``beta = 1`` is the AR model (also
    as a 0-dim tensor: ``1 * z + 0 * z_D`` is ``z`` exactly, for finite logits)."""
    if not isinstance(beta, Tensor) and beta == 1.0:
        return ar_logits
    return beta * ar_logits.float() + (1.0 - beta) * draft_logits.float()


def sample(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw from ``probs [..., V]`` with uniforms ``u [...]`` in ``[0, 1)``."""
    cdf = probs.cumsum(-1)
    x = (u * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def verify_greedy(target_logits: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification.

    ``target_logits [B, b, V]`` are the targets for positions ``s+1 .. s+b``; ``drafts
    [B, b-1]`` were proposed for ``s+1 .. s+b-1``. Returns ``(k, c)``: drafts accepted while
    equal to the argmax, and the argmax at the first position not accepted.
    """
    best = target_logits.argmax(-1)
    k = accepted_prefix(best[:, :-1] == drafts)
    return k, best.gather(1, k[:, None]).squeeze(1)


def verify_sampled(
    p: Tensor, q: Tensor, drafts: Tensor, u_accept: Tensor, u_final: Tensor
) -> tuple[Tensor, Tensor]:
    """Speculative sampling: lossless with respect to the targets ``p``.

    ``p [B, b, V]`` targets, ``q [B, b-1, V]`` the distributions the drafts were drawn from,
    ``u_accept [B, b-1]`` and ``u_final [B]`` uniforms. Draft ``i`` is accepted with
    probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the new token comes
    from ``normalize(max(0, p_i - q_i))``, and after ``b-1`` acceptances from ``p_b``.
    """
    p_d = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    ok = u_accept * q_d < p_d  # u < p/q without dividing by zero
    k = accepted_prefix(ok)
    target = p.gather(1, k[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
    q_pad = torch.cat([q, q.new_zeros(q.shape[0], 1, q.shape[-1])], dim=1)  # none after the last
    q_at = q_pad.gather(1, k[:, None, None].expand(-1, 1, q.shape[-1])).squeeze(1)
    residual = (target - q_at).clamp(min=0)
    # A residual of zero mass only happens when p == q there: sample p itself.
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, target, residual)
    return k, sample(residual, u_final)


def accepted_prefix(ok: Tensor) -> Tensor:
    """Length of the all-True prefix of each row of ``ok [B, n]``."""
    return ok.long().cumprod(-1).sum(-1)


def one_hot(tokens: Tensor, vocab: int) -> Tensor:
    """Float one-hot without ``F.one_hot``'s range check (which synchronises on CUDA)."""
    out = torch.zeros(*tokens.shape, vocab, device=tokens.device)
    return out.scatter_(-1, tokens[..., None], 1.0)


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds, a final xor-shift), in int64."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def hash_uniforms(seeds: Tensor, counter: Tensor, n: int) -> Tensor:
    """``[B, n]`` uniforms in ``[0, 1)``, a pure function of (row seed, row counter, slot).

    Counter-based randomness: a row draws the same numbers whatever the batch around it, and
    the computation is plain tensor arithmetic, so it can be captured in a CUDA graph.
    """
    slot = torch.arange(n, device=seeds.device)
    x = _mix32(seeds[:, None] & _MASK32)
    x = _mix32(x ^ (counter[:, None] & _MASK32))
    x = _mix32(x ^ slot)
    return (x >> 8).float() / float(1 << 24)
