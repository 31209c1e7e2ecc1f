"""Greedy tokens per pass of every proposal count, replayed from one output
(``tidar.acceptance``), against decoding with some of them, and against the tuner's chain.

    python benchmarks/replay_check.py --prompt-set humaneval --num-prompts 16 --out FILE

For each prompt: the greedy output (``ar``, no stop tokens, the budget plus a block), the
drafts of the block at each of its positions, and the replay of each proposal count; then
the engine decodes ``lossless`` with the ``--decode`` counts and its histogram of committed
tokens a pass must equal the replay's. The chain's projection for each count uses the full
set's measured profile, as the tuner does when a drafter carries no replayed values. Default
model and shipped drafter, float32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tidar.acceptance import block_drafts, replay
from tidar.bench import prompt_texts
from tidar.drafter import apply_drafter
from tidar.engine import DecodeConfig, Engine, Stats, proposal_set
from tidar.generate import encode_prompt, shipped_drafter
from tidar.loading import load_model
from tidar.tuner import expected_tokens_per_pass, proposal_counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--drafter", default=None, help="default: the shipped one")
    ap.add_argument("--prompt-set", default="humaneval")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--decode", type=int, nargs="+", default=[1, 16],
                    help="proposal counts to decode as well (the histograms must match)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    drafter = args.drafter or shipped_drafter("smollm2-135m-instruct")
    b = apply_drafter(loaded.model, drafter, loaded.fingerprint).block_size
    model, budget = loaded.model.eval(), args.max_new_tokens
    counts = proposal_counts(b)
    texts = prompt_texts(args.prompt_set, raw=False)[: args.num_prompts]
    prompts = [encode_prompt(loaded.tokenizer, t, raw=False) for t in texts]
    replayed = {n: [] for n in counts}
    decoded = {n: [0] * (b + 1) for n in args.decode}  # decode passes by committed tokens
    matches = {n: 0 for n in args.decode}
    start = time.perf_counter()
    for prompt in tqdm(prompts, desc="prompts"):
        engine = Engine(model)  # no stop tokens: every output has the budget's length
        truth = engine.generate([prompt], DecodeConfig(sampler="ar",
                                                       max_new_tokens=budget + b - 1))[0][0]
        drafts = block_drafts(model, prompt + truth, b)
        for n in counts:
            replayed[n].append(replay(drafts, truth, len(prompt), b, proposal_set(n, b), budget))
        for n in args.decode:
            cfg = DecodeConfig(block_size=b, proposals=proposal_set(n, b), max_new_tokens=budget)
            _, stats = engine.generate([prompt], cfg)
            hist = stats.committed_hist[1:]
            matches[n] += hist == [replayed[n][-1].count(c) for c in range(1, b + 1)]
            decoded[n] = [x + y for x, y in zip(decoded[n], stats.committed_hist, strict=True)]

    def mean(passes: list[list[int]]) -> float:
        return sum(map(sum, passes)) / sum(map(len, passes))

    reach = Stats(b, committed_hist=decoded[b]).acceptance if b in decoded else None
    rows = {n: {"replayed": mean(replayed[n]),
                "decoded": (sum(c * x for c, x in enumerate(decoded[n])) / sum(decoded[n])
                            if n in decoded else None),
                "histograms_equal": f"{matches[n]}/{len(prompts)}" if n in decoded else None,
                "chain_from_full_set": (expected_tokens_per_pass(reach, b, proposal_set(n, b))
                                        if reach else None)}
            for n in counts}
    result = {"command": "python benchmarks/replay_check.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if v is not None),
              "drafter": str(drafter), "block_size": b, "prompts": len(prompts),
              "max_new_tokens": budget, "seconds": time.perf_counter() - start,
              "threads": torch.get_num_threads(), "full_set_profile": reach,
              "tokens_per_decode_pass": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for n, row in rows.items():
        print(n, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})


if __name__ == "__main__":
    main()
