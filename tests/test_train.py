"""Conversion on the CPU: a tiny model learns to draft a predictable language, resumes
exactly, and the frozen-AR mode leaves the AR path bit-identical."""

from __future__ import annotations

import json
import random
import stat
from pathlib import Path

import pytest
import torch
from helpers import EOS, repeating_doc, tiny_model_dir

from tidar import train as train_mod
from tidar.drafter import apply_drafter, read_drafter
from tidar.engine import DecodeConfig, Engine
from tidar.errors import TidarError
from tidar.layouts import causal_layout
from tidar.loading import load_model
from tidar.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    model_dir = tiny_model_dir(root / "model", seed=0)
    rng = random.Random(0)
    data = root / "repeat.jsonl"
    with data.open("w") as f:
        for _ in range(600):
            f.write(json.dumps({"text": repeating_doc(rng)}) + "\n")
    return model_dir, data


def _config(tiny_setup, out, **kw) -> TrainConfig:
    model_dir, data = tiny_setup
    base = dict(
        out=str(out), data=[str(data)], model=str(model_dir), block_size=4, seq_len=32,
        batch_size=16, steps=40, lr=3e-3, warmup=10, dtype="float32", eval_every=1000,
        eval_rows=8, save_every=20, log_every=1, seed=0,
    )
    return TrainConfig(**(base | kw))


def _prompts(n: int = 4) -> list[str]:
    rng = random.Random(123)
    return [repeating_doc(rng, 6) for _ in range(n)]


def _tokens_per_pass(model_dir, drafter=None) -> tuple[float, bool]:
    loaded = load_model(str(model_dir))
    if drafter is not None:
        apply_drafter(loaded.model, drafter, loaded.fingerprint)
    ids = [loaded.tokenizer.encode(p) for p in _prompts()]
    assert all(10 <= t < 20 for row in ids for t in row)
    engine = Engine(loaded.model, (EOS,))
    ar, _ = engine.generate(ids, DecodeConfig(sampler="ar", max_new_tokens=24))
    out, stats = engine.generate(ids, DecodeConfig(block_size=4, max_new_tokens=24))
    return stats.tokens_per_pass, out == ar


def test_full_conversion_learns_to_draft(tiny_setup, tmp_path):
    cfg = _config(tiny_setup, tmp_path / "run", mode="full", lora_rank=0, steps=400, lr=5e-3,
                  save_every=400)
    result = train(cfg, progress=False)
    before, exact_before = _tokens_per_pass(tiny_setup[0])
    after, exact_after = _tokens_per_pass(tiny_setup[0], result["drafter"])
    assert exact_before and exact_after  # lossless stays exact with any drafter
    assert before < 1.3
    # A perfect drafter gives 24 tokens in 7 passes (3.43): prefill, then 4 per pass.
    assert after > 3.0, f"trained drafter gives {after:.2f} tokens per pass (b = 4)"
    losses = [r["diff_loss"] for r in result["history"]]
    assert losses[-1] < 0.5 * losses[0]


def test_frozen_ar_keeps_ar_logits_bit_identical(tiny_setup, tmp_path):
    cfg = _config(tiny_setup, tmp_path / "run", mode="frozen-ar", lora_rank=8, lora_alpha=8,
                  eval_prompts=_prompts(2))
    result = train(cfg, progress=False)
    # The final evaluation's calibration goes into the drafter, for the tuner.
    from tidar.drafter import read_drafter

    extra = read_drafter(result["drafter"])[1].extra
    assert len(extra["acceptance_by_position"]) == 3 and extra["calibration"]["prompts"] == 2
    assert extra["calibration"]["tokens_per_pass"] >= 1.0
    replayed = extra["tokens_per_pass_by_proposals"]  # each proposal count the tuner weighs
    assert sorted(replayed) == ["1", "2", "4"] and all(m[0] >= 1.0 for m in replayed.values())
    original = load_model(str(tiny_setup[0]))
    converted = load_model(str(tiny_setup[0]))
    info = apply_drafter(converted.model, result["drafter"], converted.fingerprint)
    assert info.mode == "frozen-ar"
    adapters = [n for n, _ in converted.model.named_parameters() if "lora_B" in n]
    assert adapters and any(p.abs().sum() > 0 for n, p in converted.model.named_parameters()
                            if "lora_B" in n)
    tokens = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        a = original.model(causal_layout(tokens))
        b = converted.model(causal_layout(tokens))
    assert torch.equal(a, b)


def test_compiled_conversion_follows_the_eager_loss_curve(tiny_setup, tmp_path):
    """``--compile`` on the CPU: frozen-AR's compiled blocks, with the adapted projections'
    own backward traced by dynamo, train as the eager ones do (float32, a few steps)."""
    kw = dict(mode="frozen-ar", lora_rank=4, lora_alpha=8, steps=4, save_every=4)
    eager = train(_config(tiny_setup, tmp_path / "eager", **kw), progress=False)
    compiled = train(_config(tiny_setup, tmp_path / "compiled", compile=True, **kw))
    a = [r["diff_loss"] for r in eager["history"]]
    b = [r["diff_loss"] for r in compiled["history"]]
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert b == pytest.approx(a, rel=1e-4)


def test_resume_reproduces_the_loss_curve(tiny_setup, tmp_path, monkeypatch):
    full = train(_config(tiny_setup, tmp_path / "whole", mode="frozen-ar", lora_rank=4,
                         lora_alpha=4), progress=False)
    real_save = train_mod._save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first checkpoint (step 20)

    monkeypatch.setattr(train_mod, "_save", save_then_die)
    cfg = _config(tiny_setup, tmp_path / "killed", mode="frozen-ar", lora_rank=4, lora_alpha=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(train_mod, "_save", real_save)
    resumed = train(cfg, resume=True, progress=False)
    a = [r["diff_loss"] for r in full["history"]]
    b = [r["diff_loss"] for r in resumed["history"]]
    assert len(a) == len(b) == 40
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 41))


def test_a_runs_checkpoint_and_drafter_get_the_modes_of_its_other_files(tiny_setup, tmp_path):
    """Not safetensors' 0600: the run's state.json, written with ``open``, sets the bar."""
    out = tmp_path / "run"
    result = train(_config(tiny_setup, out, steps=2, save_every=2, lora_rank=4, lora_alpha=4),
                   progress=False)
    plain = stat.S_IMODE((out / "checkpoint" / "state.json").stat().st_mode)
    for path in (out / "checkpoint" / "trainable.safetensors", Path(result["drafter"])):
        assert stat.S_IMODE(path.stat().st_mode) == plain, path


def test_resume_refuses_another_run(tiny_setup, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_setup, out, steps=20, lora_rank=4, lora_alpha=4), progress=False)
    with pytest.raises(TidarError, match="another run"):
        train(_config(tiny_setup, out, steps=20, block_size=8, lora_rank=4, lora_alpha=4),
              resume=True, progress=False)
    with pytest.raises(TidarError, match="no checkpoint"):
        train(_config(tiny_setup, tmp_path / "empty", steps=20), resume=True, progress=False)


def test_resume_reads_a_checkpoint_killed_mid_rename_and_refuses_a_damaged_one(tiny_setup,
                                                                               tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_setup, out, steps=20, lora_rank=4, lora_alpha=4)
    train(cfg, progress=False)
    # killed between the two renames of _write_checkpoint: only checkpoint.old is left
    (out / "checkpoint").rename(out / "checkpoint.old")
    assert len(train(cfg, resume=True, progress=False)["history"]) == 20
    for name, damage in [("state.json", "{bad"), ("trainable.safetensors", "bad")]:
        train(cfg, progress=False)  # a fresh run writes a good checkpoint
        (out / "checkpoint" / name).write_text(damage)
        with pytest.raises(TidarError, match="unreadable"):
            train(cfg, resume=True, progress=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_size": 1}, "block-size"),
        ({"block_size": 32}, "too short"),
        ({"mode": "half"}, "mode"),
        ({"data": []}, "no training data"),
        ({"steps": 0}, "positive"),
        ({"lr": -1.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"lr": float("inf")}, "--lr"),
        ({"weight_decay": float("nan")}, "--weight-decay"),
        ({"warmup": -1}, "--warmup"),
        ({"eval_every": 0}, "--eval-every"),
        ({"save_every": 0}, "--save-every"),
        ({"alpha": -0.5}, "--alpha"),
        ({"lora_rank": -1, "mode": "full"}, "--lora-rank"),
        ({"init_drafter": "/no/such/drafter"}, "does not exist"),
        ({"out": __file__}, "not a directory"),
    ],
)
def test_bad_settings(tiny_setup, tmp_path, change, message):
    change = {"out": tmp_path / "run"} | change
    with pytest.raises(TidarError, match=message):
        train(_config(tiny_setup, **change), progress=False)


@pytest.mark.parametrize("prompt, message", [("", "at least one token"),
                                             ("t10 " * 200, "exceeds the model's context")])
def test_an_unusable_eval_prompt_fails_before_training(tiny_setup, tmp_path, prompt, message):
    """Not at the first evaluation, which may come hours later."""
    out = tmp_path / "run"
    with pytest.raises(TidarError, match=message):
        train(_config(tiny_setup, out, eval_prompts=[prompt]), progress=False)
    assert not (out / "metrics.jsonl").exists()


def test_unusable_data(tiny_setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"text\": \"\"}\n{\"other\": 1}\n")
    with pytest.raises(TidarError):
        train(_config(tiny_setup, tmp_path / "run", data=[str(bad)]), progress=False)


def test_drafter_for_another_base_is_refused(tiny_setup, tmp_path):
    result = train(_config(tiny_setup, tmp_path / "run", steps=20, lora_rank=4, lora_alpha=4),
                   progress=False)
    other = load_model(str(tiny_model_dir(tmp_path / "other", seed=1)))
    with pytest.raises(TidarError, match="another base model"):
        apply_drafter(other.model, result["drafter"], other.fingerprint)


def test_init_drafter_continues_from_its_weights(tiny_setup, tmp_path):
    from safetensors.torch import load_file

    first = train(_config(tiny_setup, tmp_path / "first", steps=20, lora_rank=4, lora_alpha=4),
                  progress=False)
    # lr 0: the new run's parameters stay the drafter's, so its drafter file is the same
    again = train(_config(tiny_setup, tmp_path / "again", steps=2, lr=0.0, lora_rank=4,
                          lora_alpha=4, init_drafter=first["drafter"]), progress=False)
    a, b = load_file(first["drafter"]), load_file(again["drafter"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the continued drafter counts its tokens over both runs
    extras = [read_drafter(r["drafter"])[1].extra for r in (first, again)]
    assert "clean_tokens_total" not in extras[0]
    # no eval prompts given: on the CPU no profile (on a GPU the built-in prompts make one)
    assert "calibration" not in extras[0]
    assert train_mod.default_eval_prompts(torch.device("cpu")) == []
    assert train_mod.default_eval_prompts(torch.device("cuda")) == list(
        train_mod.CALIBRATION_PROMPTS)
    assert extras[1]["clean_tokens"] == 2 * 16 * 32
    assert extras[1]["clean_tokens_total"] == (20 + 2) * 16 * 32
    assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)  # trained, not initial
    with pytest.raises(TidarError, match="LoRA rank"):
        train(_config(tiny_setup, tmp_path / "other", steps=2, lora_rank=8, lora_alpha=8,
                      init_drafter=first["drafter"]), progress=False)


def test_fsdp2_two_processes_match_one(tiny_setup, tmp_path):
    """torchrun with 2 CPU processes (gloo, FSDP2) follows the 1-process loss curve at the
    same global batch: the multi-GPU code path, run where no GPU is."""
    import os
    import subprocess
    import sys

    model_dir, data = tiny_setup
    flags = ["--model", str(model_dir), "--data", str(data), "--block-size", "4",
             "--seq-len", "32", "--batch-size", "8", "--steps", "8", "--lr", "3e-3",
             "--warmup", "10",
             "--mode", "full", "--lora-rank", "0", "--dtype", "float32", "--log-every", "1",
             "--eval-every", "1000", "--save-every", "8"]
    one = train(_config(tiny_setup, tmp_path / "one", mode="full", lora_rank=0, steps=8,
                        batch_size=8, save_every=8), progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "tidar.cli", "convert", "--out", str(tmp_path / "two"), *flags],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    a = [r["diff_loss"] for r in one["history"]]
    b = [r["diff_loss"] for r in two]
    assert len(b) == 8 and b == pytest.approx(a, rel=2e-3)
    assert (tmp_path / "two" / "drafter.safetensors").exists()


@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("train_weight", [True, False])
def test_linear_cross_entropy_matches_autograd(chunk, train_weight):
    """The chunked loss with gradients computed in its forward equals plain cross-entropy
    over full logits with autograd, for the hidden states and (when it trains) the head."""
    from tidar.losses import linear_cross_entropy

    gen = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=train_weight)
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    scale = 0.37  # the loss is used scaled, as a training loss is
    (scale * linear_cross_entropy(hidden, weight, labels, chunk)).backward()
    got = hidden.grad.clone(), None if weight.grad is None else weight.grad.clone()
    hidden.grad, weight.grad = None, None
    expected = torch.nn.functional.cross_entropy(
        (hidden @ weight.T).reshape(-1, 50), labels.reshape(-1), reduction="sum")
    (scale * expected).backward()
    torch.testing.assert_close(got[0], hidden.grad)
    if train_weight:
        torch.testing.assert_close(got[1], weight.grad)
    else:
        assert got[1] is None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, chunk), expected)


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding windows
def test_frozen_ar_objective_equals_the_full_forward(family):
    """Frozen-AR runs the clean half as a cache (causal SDPA, or masks under windows) and the
    mask half after it; its diffusion loss and the gradients of what it trains (adapters, with
    a scale other than 1, and the mask embedding) must equal the one-pass doubled forward's."""
    from helpers import tiny_model

    from tidar.drafter import add_row_lora

    model = tiny_model(family, vocab=16, seed=3, std=0.3)
    add_row_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    tokens = torch.randint(0, 16, (3, 24), generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([0, 2, 3])
    trained = [p for name, p in model.named_parameters() if "lora_" in name or "mask_" in name]
    for p in model.parameters():  # as train.prepare leaves them
        p.requires_grad_(any(p is t for t in trained))

    def loss_and_grads(mode):
        _, diff, _ = train_mod.tidar_losses(model, tokens, 4, offsets, mode)
        return diff.item(), torch.autograd.grad(diff, trained)

    full, full_grads = loss_and_grads("full")
    frozen, frozen_grads = loss_and_grads("frozen-ar")
    assert frozen == pytest.approx(full, rel=1e-5)
    for got, expected in zip(frozen_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_adapted_linear_gradients(bias):
    """Frozen-AR's mask pass runs an adapted projection as one matmul over ``[x, xAᵀ]`` and
    ``[W, B]`` with a backward of its own: autograd's numerical check, float64."""
    from tidar.model import _AdaptedLinear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(7, dtype=torch.float64, generator=gen) if bias else None
    lora_A = torch.randn(2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    lora_B = torch.randn(7, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(_AdaptedLinear.apply, (x, weight, b, lora_A, lora_B))
    expected = x @ weight.T + (x @ lora_A.T) @ lora_B.T + (0 if b is None else b)
    torch.testing.assert_close(_AdaptedLinear.apply(x, weight, b, lora_A, lora_B), expected)


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding windows
def test_flex_attention_tiles_are_autotuned_where_training_uses_flex(family, monkeypatch):
    """``tidar convert --compile`` autotunes flex_attention's tiles exactly where training
    attention runs through it: on CUDA in full mode, and in frozen-AR under sliding windows;
    then the BlockMasks take 64 x 64 tiles, which default kernel tiles would not divide."""
    from helpers import tiny_model

    model = tiny_model(family, vocab=16, seed=0)
    windows = family == "mistral"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train_mod.uses_flex(model, "full", cuda)
    assert train_mod.uses_flex(model, "frozen-ar", cuda) == windows
    assert not train_mod.uses_flex(model, "full", cpu)
    seen = []
    monkeypatch.setattr(type(model.layers[0]), "compile",
                        lambda self, **kwargs: seen.append(kwargs.get("options")))
    train_mod.compile_blocks(model, autotune_attention=True)
    assert model.flex_mask_block == 64
    train_mod.compile_blocks(model)
    assert model.flex_mask_block == 128
    n = len(model.layers)
    assert seen[:n] == [{"max_autotune": True, "max_autotune_gemm_backends": "ATEN"}] * n
    assert seen[n:] == [None] * n


def test_flex_masks_give_the_dense_masks_logits():
    """The model over ``FlexMask``s (flex_attention, compiled, on the CPU) computes the
    logits of its dense masks for the doubled training row, sliding windows included; the
    masks carry the model's kernel choice."""
    from helpers import tiny_model

    from tidar.layouts import key_meta, training_layout

    for family in ("llama", "mistral"):
        model = tiny_model(family, vocab=16, seed=0)
        tokens = torch.randint(0, 16, (2, 24), generator=torch.Generator().manual_seed(0))
        layout = training_layout(tokens, 4, torch.tensor([0, 3]), model.cfg.mask_id)
        keys = key_meta(layout)
        flex = model.masks(layout, keys, flex=True)
        assert {m.backend for m in flex.values()} == {None}
        with torch.no_grad():
            dense_logits = model(layout, masks=model.masks(layout, keys))
            torch.testing.assert_close(model(layout, masks=flex), dense_logits, rtol=1e-5,
                                       atol=1e-4)
        model.flex_backend = "FLASH"
        assert {m.backend for m in model.masks(layout, keys, flex=True).values()} == {"FLASH"}


def test_autocast_keeps_the_residual_stream_in_the_compute_dtype():
    """Full mode on one device keeps float32 weights under bf16 autocast; the hidden states
    between blocks must still be bf16, as under FSDP2's param_dtype (a float32 stream
    doubles the memory traffic of every norm and residual add)."""
    from helpers import tiny_model

    model = tiny_model("llama", vocab=16, seed=3, std=0.3).train()
    seen = []
    for block in model.layers:
        block.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    tokens = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ar, diff, hidden = train_mod.tidar_losses(model, tokens, 4, torch.tensor([0, 1]), "full")
    (ar + diff).backward()
    assert seen and set(seen) == {torch.bfloat16}
    assert hidden.dtype == torch.bfloat16
    assert model.embed_tokens.weight.grad.dtype == torch.float32


def test_evaluations_leave_the_compiled_training_blocks_alone():
    """An in-training evaluation must not make the compiled blocks compile again for the
    training steps after it (each compilation takes seconds on a GPU, and dynamo stops
    compiling a function after 8): only the held-out forward adds one graph, once."""
    from helpers import tiny_model
    from torch._dynamo.testing import CompileCounter

    model = tiny_model("llama", vocab=16, seed=3, std=0.3)
    cfg = TrainConfig(out="", data=["-"], mode="frozen-ar", lora_rank=4, lora_alpha=8,
                      block_size=4, seq_len=32, eval_rows=4)
    train_mod.prepare(model, cfg)
    model.train()
    counter = CompileCounter()
    for block in model.layers:
        block.compile(backend=counter, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 15, (4, 32), generator=gen)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 1]]

    def step():
        tokens = torch.randint(0, 15, (4, 32), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, diff, _ = train_mod.tidar_losses(model, tokens, 4, torch.zeros(4).long(),
                                                "frozen-ar")
        diff.backward()

    step()
    graphs = [counter.frame_count]
    for _ in range(2):
        train_mod.evaluate(model, held_out, cfg, flex=False)
        train_mod.measure_acceptance(model, prompts, (), 4)
        step()
        graphs.append(counter.frame_count)
    assert graphs == [2, 3, 3]  # clean and mask passes; then the held-out forward, once


def test_generate_says_when_a_drafter_has_no_acceptance_profile(tiny_setup, tmp_path, capsys):
    """Without a profile `--proposals auto` cannot expect any draft to be accepted and
    decodes as ar: generate says so, rather than silently never drafting."""
    from tidar.cli import main

    bare = train(_config(tiny_setup, tmp_path / "bare", steps=2, lora_rank=4, lora_alpha=4,
                         eval_prompts=[]), progress=False)
    assert "acceptance_by_position" not in read_drafter(bare["drafter"])[1].extra
    calibrated = train(_config(tiny_setup, tmp_path / "calibrated", steps=2, lora_rank=4,
                               lora_alpha=4, eval_prompts=_prompts(2)), progress=False)
    for result, notice in ((bare, True), (calibrated, False)):
        code = main(["generate", "t11 t12 t13", "--raw", "--model", str(tiny_setup[0]),
                     "--drafter", result["drafter"], "--max-new-tokens", "4"])
        assert code == 0
        assert ("has no acceptance profile" in capsys.readouterr().err) == notice
