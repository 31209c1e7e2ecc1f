"""The Triton split-KV decode attention (``tidar.decode_attention``), run in Triton's CPU
interpreter (``conftest.py``), against SDPA with the same dense mask. The interpreter's bf16
matmul is broken, so these cover float32 and float16; bf16 is checked on the GPU
(``benchmarks/gpu_exactness.py`` decodes through the kernel)."""

from __future__ import annotations

import pytest
import torch

decode_attention_module = pytest.importorskip("tidar.decode_attention")
from tidar.model import dense_attention  # noqa: E402


def decode_pass_mask(batch: int, queries: int, slots: int, gen) -> torch.Tensor:
    """Each row sees its committed prefix plus a growing verify window; the last queries also
    see a scratch block at the end of the cache (a proposal block), and one row's horizon
    leaves whole key slices unseen."""
    committed = torch.randint(1, slots // 2, (batch,), generator=gen)
    horizon = committed[:, None] + torch.arange(queries) % 5
    mask = torch.arange(slots) <= horizon[..., None]
    mask[:, -min(queries, 3):, slots - 4:] = True
    return mask[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "queries", "slots"), [
    (1, 9, 3, 1, 1100),    # the AR step: three folded rows, five key slices, the last partial
    (2, 6, 2, 17, 300),    # a block plus one, a cache that is not whole slices
    (1, 4, 4, 40, 130),    # no grouping, rows past one tile
    (3, 8, 1, 5, 64),      # every query head on one KV head, a single slice
])
def test_matches_sdpa(dtype, batch, heads, kv_heads, queries, slots):
    gen = torch.Generator().manual_seed(batch * 1000 + queries * 10 + heads)
    q = torch.randn(batch, heads, queries, 32, generator=gen).to(dtype)
    k = (torch.randn(batch, kv_heads, slots, 32, generator=gen) * 3).to(dtype)
    v = torch.randn(batch, kv_heads, slots, 32, generator=gen).to(dtype)
    mask = decode_pass_mask(batch, queries, slots, gen)
    out = decode_attention_module.decode_attention(q, k, v, mask)
    expected = dense_attention(q.float(), k.float(), v.float(), mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    assert out.dtype == dtype and out.shape == q.shape
    # laid out [B, T, H, D]: merging the heads after the transpose back is a view
    assert out.transpose(1, 2).is_contiguous()


def test_strided_inputs_and_a_broadcast_mask():
    """q as the model passes it (a transposed view), a cache slice, values with a strided last
    dimension, a mask shared by the batch."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 4, 16, generator=gen).transpose(1, 2)  # [B, H=4, T=3, D]
    cache = torch.randn(2, 2, 2, 96, 32, generator=gen)
    k, v = cache[:, 0, ..., :16], cache[:, 1, ..., ::2]
    mask = (torch.arange(96) <= torch.tensor([40, 41, 90])[:, None])[None, None]
    mask = mask.expand(2, 1, 3, 96)
    out = decode_attention_module.decode_attention(q, k, v, mask)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("batch", "kv_heads", "rows", "slots"), [
    (1, 3, 3, 1536), (1, 3, 816, 1536), (64, 3, 51, 1536), (64, 3, 816, 1536), (4, 8, 8, 100),
    (1, 3, 3, 4352), (4, 3, 3, 8448)])
def test_plan_fills_the_gpu_with_whole_steps(batch, kv_heads, rows, slots):
    module = decode_attention_module
    block_m, chunk = module.plan(batch, kv_heads, rows, slots)
    shortest = module.MIN_CHUNK
    if rows <= module.FEW_ROWS:  # one row tile: short slices, but not too many of them
        assert -(-slots // chunk) <= module.FEW_ROWS_MAX_SLICES
        shortest = max(module.FEW_ROWS_MIN_CHUNK,
                       module.BLOCK_N * -(-slots // (module.BLOCK_N * module.FEW_ROWS_MAX_SLICES)))
    assert block_m >= min(rows, 16) and chunk % module.BLOCK_N == 0
    assert min(slots, shortest) <= chunk < slots + module.BLOCK_N
    programs = batch * kv_heads * -(-rows // block_m) * -(-slots // chunk)
    # slices shrink until the grid is full or a slice is as short as allowed
    assert programs >= module.TARGET_PROGRAMS or chunk <= shortest
    # and no further: twice the slice would leave the grid short of the target
    if chunk < slots:
        assert programs // 2 < module.TARGET_PROGRAMS


def test_compiles_as_one_opaque_op():
    """Compiled blocks call the kernel as an external op; its fake gives the real layout, so
    the view that merges the heads still compiles and matches eager."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 2, 16, generator=gen)
    k, v = torch.randn(2, 1, 2, 70, 16, generator=gen)
    mask = torch.ones(1, 1, 2, 70, dtype=torch.bool)

    def merged(q, k, v, mask):
        return decode_attention_module.decode_attention(q, k, v, mask).transpose(1, 2).view(
            1, 2, 64)

    compiled = torch.compile(merged, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, mask), merged(q, k, v, mask))


def test_engine_decodes_through_the_kernel_exactly(monkeypatch):
    """The engine's own masks (prefill, verify/propose, partial proposal sets) through the
    kernel, as on CUDA: greedy ``lossless`` equals ``ar``, and both equal the SDPA path."""
    from helpers import tiny_model

    import tidar.model
    from tidar.engine import DecodeConfig, Engine

    model = tiny_model("qwen3", vocab=8, seed=1)  # 16-wide heads, which the kernel takes
    prompts = [[2, 3, 4], [5, 6, 7, 2, 3], [4]]
    configs = [DecodeConfig(sampler="ar", max_new_tokens=12),
               DecodeConfig(block_size=4, max_new_tokens=12),
               DecodeConfig(block_size=4, proposals=(0, 2), max_new_tokens=12)]
    with torch.inference_mode():
        sdpa = [Engine(model).generate(prompts, cfg)[0] for cfg in configs]
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return decode_attention_module.decode_attention(*args)

    monkeypatch.setattr(tidar.model, "dense_attention_kernel", lambda q, k: "triton")
    monkeypatch.setattr(tidar.model, "decode_attention", counted)
    with torch.inference_mode():
        kernel = [Engine(model).generate(prompts, cfg)[0] for cfg in configs]
    # query counts: AR steps, the prefill with its mask block, partial and full passes
    assert {shape[2] for shape in calls} >= {1, 9, 12, 20}
    assert kernel == sdpa
    assert kernel[1] == kernel[0] and kernel[2] == kernel[0]


def test_one_key_slice_skips_the_merge(monkeypatch):
    """A cache of one key slice: the slice kernel writes the output itself, exactly what the
    merge kernel would have made of that one slice."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 6, 6, 32, generator=gen)
    k, v = (torch.randn(2, 2, 200, 32, generator=gen) for _ in range(2))
    mask = decode_pass_mask(2, 6, 200, gen)
    assert decode_attention_module.plan(2, 2, 18, 200)[1] >= 200  # one slice
    direct = decode_attention_module.decode_attention(q, k, v, mask)
    monkeypatch.setattr(decode_attention_module, "MERGE_ALWAYS", True)
    merged = decode_attention_module.decode_attention(q, k, v, mask)
    assert torch.equal(direct, merged)
    torch.testing.assert_close(direct, dense_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("merge_all", "elements", "steps"), [
    (True, 8192, "one"), (True, 1024, "several"), (False, 8192, "one per slice")])
def test_merge_steps_give_the_same_attention(monkeypatch, merge_all, elements, steps):
    """The AR step's rows (one tile) over many short slices, merged all in one step, in
    steps of a few slices with a running peak, or one slice a step: the same attention."""
    module = decode_attention_module
    monkeypatch.setattr(module, "FEW_ROWS_MERGE_ALL", merge_all)
    monkeypatch.setattr(module, "MERGE_ELEMENTS", elements)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 6, 2, 32, generator=gen)
    k = torch.randn(1, 2, 700, 32, generator=gen) * 3
    v = torch.randn(1, 2, 700, 32, generator=gen)
    mask = decode_pass_mask(1, 2, 700, gen)
    parts = -(-700 // module.plan(1, 2, 6, 700)[1])
    step = module.merge_plan(6, parts, 32)[1]
    assert parts > 8 and {"one": step >= parts, "several": 1 < step < parts,
                          "one per slice": step == 1}[steps]
    out = module.decode_attention(q, k, v, mask)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


class RefusingKernel:
    """The slice kernel, except that launches with a row tile in ``refused`` raise Triton's
    out-of-resources error, as a GPU whose thread blocks have too little shared memory
    does; ``tiles`` lists the row tile of every launch tried."""

    def __init__(self, kernel, refused):
        self.kernel, self.refused, self.tiles = kernel, refused, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.tiles.append(meta["BLOCK_M"])
            if meta["BLOCK_M"] in self.refused:
                from triton.runtime.errors import OutOfResources
                raise OutOfResources(300000, 232448, "shared memory")
            return self.kernel[grid](*args, **meta)
        return launch


@pytest.mark.parametrize(("refused", "first", "then"), [
    ({64, 32}, [64, 32, 16], [16]),  # halves to the tile that fits, and starts there next time
    ({64, 32, 16}, [64, 32, 16], []),  # nothing fits: SDPA, without trying the kernel again
])
def test_row_tiles_the_device_refuses_halve_then_fall_back_to_sdpa(monkeypatch, refused, first,
                                                                  then):
    module = decode_attention_module
    kernel = RefusingKernel(module._slice_kernel, refused)
    monkeypatch.setattr(module, "_slice_kernel", kernel)
    monkeypatch.setattr(module, "_REFUSED", set())
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 40, 32, generator=gen)  # 40 rows a KV head: 64-row tiles
    k, v = torch.randn(2, 1, 4, 130, 32, generator=gen)
    mask = decode_pass_mask(1, 40, 130, gen)
    expected = dense_attention(q, k, v, mask)
    for tried in (first, then):
        kernel.tiles.clear()
        out = module.decode_attention(q, k, v, mask)
        assert kernel.tiles == tried
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert out.transpose(1, 2).is_contiguous()
