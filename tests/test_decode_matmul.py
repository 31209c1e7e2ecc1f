"""The fused matmul of drafting passes (``tidar.decode_matmul``), run in Triton's CPU
interpreter (``conftest.py``): against the plain expressions it replaces, mask rows reading the
adapted half of stacked weights, and inside the model and the engine, where drafting with it
must give the plain layers' logits and tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_fused_logits, kernel_on_cpu, tiny_model, with_row_lora

decode_matmul = pytest.importorskip("tidar.decode_matmul")
from triton.runtime.errors import OutOfResources  # noqa: E402

from tidar.engine import DecodeConfig, Engine  # noqa: E402
from tidar.layouts import decode_layout  # noqa: E402
from tidar.model import KVCache  # noqa: E402


def plain(x, weight, norm_weight, bias, residual, swiglu, length, start, adapted):
    """The expressions the kernel fuses, in float32: clean rows against the base rows of the
    weight, mask rows (from ``start`` in each sequence) against the rows from ``adapted``."""
    width = adapted or weight.shape[0]
    if norm_weight is not None:
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
        x = norm_weight * x
    x = x.float()

    def half(first):
        return F.linear(x, weight[first:first + width].float(),
                        None if bias is None else bias[first:first + width].float())

    y = half(0)
    if adapted:
        masked = torch.arange(x.shape[0]) % length >= start
        y = torch.where(masked[:, None], half(adapted), y)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual.float() + y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("sequences", "length", "start"), [
    (1, 32, 16),   # one proposal block, block size 16: 16 clean rows, 16 mask rows
    (2, 7, 3),     # tiles cut short on both sides
    (1, 90, 10),   # mask rows in two tiles of 64
    (3, 5, 5),     # no mask rows: the base half alone
    (17, 1, 1),    # the AR step of 17 sequences: their rows tiled together
])
@pytest.mark.parametrize(("use_norm", "use_bias", "swiglu", "use_residual"), [
    (True, False, False, False),   # q/k/v
    (True, True, True, False),     # gate/up with biases and SwiGLU
    (False, True, False, True),    # o and down, residual added
])
def test_matches_the_plain_expressions(dtype, sequences, length, start, use_norm, use_bias,
                                       swiglu, use_residual):
    check_against_plain(dtype, sequences, length, start, use_norm, use_bias, swiglu,
                        use_residual, inputs=40, outputs=24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("use_norm", "use_bias", "use_residual", "stacked"), [
    (True, False, False, False),  # q/k/v
    (False, True, True, False),   # o, residual added
    (False, True, True, True),    # o or down over stacked weights
])
def test_wide_passes_take_the_wide_tile(dtype, use_norm, use_bias, use_residual, stacked,
                                        monkeypatch):
    """Past ``MAX_PASS_ROWS`` (lowered here) q/k/v and o take the wide tile, here two tiles
    of outputs (the second cut short) and each sequence's mask rows over several row tiles."""
    monkeypatch.setattr(decode_matmul, "MAX_PASS_ROWS", 8)
    rows, inputs = 2 * 40, 48
    wide_rows = decode_matmul.WIDE_NORMED_ROWS if use_norm else decode_matmul.WIDE_ROWS
    assert decode_matmul.tile(rows, inputs, False, use_norm, stacked, 2) == (
        wide_rows, decode_matmul.WIDE_OUTPUTS, decode_matmul.WARPS)
    check_against_plain(dtype, 2, 40, 7 if stacked else 40, use_norm, use_bias, False,
                        use_residual, inputs=inputs, outputs=decode_matmul.WIDE_OUTPUTS + 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("stacked", "sequences", "bound"), [
    (False, 2, "WIDE_MLP_MAX_ROWS"),
    (True, 2, "WIDE_STACKED_MLP_MAX_ROWS"),
    (False, 1, "WIDE_MLP_MAX_ROWS_ONE_SEQUENCE"),
    (True, 1, "WIDE_MLP_MAX_ROWS_ONE_SEQUENCE"),
])
def test_gate_up_takes_the_wide_tile_up_to_the_mlp_rows(dtype, stacked, sequences, bound,
                                                        monkeypatch):
    """Gate/up (norm, SwiGLU, biases) takes the wide tile up to
    ``WIDE_MLP_MAX_ROWS_ONE_SEQUENCE`` rows in one sequence's pass, and in several
    sequences' up to ``WIDE_MLP_MAX_ROWS`` over plain weights or
    ``WIDE_STACKED_MLP_MAX_ROWS`` over a drafter's stacked ones, and the small tile past them
    (the three bounds lowered here, and set apart so that the wrong one fails)."""
    monkeypatch.setattr(decode_matmul, "MAX_PASS_ROWS", 8)
    bounds = ["WIDE_MLP_MAX_ROWS", "WIDE_STACKED_MLP_MAX_ROWS", "WIDE_MLP_MAX_ROWS_ONE_SEQUENCE"]
    for name in bounds:
        monkeypatch.setattr(decode_matmul, name, 88 if name != bound else 80)
    wide = (decode_matmul.WIDE_SWIGLU_ROWS, decode_matmul.WIDE_OUTPUTS)
    assert decode_matmul.tile(80, 48, True, True, stacked, sequences)[:2] == wide
    small = (decode_matmul.ROWS_PER_BLOCK, decode_matmul.OUTPUTS_PER_BLOCK)
    assert decode_matmul.tile(81, 48, True, True, stacked, sequences)[:2] == small
    length = 80 // sequences
    check_against_plain(dtype, sequences, length, 7 if stacked else length, True, True, True,
                        False, inputs=48, outputs=decode_matmul.WIDE_OUTPUTS + 16)


def check_against_plain(dtype, sequences, length, start, use_norm, use_bias, swiglu,
                        use_residual, inputs, outputs):
    gen = torch.Generator().manual_seed(sequences * 100 + length + start)
    width = 2 * outputs if swiglu else outputs
    stacked = start < length
    rows = sequences * length
    x = torch.randn(rows, inputs, generator=gen).to(dtype)
    weight = (torch.randn(2 * width if stacked else width, inputs, generator=gen)
              / inputs**0.5).to(dtype)
    norm_weight = (torch.rand(inputs, generator=gen) + 0.5).to(dtype) if use_norm else None
    bias = torch.randn(weight.shape[0], generator=gen).to(dtype) if use_bias else None
    residual = torch.randn(rows, outputs, generator=gen).to(dtype) if use_residual else None
    adapted = width if stacked else 0
    args = (x, weight, norm_weight, bias, residual, swiglu)
    got = decode_matmul.decode_matmul(*args, 1e-5, length, start, adapted)
    expected = plain(*args, length, start, adapted)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (rows, outputs)
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.fixture
def matmuls_on_cpu(monkeypatch):
    """Let drafting passes take the fused path on the CPU (the interpreter), counting its
    calls by rows."""
    return kernel_on_cpu(monkeypatch, decode_matmul, "decode_matmul", MAX_PASS_ROWS=4096)


def drafting_pass_logits(model, sequences: int = 2):
    """Logits of a drafting pass (block size 4, proposals for 0 and 1 accepted drafts) over
    random caches, for two sequences (or the first of them)."""
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(model.cfg, sequences, 16, 12, torch.float32, "cpu")
    for buffer in cache.k + cache.v:
        buffer.copy_(torch.randn(buffer.shape, generator=gen))
    drafts = torch.randint(0, 8, (2, 4), generator=gen)[:sequences]
    layout = decode_layout(torch.tensor([3, 5])[:sequences], drafts, [0, 1], 4, 16,
                           model.cfg.mask_id)
    with torch.inference_mode(), model.decode_weights():
        return model(layout, cache)


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmoe"])
def test_a_drafting_pass_with_fused_matmuls_gives_the_plain_logits(family, matmuls_on_cpu,
                                                                   monkeypatch):
    """Biases (qwen2), experts (olmoe: attention fused, experts plain), with and without
    mask-row adapters (stacked weights, the mask rows reading the adapted half)."""
    check_fused_logits(decode_matmul, drafting_pass_logits, family, matmuls_on_cpu,
                       monkeypatch, tol=1e-4)


def test_drafting_with_fused_matmuls_gives_the_same_tokens(matmuls_on_cpu, monkeypatch):
    """Greedy `lossless` with mask-row adapters decodes the same tokens, pass for pass, with
    its drafting passes fused; the plain layers decode as before when it is off."""
    model = with_row_lora(tiny_model("llama", vocab=16, seed=5))
    prompts = [torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 3)]
    cfg = DecodeConfig(sampler="lossless", block_size=4, proposals=(0, 1, 2),
                       max_new_tokens=12)
    got, stats = Engine(model).generate(prompts, cfg)
    assert matmuls_on_cpu
    with monkeypatch.context() as plain_only:
        plain_only.setattr(decode_matmul, "DEVICES", ())
        expected, expected_stats = Engine(model).generate(prompts, cfg)
    assert got == expected
    assert stats.passes == expected_stats.passes


def test_thread_blocks_that_overflow_shared_memory_are_counted():
    """The H100 refused SmolLM2's gate/up (576 inputs) in float32: 294,912 bytes of shared
    memory against 232,448 a thread block may have (session 28), so ``supported`` leaves it
    to the plain layers. Its gate/up and down (1,536 inputs) in bfloat16 ran there."""
    limit = 232448
    assert decode_matmul.shared_bytes(576, True, 4) == 294912
    assert decode_matmul.shared_bytes(576, True, 2) <= limit
    assert decode_matmul.shared_bytes(1536, False, 2) <= limit
    assert decode_matmul.shared_bytes(1536, False, 4) > limit


class RefusingKernel:
    """``_matmul_kernel`` as a device that refuses thread blocks of more than ``outputs``
    outputs or ``rows`` rows (Triton raises ``OutOfResources`` before launching), counting
    the tiles tried as (rows, outputs)."""

    def __init__(self, kernel, outputs: int, rows: int = 4096):
        self.kernel, self.outputs, self.rows, self.tried = kernel, outputs, rows, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            block = kwargs["BLOCK_M"], kwargs["BLOCK_N"]
            self.tried.append(block)
            if block[0] > self.rows or block[1] > self.outputs:
                raise OutOfResources(block[0] * block[1] * 100, 232448, "shared memory")
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_a_refused_wide_tile_halves_its_outputs(monkeypatch):
    """A wide tile the device refuses runs with half its outputs, and later calls start
    there; a small tile refused is an error (``supported`` should have said no)."""
    monkeypatch.setattr(decode_matmul, "MAX_PASS_ROWS", 8)
    monkeypatch.setattr(decode_matmul, "_REFUSED", set())
    refusing = RefusingKernel(decode_matmul._matmul_kernel, decode_matmul.OUTPUTS_PER_BLOCK)
    monkeypatch.setattr(decode_matmul, "_matmul_kernel", refusing)
    for _ in range(2):
        check_against_plain(torch.float32, 2, 40, 7, True, False, False, False, inputs=48,
                            outputs=80)
    rows = decode_matmul.WIDE_NORMED_ROWS
    wide, small = decode_matmul.WIDE_OUTPUTS, decode_matmul.OUTPUTS_PER_BLOCK
    assert refusing.tried == [(rows, wide), (rows, small), (rows, small)]
    refusing.outputs = small // 2
    with pytest.raises(OutOfResources):
        check_against_plain(torch.float32, 2, 4, 1, True, False, False, False, inputs=48,
                            outputs=80)


def test_a_wide_tile_refused_at_every_width_gives_way_to_the_small_tile(monkeypatch):
    """Gate/up's wide tile (64 rows) on a device that refuses more than 16 rows a thread
    block: both its widths refused, the pass runs in the small tile, with the plain result;
    later calls go straight there."""
    monkeypatch.setattr(decode_matmul, "MAX_PASS_ROWS", 8)
    monkeypatch.setattr(decode_matmul, "_REFUSED", set())
    small_rows, small = decode_matmul.ROWS_PER_BLOCK, decode_matmul.OUTPUTS_PER_BLOCK
    refusing = RefusingKernel(decode_matmul._matmul_kernel, 4096, rows=small_rows)
    monkeypatch.setattr(decode_matmul, "_matmul_kernel", refusing)
    for _ in range(2):
        check_against_plain(torch.float32, 2, 40, 7, True, True, True, False, inputs=48,
                            outputs=80)
    rows, wide = decode_matmul.WIDE_SWIGLU_ROWS, decode_matmul.WIDE_OUTPUTS
    assert rows > small_rows
    assert refusing.tried == [(rows, wide), (rows, small), (small_rows, small),
                              (small_rows, small)]


@pytest.mark.parametrize(("stacked", "sequences"), [(False, 2), (True, 2), (False, 1),
                                                   (True, 1)])
def test_wide_passes_are_taken_by_the_projections_that_gain(stacked, sequences, monkeypatch):
    """SmolLM2's shapes: for several sequences up to ``WIDE_MLP_MAX_ROWS`` rows (192:
    batch 4 at two proposed blocks) over plain weights and ``WIDE_STACKED_MLP_MAX_ROWS``
    (160: batch 2 at four) over a drafter's stacked ones, for one sequence up to
    ``MAX_WIDE_ROWS`` (288) over either (272: every block proposed), every projection goes
    to the kernel; past them q/k/v and o do, gate/up (SwiGLU) and down (1,536 inputs) stay
    plain; and past ``MAX_WIDE_ROWS`` all stay plain."""
    monkeypatch.setattr(decode_matmul, "DEVICES", ("cpu",))
    wide = decode_matmul.MAX_WIDE_ROWS
    assert wide == 288
    most = {(False, 2): 192, (True, 2): 160, (False, 1): wide, (True, 1): wide}[stacked, sequences]

    def taken(rows, outputs, inputs, swiglu=False):
        outputs *= 1 + stacked
        return decode_matmul.supported(torch.zeros(rows, inputs), torch.zeros(outputs, inputs),
                                       swiglu, stacked, sequences)

    for rows in (96, 144, 272, most + 1):  # the small tile, then the wide one
        if rows > wide:
            continue
        assert taken(rows, 960, 576) and taken(rows, 576, 576)
        mlp = rows <= most
        assert taken(rows, 3072, 576, True) == mlp and taken(rows, 576, 1536) == mlp
    assert not taken(wide + 1, 960, 576) and not taken(wide + 1, 3072, 576, True)


@pytest.mark.parametrize(("adapters", "sequences", "bounds", "per_layer"), [
    (False, 2, (0, 4096, 4096), 2),  # q/k/v and o
    (False, 2, (4096, 0, 0), 4),     # and gate/up and down
    (True, 2, (4096, 0, 4096), 2),   # over a drafter's stacked weights, several sequences
    (True, 2, (0, 4096, 0), 4),
    (False, 1, (4096, 4096, 0), 2),  # one sequence, plain or stacked weights
    (False, 1, (0, 0, 4096), 4),
    (True, 1, (4096, 4096, 0), 2),
    (True, 1, (0, 0, 4096), 4),
])
def test_a_wide_drafting_pass_gives_the_plain_logits(adapters, sequences, bounds, per_layer,
                                                     matmuls_on_cpu, monkeypatch):
    """Past ``MAX_PASS_ROWS`` a drafting pass runs q/k/v and o in the wide tile and, within
    ``WIDE_MLP_MAX_ROWS_ONE_SEQUENCE`` rows for one sequence (for several
    ``WIDE_MLP_MAX_ROWS``, with adapters ``WIDE_STACKED_MLP_MAX_ROWS``), gate/up and down, the
    rest as plain layers (``WIDE_MAX_INPUTS`` set to the tiny model's width, as SmolLM2's
    down has more inputs than it), with the plain layers' logits. Each case sets the bound
    it should read apart from the other two, so that reading the wrong one fails."""
    model = tiny_model("llama", vocab=8, seed=3)
    if adapters:
        model = with_row_lora(model)
    monkeypatch.setattr(decode_matmul, "MAX_PASS_ROWS", 0)
    monkeypatch.setattr(decode_matmul, "WIDE_MAX_INPUTS", model.cfg.dim)
    for name, rows in zip(("WIDE_MLP_MAX_ROWS", "WIDE_STACKED_MLP_MAX_ROWS",
                           "WIDE_MLP_MAX_ROWS_ONE_SEQUENCE"), bounds, strict=True):
        monkeypatch.setattr(decode_matmul, name, rows)
    with monkeypatch.context() as plain_only:
        plain_only.setattr(decode_matmul, "DEVICES", ())
        expected = drafting_pass_logits(model, sequences)
    matmuls_on_cpu.clear()
    torch.testing.assert_close(drafting_pass_logits(model, sequences), expected, atol=1e-4,
                               rtol=1e-4)
    assert len(matmuls_on_cpu) == per_layer * model.cfg.n_layers
