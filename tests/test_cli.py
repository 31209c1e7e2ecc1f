"""The command line on the embedded default: greedy output equals transformers' generate,
lossless equals ar, and every input a user can get wrong is one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from tidar.cli import main
from tidar.engine import DecodeConfig, Engine
from tidar.generate import encode_prompt, stop_ids
from tidar.loading import load_model

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "List three colours.",
]


@pytest.fixture(scope="module")
def default(default_gguf):
    return load_model(None)


def test_ar_equals_transformers_generate(default):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default.source, dtype=torch.float32).eval()
    engine = Engine(default.model, stop_ids(default))
    for prompt in PROMPTS:
        ids = encode_prompt(default.tokenizer, prompt, raw=False)
        ours, _ = engine.generate([ids], DecodeConfig(sampler="ar", max_new_tokens=24))
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=list(stop_ids(default)), pad_token_id=2)
        assert ours[0] == ref[0, len(ids):].tolist()


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_lossless_equals_ar(default, capsys):
    common = ["--max-new-tokens", "20", "--json"]
    code, out, _ = _run(capsys, "generate", PROMPTS[0], "--sampler", "ar", *common)
    assert code == 0
    ar = json.loads(out)
    for drafter in ([], ["--proposals", "4", "--block-size", "4"]):
        code, out, _ = _run(capsys, "generate", PROMPTS[0], "--sampler", "lossless",
                            *drafter, *common)
        assert code == 0
        result = json.loads(out)
        assert result["token_ids"] == ar["token_ids"]
        for key in ("text", "num_tokens", "passes", "tokens_per_pass", "seconds",
                    "tokens_per_second", "sampler"):
            assert key in result
        assert result["tokens_per_pass"] >= 1.0


def test_generate_streams_text_and_summary(default, capsys):
    code, out, err = _run(capsys, "generate", PROMPTS[1], "--sampler", "ar",
                          "--max-new-tokens", "12", "--compare")
    assert code == 0 and out.strip()
    assert "tokens/pass" in err and "identical to ar" in err


def test_compare_times_runners_past_their_first_two_uses(default, capsys, monkeypatch):
    """On the GPU a runner's first use prefills eagerly and its second starts by a join graph
    it captures then: --compare warms each configuration up twice before timing it."""
    calls = []
    stream = Engine.stream

    def recorded(self, prompts, cfg, *args, **kwargs):
        calls.append(cfg.sampler)
        return stream(self, prompts, cfg, *args, **kwargs)

    monkeypatch.setattr(Engine, "stream", recorded)
    code, _, _ = _run(capsys, "generate", PROMPTS[1], "--proposals", "1", "--block-size", "4",
                      "--max-new-tokens", "12", "--compare", "--json")
    assert code == 0
    assert calls[-2:] == ["lossless", "ar"]  # the timed runs
    assert calls[:-2].count("lossless") >= 2 and calls[:-2].count("ar") >= 2


def test_compare_of_sampled_output_names_the_draws(default, capsys):
    """Sampled lossless output is ar's distribution, not ar's draws: --compare says so
    instead of reporting a difference as an error."""
    code, _, err = _run(capsys, "generate", PROMPTS[1], "--temperature", "1.5",
                        "--proposals", "1", "--block-size", "4", "--max-new-tokens", "12",
                        "--compare")
    assert code == 0 and ("same distribution" in err or "identical to ar" in err)
    assert "DIFFERENT" not in err


def test_stop_string_ends_generation(default, capsys):
    common = ["--sampler", "lossless", "--proposals", "2", "--block-size", "4",
              "--max-new-tokens", "24", "--json"]
    code, out, _ = _run(capsys, "generate", PROMPTS[0], *common)
    full = json.loads(out)
    stop = full["text"][len(full["text"]) // 2 :][:6]
    assert stop.strip()
    code, out, _ = _run(capsys, "generate", PROMPTS[0], *common, "--stop", stop)
    cut = json.loads(out)
    assert code == 0
    assert cut["text"] == full["text"][: full["text"].find(stop)]
    assert cut["token_ids"] == full["token_ids"][: cut["num_tokens"]]
    assert cut["num_tokens"] < full["num_tokens"]
    code, out, _ = _run(capsys, "generate", PROMPTS[0], "--sampler", "ar",
                        "--max-new-tokens", "24", "--stop", stop)
    assert out.rstrip("\n") == cut["text"].rstrip("\n") and stop not in out


def test_info(default, capsys):
    code, out, _ = _run(capsys, "info")
    assert code == 0 and "llama" in out and "134515008" in out
    lines = {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines()}
    assert lines["drafter"].endswith("smollm2-135m-instruct.safetensors")  # the shipped one
    assert lines["drafter_mode"] == "frozen-ar, block size 16, LoRA rank 48"
    assert lines["drafter_for_this_model"] == "yes"
    assert lines["drafter_calibration"].startswith("1.594 tokens per pass on 8 prompts")


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "/no/such/model"], "does not exist"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--temperature", "nan"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top-p"),
        (["generate", "hi", "--max-new-tokens", "9000"], "context"),
        (["generate", "hi", "--sampler", "fast"], "invalid choice"),
        (["generate", "hi", "--beta", "2", "--sampler", "mix"], "beta"),
        (["generate", "hi", "--block-size", "1", "--proposals", "1"], "block-size"),
        (["generate", "hi", "--proposals", "many"], "proposals"),
        (["generate", "hi", "--block-size", "0"], "block-size"),  # not "the drafter's"
        (["generate", "hi", "--proposals", "0"], "proposals"),
        (["generate", "hi", "--proposals", "9", "--block-size", "4"], "proposals"),
        (["generate", "hi", "--drafter", "/no/such/drafter"], "does not exist"),
        (["generate", "hi", "--stop", ""], "--stop"),  # before loading and tuning
        (["generate"], "required"),
    ],
)
def test_bad_input_is_one_line(default, capsys, args, message):
    code, out, err = _run(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tidar: error:") and message in lines[0]


def test_corrupt_gguf_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, _, err = _run(capsys, "info", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("sampler", "beta", "expected", "notice"), [
    ("mix", None, 0.7, False),  # mix's default
    ("mix", 0.4, 0.4, False),
    ("lossless", 0.4, 1.0, True),  # --beta with another sampler: said, then ignored
    ("lossless", None, 1.0, False),
])
def test_beta_belongs_to_mix(sampler, beta, expected, notice, capsys):
    import argparse

    from tidar.generate import decode_config

    args = argparse.Namespace(block_size=None, proposals=None, sampler=sampler, beta=beta,
                              temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=4, seed=0)
    assert decode_config(args, 4).beta == expected
    assert ("--beta applies to --sampler mix" in capsys.readouterr().err) == notice


def test_tuner_summary_in_words():
    from tidar.generate import tuner_summary

    drafting = {"choice": "lossless", "block_size": 16, "proposals": 1,
                "expected_tokens_per_pass": 1.558, "expected_speedup": 1.157,
                "shapes_measured": [1, 32, 48]}
    assert tuner_summary(drafting) == (
        "lossless, block size 16, 1 proposal block: expected 1.558 tokens per pass, 1.157x ar "
        "(pass costs measured for 1, 32, 48 queries)")
    ar = drafting | {"choice": "ar", "block_size": 1, "proposals": 0, "shapes_measured": [1]}
    assert tuner_summary(ar).startswith("ar (no drafting setting was expected to beat it by 10%")


def test_help_lists_defaults(capsys):
    """Options show their defaults (0 included, lists as typed), once, and none where there
    is none."""
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "at most (default: 16)" in text and "--port PORT (default: 8000)" in text
    assert "--seed SEED (default: 0)" in text and text.count("(default: True)") == 1
    assert "--drafter DRAFTER drafter checkpoint from `tidar convert` (default: the" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        main(["data", "code", "--help"])
    assert "(default: .py .md .rst)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", [
    ["convert", "--data", "x.txt", "--model", "/no/such/model"],
    ["bench", "--model", "/no/such/model"],
    ["data", "code", "--packages", "tidar"],
    ["data", "synth", "--model", "/no/such/model"],
])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(command, tmp_path, capsys):
    """Checked before the model loads: a file in the way, or a directory that cannot be made."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out, message in [(blocker, "exists and is not a directory"),
                         (blocker / "run", "cannot be written")]:
        code, _, err = _run(capsys, *command, "--out", str(out))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], err
