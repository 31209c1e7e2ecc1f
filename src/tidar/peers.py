"""What users run today, for ``tidar bench`` to compare against: transformers ``generate``
(greedy) and its prompt-lookup decoding, as timed runs on batches of token ids."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TidarError

PLD_TOKENS = 10  # prompt_lookup_num_tokens, as transformers' docs suggest


@dataclass
class Run:
    """One timed call of a method on one batch of prompts."""

    outputs: list[list[int]]
    seconds: float  # the whole call
    first_seconds: float | None = None  # until the first token was on the host
    passes: int = 0  # per-row passes, summed (engine); forward calls (transformers)
    batch_passes: int = 0  # engine: passes the batch ran, its longest row's
    hist: list[int] = field(default_factory=list)  # engine: decode passes by tokens committed


def sync(device) -> None:
    """Wait for the device, so that host clocks time the work it was given."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


class HFRunner:
    """transformers' ``generate``, greedy, on left-padded batches of token ids."""

    def __init__(self, source: str, device, dtype, stops: tuple[int, ...], tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        path = Path(source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if path.is_file():
                    model = AutoModelForCausalLM.from_pretrained(
                        path.parent, gguf_file=path.name, dtype=dtype)
                else:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as exc:
            raise TidarError(f"transformers cannot load {source} for the baseline: {exc}") \
                from None
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.stops = stops
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (stops[0] if stops else 0)
        self.calls = 0
        self.model.register_forward_hook(self._count)
        gc = self.model.generation_config
        for name in ("temperature", "top_p", "top_k"):  # greedy: silence sampling defaults
            if hasattr(gc, name):
                setattr(gc, name, None)

    def _count(self, *_):
        self.calls += 1

    def _inputs(self, prompts: list[list[int]]):
        import torch

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _cut(self, row: list[int], max_new: int) -> list[int]:
        row = row[:max_new]
        for i, t in enumerate(row):
            if t in self.stops:
                return row[: i + 1]
        return row

    def run(self, prompts: list[list[int]], max_new: int, pld: bool = False) -> Run:
        import torch

        ids, mask = self._inputs(prompts)
        kwargs = dict(do_sample=False, max_new_tokens=max_new, pad_token_id=self.pad,
                      eos_token_id=list(self.stops) or None)
        if pld:
            kwargs["prompt_lookup_num_tokens"] = PLD_TOKENS
        self.calls = 0
        sync(self.device)
        start = time.perf_counter()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        sync(self.device)
        seconds = time.perf_counter() - start
        outputs = [self._cut(row, max_new) for row in out[:, ids.shape[1]:].tolist()]
        return Run(outputs, seconds, passes=self.calls)
