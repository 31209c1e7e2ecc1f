"""``tidar bench`` end to end on the CPU: a tiny random Llama, a file prompt set, every method,
two batch sizes; then the inputs a user can get wrong."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
from helpers import tiny_model_dir

from tidar.bench import add_bench_args, batches, read_prompt_file, run_bench
from tidar.errors import TidarError

pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = tiny_model_dir(root / "model")
    rng = random.Random(0)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(
        " ".join(f"t{rng.randrange(10, 40)}" for _ in range(rng.randrange(3, 9)))
        for _ in range(3)) + "\n")
    return model, prompts


def _args(setup, out, *extra):
    model, prompts = setup
    p = argparse.ArgumentParser()
    add_bench_args(p)
    return p.parse_args([
        "--model", str(model), "--device", "cpu", "--dtype", "float32",
        "--prompt-set", str(prompts), "--num-prompts", "3", "--batch-sizes", "1,2",
        "--max-new-tokens", "12", "--block-size", "4", "--betas", "0.5", "--repeats", "2",
        "--pass-repeats", "3", "--out", str(out), *extra,
    ])


def test_bench_end_to_end(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_bench(_args(setup, out)) == 0
    report = json.loads((out / "bench.json").read_text())
    meta = report["meta"]
    assert report["complete"] is True
    assert meta["device_type"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["drafter"].startswith("untrained") and meta["block_size"] == 4
    assert meta["methods"] == ["ar", "hf", "pld", "lossless", "mix@0.5", "auto"]

    rows = {(r["method"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(m, b) for m in ("ar", "hf", "lossless", "mix@0.5", "auto")
                         for b in (1, 2)} \
        | {("pld", 1)}  # prompt lookup: batch 1 only
    for (_, batch), r in rows.items():
        assert r["sequences"] == (3 if batch == 1 else 4)  # ceil(3 / 2) batches of 2
        assert 0 < r["tokens"] <= 12 * r["sequences"]
        assert r["tokens_per_second"] > 0 and r["seconds"] > 0 and r["ttft_ms"] > 0
        assert len(r["seconds_per_repeat"]) == 2
        assert 0.0 <= r["identical_to_ar"] <= 1.0
        assert r["speedup"] is not None and r["speedup"] > 0
    for batch in (1, 2):
        ar = rows["ar", batch]
        assert ar["tokens_per_pass"] == 1.0
        for method in ("ar", "lossless"):  # a batch runs as long as its longest row
            r = rows[method, batch]
            assert r["passes"] <= r["batch_passes"] * batch
            assert r["row_utilisation"] == r["passes"] / (r["batch_passes"] * batch) <= 1.0
        if batch == 1:
            assert rows["lossless", 1]["row_utilisation"] == 1.0
        assert ar["speedup"] == 1.0 and ar["speedup_end_to_end"] == 1.0
        assert ar["identical_to_ar"] == 1.0
        lossless = rows["lossless", batch]
        assert lossless["identical_to_ar"] == 1.0  # fp32 on the CPU: token for token
        assert len(lossless["committed_per_pass_histogram"]) == 4
        assert len(lossless["acceptance_by_position"]) == 3
        assert rows["mix@0.5", batch]["beta"] == 0.5
        # An untrained drafter is never accepted: the tuner must fall back to ar.
        assert rows["auto", batch]["tuner"]["choice"] == "ar"
        assert rows["auto", batch]["sampler"] == "ar"
    assert rows["pld", 1]["forward_calls"] > 0
    assert rows["hf", 1]["identical_to_ar"] == 1.0  # transformers greedy == our ar, fp32

    curve = report["pass_latency"]
    assert [c["batch_size"] for c in curve["curves"]] == [1, 2]
    qs = [p["q_per_sequence"] for p in curve["curves"][0]["points"]]
    assert qs == [1, 8, 12, 20]  # ar; b = 4 with |S| = 1, 2, 4
    assert curve["curves"][0]["points"][0]["relative_to_ar"] == 1.0

    for name in ("speedup_vs_batch.png", "tokens_per_pass_hist.png", "pass_latency.png"):
        path = out / name
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "speedup" in table and "mix@0.5" in table


def test_method_subset_always_keeps_ar(setup, tmp_path):
    out = tmp_path / "out"
    args = _args(setup, out, "--methods", "lossless", "--batch-sizes", "2", "--pass-repeats",
                 "0", "--repeats", "1")
    assert run_bench(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in report["results"]] == ["ar", "lossless"]
    assert report["pass_latency"] is None


def test_stopped_run_keeps_finished_cells(setup, tmp_path, monkeypatch):
    """bench.json is rewritten after each batch size: a run stopped later keeps them."""
    import tidar.bench

    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tidar.bench, "_pass_curve", stop)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_bench(_args(setup, out, "--methods", "ar", "--repeats", "1"))
    report = json.loads((out / "bench.json").read_text())
    assert report["complete"] is False
    assert [(r["method"], r["batch_size"]) for r in report["results"]] == [("ar", 1), ("ar", 2)]
    assert not list(out.glob("*.tmp"))


def test_every_batch_is_decoded_once_before_the_timed_repeats(setup, tmp_path, monkeypatch):
    """The warm-up decodes every batch of prompts with every method (a batch's prefill has
    its own size class and padded length to compile and capture), so the first repeat times
    what the others do."""
    import tidar.bench

    runs, run = [], tidar.bench.run_engine

    def counting(engine, prompts, cfg):
        runs.append((cfg.sampler, tuple(map(tuple, prompts))))
        return run(engine, prompts, cfg)

    monkeypatch.setattr(tidar.bench, "run_engine", counting)
    quick = ("--methods", "ar,lossless", "--batch-sizes", "1", "--pass-repeats", "0")
    assert run_bench(_args(setup, tmp_path / "out", *quick)) == 0
    batches = sorted(set(prompts for _, prompts in runs))
    assert len(batches) == 3  # three prompts, batch size 1
    warm_up = runs[:len(runs) // 3]  # the warm-up and two repeats run alike
    assert sorted(warm_up) == sorted((s, b) for s in ("ar", "lossless") for b in batches)
    assert sorted(runs) == sorted(warm_up * 3)


def test_resume_measures_only_the_missing_cells(setup, tmp_path, monkeypatch):
    """``--resume`` keeps a stopped run's cells and measures the rest; a report made with
    other settings, or one that is not a report, is refused in one line."""
    import tidar.bench

    out = tmp_path / "out"
    quick = ("--methods", "ar", "--repeats", "1", "--pass-repeats", "0")
    assert run_bench(_args(setup, out, *quick, "--batch-sizes", "1")) == 0
    first = json.loads((out / "bench.json").read_text())
    measured, measure = [], tidar.bench._measure_cell

    def counting(methods, engine, eager, hf, groups, *rest):
        measured.append(len(groups[0]))  # the batch size of the cell
        return measure(methods, engine, eager, hf, groups, *rest)

    monkeypatch.setattr(tidar.bench, "_measure_cell", counting)
    assert run_bench(_args(setup, out, *quick, "--batch-sizes", "1,2", "--resume")) == 0
    report = json.loads((out / "bench.json").read_text())
    assert measured == [2] and report["complete"] is True
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    assert report["results"][0] == first["results"][0]
    assert report["meta"]["resumed_from"] == first["meta"]["time"]

    with pytest.raises(TidarError, match="betas"):
        run_bench(_args(setup, out, *quick, "--betas", "0.7", "--resume"))
    (out / "bench.json").write_text("{not json")
    with pytest.raises(TidarError, match="not a bench report"):
        run_bench(_args(setup, out, *quick, "--resume"))


@pytest.mark.parametrize("extra, message", [
    (("--batch-sizes", "0"), "--batch-sizes"),
    (("--batch-sizes", "two"), "--batch-sizes"),
    (("--methods", "ar,eagle"), "unknown method"),
    (("--betas", "1.5"), "--betas"),
    (("--repeats", "0"), "--repeats"),
    (("--prompt-set", "/nonexistent/prompts.txt"), "does not exist"),
    (("--max-new-tokens", "1000"), "context"),
])
def test_bad_inputs_raise(setup, tmp_path, extra, message):
    with pytest.raises(TidarError, match=message):
        run_bench(_args(setup, tmp_path / "out", *extra))


def test_prompt_files_and_batching(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a b"}\n\n{"prompt": "c"}\n')
    assert read_prompt_file(jsonl) == ["a b", "c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(TidarError, match="prompt"):
        read_prompt_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(TidarError, match="no prompts"):
        read_prompt_file(empty)
    assert batches([1, 2, 3], 2, 3) == [[1, 2], [3, 1]]
    assert batches([1, 2, 3], 4, 3) == [[1, 2, 3, 1]]
    assert batches([1, 2, 3], 1, 2) == [[1], [2]]


def test_cli_reports_bad_input_in_one_line(setup, tmp_path, capsys):
    from tidar.cli import main

    model, prompts = setup
    assert main(["bench", "--model", str(model), "--prompts", str(prompts), "--device", "cpu",
                 "--batch-sizes", "1,-4", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tidar: error: --batch-sizes")
    assert main(["bench", "--methods", "ar", "--repeats", "x"]) == 2  # argparse errors too
