"""One decoder-only transformer for every supported family, dense and MoE.

Single-device and small, in the spirit of gpt-fast's ``model.py``: family differences are
fields of ``ModelConfig``. Parameter names follow the Hugging Face layout (minus the
``model.`` prefix), so loading a checkpoint is mostly a rename. The forward takes a
``Layout`` (positions plus the visibility rule of ``layouts.py``) and an optional ``KVCache``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layouts import (
    FLEX_MASK_BLOCK,
    CausalMask,
    KeyMeta,
    Layout,
    dense_mask,
    flex_block_mask,
    key_meta,
)
from .prefix_attention import PrefixBlockMask, prefix_block_attention

try:
    from .decode_attention import decode_attention
    from .decode_attention import supported as triton_supports
except ImportError:  # no Triton (CPU builds of torch): SDPA everywhere
    decode_attention = None
try:
    from . import decode_matmul, decode_matvec, decode_moe, decode_qkv
except ImportError:  # no Triton: plain projections everywhere
    decode_matmul = decode_matvec = decode_moe = decode_qkv = None

KV_SLOT_MULTIPLE = 256  # CUDA caches come in whole slices of this many slots
DECODE_LINEAR_MAX_ELEMENTS = 1 << 24  # largest weight group decoding runs as one DecodeLinear


class RowGate:
    """Where the mask-token rows start along the sequence (``Layout.clean``), shared with the
    adapters that apply to those rows only. Every layout puts its clean tokens first.
    ``decoding``: the decode-time weights (``DecodeLinear``) are current and may be used (set
    by ``Transformer.decode_weights``; a plain attribute, so compiled code guards on it)."""

    def __init__(self):
        # Instance attributes from the start: compiled blocks guard on them, and a class
        # attribute later shadowed by an instance one fails those guards (a recompile).
        self.start = 0
        self.decoding = False


class _AdaptedLinear(torch.autograd.Function):
    """``x Wᵀ + b + (x Aᵀ) Bᵀ`` as one matmul over ``[x, x Aᵀ]`` and ``[W, B]``, with ``W``
    and ``b`` frozen. The update is never a tensor of its own (written, then read back to be
    added), and the backward reads the output's gradient once, for ``x``, ``x Aᵀ`` and ``B``
    (plain autograd through the concatenated weight would also compute ``W``'s gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                lora_B: Tensor) -> Tensor:
        xa = F.linear(x, lora_A)
        stacked = torch.cat([weight, lora_B], -1)
        ctx.save_for_backward(x, xa, stacked, lora_A)
        return F.linear(torch.cat([x, xa], -1), stacked, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, xa, stacked, lora_A = ctx.saved_tensors
        grad_cat = grad @ stacked
        grad_xa = grad_cat[..., x.shape[-1]:]
        grad_x = grad_cat[..., : x.shape[-1]] + grad_xa @ lora_A
        return (grad_x, None, None, grad_xa.flatten(0, -2).t() @ x.flatten(0, -2),
                grad.flatten(0, -2).t() @ xa.flatten(0, -2))


class RowLoRA(nn.Module):
    """A LoRA adapter on a linear layer whose update applies only to mask-token rows.

    Clean tokens never attend to mask tokens, so with these adapters the AR path of the model
    is the base model, exactly (the frozen-AR conversion mode). When decoding, the layer runs
    inside one stacked matmul (``DecodeLinear``); a pass with no mask rows (plain AR) runs the
    base weights alone.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gate: RowGate):
        super().__init__()
        self.base = base
        self.gate = gate
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)

    def forward(self, x: Tensor) -> Tensor:
        start = self.gate.start
        if start >= x.shape[-2]:
            return self.base(x)
        # The scale rides on B, so the update's gradient is the output's, not a scaled copy.
        lora_B = self.lora_B if self.scale == 1 else self.lora_B * self.scale
        weight, bias = self.base.weight, self.base.bias
        if (start == 0 and torch.is_grad_enabled() and x.dtype == weight.dtype
                and weight.shape[0] >= weight.shape[1] and not weight.requires_grad
                and (bias is None or not bias.requires_grad)):
            # Mask rows alone, training frozen weights, an output at least as wide as the
            # input (where one matmul over [x, xAᵀ] saves more than the concatenation costs).
            return _AdaptedLinear.apply(x, weight, bias, self.lora_A.to(x.dtype),
                                        lora_B.to(x.dtype))
        delta = F.linear(F.linear(x[..., start:, :], self.lora_A.to(x.dtype)), lora_B.to(x.dtype))
        # Zero rows in front of the update, not a concatenation: with mask rows alone (start 0,
        # frozen-AR's mask pass) the padding's backward is a view, not a copy of the gradient.
        return self.base(x) + F.pad(delta, (0, 0, start, 0))

    def adapted_weight(self) -> Tensor:
        w = self.base.weight
        return (w.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scale).to(w.dtype)


class DecodeLinear(nn.Module):
    """Linear layers that read one input (q/k/v, gate/up, or one adapted layer), run as one
    matmul when decoding.

    Layers carrying a ``RowLoRA`` make the weight stacked, ``[W; W']`` with ``W'`` the adapted
    weights (``W`` again for a plain layer): every row runs against both, clean rows keep the
    base half and mask rows the adapted half. The weight is a cache that compiled code cannot
    check, so ``refresh`` rebuilds it eagerly on entering ``Transformer.decode_weights`` and it
    is used only inside, updated in place where it can be, so captured CUDA graphs read
    current values.
    """

    def __init__(self, gate: RowGate):
        super().__init__()
        self.gate = gate
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.sizes: tuple[int, ...] = ()
        self.stacked = False
        self._key: tuple | None = None

    def active(self) -> bool:
        return self.gate.decoding and self.weight is not None and not torch.is_grad_enabled()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out, start = sum(self.sizes), self.gate.start
        if not self.stacked or start >= x.shape[-2]:
            bias = None if self.bias is None else self.bias[:out]
            return F.linear(x, self.weight[:out], bias).split(self.sizes, dim=-1)
        y = F.linear(x, self.weight, self.bias)
        y = torch.cat([y[..., :start, :out], y[..., start:, out:]], dim=-2)
        return y.split(self.sizes, dim=-1)

    @torch.no_grad()
    def refresh(self, layers: list[nn.Module]) -> None:
        """Rebuild from ``layers`` (``nn.Linear`` or ``RowLoRA``) if a weight changed since (an
        optimizer step, ``.to``); no layers: unused."""
        if not layers:
            self.weight = self.bias = self._key = None
            return
        key = tuple((id(p), p._version, p.dtype, p.device)
                    for layer in layers for p in layer.parameters())
        if key == self._key:
            return
        self._key = key
        base = [layer.base if isinstance(layer, RowLoRA) else layer for layer in layers]
        self.sizes = tuple(b.out_features for b in base)
        self.stacked = any(isinstance(layer, RowLoRA) for layer in layers)
        weight = torch.cat([b.weight for b in base])
        bias = None if base[0].bias is None else torch.cat([b.bias for b in base])
        if self.stacked:
            adapted = [layer.adapted_weight() if isinstance(layer, RowLoRA) else layer.weight
                       for layer in layers]
            weight = torch.cat([weight, *adapted])
            bias = None if bias is None else torch.cat([bias, bias])
        old = self.weight
        # In place where allowed (an inference-mode tensor only changes in inference mode).
        if old is not None and old.shape == weight.shape and old.dtype == weight.dtype and (
                old.device == weight.device) and (self.bias is None) == (bias is None) and (
                torch.is_inference_mode_enabled() or not old.is_inference()):
            old.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        else:
            self.weight, self.bias = weight, bias


class FusedWeights(NamedTuple):
    """What a fused projection reads: ``weight`` and ``bias``, the stacked ``[W; W']`` of a
    drafter's adapters where mask rows (from ``start`` in each sequence) read ``W'`` from
    weight row ``adapted`` on; without mask rows the base half alone and ``adapted`` 0.
    ``matvec``: ``decode_matvec`` takes it (the AR step's few rows), else ``decode_matmul``."""

    weight: Tensor
    bias: Tensor | None
    start: int
    adapted: int
    matvec: bool = False


def fused_weights(group: DecodeLinear, plain: nn.Module | None, x: Tensor,
                  swiglu: bool = False) -> FusedWeights | None:
    """The weights of a fused projection over the rows of ``x`` ``[B, T, ...]`` (the block's
    input: the projection's own input may be wider) while decoding on CUDA: the AR step's
    few rows as ``decode_matvec``, more rows (or mask rows) as ``decode_matmul`` where that
    is on. The group's weights, or the ``plain`` ``nn.Linear``'s. None where the plain layers
    must run."""
    if decode_matvec is None or not group.gate.decoding:
        return None
    length = x.shape[-2]
    if group.active():
        out = sum(group.sizes)
        if group.stacked and group.gate.start < length:
            weights = FusedWeights(group.weight, group.bias, group.gate.start, out)
        else:
            weights = FusedWeights(group.weight[:out],
                                   None if group.bias is None else group.bias[:out], length, 0)
    elif type(plain) is nn.Linear:
        weights = FusedWeights(plain.weight, plain.bias, length, 0)
    else:
        return None
    rows = x.flatten(0, -2)
    if weights.adapted == 0 and decode_matvec.supported(rows, weights.weight):
        return weights._replace(matvec=True)
    stacked, sequences = weights.adapted > 0, rows.shape[0] // length
    taken = decode_matmul.supported(rows, weights.weight, swiglu, stacked, sequences)
    return weights if taken else None


def fused(x: Tensor, weights: FusedWeights, norm: RMSNorm | None = None,
          residual: Tensor | None = None, swiglu: bool = False) -> Tensor:
    """The fused projection of ``x`` ``[B, T, K]``: the norm before, SwiGLU and residual
    after; ``decode_matvec`` for the AR step's few rows, else ``decode_matmul``."""
    rows = x.flatten(0, -2)
    args = (rows, weights.weight, None if norm is None else norm.weight, weights.bias,
            None if residual is None else residual.flatten(0, -2), swiglu,
            0.0 if norm is None else norm.eps)
    if weights.matvec:
        out = decode_matvec.decode_matvec(*args)
    else:
        out = decode_matmul.decode_matmul(*args, x.shape[-2], weights.start, weights.adapted)
    return out.view(*x.shape[:-1], -1)


def decodable(layers: list[nn.Module]) -> bool:
    """Whether decoding runs these layers as one ``DecodeLinear``: plain (or row-adapted)
    linear layers with something to fuse or stack, small enough to be launch-bound at decode
    batch sizes. Larger ones run as they are: a fused or stacked copy would save little and
    double their memory."""
    base = [layer.base if isinstance(layer, RowLoRA) else layer for layer in layers]
    if any(type(b) is not nn.Linear for b in base):
        return False
    if len(layers) == 1 and base[0] is layers[0]:
        return False  # one plain layer: nothing to fuse or stack
    return sum(b.weight.numel() for b in base) <= DECODE_LINEAR_MAX_ELEMENTS


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)


class KVCache:
    """Static per-layer key/value buffers: ``capacity`` committed slots plus a scratch area.

    Slot ``p < capacity`` holds the token at position ``p``; scratch slots hold the current
    pass's mask tokens. Each row's committed length lives in the engine, not here.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, scratch: int, dtype, device):
        # On CUDA, rounded up to whole slices (fewer distinct graph shapes, whole key slices
        # for decode attention); the extra slots lie past every horizon.
        multiple = KV_SLOT_MULTIPLE if torch.device(device).type == "cuda" else 1
        slots = -(-(capacity + scratch) // multiple) * multiple
        shape = (batch, cfg.n_kv_heads, slots, cfg.head_dim)
        self.capacity = capacity
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        return self.k[index], self.v[index]

    def rows(self, row: int) -> KVCache:
        """The cache of batch row ``row`` alone: views, written in place."""
        view = object.__new__(KVCache)
        view.capacity = self.capacity
        view.k = [k[row : row + 1] for k in self.k]
        view.v = [v[row : row + 1] for v in self.v]
        return view


def write_kv(buffers: tuple[Tensor, Tensor], slots: Tensor, k: Tensor, v: Tensor):
    """Store ``k, v`` ``[B, H, T, D]`` at ``slots`` ``[B, T]`` of one layer's cache buffers."""
    k_buf, v_buf = buffers
    rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
    k_buf[rows, :, slots] = k.transpose(1, 2).to(k_buf.dtype)
    v_buf[rows, :, slots] = v.transpose(1, 2).to(v_buf.dtype)
    return k_buf, v_buf


def rope_frequencies(cfg: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies and output scale, with the scaling type the checkpoint declares."""
    hf = cfg.hf_config
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim
        return 1.0 / (theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        from .errors import TidarError

        raise TidarError(f"unsupported RoPE scaling type {rope_type!r}")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, None)
    return inv_freq.float(), float(scale)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, gate: RowGate):
        super().__init__()
        self.cfg = cfg
        self.window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(kv_dim, cfg.norm_eps)
        self.qkv = DecodeLinear(gate)
        self.out = DecodeLinear(gate)

    def decode_groups(self) -> list[tuple[DecodeLinear, list[nn.Module]]]:
        return [(self.qkv, [self.q_proj, self.k_proj, self.v_proj]), (self.out, [self.o_proj])]

    def residual_step(self, x, norm, cos, sin, masks, kv, slots) -> Tensor | None:
        """``x + self(norm(x), ...)`` with the norm fused into the q/k/v projection and the
        residual into the output's (``fused_weights``: the AR step on CUDA, and drafting
        passes where ``decode_matmul`` is on); None where that does not apply."""
        qkv, out = fused_weights(self.qkv, None, x), fused_weights(self.out, self.o_proj, x)
        if qkv is None or out is None:
            return None
        cfg, rows = self.cfg, x.flatten(0, -2)
        if (kv is not None and qkv.matvec and cfg.qk_norm is None and cfg.clip_qkv is None
                and decode_qkv.supported(rows, qkv.weight, x.shape[-2])):
            # The AR step: RoPE and the cache writes in the projection's kernel.
            q = decode_qkv.decode_qkv(rows, qkv.weight, norm.weight, qkv.bias, norm.eps,
                                      cos, sin, *kv, slots, cfg.n_heads)
            return fused(self.attend_heads(q, *kv, masks), out, residual=x)
        q, k, v = fused(x, qkv, norm=norm).split(self.qkv.sizes, dim=-1)
        return fused(self.context(q, k, v, cos, sin, masks, kv, slots), out, residual=x)

    def forward(self, x, cos, sin, masks, kv: tuple[Tensor, Tensor] | None, slots) -> Tensor:
        """``kv``: this layer's cache buffers (written at ``slots``), or None: no cache."""
        if self.qkv.active():
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out = self.context(q, k, v, cos, sin, masks, kv, slots)
        return self.out(out)[0] if self.out.active() else self.o_proj(out)

    def context(self, q, k, v, cos, sin, masks, kv, slots) -> Tensor:
        """Attention from projected ``q, k, v [B, T, heads * head_dim]``: the heads' outputs
        ``[B, T, n_heads * head_dim]``, before the output projection."""
        cfg = self.cfg
        batch, length, _ = q.shape
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(batch, length, cfg.n_heads, cfg.head_dim)
        k = k.view(batch, length, cfg.n_kv_heads, cfg.head_dim)
        v = v.view(batch, length, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # The RoPE tables follow the residual stream's dtype: attend in the projections'.
        q, k = rotate(q, cos, sin).to(v.dtype), rotate(k, cos, sin).to(v.dtype)
        if kv is not None:
            k, v = write_kv(kv, slots, k, v)
        return self.attend_heads(q, k, v, masks)

    def attend_heads(self, q, k, v, masks) -> Tensor:
        """Attention of the rotated ``q`` ``[B, heads, T, D]`` over ``k, v`` (the cache, once
        written): the heads' outputs ``[B, T, n_heads * head_dim]``."""
        batch, _, length, _ = q.shape
        out = attend(q, k.to(q.dtype), v.to(q.dtype), masks[self.window])
        return out.transpose(1, 2).reshape(batch, length, -1)


class FlexMask(NamedTuple):
    """A flex_attention ``BlockMask`` and the kernels its calls run: ``backend`` None for
    flex_attention's own (Triton), ``"FLASH"`` for FlashAttention-4's (the ``flash-attn-4``
    package, Hopper and later)."""

    block_mask: object
    backend: str | None = None


_compiled_flex = None


def attend(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """Attention with a dense boolean mask (the kernel ``dense_attention_kernel`` picks),
    causal over the first keys, frozen-AR training's mask half (``PrefixBlockMask``), or
    flex_attention over a ``FlexMask`` (compiled once)."""
    if isinstance(mask, PrefixBlockMask):
        return prefix_block_attention(q, k, v, mask)
    if isinstance(mask, CausalMask):
        t = q.shape[2]
        return F.scaled_dot_product_attention(q, k[:, :, :t], v[:, :, :t], is_causal=True,
                                              enable_gqa=True)
    if isinstance(mask, Tensor):
        kernel = dense_attention_kernel(q, k)
        if kernel == "triton":
            return decode_attention(q, k, v, mask)
        return dense_attention(q, k, v, mask)
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    options = None if mask.backend is None else {"BACKEND": mask.backend}
    return _compiled_flex(q, k, v, block_mask=mask.block_mask, enable_gqa=True,
                          kernel_options=options)


def dense_attention_kernel(q: Tensor, k: Tensor) -> str:
    """``triton`` (``decode_attention``'s split-KV kernel, forward only) on CUDA where it
    supports the shapes and no gradient is needed, else ``sdpa``; the CPU keeps SDPA."""
    if (q.device.type == "cuda" and decode_attention is not None and not q.requires_grad
            and triton_supports(q)):
        return "triton"
    return "sdpa"


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """SDPA with a dense mask. The query heads sharing a KV head are folded into one longer
    query sequence: plain attention over the unexpanded cache, which SDPA's fused kernels run
    with a mask (its grouped-query mode would fall back to materialising scores)."""
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    if group > 1:
        q = q.reshape(batch, k.shape[1], group * length, dim)
        mask = mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, heads, length, dim)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, gate: RowGate, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.gate_up = DecodeLinear(gate)
        self.down = DecodeLinear(gate)

    def decode_groups(self) -> list[tuple[DecodeLinear, list[nn.Module]]]:
        return [(self.gate_up, [self.gate_proj, self.up_proj]), (self.down, [self.down_proj])]

    def residual_step(self, x: Tensor, norm: RMSNorm) -> Tensor | None:
        """``x + self(norm(x))`` with the residual fused into the down projection
        (``fused_weights``) and the norm and SwiGLU into gate/up's. Down runs fused on its own
        where only it takes ``decode_matmul``'s wide tile. None where down's fusion does not
        apply, or gate/up's does not and down would be a matvec (the AR step fuses both or
        neither, as timed)."""
        down = fused_weights(self.down, self.down_proj, x)
        gate_up = fused_weights(self.gate_up, None, x, swiglu=True)
        if down is None or (gate_up is None and down.matvec):
            return None
        hidden = (self.hidden(norm(x)) if gate_up is None
                  else fused(x, gate_up, norm=norm, swiglu=True))
        return fused(hidden, down, residual=x)

    def hidden(self, x: Tensor) -> Tensor:
        """SwiGLU of gate and up: the down projection's input."""
        if self.gate_up.active():
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return F.silu(gate) * up

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.hidden(x)
        return self.down(hidden)[0] if self.down.active() else self.down_proj(hidden)


def grouped_mm(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``x`` rows sorted by expert, times ``weight[e].T`` for each expert's row range."""
    if x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling()):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    # torch's CUDA grouped GEMM is bf16-only, and so is its shape check under torch.compile.
    # Other dtypes (fp32 checks) run every expert on every row and keep each row's own:
    # wasteful, but free of host syncs (CUDA graphs).
    rows = torch.arange(x.shape[0], device=x.device)
    expert = torch.searchsorted(offsets, rows.to(offsets.dtype), right=True)
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for e in range(weight.shape[0]):
        out = torch.where((expert == e)[:, None], x @ weight[e].T, out)
    return out


class Experts(nn.Module):
    """All experts of one layer as two stacked weights, run as grouped matmuls."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: Tensor, expert: Tensor, weight: Tensor) -> Tensor:
        """``x`` ``[N, D]``; ``expert``, ``weight`` ``[N, k]``: the weighted sum of k experts."""
        n_experts = self.gate_up_proj.shape[0]
        flat = expert.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // expert.shape[1]
        counts = torch.zeros(n_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync on CUDA
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[token]
        gate, up = grouped_mm(xs, self.gate_up_proj, offsets).chunk(2, dim=-1)
        ys = grouped_mm(F.silu(gate) * up, self.down_proj, offsets)
        ys = ys * weight.reshape(-1)[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, gate: RowGate):
        super().__init__()
        moe = cfg.moe
        self.row_gate = gate
        self.top_k = moe.top_k
        self.normalize = moe.normalize_top_k
        self.gate = nn.Linear(cfg.dim, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, cfg.dim, moe.expert_dim)
        if moe.shared_expert_dim:
            self.shared_expert = MLP(cfg.dim, moe.shared_expert_dim, gate)
            self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False)
        else:
            self.shared_expert = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weight, expert = torch.topk(probs, self.top_k, dim=-1)
        if self.training:
            # Switch-style load balancing: experts' token share times their mean probability.
            share = F.one_hot(expert, probs.shape[-1]).float().sum(1).mean(0) / self.top_k
            self.aux_loss = probs.shape[-1] * (share * probs.mean(0)).sum()
        if self.normalize:
            weight = weight / weight.sum(-1, keepdim=True)
        return expert, weight.to(x.dtype)

    def residual_step(self, x: Tensor, norm: RMSNorm) -> Tensor | None:
        """``x + self(norm(x))`` with the routed experts in ``decode_moe``'s kernels, the
        residual added in them, for the AR step's few rows while decoding; None elsewhere,
        and with a shared expert."""
        rows = x.flatten(0, -2)
        experts = self.experts
        if (decode_moe is None or not self.row_gate.decoding or self.shared_expert is not None
                or not decode_moe.supported(rows, experts.gate_up_proj, experts.down_proj)):
            return None
        normed = norm(rows)
        routing = decode_moe.routing(experts.gate_up_proj)
        if routing == "kernels":
            out = decode_moe.decode_moe_routed(normed, experts.gate_up_proj, experts.down_proj,
                                               self.gate(normed), rows, self.top_k,
                                               self.normalize)
            return out.view(x.shape)
        if routing == "kernel":
            expert, weight = decode_moe.route_experts(self.gate(normed), self.top_k,
                                                      self.normalize, normed.dtype)
        else:
            expert, weight = self.route(normed)
        out = decode_moe.decode_moe(normed, experts.gate_up_proj, experts.down_proj, expert,
                                    weight, rows)
        return out.view(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        expert, weight = self.route(x)
        out = self.experts(x, expert, weight)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, gate: RowGate):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer, gate)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        sparse = cfg.moe is not None and cfg.moe.sparse_layers[layer]
        self.mlp = (MoE(cfg, gate) if sparse
                    else MLP(cfg.dim, cfg.intermediate_size, gate, cfg.mlp_bias))

    def forward(self, x, cos, sin, masks, kv, slots) -> Tensor:
        after = self.self_attn.residual_step(x, self.input_layernorm, cos, sin, masks, kv, slots)
        if after is None:
            after = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, kv, slots)
        x = after
        after = self.mlp.residual_step(x, self.post_attention_layernorm)
        return x + self.mlp(self.post_attention_layernorm(x)) if after is None else after


class BlockInputs(NamedTuple):
    x: Tensor  # [B, T, dim] embedded tokens
    cos: Tensor  # [B, 1, T, head_dim]
    sin: Tensor
    masks: dict  # attention window -> mask
    slots: Tensor | None  # [B, T] cache slots, None without a cache


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        # The input-only mask token (id == vocab_size); the output head keeps the vocabulary.
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.dim))
        self.row_gate = RowGate()
        self.layers = nn.ModuleList(Block(cfg, i, self.row_gate) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        )
        inv_freq, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.checkpointing = False  # recompute each block in backward (training memory)
        # flex_attention BlockMasks' tile; compiled blocks whose attention tiles are
        # autotuned set a smaller one (``train.compile_blocks``).
        self.flex_mask_block = FLEX_MASK_BLOCK
        self.flex_backend: str | None = None  # FlexMask.backend of the masks it builds

    @contextmanager
    def decode_weights(self):
        """Decode with fused projections and the mask-row adapters' stacked weights
        (``DecodeLinear``), brought up to date first (after training steps or loading);
        compiled or graph-captured passes read them."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                for decoded, layers in module.decode_groups():
                    decoded.refresh(layers if decodable(layers) else [])
        outer, self.row_gate.decoding = self.row_gate.decoding, True
        try:
            yield
        finally:
            self.row_gate.decoding = outer

    def init_mask_embedding(self) -> None:
        """The mean token embedding: a neutral start for an untrained drafter."""
        with torch.no_grad():
            self.mask_embedding.copy_(self.embed_tokens.weight.float().mean(0))

    def embed(self, tokens: Tensor) -> Tensor:
        is_mask = (tokens == self.cfg.mask_id)[..., None]
        x = self.embed_tokens(tokens.clamp(max=self.cfg.vocab_size - 1))
        return torch.where(is_mask, self.mask_embedding.to(x.dtype), x)

    @property
    def head_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def head(self, h: Tensor) -> Tensor:
        return F.linear(h, self.head_weight)

    def rope(self, positions: Tensor, dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, head_dim]
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def masks(self, layout: Layout, keys: KeyMeta, flex: bool = False) -> dict:
        """One mask per distinct attention window: dense, or ``FlexMask``s."""
        windows = set(self.cfg.sliding_windows or [None])
        if flex:
            return {w: FlexMask(flex_block_mask(layout, keys, w, self.flex_mask_block),
                                self.flex_backend) for w in windows}
        return {w: dense_mask(layout, keys, w) for w in windows}

    def forward(
        self, layout: Layout, cache: KVCache | None = None, masks: dict | None = None,
        hidden_only: bool = False, blocks=None,
    ) -> Tensor:
        """Logits ``[B, T, V]`` (or final hidden states) for the layout's query tokens.

        ``blocks``: callables to run in place of ``self.layers`` (compiled wrappers of them).
        """
        self.row_gate.start = layout.clean
        x = self.norm(self.run_blocks(self.prepare(layout, cache, masks), cache, blocks))
        return x if hidden_only else self.head(x)

    def prepare(self, layout: Layout, cache: KVCache | None = None,
                masks: dict | None = None) -> BlockInputs:
        """What every block reads besides the hidden states: the embedded tokens, RoPE
        tables, masks and cache slots. Split from ``run_blocks`` so a decoding engine can
        compile this part (many small kernels) on its own."""
        x = self.embed(layout.tokens)
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            # Mixed precision: the residual stream (and every norm over it) in the compute
            # dtype, as under FSDP2's param_dtype; float32 weights would keep it in float32.
            x = x.to(torch.get_autocast_dtype(kind))
        cos, sin = self.rope(layout.positions, x.dtype)
        if masks is None:
            masks = self.masks(layout, key_meta(layout, cache.slots if cache else None))
        return BlockInputs(x, cos, sin, masks, layout.slots if cache is not None else None)

    def run_blocks(self, inputs: BlockInputs, cache: KVCache | None = None,
                   blocks=None) -> Tensor:
        """The blocks (or ``blocks``) over ``inputs``; hidden states before the final norm.
        The caller sets ``row_gate.start`` to the layout's ``clean`` first."""
        x = inputs.x
        for i, block in enumerate(blocks or self.layers):
            kv = cache.layer(i) if cache is not None else None
            args = (inputs.cos, inputs.sin, inputs.masks, kv, inputs.slots)
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x

    def num_parameters(self) -> tuple[int, int]:
        """Total and active-per-token parameter counts (they differ for MoE)."""
        total = sum(p.numel() for p in self.parameters()) - self.mask_embedding.numel()
        active = total
        for block in self.layers:
            if isinstance(block.mlp, MoE):
                experts = block.mlp.experts
                per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // (
                    experts.gate_up_proj.shape[0]
                )
                active -= per_expert * (experts.gate_up_proj.shape[0] - block.mlp.top_k)
        return total, active
