"""``tidar calibrate`` on a tiny model: it stores what ``measure_acceptance`` measures, in
the drafter it names or a copy, whatever the batch size, and bad input is one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import repeating_doc, tiny_model_dir

from tidar.cli import main
from tidar.drafter import apply_drafter, read_drafter
from tidar.generate import encode_prompt, stop_ids
from tidar.loading import load_model
from tidar.train import TrainConfig, measure_acceptance, train
from tidar.tuner import Acceptance

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, a drafter for it (block size 4) trained to draft repeated patterns, and
    a file of such prompts."""
    root = tmp_path_factory.mktemp("calibrate")
    model_dir = tiny_model_dir(root / "model", seed=0)
    rng = random.Random(0)
    data = root / "repeat.jsonl"
    data.write_text("".join(json.dumps({"text": repeating_doc(rng, 48)}) + "\n"
                            for _ in range(300)))
    run = train(TrainConfig(out=str(root / "run"), data=[str(data)], model=str(model_dir),
                            block_size=4, seq_len=32, batch_size=16, steps=40, lr=3e-3,
                            warmup=10, dtype="float32", eval_every=1000, lora_rank=4,
                            lora_alpha=4, save_every=40, seed=0), progress=False)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(repeating_doc(rng, 6) for _ in range(5)))
    return model_dir, Path(run["drafter"]), prompts


def _calibrate(capsys, setup, *extra) -> tuple[int, str, str]:
    model_dir, drafter, prompts = setup
    code = main(["calibrate", "--model", str(model_dir), "--drafter", str(drafter),
                 "--prompt-set", str(prompts), "--max-new-tokens", "24", "--device", "cpu",
                 *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_calibrate_stores_the_measurement_in_a_copy(setup, tmp_path, capsys):
    model_dir, drafter, prompts = setup
    out = tmp_path / "calibrated.safetensors"
    before = drafter.read_bytes()
    code, printed, err = _calibrate(capsys, setup, "--out", str(out), "--json",
                                    "--batch-size", "2")
    assert code == 0 and f"calibration written to {out}" in err
    assert drafter.read_bytes() == before  # the drafter named is left as it was

    loaded = load_model(str(model_dir))
    apply_drafter(loaded.model, drafter, loaded.fingerprint)
    ids = [encode_prompt(loaded.tokenizer, line, raw=False)
           for line in prompts.read_text().splitlines()]
    expected = measure_acceptance(loaded.model, ids, stop_ids(loaded), 4, max_new_tokens=24)
    measured = json.loads(printed)
    assert measured["eval/tokens_per_pass"] > 1.2  # drafts are accepted: something to measure
    for key, value in expected.items():  # batches of 2 and of all 5 decode alike
        assert measured[key] == json.loads(json.dumps(value))

    tensors, info = read_drafter(out, loaded.fingerprint)
    original, _ = read_drafter(drafter)
    assert all(torch.equal(tensors[k], original[k]) and tensors[k].dtype == original[k].dtype
               for k in original)
    assert info.extra["calibration"]["prompts"] == 5
    acceptance = Acceptance.of_drafter(info)
    assert acceptance.reach == pytest.approx(expected["eval/acceptance_by_position"])
    assert {str(n): m for n, m in acceptance.by_proposals.items()} == \
        measured["eval/tokens_per_pass_by_proposals"]


def _info(capsys, model_dir, drafter) -> dict[str, str]:
    assert main(["info", str(model_dir), "--drafter", str(drafter)]) == 0
    return {line.split()[0]: " ".join(line.split()[1:])
            for line in capsys.readouterr().out.splitlines()}


def test_info_describes_the_drafter_and_its_calibration(setup, tmp_path, capsys):
    model_dir, drafter, prompts = setup
    before = _info(capsys, model_dir, drafter)
    assert before["drafter_mode"] == "frozen-ar, block size 4, LoRA rank 4"
    assert before["drafter_training"] == "40 steps, 20,480 clean tokens in its last run"
    assert before["drafter_for_this_model"] == "yes"
    assert before["drafter_calibration"] == "none (`tidar calibrate` measures one)"
    out = tmp_path / "calibrated.safetensors"
    assert _calibrate(capsys, setup, "--out", str(out))[0] == 0
    after = _info(capsys, model_dir, out)["drafter_calibration"]
    assert after.startswith("1.") and "on 5 prompts (cpu, float32)" in after
    other = tiny_model_dir(tmp_path / "other", seed=1)
    assert _info(capsys, other, drafter)["drafter_for_this_model"].startswith("no (trained for")


def test_calibrate_in_place_and_dry_run(setup, tmp_path, capsys):
    _, drafter, prompts = setup
    copy = tmp_path / "d.safetensors"
    copy.write_bytes(drafter.read_bytes())
    code, _, err = _calibrate(capsys, (setup[0], copy, prompts), "--dry-run")
    assert code == 0 and "tokens per pass with every proposal block" in err
    assert copy.read_bytes() == drafter.read_bytes()
    code, _, _ = _calibrate(capsys, (setup[0], copy, prompts), "--num-prompts", "2")
    assert code == 0 and read_drafter(copy)[1].extra["calibration"]["prompts"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-new-tokens", "4"], "at least the block size + 1 (5)"),
    (["--max-new-tokens", "300"], "exceeds the model's context of 256"),  # before decoding
    (["--out", "."], "is a directory"),
    (["--out", "/dev/null/drafter.safetensors"], "cannot be written"),  # checked before work
    (["--prompt-set", "/no/such/prompts.txt"], "does not exist"),
    (["--drafter", "/no/such/drafter.safetensors"], "does not exist"),
])
def test_bad_input_is_one_line(setup, capsys, extra, message):
    code, _, err = _calibrate(capsys, setup, *extra)
    *said, last = err.strip().splitlines()
    assert code == 2 and last.startswith("tidar: error:") and message in last, err
    assert all(line.startswith("tidar: calibrating") for line in said), err  # no traceback


def test_a_model_without_a_shipped_drafter_needs_one(setup, capsys):
    code = main(["calibrate", "--model", str(setup[0]), "--device", "cpu", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "pass --drafter FILE" in err


@pytest.mark.parametrize("model", [[], ["--model", "smollm2-135m-instruct"]])
def test_the_shipped_drafter_is_not_written_in_place(model, capsys):
    """Refused before anything loads (the embedded default is not needed to see it)."""
    assert main(["calibrate", *model]) == 2
    assert "pass --out FILE" in capsys.readouterr().err
