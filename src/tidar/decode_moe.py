"""The AR step's routed experts as two Triton kernels (GPU only): the chosen experts'
gate/up with SwiGLU, then their down projections summed with the routing weights and the
residual added.

The grouped-matmul path (``model.Experts``) sorts the rows by expert, counts, gathers, runs
two grouped GEMMs and scatters the result back, a chain of small kernels for one or two rows.
Here each thread block reads the expert ids of its row and loads that expert's weight tile,
as ``decode_matvec`` loads a dense one. ``decode_moe_routed`` takes the router's logits
instead, and its kernels pick each row's experts themselves, in place of the softmax and
``torch.topk`` before them (``ROUTE_IN_KERNELS``). On the H100, random weights of
OLMoE-1B-7B's shape took 1.49-1.66 ms an AR step at batch 1 in 172 kernels routed here,
1.62-1.80 in 236 with the experts given and 2.15-2.39 in 412 through the grouped path
(session 47, docs/results.md section 2: ``pass_latency.py --shape olmoe-7b --ar-only
--batch 1 --kernel-settings engine MOE_MAX_ROWS=1 MOE_MAX_ROWS=1,ROUTE_IN_KERNELS=True``),
with the same tokens as the grouped path on the GPU (``gpu_exactness.py --runs eager
--families olmoe qwen3_moe mixtral``). Two rows (batch 2) took 2.28-2.31 against 2.95-2.98
ms, but their tokens are not yet checked on the GPU: ``MOE_MAX_ROWS`` stays 1 until
``gpu_exactness.py ... --kernel-settings MOE_MAX_ROWS=2`` (its ``ar`` row decodes a pair).
``route_experts`` (``ROUTE_KERNEL``, off until timed) instead picks each row's experts in
one small kernel before ``decode_moe``. Importing this module needs Triton; the tests run it
in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import decode_matvec
from .decode_matvec import fits, load_tile, plan, unit_stride

MOE_MAX_ROWS = 1  # rows (sequences of one query) at most; 0: the grouped-matmul path always
DEVICES = ("cuda",)  # the tests add "cpu": Triton's interpreter
# Each kernel picks its rows' experts from the router's logits itself (``decode_moe_routed``)
# in place of the softmax and ``torch.topk`` before them: four kernels fewer a layer.
ROUTE_IN_KERNELS = True
# With ROUTE_IN_KERNELS off: one small kernel picks each row's experts (``route_experts``) in
# place of the softmax and ``torch.topk``, once a row instead of in every thread block of
# the two kernels (which made gate/up 7 and down 4 us a layer slower, session 47). Off until
# timed against ROUTE_IN_KERNELS.
ROUTE_KERNEL = False
MAX_EXPERTS = 256  # router logits a row, one register tile


@triton.jit
def _probabilities(Logits, row, n_experts, stride_l, BLOCK_E: tl.constexpr):
    """The experts' indices and row ``row``'s router probabilities (the softmax of its logits
    in float32), -1 past ``n_experts`` so that they are never picked."""
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(Logits + row * stride_l + e, mask=e < n_experts, other=float("-inf"))
    logits = logits.to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, 0))
    return e, tl.where(e < n_experts, probs / tl.sum(probs, 0), -1.0)


@triton.jit
def _pick(e, left):
    """The most probable expert of ``left`` (the lowest index on ties), its probability, and
    ``left`` without it."""
    best, index = tl.max(left, 0, return_indices=True, return_indices_tie_break_left=True)
    return index.to(tl.int64), best, tl.where(e == index, -1.0, left)


@triton.jit
def _route_kernel(Logits, Expert, Weight, n_experts, stride_l, TOP_K: tl.constexpr,
                  NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOP: tl.constexpr):
    """Row ``r``'s ``TOP_K`` most probable experts by ``Logits`` (program r), in order, and
    their probabilities (``NORMALIZE``: over the chosen), rounded to ``Weight``'s dtype."""
    row = tl.program_id(0)
    e, left = _probabilities(Logits, row, n_experts, stride_l, BLOCK_E)
    j = tl.arange(0, BLOCK_TOP)
    expert = tl.zeros([BLOCK_TOP], tl.int64)
    weight = tl.zeros([BLOCK_TOP], tl.float32)
    for slot in tl.static_range(TOP_K):
        index, best, left = _pick(e, left)
        expert = tl.where(j == slot, index, expert)
        weight = tl.where(j == slot, best, weight)
    if NORMALIZE:
        weight = weight / tl.sum(weight, 0)
    tl.store(Expert + row * TOP_K + j, expert, mask=j < TOP_K)
    tl.store(Weight + row * TOP_K + j, weight.to(Weight.dtype.element_ty), mask=j < TOP_K)


@triton.jit
def _gate_up_kernel(X, W, Expert, Logits, Out, K, N, n_experts, stride_x, stride_e, stride_w,
                    stride_l, TOP_K: tl.constexpr, ROUTE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Outputs ``n`` of the SwiGLU of row ``r``'s ``j``-th expert, program (n-tile, r*k+j):
    ``silu(gate @ x) * (up @ x)``, the weight ``[E, 2N, K]`` gate rows then up rows. The
    expert from ``Expert``, or with ``ROUTE`` the ``j``-th most probable by ``Logits``."""
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    slot = tl.program_id(1)  # row * TOP_K + j
    if ROUTE:
        e, left = _probabilities(Logits, slot // TOP_K, n_experts, stride_l, BLOCK_E)
        expert, _, left = _pick(e, left)
        for j in tl.static_range(1, TOP_K):
            index, _, left = _pick(e, left)
            expert = tl.where(slot % TOP_K == j, index, expert)
    else:
        expert = tl.load(Expert + slot).to(tl.int64)
    x = tl.load(X + (slot // TOP_K) * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
    weights = W + expert * stride_e
    gate = tl.sum(load_tile(weights, n, n_ok, k, k_ok, stride_w).to(tl.float32) * x[None, :], 1)
    up = tl.sum(load_tile(weights, n + N, n_ok, k, k_ok, stride_w).to(tl.float32) * x[None, :],
                1)
    tl.store(Out + slot * N + n, (gate * tl.sigmoid(gate) * up).to(Out.dtype.element_ty),
             mask=n_ok)


@triton.jit
def _down_kernel(H, W, Expert, Weight, Logits, Res, Out, K, N, n_experts, stride_e, stride_w,
                 stride_l, stride_res, stride_out, TOP_K: tl.constexpr, ROUTE: tl.constexpr,
                 NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """Outputs ``n`` of row ``r`` (program (n-tile, r)): the residual plus the routing
    weights times each chosen expert's down projection of its SwiGLU output ``H``. Experts
    and weights from ``Expert`` and ``Weight``, or with ``ROUTE`` the most probable by
    ``Logits`` and their probabilities (``NORMALIZE``: over the chosen), rounded to the
    output's dtype as ``model.MoE.route`` rounds them."""
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    row = tl.program_id(1)
    acc = tl.load(Res + row * stride_res + n, mask=n_ok, other=0.0).to(tl.float32)
    if ROUTE:
        e, probs = _probabilities(Logits, row, n_experts, stride_l, BLOCK_E)
        total = 1.0
        if NORMALIZE:
            left = probs
            total = 0.0
            for _ in tl.static_range(TOP_K):
                _, best, left = _pick(e, left)
                total += best
        left = probs
    for j in tl.static_range(TOP_K):
        slot = row * TOP_K + j
        if ROUTE:
            expert, weight, left = _pick(e, left)
            weight = (weight / total).to(Out.dtype.element_ty).to(tl.float32)
        else:
            expert = tl.load(Expert + slot).to(tl.int64)
            weight = tl.load(Weight + slot).to(tl.float32)
        h = tl.load(H + slot * K + k, mask=k_ok, other=0.0).to(tl.float32)
        w = load_tile(W + expert * stride_e, n, n_ok, k, k_ok, stride_w).to(tl.float32)
        acc += weight * tl.sum(w * h[None, :], 1)
    tl.store(Out + row * stride_out + n, acc.to(Out.dtype.element_ty), mask=n_ok)


def supported(x: Tensor, gate_up: Tensor, down: Tensor) -> bool:
    """The kernels take 1 to ``MOE_MAX_ROWS`` rows ``x`` ``[rows, D]`` against experts'
    ``gate_up`` ``[E, 2H, D]`` and ``down`` ``[E, D, H]``, on CUDA, each input row one
    register tile as in the matvec (``decode_matvec.fits``, its ``MAX_INPUTS``)."""
    most = decode_matvec.MAX_INPUTS
    return (fits(x, gate_up[0], DEVICES, MOE_MAX_ROWS, most)
            and down.shape[-1] <= most and down.dtype == x.dtype
            and gate_up.stride(-1) == 1 and down.stride(-1) == 1)


def _experts(x: Tensor, gate_up: Tensor, down: Tensor, residual: Tensor, top_k: int,
             expert: Tensor | None, weight: Tensor | None, logits: Tensor | None,
             normalize: bool) -> Tensor:
    """The two kernels, over given experts and weights or (``logits``) routing in them."""
    rows, inputs = x.shape
    hidden = down.shape[-1]
    x, residual = unit_stride(x, residual)
    route = logits is not None
    if route:
        logits = logits.contiguous()
        expert = weight = logits  # unread
    else:
        expert, weight = expert.contiguous(), weight.contiguous()
        logits = expert  # unread
    n_experts = gate_up.shape[0]
    block_e = triton.next_power_of_2(n_experts)
    swiglu = x.new_empty(rows * top_k, hidden)
    block_n, warps = plan(hidden, inputs)
    _gate_up_kernel[(triton.cdiv(hidden, block_n), rows * top_k)](
        x, gate_up, expert, logits, swiglu, inputs, hidden, n_experts, x.stride(0),
        gate_up.stride(0), gate_up.stride(1), logits.stride(0), TOP_K=top_k, ROUTE=route,
        BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(inputs), BLOCK_E=block_e,
        num_warps=warps)
    out = x.new_empty(rows, inputs)
    block_n, warps = plan(inputs, hidden)
    _down_kernel[(triton.cdiv(inputs, block_n), rows)](
        swiglu, down, expert, weight, logits, residual, out, hidden, inputs, n_experts,
        down.stride(0), down.stride(1), logits.stride(0), residual.stride(0), out.stride(0),
        TOP_K=top_k, ROUTE=route, NORMALIZE=normalize, BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(hidden), BLOCK_E=block_e, num_warps=warps)
    return out


def routing(gate_up: Tensor) -> str:
    """Who picks the experts of ``gate_up``'s layer: ``"kernels"`` (``decode_moe_routed``,
    ``ROUTE_IN_KERNELS``), ``"kernel"`` (``route_experts`` before ``decode_moe``,
    ``ROUTE_KERNEL``) or ``"torch"`` (``model.MoE.route``); torch where the router's logits
    pass one register tile."""
    if gate_up.shape[0] > MAX_EXPERTS:
        return "torch"
    return "kernels" if ROUTE_IN_KERNELS else "kernel" if ROUTE_KERNEL else "torch"


@torch.library.custom_op("tidar::route_experts", mutates_args=())
def route_experts(logits: Tensor, top_k: int, normalize: bool,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``model.MoE.route`` in one kernel: the ``top_k`` experts of the softmax of the
    router's ``logits`` ``[rows, E]`` (in float32, the lowest index on ties) and their
    probabilities (``normalize``: divided by the chosen ones' sum) in ``dtype``."""
    rows, n_experts = logits.shape
    logits = logits.contiguous()
    expert = torch.empty(rows, top_k, dtype=torch.long, device=logits.device)
    weight = torch.empty(rows, top_k, dtype=dtype, device=logits.device)
    _route_kernel[(rows,)](logits, expert, weight, n_experts, logits.stride(0), TOP_K=top_k,
                           NORMALIZE=normalize, BLOCK_E=triton.next_power_of_2(n_experts),
                           BLOCK_TOP=triton.next_power_of_2(top_k),
                           num_warps=1)  # maxima by warp shuffles, no shared memory
    return expert, weight


@route_experts.register_fake
def _(logits, top_k, normalize, dtype):
    rows = logits.shape[0]
    return (logits.new_empty(rows, top_k, dtype=torch.long),
            logits.new_empty(rows, top_k, dtype=dtype))


@torch.library.custom_op("tidar::decode_moe", mutates_args=())
def decode_moe(x: Tensor, gate_up: Tensor, down: Tensor, expert: Tensor, weight: Tensor,
               residual: Tensor) -> Tensor:
    """``residual + sum_j weight[:, j] * down[e_j] @ swiglu(gate_up[e_j] @ x)`` for the
    (already normalised) rows ``x`` ``[rows, D]`` and their ``top_k`` experts ``expert`` and
    routing weights ``weight`` ``[rows, top_k]``. An opaque custom op, as ``decode_matvec``:
    the compiled pass calls its two kernels as external ones."""
    return _experts(x, gate_up, down, residual, expert.shape[1], expert, weight, None, False)


@decode_moe.register_fake
def _(x, gate_up, down, expert, weight, residual):
    return x.new_empty(x.shape)


@torch.library.custom_op("tidar::decode_moe_routed", mutates_args=())
def decode_moe_routed(x: Tensor, gate_up: Tensor, down: Tensor, logits: Tensor,
                      residual: Tensor, top_k: int, normalize: bool) -> Tensor:
    """``decode_moe`` with the routing in its kernels: the ``top_k`` experts of the softmax
    of the router's ``logits`` ``[rows, E]``, weighted by their probabilities (``normalize``:
    divided by the chosen ones' sum), as ``model.MoE.route`` picks them."""
    return _experts(x, gate_up, down, residual, top_k, None, None, logits, normalize)


@decode_moe_routed.register_fake
def _(x, gate_up, down, logits, residual, top_k, normalize):
    return x.new_empty(x.shape)
