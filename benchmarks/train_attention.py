"""Attention of the TiDAR training layout, forward plus backward, timed alone: flex_attention
over the whole doubled row (as training runs it) against variants (SmolLM2-135M shapes, bf16).

    python benchmarks/train_attention.py --batch 64 --seq-len 512
    python benchmarks/train_attention.py --batch 128 --layouts frozen
    python benchmarks/train_attention.py --batch 128 --layouts doubled \
        --variants flex_tuned_64 flash_128

Variants:

- ``flex``: one flex_attention call over the doubled row, mask from the layout's tensors;
- ``flex_int32``: the same, with the layout tensors the mask reads as int32;
- ``split``: the clean half (plain causal attention over its own keys) through SDPA's fused
  causal kernel, the mask half through flex_attention over all keys;
- ``flex_tuned``, ``split_tuned``: ``flex`` and ``split`` with flex_attention's tiles
  autotuned, as ``tidar convert --compile`` runs full mode (``train.ATTENTION_AUTOTUNE``);
- ``flex_tuned_64``: ``flex_tuned`` over a BlockMask of 64 x 64 tiles (128 x 128 is
  flex_attention's default), as ``tidar convert --compile`` runs full mode since session 25;
- ``flash_128``: ``flex_int32`` on FlashAttention-4's kernels (``kernel_options={"BACKEND":
  "FLASH"}``, the ``flash-attn-4`` package) over the 128 x 128 tiles its Hopper kernels take.

And frozen-AR's mask half, its queries over a cache of the clean half (no gradient) and the
mask half:

- ``frozen_flex``: flex_attention over the cache (as frozen-AR trained up to session 20);
- ``frozen_prefix``: ``tidar.prefix_attention`` (flash kernel for the far clean keys).

Each is compiled; the time is the median of CUDA-event-timed forward+backward calls after
warm-up, and each variant's output and gradients are checked against the first of its group
(``flex``, ``frozen_flex``).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from common import event_seconds, format_profile, profile_cuda, write_json
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tidar.layouts import flex_block_mask, key_meta, training_layout, visible
from tidar.prefix_attention import PrefixBlockMask, prefix_block_attention
from tidar.train import ATTENTION_AUTOTUNE, TUNED_FLEX_MASK_BLOCK, mask_half

FLASH = {"BACKEND": "FLASH"}

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def layout_mask(layout, queries: slice, dtype=torch.long, **kernel):
    """A BlockMask for the layout's ``queries`` over all its keys, from the visibility rule."""
    keys = key_meta(layout)
    q_h, q_b = layout.horizon[:, queries].to(dtype), layout.block[:, queries].to(dtype)
    kv_p, kv_b = keys.positions.to(dtype), keys.block.to(dtype)

    def mask_mod(b, h, q, kv):
        return visible(q_h[b, q], q_b[b, q], kv_p[b, kv], kv_b[b, kv])

    return create_block_mask(mask_mod, q_h.shape[0], None, q_h.shape[1], kv_p.shape[1],
                             device="cuda", _compile=True, **kernel)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layouts", choices=["doubled", "frozen", "both"], default="both",
                    help="the doubled row's variants, frozen-AR's mask half's, or both")
    ap.add_argument("--variants", nargs="+", metavar="NAME",
                    help="time only these of the doubled row's variants (default: all)")
    ap.add_argument("--profile", type=int, default=0, metavar="CALLS",
                    help="also profile this many forward+backward calls of each variant: GPU "
                    "time by kernel")
    args = ap.parse_args()
    torch.manual_seed(0)
    batch, length = args.batch, args.seq_len
    tokens = torch.randint(0, 1000, (batch, length), device="cuda")
    offsets = torch.randint(0, args.block_size, (batch,), device="cuda")
    layout = training_layout(tokens, args.block_size, offsets, mask_id=1000)
    shape = (batch, HEADS, 2 * length, HEAD_DIM)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, KV_HEADS, 2 * length, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad_out = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    flex = torch.compile(flex_attention, dynamic=False)
    flex_tuned = torch.compile(flex_attention, dynamic=False, options=ATTENTION_AUTOTUNE)
    flex_flash = torch.compile(partial(flex_attention, kernel_options=FLASH), dynamic=False)
    torch._dynamo.config.recompile_limit = 64  # a compilation per variant's mask and options
    everything = slice(None)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "batch": batch, "seq_len": length, "variants": {}}

    def whole(mask, attend=flex):
        return lambda q, k, v: attend(q, k, v, block_mask=mask, enable_gqa=True)

    second_half = layout_mask(layout, slice(length, None))

    def split(attend):
        def run(q, k, v):
            clean = F.scaled_dot_product_attention(
                q[:, :, :length], k[:, :, :length], v[:, :, :length], is_causal=True,
                enable_gqa=True)
            rest = attend(q[:, :, length:], k, v, block_mask=second_half, enable_gqa=True)
            return torch.cat([clean, rest], dim=2)
        return run

    makers = {  # built only when chosen: each mask and tuned kernel costs compile time
        "flex": lambda: whole(layout_mask(layout, everything)),
        "flex_int32": lambda: whole(layout_mask(layout, everything, torch.int32)),
        "split": lambda: split(flex),
        "flex_tuned": lambda: whole(layout_mask(layout, everything), flex_tuned),
        "split_tuned": lambda: split(flex_tuned),
        "flex_tuned_64": lambda: whole(
            layout_mask(layout, everything, BLOCK_SIZE=TUNED_FLEX_MASK_BLOCK), flex_tuned),
        "flash_128": lambda: whole(layout_mask(layout, everything, torch.int32), flex_flash),
    }
    unknown = set(args.variants or ()) - makers.keys()
    if unknown:
        ap.error(f"unknown --variants {', '.join(sorted(unknown))}; the doubled row's are "
                 f"{', '.join(makers)}")
    if args.layouts in ("frozen", "both"):
        inputs = (q[:, :, length:], k[:, :, length:], v[:, :, length:])
        time_variants(frozen_variants(layout, length, args.block_size, offsets, flex), inputs,
                      grad_out[:, :, length:], args.repeats, results, args.profile)
    if args.layouts == "frozen":
        write_json("train_attention.json", results)
        return
    variants = {name: make() for name, make in makers.items()
                if args.variants is None or name in args.variants}
    time_variants(variants, (q, k, v), grad_out, args.repeats, results, args.profile)
    write_json("train_attention.json", results)


def frozen_variants(layout, length: int, block: int, offsets, flex) -> dict:
    """Frozen-AR's mask half, called as ``fn(q, k_own, v_own)``: keys and values are a
    cache of constant clean entries, then the mask half's own."""
    clean_k = torch.randn(offsets.shape[0], KV_HEADS, length, HEAD_DIM, device="cuda",
                          dtype=torch.bfloat16)
    clean_v = torch.randn_like(clean_k)
    drafts = mask_half(layout, length, length)
    block_mask = flex_block_mask(drafts, key_meta(drafts, 2 * length))
    prefix_mask = PrefixBlockMask.for_offsets(offsets, block, length)
    prefix = torch.compile(prefix_block_attention, dynamic=False)

    def frozen_flex(q, k, v):
        return flex(q, torch.cat([clean_k, k], 2), torch.cat([clean_v, v], 2),
                    block_mask=block_mask, enable_gqa=True)

    def frozen_prefix(q, k, v):
        return prefix(q, torch.cat([clean_k, k], 2), torch.cat([clean_v, v], 2), prefix_mask)

    return {"frozen_flex": frozen_flex, "frozen_prefix": frozen_prefix}


def time_variants(variants: dict, inputs, grad_out, repeats: int, results: dict,
                  profile_calls: int = 0) -> None:
    """Time each variant's forward and forward+backward; check it against the first one."""
    q, k, v = (t.detach().requires_grad_() for t in inputs)
    reference = None
    for name, fn in variants.items():
        def step(fn=fn):
            q.grad = k.grad = v.grad = None
            out = fn(q, k, v)
            out.backward(grad_out)
            return out
        try:
            out = step()
            got = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
            if reference is None:
                reference = got
            err = max((a - b).abs().max().item() for a, b in zip(got, reference, strict=True))
            with torch.no_grad():
                forward = event_seconds(lambda fn=fn: fn(q, k, v), repeats)
            row = {"forward_ms": 1e3 * forward, "forward_backward_ms": 1e3 * event_seconds(
                step, repeats), "max_abs_diff_vs_first": err}
            if profile_calls:
                row["profile"] = profile_cuda(step, profile_calls)
        except Exception as exc:  # report and go on: one failing variant must not stop the rest
            row = {"error": repr(exc)[:300]}
        results["variants"][name] = row
        print(name, {key: x for key, x in row.items() if key != "profile"}, flush=True)
        if "profile" in row:
            print(format_profile(row["profile"], rows=16), flush=True)


if __name__ == "__main__":
    main()
