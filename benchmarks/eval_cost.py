"""What one in-training evaluation of ``tidar convert`` costs, by part: the held-out losses and
the acceptance measurement (greedy ``lossless`` on the evaluation prompts), on a
SmolLM2-shaped random model with compiled blocks, between frozen-AR training steps as in a run.

    python benchmarks/eval_cost.py --evals 3

Per evaluation: seconds and graphs compiled for the held-out forward, for the acceptance
measurement as the trainer runs it (eager), for the same decode through the compiled training
blocks (how it ran before: each decode shape compiled them again), and for the first training
step after it (a changed guard would compile the training blocks again here).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_json
from train_throughput import build

from tidar.engine import DecodeConfig, Engine
from tidar.train import TrainConfig, evaluate, measure_acceptance


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def compiled_acceptance(model, prompts, cfg) -> dict:
    """``measure_acceptance`` as it ran before: the decode through the compiled blocks."""
    model.eval()
    _, stats = Engine(model).generate(
        prompts, DecodeConfig(block_size=cfg.block_size, max_new_tokens=128))
    model.train()
    return {"eval/tokens_per_pass": stats.tokens_per_pass}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    model, train_step = build("frozen-ar", args.batch, 512, compile_model=True, lora_rank=48)
    cfg = TrainConfig(out="", data=["-"])  # the evaluation's block size, rows and length
    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(40, 120, (args.prompts,), generator=gen)]
    held_out = torch.randint(0, vocab, (cfg.eval_rows, cfg.seq_len), device="cuda")

    def graphs() -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    step_seconds, _ = timed(lambda: [train_step() for _ in range(3)])
    step_seconds, _ = timed(lambda: [train_step() for _ in range(5)])
    rows = []
    for i in range(args.evals):
        row = {"eval": i, "train_step_seconds": step_seconds / 5}
        for part, fn in (
            ("held_out", lambda: evaluate(model, held_out, cfg, flex=True)),
            ("acceptance", lambda: measure_acceptance(model, prompts, (), cfg.block_size)),
            ("acceptance_compiled_blocks", lambda: compiled_acceptance(model, prompts, cfg)),
            ("next_train_step", train_step),
        ):
            before = graphs()
            row[f"{part}_seconds"], result = timed(fn)
            row[f"{part}_graphs"] = graphs() - before
            if part.startswith("acceptance"):
                row[f"{part}_tokens_per_pass"] = result["eval/tokens_per_pass"]
        rows.append(row)
        print(row, flush=True)
        write_json("eval_cost.json", {"device": torch.cuda.get_device_name(),
                                      "torch": torch.__version__, "evals": rows})


if __name__ == "__main__":
    main()
