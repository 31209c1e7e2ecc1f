"""The ``tidar`` command line. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import TidarError


def _default_text(default) -> str | None:
    """``(default: X)`` for an option's help, a list's values spaced as one types them (%
    escaped for argparse's formatting); None where there is nothing to show: no value, a
    flag's off, an empty list (by identity, so that 0 is shown)."""
    listed = isinstance(default, (list, tuple))
    if (listed and not default) or any(default is h for h in (None, False, argparse.SUPPRESS)):
        return None
    value = " ".join(map(str, default)) if listed else default
    return f"(default: {value})".replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    def add_argument(self, *args, **kwargs) -> argparse.Action:
        """As argparse's, with the option's default added to its help unless the help names
        it already."""
        action = super().add_argument(*args, **kwargs)
        shown = _default_text(action.default) if action.option_strings else None
        if shown and "default" not in (action.help or ""):
            action.help = f"{action.help} {shown}" if action.help else shown
        return action

    def error(self, message: str):  # one line, not usage plus a line
        raise TidarError(message)


def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise TidarError("--device cuda requested but no CUDA device is available")
    return name


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory, .gguf file or hub id "
                   "(default: the embedded smollm2-135m-instruct)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", default=None, help="drafter checkpoint from `tidar convert` "
                   "(default: the model's shipped drafter, if any)")
    p.add_argument("--sampler", default="lossless", choices=["ar", "lossless", "mix"])
    p.add_argument("--beta", type=float, default=None,
                   help="mix weight of the AR logits (--sampler mix; default 0.7)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=None, help="default: the drafter's")
    p.add_argument("--proposals", default="auto", help="proposal blocks per pass: N, all, or "
                   "auto (default: the tuner picks from measured pass costs, plain ar when "
                   "drafting does not pay)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode pass "
                   "(a slower first call, faster passes; for the GPU)")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    d = TrainConfig(out="")
    p.add_argument("--out", required=True, help="run directory: checkpoint, drafter, logs")
    p.add_argument("--data", nargs="+", required=True,
                   help="sources: text files or dirs, .jsonl, .parquet, datasets dirs; "
                   "SOURCE:WEIGHT to mix")
    p.add_argument("--model", default=None)
    p.add_argument("--mode", default=d.mode, choices=["frozen-ar", "full"])
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="clean tokens per row")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step, global")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 frozen-ar, 1e-5 full")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of the AR loss (full)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="adapter rank (default 64 frozen-ar; 0 = all weights in full mode)")
    p.add_argument("--lora-alpha", type=float, default=None, help="default: the rank")
    p.add_argument("--router-aux", type=float, default=d.router_aux)
    p.add_argument("--freeze-router", action="store_true")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block; where attention runs through "
                        "flex_attention (full mode on a GPU), its tiles are autotuned once "
                        "per shape (about 40 s)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-rows", type=int, default=d.eval_rows)
    p.add_argument("--eval-prompt", action="append", default=[], dest="eval_prompts",
                   help="a prompt on which evaluations measure acceptance, for the drafter's "
                   "calibration profile (repeatable; default: 8 built-in chat prompts on "
                   "cuda, none on cpu, where measuring takes minutes)")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init-drafter", default=None, metavar="DRAFTER",
                   help="start from this drafter's weights (same mode, block size and LoRA "
                   "shape); a new run with a fresh optimizer and schedule")


def run_convert(args) -> int:
    from .train import TrainConfig, train

    full = args.mode == "full"
    rank = args.lora_rank if args.lora_rank is not None else (0 if full else 64)
    cfg = TrainConfig(
        out=args.out, data=args.data, model=args.model, mode=args.mode,
        block_size=args.block_size, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, steps=args.steps,
        lr=args.lr if args.lr is not None else (1e-5 if full else 1e-3),
        warmup=args.warmup, weight_decay=args.weight_decay, alpha=args.alpha,
        lora_rank=rank, lora_alpha=args.lora_alpha if args.lora_alpha is not None else rank or 1,
        router_aux=args.router_aux, freeze_router=args.freeze_router, dtype=args.dtype,
        compile=args.compile, grad_checkpointing=args.grad_checkpointing,
        eval_every=args.eval_every, eval_rows=args.eval_rows,
        eval_prompts=args.eval_prompts or None,
        save_every=args.save_every, log_every=args.log_every, seed=args.seed, device=args.device,
        init_drafter=args.init_drafter,
    )
    result = train(cfg, resume=args.resume)
    print(f"drafter written to {result['drafter']}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tidar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text for a prompt")
    gen.add_argument("prompt")
    add_model_args(gen)
    add_decode_args(gen)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.add_argument("--stop", action="append", default=[], metavar="STR",
                     help="stop when the text contains STR (repeatable; STR is not printed)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--compare", action="store_true", help="also run `ar`; print the speedup")

    conv = sub.add_parser("convert", help="train a model into a TiDAR drafter")
    add_convert_args(conv)

    from .synth import add_data_commands

    add_data_commands(sub)

    info = sub.add_parser("info", help="describe a model and its drafter")
    info.add_argument("model", nargs="?", default=None)
    info.add_argument("--drafter", default=None,
                      help="drafter to describe (default: the model's shipped one, if any)")

    serve = sub.add_parser("serve", help="an HTTP API in OpenAI's style (FastAPI)")
    add_model_args(serve)
    add_decode_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=16,
                       help="requests of one configuration decoded together, at most")
    serve.add_argument("--batch-window", type=float, default=5.0,
                       help="milliseconds an idle server waits for more requests before it "
                       "starts a batch (0: start at once)")
    serve.add_argument("--join", action=argparse.BooleanOptionalAction, default=True,
                       help="let requests join a running batch in rows that free up, or "
                       "in new ones as it grows up to --max-batch (continuous batching; "
                       "--no-join: they wait for the next batch)")
    serve.add_argument("--batch-rows", type=int, default=1,
                       help="rows a batch decodes at least from its start, so that requests "
                       "arriving while it runs join without moving it into a larger batch; "
                       "every pass pays for the idle ones")

    from .bench import add_bench_args

    add_bench_args(sub.add_parser("bench", help="decoding speed against transformers and ar"))
    from .calibrate import add_calibrate_args

    add_calibrate_args(sub.add_parser(
        "calibrate", help="measure a drafter's acceptance on your prompts for --proposals auto"))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "generate":
            from .generate import run_generate

            return run_generate(args)
        if args.command == "convert":
            return run_convert(args)
        if args.command == "data":
            from .synth import run_data

            return run_data(args)
        if args.command == "info":
            return run_info(args)
        if args.command == "serve":
            from .serve import run_serve

            return run_serve(args)
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args)
        if args.command == "calibrate":
            from .calibrate import run_calibrate

            return run_calibrate(args)
        return 2
    except TidarError as exc:
        print(f"tidar: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tidar: interrupted", file=sys.stderr)
        return 130


def run_info(args) -> int:
    from .loading import load_model

    start = time.perf_counter()
    loaded = load_model(args.model)
    cfg = loaded.config
    total, active = loaded.model.num_parameters()
    info = {
        "model": loaded.source,
        "family": cfg.family,
        "kind": "moe" if cfg.moe else "dense",
        "parameters": total,
        "active_parameters": active,
        "layers": cfg.n_layers,
        "hidden_size": cfg.dim,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position,
        "dtype": str(getattr(cfg.hf_config, "dtype", None) or "float32").replace("torch.", ""),
        "fingerprint": loaded.fingerprint,
    }
    if cfg.moe:
        info["experts"] = f"{cfg.moe.top_k} of {cfg.moe.num_experts}"
    info |= _drafter_info(args.drafter, loaded)
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print(f"(loaded in {time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


def _drafter_info(requested: str | None, loaded) -> dict:
    """What ``tidar info`` says of the drafter: its settings, training, whether it belongs
    to the model, and the calibration ``--proposals auto`` reads."""
    from .drafter import read_drafter
    from .generate import drafter_for

    path = drafter_for(requested, loaded)
    if path is None:
        return {"drafter": "none (--drafter FILE from `tidar convert`)"}
    _, d = read_drafter(path)
    extra = d.extra or {}
    adapters = f", LoRA rank {d.lora_rank}" if d.lora_rank else ""
    total = extra.get("clean_tokens_total")
    trained = (f"{total:,} clean tokens over all its runs" if total else
               f"{extra.get('steps', '?')} steps, "
               f"{extra.get('clean_tokens', 0):,} clean tokens in its last run")
    out = {"drafter": str(path),
           "drafter_mode": f"{d.mode}, block size {d.block_size}{adapters}",
           "drafter_training": trained,
           "drafter_for_this_model": "yes" if d.base_fingerprint == loaded.fingerprint else
           f"no (trained for {d.base_fingerprint})"}
    calibration, reach = extra.get("calibration", {}), extra.get("acceptance_by_position")
    if reach:
        where = ", ".join(str(calibration[k]) for k in ("device", "dtype") if k in calibration)
        out["drafter_calibration"] = (
            f"{calibration.get('tokens_per_pass', 0):.3f} tokens per pass on "
            f"{calibration.get('prompts', '?')} prompts" + (f" ({where})" if where else "")
            + "; P(k >= 1, 2, 3) = " + ", ".join(f"{p:.3f}" for p in reach[:3]))
    else:
        out["drafter_calibration"] = "none (`tidar calibrate` measures one)"
    return out


if __name__ == "__main__":
    sys.exit(main())
