"""What a decode pass costs, three ways, for the passes the tuner weighs: one captured replay
timed alone (after a synchronisation, as ``Engine.time_pass`` timed it up to session 10),
``burst`` replays back to back, and the passes of a real ``Engine.generate`` (wall time from
the first streamed tokens to the end, over the replays run), compiled and captured as
``tidar generate --compile`` decodes. ``--drafter PATH``: the embedded default with that
drafter, decoding the bench's chat prompts to their stop tokens; else a drafter-shaped model
(the embedded default's shape with rank-48 mask-row adapters, random weights, no stop
tokens, prompts of ``--context`` tokens).

    python benchmarks/pass_timing.py --batch 1 4 --queries 1 32 272
    python benchmarks/pass_timing.py --batch 1 4 --queries 1 32 --new-tokens 128 \
        --drafter /root/drafter.safetensors
    python benchmarks/pass_timing.py --batch 1 --queries 1 32 --per-pass
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from common import smollm2_shaped, write_json

from tidar.drafter import add_row_lora
from tidar.engine import DecodeConfig, Engine
from tidar.tuner import TUNER_CONTEXT


def config_for(queries: int, block_size: int) -> DecodeConfig:
    if queries == 1:
        return DecodeConfig(sampler="ar")
    return DecodeConfig(block_size=block_size, proposals=tuple(range(queries // block_size - 1)))


def single_replays(engine: Engine, cfg: DecodeConfig, batch: int, context: int,
                   repeats: int) -> float:
    """Median of replays each timed alone, the GPU idle before each (the old ``time_pass``)."""
    cfg = cfg.resolved()
    prompts = [[(7 * i + r) % 1000 for i in range(context)] for r in range(batch)]
    cfg = replace(cfg, max_new_tokens=(repeats + 4) * cfg.block_size + 1)
    runner = engine._runner(batch, context + cfg.max_new_tokens, cfg)
    engine._start(runner, prompts, cfg, [0] * batch)
    return statistics.median(engine._burst_seconds(runner, 1) for _ in range(repeats))


def per_pass_after_prefill(engine: Engine, cfg: DecodeConfig, context: int, passes: int = 24,
                           rounds: int = 15) -> list[float]:
    """Median seconds of the 1st, 2nd, .. replay after a prefill (batch 1), each between two
    events: whether the first passes after a prefill cost more than later ones."""
    cfg = replace(cfg.resolved(), max_new_tokens=(passes + 16) * cfg.block_size + 1)
    prompts = [[(7 * i) % 1000 for i in range(context)]]
    runner = engine._runner(1, context + cfg.max_new_tokens, cfg)
    times: list[list[float]] = [[] for _ in range(passes)]
    for _ in range(rounds):
        engine._start(runner, prompts, cfg, [0])
        events = [torch.cuda.Event(enable_timing=True) for _ in range(passes + 1)]
        events[0].record()
        for i in range(passes):
            runner.step()
            events[i + 1].record()
        events[-1].synchronize()
        for i in range(passes):
            times[i].append(events[i].elapsed_time(events[i + 1]) / 1000)
    return [statistics.median(t) for t in times]


def decode_seconds_per_pass(engine: Engine, cfg: DecodeConfig, groups: list[list[list[int]]],
                            new_tokens: int) -> tuple[float, int, int]:
    """Wall seconds per replay of real generations of each group of prompts, from the first
    streamed tokens (the prefill done) to the end, syncs and host work included; the replays
    run, and the passes while rows were active."""
    cfg = replace(cfg, max_new_tokens=new_tokens)
    elapsed, replays, passes = 0.0, 0, 0
    for prompts in groups:
        started = None
        for _ in engine.stream(prompts, cfg):
            if started is None:
                torch.cuda.synchronize()
                started = time.perf_counter()
        torch.cuda.synchronize()
        elapsed += time.perf_counter() - started
        replays += int(engine._live.counter[0]) - 1  # every pass after prefill
        passes += max(engine.last_stats.passes) - 1
    return elapsed / replays, replays, passes


def load(drafter: str | None):
    """The model, its stop tokens and prompts (random weights: none and none)."""
    if drafter is None:
        model = smollm2_shaped(device="cpu", dtype=torch.float32)
        add_row_lora(model, 48, 96.0)
        return model.to(device="cuda", dtype=torch.bfloat16).eval(), (), []
    from tidar.bench import prompt_texts
    from tidar.drafter import apply_drafter
    from tidar.generate import encode_prompt, stop_ids
    from tidar.loading import load_model

    loaded = load_model(None, device="cuda", dtype=torch.bfloat16)
    apply_drafter(loaded.model, drafter, loaded.fingerprint)
    prompts = [encode_prompt(loaded.tokenizer, t, raw=False) for t in prompt_texts("chat", False)]
    return loaded.model, stop_ids(loaded), prompts


def time_rows(engine: Engine, chat: list, args) -> list[dict]:
    rows = []
    for batch in args.batch:
        for q in args.queries:
            cfg = config_for(q, args.block_size)
            single = single_replays(engine, cfg, batch, args.context, args.repeats)
            burst = engine.time_pass(cfg, batch, args.context, args.repeats)
            prompts = chat or [[(7 * i + 3 * r) % 1000 for i in range(args.context)]
                               for r in range(batch)]
            groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
            decoded = [decode_seconds_per_pass(engine, cfg, groups, args.new_tokens)
                       for _ in range(args.rounds)]
            row = {"batch": batch, "queries": q, "single_ms": 1e3 * single,
                   "time_pass_ms": 1e3 * burst,
                   "decode_ms": 1e3 * statistics.median(d for d, _, _ in decoded),
                   "decode_replays": [n for _, n, _ in decoded],
                   "decode_active_passes": [n for _, _, n in decoded]}
            if args.per_pass and batch == 1:
                times = per_pass_after_prefill(engine, cfg, args.context)
                row["per_pass_after_prefill_ms"] = [round(1e3 * t, 4) for t in times]
            rows.append(row)
            write_json("pass_timing.json", {"rows": rows})  # so far: a later row may time out
            print(f"batch {batch} q {q}: single {row['single_ms']:.3f} ms, time_pass "
                  f"{row['time_pass_ms']:.3f} ms, decode {row['decode_ms']:.3f} ms/pass "
                  f"({row['decode_replays']} replays)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 32, 272])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=TUNER_CONTEXT)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3, help="decode runs per shape (median)")
    ap.add_argument("--drafter", help="the embedded default with this drafter, chat prompts")
    ap.add_argument("--per-pass", action="store_true",
                    help="also time the passes after a prefill one by one (batch 1)")
    args = ap.parse_args()
    model, stops, chat = load(args.drafter)
    with torch.inference_mode(), model.decode_weights():
        rows = time_rows(Engine(model, stops, compile=True), chat, args)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "model": args.drafter or "random, drafter-shaped", "context": args.context,
               "new_tokens": args.new_tokens, "rows": rows, "ratios_to_ar": {}}
    for batch in args.batch:
        by_q = {r["queries"]: r for r in rows if r["batch"] == batch}
        if 1 in by_q:
            ratios = {q: {k: round(r[k] / by_q[1][k], 3)
                          for k in ("single_ms", "time_pass_ms", "decode_ms")}
                      for q, r in by_q.items() if q != 1}
            results["ratios_to_ar"][batch] = ratios
            print(f"batch {batch}: t(q)/t(1) {ratios}")
    write_json("pass_timing.json", results)


if __name__ == "__main__":
    main()
