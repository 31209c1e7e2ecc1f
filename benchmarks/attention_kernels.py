"""Candidate kernels for the decode pass at small batch, timed alone: masked attention over
the static KV cache (SDPA as the model runs it, against split-KV variants) and the q/k/v and
gate/up projections separate against fused (SmolLM2-135M shapes, bf16, H100).

    python benchmarks/attention_kernels.py

Each candidate is compiled, then ``--calls`` dependent calls are captured in one CUDA graph;
the time per call is the median replay time over ``--repeats`` replays divided by the calls,
which is what a kernel costs inside the engine's captured pass, launch gap included.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from common import graph_seconds, write_json

from tidar.engine import raise_recompile_limit
from tidar.model import dense_attention, split_kv_attention

HEADS, KV_HEADS, HEAD_DIM, DIM, HIDDEN = 9, 3, 64, 576, 1536


def decode_mask(batch: int, queries: int, slots: int, committed: int) -> torch.Tensor:
    """A verify/propose-like mask: every query sees the committed prefix plus a few more."""
    pos = torch.arange(slots, device="cuda")
    horizon = committed + torch.arange(queries, device="cuda") % 17
    return (pos[None, :] <= horizon[:, None]).expand(batch, 1, queries, slots).contiguous()


def attention_rows(shapes, calls: int, repeats: int) -> list[dict]:
    rows = []
    for batch, queries, slots in shapes:
        q = torch.randn(batch, HEADS, queries, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = decode_mask(batch, queries, slots, slots - 300)
        reference = dense_attention(q, k, v, mask).float()
        candidates = {"sdpa": dense_attention}
        for chunk in (64, 128, 256):
            candidates[f"split_kv_{chunk}"] = (
                lambda q, k, v, m, c=chunk: split_kv_attention(q, k, v, m, c))
        row = {"batch": batch, "queries": queries, "slots": slots}
        for name, fn in candidates.items():
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            try:
                err = (compiled(q, k, v, mask).float() - reference).abs().max().item()
                sec = graph_seconds(partial(compiled, q, k, v, mask), calls, repeats)
                row[name] = {"us": round(sec * 1e6, 2), "max_abs_err": err}
            except Exception as exc:  # one failing candidate must not end the sweep
                row[name] = {"error": repr(exc)[:300]}
        print(row, flush=True)
        rows.append(row)
    return rows


def projection_rows(tokens_list, calls: int, repeats: int) -> list[dict]:
    kv_dim = KV_HEADS * HEAD_DIM
    w = {n: torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.02 for n, (o, i) in {
        "q": (DIM, DIM), "k": (kv_dim, DIM), "v": (kv_dim, DIM), "gate": (HIDDEN, DIM),
        "up": (HIDDEN, DIM)}.items()}
    qkv = torch.cat([w["q"], w["k"], w["v"]])
    gate_up = torch.cat([w["gate"], w["up"]])
    candidates = {
        "qkv_separate": lambda x: (F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"])),
        "qkv_fused": lambda x: F.linear(x, qkv).split([DIM, kv_dim, kv_dim], dim=-1),
        "gate_up_separate": lambda x: F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]),
        "gate_up_fused": lambda x: (lambda gu: F.silu(gu[..., :HIDDEN]) * gu[..., HIDDEN:])(
            F.linear(x, gate_up)),
    }
    rows = []
    for tokens in tokens_list:
        x = torch.randn(1, tokens, DIM, device="cuda", dtype=torch.bfloat16)
        row = {"tokens": tokens}
        for name, fn in candidates.items():
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            sec = graph_seconds(partial(compiled, x), calls, repeats)
            row[name + "_us"] = round(sec * 1e6, 2)
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    raise_recompile_limit()
    shapes = [(1, 1, 1280), (1, 17, 1536), (1, 272, 1536), (4, 1, 1280), (4, 17, 1536),
              (4, 272, 1536), (16, 1, 1280), (16, 17, 1536), (64, 1, 1280), (64, 17, 1536)]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "attention": attention_rows(shapes, args.calls, args.repeats),
              "projections": projection_rows([1, 4, 17, 272], args.calls, args.repeats)}
    write_json("attention_kernels.json", report)


if __name__ == "__main__":
    main()
