"""The AR step's routed experts in two kernels (``tidar.decode_moe``), run in Triton's CPU
interpreter (``conftest.py``): against the plain expression, and inside the model, where
decoding with them must give the grouped-matmul path's logits and tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ar_step_logits, kernel_on_cpu, tiny_model

decode_moe = pytest.importorskip("tidar.decode_moe")
from tidar.engine import DecodeConfig, Engine  # noqa: E402
from tidar.model import MoE  # noqa: E402
from tidar.sampling import SamplingParams  # noqa: E402


def plain(x, gate_up, down, expert, weight, residual):
    out = residual.clone()
    for r in range(x.shape[0]):
        for j in range(expert.shape[1]):
            gate, up = (gate_up[expert[r, j]] @ x[r]).chunk(2)
            out[r] += weight[r, j] * (down[expert[r, j]] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "top_k"), [(1, 2), (2, 3)])
@pytest.mark.parametrize(("dim", "hidden"), [(48, 20), (1100, 36)])  # 4 and 2 outputs a block
def test_matches_the_plain_expression(dtype, rows, top_k, dim, hidden):
    gen = torch.Generator().manual_seed(rows * 100 + top_k + dim)
    experts = 5
    x = torch.randn(rows, dim, generator=gen).to(dtype)
    gate_up = (torch.randn(experts, 2 * hidden, dim, generator=gen) / dim**0.5).to(dtype)
    down = (torch.randn(experts, dim, hidden, generator=gen) / hidden**0.5).to(dtype)
    expert = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(rows)])
    weight = torch.rand(rows, top_k, generator=gen).to(dtype)
    residual = torch.randn(rows, dim, generator=gen).to(dtype)
    got = decode_moe.decode_moe(x, gate_up, down, expert, weight, residual)
    expected = plain(*(t.float() if t.is_floating_point() else t
                       for t in (x, gate_up, down, expert, weight, residual)))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (rows, dim)
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_routing_in_the_kernels_picks_as_the_model_does(dtype, normalize):
    """``decode_moe_routed``: the experts and weights ``model.MoE.route`` takes from the
    router's logits (softmax, top-k, optionally renormalised, rounded to the rows' dtype);
    7 experts leave one of the 8-wide tile masked."""
    gen = torch.Generator().manual_seed(7 + normalize)
    rows, top_k, experts, dim, hidden = 2, 3, 7, 48, 20
    x = torch.randn(rows, dim, generator=gen).to(dtype)
    gate_up = (torch.randn(experts, 2 * hidden, dim, generator=gen) / dim**0.5).to(dtype)
    down = (torch.randn(experts, dim, hidden, generator=gen) / hidden**0.5).to(dtype)
    logits = torch.randn(rows, experts, generator=gen).to(dtype)
    residual = torch.randn(rows, dim, generator=gen).to(dtype)
    weight, expert = torch.topk(F.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True)
    got = decode_moe.decode_moe_routed(x, gate_up, down, logits, residual, top_k, normalize)
    expected = plain(x.float(), gate_up.float(), down.float(), expert,
                     weight.to(dtype).float(), residual.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_the_routing_kernel_picks_as_the_model_does(dtype, normalize):
    """``route_experts``: ``model.MoE.route``'s experts, in its order, and weights (softmax
    in float32, top-k, optionally renormalised, rounded to the rows' dtype); 7 experts leave
    one of the 8-wide tile masked, 3 of them chosen one of the 4-wide."""
    gen = torch.Generator().manual_seed(11 + normalize)
    logits = torch.randn(5, 7, generator=gen).to(dtype)
    weight, expert = torch.topk(F.softmax(logits.float(), dim=-1), 3, dim=-1)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True)
    got_expert, got_weight = decode_moe.route_experts(logits, 3, normalize, dtype)
    assert torch.equal(got_expert, expert) and got_weight.dtype == dtype
    torch.testing.assert_close(got_weight, weight.to(dtype))


def test_the_routing_kernel_runs_once_a_row_before_the_experts_kernels(monkeypatch):
    routes = kernel_on_cpu(monkeypatch, decode_moe, "route_experts")
    experts = kernel_on_cpu(monkeypatch, decode_moe, "decode_moe", MOE_MAX_ROWS=2,
                            ROUTE_IN_KERNELS=False, ROUTE_KERNEL=True)
    model = tiny_model("olmoe", vocab=8, seed=3)
    ar_step_logits(model)
    assert routes == experts == [2] * sparse_layers(model)


def test_the_custom_ops_trace():
    """Their schemas and fake tensors agree with the kernels (what torch.compile and CUDA
    graphs trace the AR step with)."""
    gen = torch.Generator().manual_seed(0)
    x, gate_up, down, residual = (torch.randn(2, 48, generator=gen),
                                  torch.randn(5, 40, 48, generator=gen),
                                  torch.randn(5, 48, 20, generator=gen),
                                  torch.randn(2, 48, generator=gen))
    torch.library.opcheck(decode_moe.decode_moe, (
        x, gate_up, down, torch.tensor([[0, 3], [4, 1]]), torch.rand(2, 2, generator=gen),
        residual))
    torch.library.opcheck(decode_moe.decode_moe_routed, (
        x, gate_up, down, torch.randn(2, 5, generator=gen), residual, 2, True))
    torch.library.opcheck(decode_moe.route_experts, (
        torch.randn(2, 5, generator=gen), 3, False, torch.float16))


@pytest.fixture(params=["torch", "kernels", "kernel"],
                ids=["routed-before", "routed-in-kernels", "routed-in-a-kernel-before"])
def moe_on_cpu(request, monkeypatch):
    """Let the MoE layers take the kernels on the CPU (the interpreter), the routing before
    them (by torch or by ``route_experts``, ``ROUTE_KERNEL``) or in them
    (``ROUTE_IN_KERNELS``), counting the experts' kernels' calls."""
    in_kernels = request.param == "kernels"
    name = "decode_moe_routed" if in_kernels else "decode_moe"
    return kernel_on_cpu(monkeypatch, decode_moe, name, MOE_MAX_ROWS=2,
                         ROUTE_IN_KERNELS=in_kernels, ROUTE_KERNEL=request.param == "kernel")


def sparse_layers(model) -> int:
    return sum(isinstance(block.mlp, MoE) for block in model.layers)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral"])
def test_the_ar_step_with_the_kernels_gives_the_plain_logits(family, moe_on_cpu, monkeypatch):
    model = tiny_model(family, vocab=8, seed=3)
    with monkeypatch.context() as plain_only:
        plain_only.setattr(decode_moe, "DEVICES", ())
        expected = ar_step_logits(model)
    moe_on_cpu.clear()
    torch.testing.assert_close(ar_step_logits(model), expected, atol=1e-5, rtol=1e-5)
    assert moe_on_cpu == [2] * sparse_layers(model) and sparse_layers(model) > 0


def test_the_shipped_setting_routes_one_sequence_in_the_kernels_and_not_two(monkeypatch):
    """As shipped (``MOE_MAX_ROWS`` 1, ``ROUTE_IN_KERNELS``), one sequence's AR steps pick
    their experts in the kernels; two sequences' keep the grouped matmuls (their tokens are
    not yet checked on the GPU)."""
    given = kernel_on_cpu(monkeypatch, decode_moe, "decode_moe")
    routed = kernel_on_cpu(monkeypatch, decode_moe, "decode_moe_routed")
    model = tiny_model("olmoe", vocab=8, seed=3)
    ar_step_logits(model)  # two rows
    assert not given and not routed
    Engine(model).generate([[1, 2, 3]], DecodeConfig(sampler="ar", max_new_tokens=4))
    assert routed == [1] * 3 * sparse_layers(model) and not given


def test_off_past_its_rows_and_with_a_shared_expert(moe_on_cpu, monkeypatch):
    """``MOE_MAX_ROWS`` 0 and rows past it keep the grouped matmuls, and so does a layer with
    a shared expert (qwen2_moe)."""
    model = tiny_model("olmoe", vocab=8, seed=3)
    monkeypatch.setattr(decode_moe, "MOE_MAX_ROWS", 0)
    ar_step_logits(model)
    monkeypatch.setattr(decode_moe, "MOE_MAX_ROWS", 1)  # the step has 2 rows
    ar_step_logits(model)
    monkeypatch.setattr(decode_moe, "MOE_MAX_ROWS", 2)
    ar_step_logits(tiny_model("qwen2_moe", vocab=8, seed=3))
    assert not moe_on_cpu


def test_more_experts_than_a_register_tile_are_routed_before_the_kernels(monkeypatch):
    given = kernel_on_cpu(monkeypatch, decode_moe, "decode_moe", MOE_MAX_ROWS=2,
                          ROUTE_IN_KERNELS=True, MAX_EXPERTS=2)
    routed = kernel_on_cpu(monkeypatch, decode_moe, "decode_moe_routed")
    model = tiny_model("olmoe", vocab=8, seed=3)
    assert model.layers[0].mlp.experts.gate_up_proj.shape[0] > 2
    ar_step_logits(model)
    assert given and not routed


def test_decoding_with_the_kernels_gives_the_same_tokens(moe_on_cpu, monkeypatch):
    """Greedy and sampled `ar` decode the same tokens with the kernels as without."""
    model = tiny_model("olmoe", vocab=16, seed=5)
    prompts = [torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 3)]
    configs = [DecodeConfig(sampler="ar", max_new_tokens=8, sampling=sampling)
               for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9))]
    for cfg in configs:
        moe_on_cpu.clear()
        got, _ = Engine(model).generate(prompts, cfg)
        assert len(moe_on_cpu) == 7 * sparse_layers(model)  # every step after the prefill
        with monkeypatch.context() as plain_only:
            plain_only.setattr(decode_moe, "DEVICES", ())
            expected, _ = Engine(model).generate(prompts, cfg)
        assert got == expected
