"""``tidar generate``: text in, text out, around the token-level engine."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .engine import DecodeConfig, Engine, proposal_set
from .errors import TidarError
from .sampling import SamplingParams
from .tuner import MARGIN, Acceptance, auto_config

DEFAULT_BLOCK_SIZE = 16
DEFAULT_BETA = 0.7  # mix: the weight of the AR logits


def shipped_drafter(model_name: str) -> Path | None:
    """The drafter that ships inside the package for an embedded model, if there is one."""
    path = resources.files("tidar") / "drafters" / f"{model_name}.safetensors"
    return Path(str(path)) if path.is_file() else None


def drafter_for(requested: str | None, loaded) -> str | Path | None:
    """The drafter a command uses: the one asked for, else the embedded default's shipped
    one (None: an untrained drafter)."""
    if requested is None and loaded.is_default:
        return shipped_drafter("smollm2-135m-instruct")
    return requested


def encode_prompt(tokenizer, prompt: str, raw: bool) -> list[int]:
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return tokenizer.encode(prompt, add_special_tokens=True)


def stop_ids(loaded) -> tuple[int, ...]:
    ids = set(loaded.config.eos_token_ids)
    if getattr(loaded.tokenizer, "eos_token_id", None) is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return tuple(sorted(ids))


def decode_config(args, block_size: int) -> DecodeConfig:
    """The configuration the flags ask for (``--proposals auto`` is resolved by the tuner)."""
    b = block_size if args.block_size is None else args.block_size
    if args.beta is not None and args.sampler != "mix":
        print(f"tidar: --beta applies to --sampler mix; the {args.sampler} sampler ignores it",
              file=sys.stderr)
    proposals = None
    if args.proposals not in (None, "all", "auto"):
        try:
            count = int(args.proposals)
        except ValueError:
            raise TidarError(f"--proposals takes a number, got {args.proposals!r}") from None
        proposals = proposal_set(count, b)
    return DecodeConfig(
        sampler=args.sampler,
        block_size=b,
        proposals=proposals,
        beta=(DEFAULT_BETA if args.beta is None else args.beta) if args.sampler == "mix" else 1.0,
        sampling=SamplingParams(args.temperature, args.top_k, args.top_p),
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    ).resolved()


class TextStream:
    """Decodes tokens as they arrive and watches for stop strings; optionally prints the text,
    holding back incomplete characters and anything that may be the start of a stop string."""

    def __init__(self, tokenizer, out=None, stops: tuple[str, ...] = ()):
        self.tokenizer, self.out, self.stops = tokenizer, out, stops
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False
        self.text = ""

    def add(self, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        if self.out is None or text.endswith("\ufffd"):
            return
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.printed, len(text) - hold)
        self.out.write(text[self.printed : end])
        self.out.flush()
        self.printed = end

    def close(self) -> None:
        if self.out is not None:
            self.out.write(self.text[self.printed :])
            self.out.flush()

    def stop_prefix(self) -> list[int]:
        """The shortest prefix of the ids whose text reaches the stop string."""
        for n in range(1, len(self.ids) + 1):
            if len(self.tokenizer.decode(self.ids[:n], skip_special_tokens=True)) >= len(
                self.text
            ):
                return self.ids[:n]
        return self.ids


def run_rows(engine: Engine, prompts: list[list[int]], cfg: DecodeConfig,
             texts: list[TextStream | None], on_chunk=None, more=None,
             min_rows: int = 1, max_rows: int = 0) -> list[dict]:
    """A batched generation; each row's result. A row whose ``texts`` reached a stop string
    ends at the next pass (the engine finishes it). ``on_chunk(row)`` runs after each chunk of
    a row's tokens, inside the engine's stream: the server streams text there, and may
    ``engine.finish`` the row. ``more(longest)``: another prompt (at most ``longest`` tokens)
    and its text to join the running batch, or None (``Engine.stream``); joined rows' results
    follow the others', in the order they joined; ``min_rows``, ``max_rows`` as
    ``Engine.stream``."""
    cfg = cfg.resolved()
    start = time.perf_counter()
    tokens: list[list[int]] = [[] for _ in prompts]
    texts, started = list(texts), [start] * len(prompts)

    def join(longest: int) -> list[int] | None:
        offer = more(longest)
        if offer is None:
            return None
        tokens.append([])
        texts.append(offer[1])
        started.append(time.perf_counter())
        return offer[0]

    for row, new in engine.stream(prompts, cfg, more=None if more is None else join,
                                  min_rows=min_rows, max_rows=max_rows):
        tokens[row].extend(new)
        text = texts[row]
        if text is not None:
            text.add(new)
            if text.stopped:
                engine.finish(row)
        if on_chunk is not None:
            on_chunk(row)
    end = time.perf_counter()
    stats = engine.last_stats
    batch = stats.as_dict()
    results = []
    for row, text in enumerate(texts):
        ids, seconds = tokens[row], end - started[row]
        if text is not None:
            text.close()
            if text.stopped:
                ids = text.stop_prefix()
        results.append({
            "token_ids": ids,
            "num_tokens": len(ids),
            "passes": stats.passes[row],
            "tokens_per_pass": stats.row_tokens_per_pass(row),
            "seconds": seconds,
            "tokens_per_second": len(ids) / seconds if seconds > 0 else 0.0,
            "sampler": cfg.sampler,
            "block_size": cfg.block_size,
            "proposals": len(cfg.proposals),
            "acceptance_by_position": batch["acceptance_by_position"],
            "committed_per_pass_histogram": batch["committed_per_pass_histogram"],
        })
    return results


def run_once(engine: Engine, prompt_ids, cfg: DecodeConfig, text: TextStream | None = None
             ) -> dict:
    """One generation (``run_rows`` for one prompt)."""
    return run_rows(engine, [prompt_ids], cfg, [text])[0]


def tuner_summary(info: dict) -> str:
    """The tuner's pick in words (``--json`` keeps the dict)."""
    shapes = ", ".join(map(str, info["shapes_measured"]))
    if info["choice"] == "ar":
        return (f"ar (no drafting setting was expected to beat it by {MARGIN:.0%}; pass "
                f"costs measured for {shapes} queries)")
    blocks = info["proposals"]
    return (f"{info['choice']}, block size {info['block_size']}, {blocks} proposal "
            f"block{'s' if blocks > 1 else ''}: expected {info['expected_tokens_per_pass']} "
            f"tokens per pass, {info['expected_speedup']}x ar (pass costs measured for "
            f"{shapes} queries)")


@dataclass
class Decoder:
    """A loaded model with its drafter, its engine, and the configuration the flags ask for
    (``tune`` settles ``--proposals auto``)."""

    loaded: Any
    engine: Engine
    cfg: DecodeConfig
    drafter_path: Path | None  # None: the untrained drafter
    acceptance: Acceptance  # the drafter's, for the tuner

    @property
    def drafter(self) -> str:
        """The drafter in words: its path, or what stands in for it."""
        return "untrained (mean embedding)" if self.drafter_path is None else str(
            self.drafter_path)

    def tune(self, args) -> dict | None:
        """The tuner's pick replaces ``cfg`` when the flags leave the proposals to it;
        returns the tuner's summary (None: nothing to tune)."""
        if args.proposals not in (None, "auto") or self.cfg.sampler == "ar":
            return None
        if self.drafter_path is not None and not self.acceptance.reach:
            print(f"tidar: {self.drafter_path} has no acceptance profile (its conversion "
                  "measured none); --proposals auto assumes no draft is accepted; measure "
                  "one with `tidar calibrate --drafter FILE`, or pass --proposals N to draft "
                  "anyway", file=sys.stderr)
        self.cfg, info = auto_config(self.engine, self.loaded.fingerprint, self.cfg,
                                     self.acceptance)
        return info


def load_decoder(args) -> Decoder:
    """The model, drafter (the shipped one for the embedded default) and engine the flags
    name."""
    import torch

    from .cli import _device, _dtype
    from .drafter import apply_drafter
    from .loading import load_model

    device = _device(args.device)
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, device=device, dtype=_dtype(args.dtype))
    drafter_path = drafter_for(args.drafter, loaded)
    block_size = DEFAULT_BLOCK_SIZE
    acceptance = Acceptance()  # an untrained drafter is assumed never to be accepted
    if drafter_path is not None:
        info = apply_drafter(loaded.model, drafter_path, loaded.fingerprint)
        block_size = info.block_size
        acceptance = Acceptance.of_drafter(info)
    cfg = decode_config(args, block_size)
    engine = Engine(loaded.model, stop_ids(loaded), compile=args.compile)
    return Decoder(loaded, engine, cfg, drafter_path and Path(drafter_path), acceptance)


def nonempty_stops(stops, label: str) -> tuple[str, ...]:
    """Stop strings, none of them empty (an empty one would stop before any text)."""
    stops = tuple(stops)
    if any(not s for s in stops):
        raise TidarError(f"{label} must not be empty")
    return stops


def run_generate(args) -> int:
    stops = nonempty_stops(args.stop, "--stop strings")
    decoder = load_decoder(args)
    loaded, engine = decoder.loaded, decoder.engine
    prompt_ids = encode_prompt(loaded.tokenizer, args.prompt, args.raw)
    engine.check_prompts([prompt_ids], decoder.cfg)  # before the tuner spends time measuring
    tuner_info = decoder.tune(args)
    cfg, drafter = decoder.cfg, decoder.drafter

    ar_cfg = DecodeConfig(sampler="ar", sampling=cfg.sampling,
                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    if args.compare:  # warm-up: a process's first decode runs slower (allocation, kernel
        # setup), and so does a runner's second on the GPU, which starts by a join graph it
        # captures then. Warmed once, the timed `ar` run paid for that capture: 8.4 tokens/s
        # for 64 tokens against 1607 warm (H100, float32; docs/results.md section 1).
        for c in (cfg, ar_cfg):
            for _ in range(2):
                engine.generate([prompt_ids],
                                replace(c, max_new_tokens=min(8, c.max_new_tokens)))
    text = TextStream(loaded.tokenizer, None if args.json else sys.stdout, stops)
    result = run_once(engine, prompt_ids, cfg, text)
    result["text"] = text.text
    result["drafter"] = drafter
    if tuner_info is not None:
        result["tuner"] = tuner_info
    if args.compare:
        ar = run_once(engine, prompt_ids, ar_cfg, TextStream(loaded.tokenizer, None, stops))
        result["compare"] = {
            "ar_tokens_per_second": ar["tokens_per_second"],
            "speedup": result["tokens_per_second"] / max(ar["tokens_per_second"], 1e-9),
            "identical": ar["token_ids"] == result["token_ids"],
        }
    if args.json:
        print(json.dumps(result))
        return 0
    print(file=sys.stdout)
    if tuner_info is not None:
        print(f"tuner: {tuner_summary(tuner_info)}", file=sys.stderr)
    label = result["sampler"]
    if tuner_info is not None and label != args.sampler:
        label = f"{args.sampler} -> {label} (tuner)"
    print(
        f"[{label}] {result['num_tokens']} tokens, {result['passes']} passes, "
        f"{result['tokens_per_pass']:.2f} tokens/pass, {result['tokens_per_second']:.1f} tokens/s",
        file=sys.stderr,
    )
    if args.compare:
        cmp = result["compare"]
        if cmp["identical"]:
            same = "identical to ar's"
        elif not cfg.sampling.greedy:
            same = "not ar's draws (sampling: the same distribution, other draws)"
        elif cfg.sampler == "mix":
            same = "different from ar's (mix changes the distribution)"
        else:
            same = "DIFFERENT from ar's"
        print(
            f"[ar] {cmp['ar_tokens_per_second']:.1f} tokens/s; speedup {cmp['speedup']:.2f}x; "
            f"output {same}",
            file=sys.stderr,
        )
    return 0
