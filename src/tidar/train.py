"""``tidar convert``: continued training with the TiDAR objective (DESIGN.md section 2).

One script for one GPU, many GPUs (``torchrun``: FSDP2 applied from outside the model) or the
CPU. Two modes:

- ``full``: every weight (or peft LoRA on every row) trains on
  ``(alpha * CE_AR + CE_diff) / (1 + alpha)`` over the doubled sequence;
- ``frozen-ar``: only the mask embedding and adapters on mask-token rows train, on ``CE_diff``.
  The clean half runs once without autograd and serves as the KV cache that the mask half
  attends to, as at decode time; the AR path stays the base model, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .drafter import LORA_TARGETS, DrafterInfo, add_row_lora, save_drafter
from .errors import TidarError
from .files import give_plain_mode, output_dir
from .layouts import FLEX_MASK_BLOCK, CausalMask, Layout, key_meta, training_layout
from .losses import linear_cross_entropy
from .model import KVCache, MoE, Transformer
from .prefix_attention import PrefixBlockMask

MODES = ("frozen-ar", "full")
# Where evaluations on a GPU measure acceptance (the profile the drafter file carries for the
# tuner of `--proposals auto`), unless --eval-prompt names others; apart from the bench's prompts.
CALIBRATION_PROMPTS = (
    "Explain what a hash table is and when to use one.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What are three tips for writing a good email?",
    "Write a Python function that reverses the words in a sentence.",
    "Summarize the water cycle in a few sentences.",
    "Write a Python function that counts the vowels in a string.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a short plan for learning to cook.",
)
CALIBRATION_NEW_TOKENS = 128  # tokens decoded a calibration prompt


@dataclass
class TrainConfig:
    out: str
    data: list[str] = field(default_factory=list)
    model: str | None = None
    mode: str = "frozen-ar"
    block_size: int = 16
    seq_len: int = 512
    batch_size: int = 16  # rows per optimizer step, over all GPUs
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.0
    alpha: float = 1.0
    lora_rank: int = 64  # frozen-ar: adapter rank; full: 0 trains every weight
    lora_alpha: float = 64.0
    router_aux: float = 0.01
    freeze_router: bool = False
    dtype: str = "bfloat16"
    compile: bool = False
    grad_checkpointing: bool = False
    eval_every: int = 200
    eval_rows: int = 32
    save_every: int = 200
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    eval_prompts: list[str] | None = None  # None: default_eval_prompts(device)
    init_drafter: str | None = None  # start from this drafter's weights (a new run)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise TidarError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 2 <= self.block_size <= 64:
            raise TidarError(f"--block-size must be between 2 and 64, got {self.block_size}")
        if self.seq_len < 2 * self.block_size:
            raise TidarError(
                f"--seq-len {self.seq_len} is too short for blocks of {self.block_size}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise TidarError("--steps, --batch-size and --grad-accum must be positive")
        if self.lora_rank < 0:
            raise TidarError("--lora-rank must be >= 0")
        counts = {"--eval-every": self.eval_every, "--eval-rows": self.eval_rows,
                  "--save-every": self.save_every, "--log-every": self.log_every}
        for flag, value in counts.items():
            if value < 1:
                raise TidarError(f"{flag} must be at least 1, got {value}")
        if not 0 <= self.lr < math.inf or self.warmup < 0:
            raise TidarError(f"need a finite --lr >= 0 and --warmup >= 0, got {self.lr} and "
                             f"{self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TidarError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        weights = {"--weight-decay": self.weight_decay, "--alpha": self.alpha,
                   "--router-aux": self.router_aux, "--lora-alpha": self.lora_alpha}
        for flag, value in weights.items():
            if not 0 <= value < math.inf:
                raise TidarError(f"{flag} must be a finite number >= 0, got {value}")
        if not self.data:
            raise TidarError("no training data: pass --data SOURCE [SOURCE ...]")
        if self.init_drafter is not None and not Path(self.init_drafter).is_file():
            raise TidarError(f"drafter {self.init_drafter} does not exist")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise TidarError("--device cuda requested but no CUDA device is available")

    def run_key(self, fingerprint: str) -> str:
        """What must match for ``--resume``: the base model and everything shaping the run."""
        keys = ("mode", "block_size", "seq_len", "batch_size", "lora_rank", "data", "seed")
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"base": fingerprint})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the objective -----------------------------------------------------------------------------
def mask_half(layout: Layout, length: int, capacity: int) -> Layout:
    """The mask half of a training layout, with scratch slots after a clean-half cache."""
    rows = layout.tokens.shape[0]
    scratch = (capacity + torch.arange(length, device=layout.tokens.device)).expand(rows, -1)
    return Layout(
        layout.tokens[:, length:],
        layout.positions[:, length:],
        layout.horizon[:, length:],
        layout.block[:, length:],
        clean=0,
        slots=scratch,
    )


def default_eval_prompts(device: torch.device) -> list[str]:
    """The built-in calibration prompts on a GPU (a second or two an evaluation); none on the
    CPU, where decoding them with the full proposal set takes minutes for a 135M model."""
    return list(CALIBRATION_PROMPTS) if device.type == "cuda" else []


def tidar_losses(
    model: Transformer, tokens: Tensor, block_size: int, offsets: Tensor, mode: str,
    flex: bool = False,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(CE_AR sum or None, CE_diff sum, diffusion hidden states)`` for rows ``tokens [B, L]``."""
    length = tokens.shape[1]
    layout = training_layout(tokens, block_size, offsets, model.cfg.mask_id)
    if mode == "full":
        masks = model.masks(layout, key_meta(layout), flex=flex)
        hidden = model(layout, masks=masks, hidden_only=True)
        ar = linear_cross_entropy(hidden[:, : length - 1], model.head_weight, tokens[:, 1:])
        diff_hidden = hidden[:, length:]
        return ar, linear_cross_entropy(diff_hidden, model.head_weight, tokens), diff_hidden
    # frozen-ar: the clean half is the base model; run it once as a cache, without autograd.
    capacity = length
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, tokens.shape[0], capacity, length, dtype, tokens.device)
    clean = Layout(
        layout.tokens[:, :length], layout.positions[:, :length], layout.horizon[:, :length],
        layout.block[:, :length], clean=length, slots=layout.positions[:, :length],
    )
    # Clean tokens fill slots 0..L-1: plain causal attention, unless windows restrict it.
    clean_masks = ({None: CausalMask()} if not any(model.cfg.sliding_windows)
                   else model.masks(clean, key_meta(clean, cache.slots), flex=flex))
    with torch.no_grad():
        model(clean, cache, masks=clean_masks, hidden_only=True)
    drafts = mask_half(layout, length, capacity)
    masks = ({None: PrefixBlockMask.for_offsets(offsets, block_size, length)}
             if not any(model.cfg.sliding_windows)
             else model.masks(drafts, key_meta(drafts, cache.slots), flex=flex))
    hidden = model(drafts, cache, masks=masks, hidden_only=True)
    return None, linear_cross_entropy(hidden, model.head_weight, tokens), hidden


# Inductor options that time flex_attention's tile choices and leave matmuls to cuBLAS.
ATTENTION_AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN"}
# The BlockMask tile under tuned attention tiles (64 x 64, the tuner's pick for the kernels):
# flex_attention computes 22% less of the doubled row than over 128 x 128 mask tiles.
TUNED_FLEX_MASK_BLOCK = 64


def compile_blocks(model: Transformer, autotune_attention: bool = False) -> None:
    """torch.compile each transformer block: the blocks share code, so one compilation serves
    all of them, and the eager elementwise work (norms, RoPE, SiLU) is fused.

    ``autotune_attention``: inductor times flex_attention's tile choices for the shapes it
    meets (about 40 s for the forward and backward of one shape; matmuls stay with cuBLAS),
    and the model's BlockMasks get 64 x 64 tiles, which its default kernel tiles would not
    divide. Full mode on the H100: 169.5k clean tokens/s with default tiles, 176.3k tuned,
    184.4-185.4k tuned over 64 x 64 BlockMask tiles (docs/results.md section 4)."""
    options = ATTENTION_AUTOTUNE if autotune_attention else None
    model.flex_mask_block = TUNED_FLEX_MASK_BLOCK if autotune_attention else FLEX_MASK_BLOCK
    for block in model.layers:
        block.compile(dynamic=False, options=options)


def uses_flex(model: Transformer, mode: str, device: torch.device) -> bool:
    """Whether training attention runs through flex_attention: on CUDA, full mode's doubled
    row, and frozen-AR under sliding windows (otherwise SDPA and ``prefix_attention``)."""
    return device.type == "cuda" and (mode == "full" or any(model.cfg.sliding_windows))


def router_aux_loss(model: torch.nn.Module) -> Tensor | None:
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and hasattr(m, "aux_loss")]
    return torch.stack(losses).mean() if losses else None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from ``lr`` to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# -- model preparation -------------------------------------------------------------------------
def prepare(model: Transformer, cfg: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze or wrap for the mode; return the trainable parameters by name."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "frozen-ar":
        if cfg.lora_rank:
            add_row_lora(model, cfg.lora_rank, cfg.lora_alpha)
    elif cfg.lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(LORA_TARGETS)
        )
        inject_adapter_in_model(lora, model)
    else:
        for name, p in model.named_parameters():
            is_router = name.endswith("mlp.gate.weight")
            p.requires_grad_(not (cfg.freeze_router and is_router))
    model.mask_embedding.requires_grad_(True)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def frozen_to(model: Transformer, dtype: torch.dtype) -> None:
    """Frozen-AR: the frozen weights never update, so they are kept in the compute dtype; the
    trained ones (mask embedding, adapters) stay float32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, rows: Tensor, cfg: TrainConfig, flex: bool) -> dict:
    """Held-out AR loss, diffusion loss and diffusion accuracy per block position."""
    model.eval()
    b, length = cfg.block_size, rows.shape[1]
    offsets = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    ar_sum, diff_sum, hidden = tidar_losses(model, rows, b, offsets, "full", flex)
    preds = model.head(hidden).argmax(-1)
    correct = (preds == rows).float()
    per_position = correct.reshape(rows.shape[0], -1, b)[:, : length // b].mean((0, 1))
    model.train()
    n = rows.numel()
    return {
        "eval/ar_loss": ar_sum.item() / (n - rows.shape[0]),
        "eval/diff_loss": diff_sum.item() / n,
        "eval/diff_accuracy": correct.mean().item(),
        "eval/diff_accuracy_by_position": per_position.tolist(),
    }


def calibration_extra(measured: dict) -> dict:
    """What a drafter file keeps of ``measure_acceptance``'s result for the tuner
    (``tuner.Acceptance.of_drafter``); a record from before the replay has no replayed
    tokens per pass."""
    return {"acceptance_by_position": measured["eval/acceptance_by_position"],
            "tokens_per_pass_by_proposals":
                measured.get("eval/tokens_per_pass_by_proposals", {})}


def eval_prompt_ids(loaded, cfg: TrainConfig) -> list[list[int]]:
    """The evaluations' calibration prompts as tokens, checked now rather than at the first
    evaluation (an empty one, or one too long for the context)."""
    from .engine import DecodeConfig, Engine
    from .generate import encode_prompt

    ids = [encode_prompt(loaded.tokenizer, p, raw=False) for p in cfg.eval_prompts]
    if ids:
        Engine(loaded.model, ()).check_prompts(ids, DecodeConfig(
            block_size=cfg.block_size, max_new_tokens=CALIBRATION_NEW_TOKENS))
    return ids


def measure_acceptance(model, prompts: list[list[int]], stop_ids, block_size: int,
                       max_new_tokens: int = CALIBRATION_NEW_TOKENS, batch_size: int = 0,
                       progress: bool = False) -> dict:
    """Greedy ``lossless`` tokens per pass and acceptance by draft position (``P(k >= j)``)
    of the model being trained, on a few prompts, and each proposal count's tokens per pass
    replayed from the same outputs (``tidar.acceptance``): the calibration the tuner reads.
    ``batch_size`` prompts decode together (0: all of them); ``progress``: bars on stderr."""
    from tqdm import tqdm

    from .acceptance import tokens_per_pass_by_proposals
    from .engine import DecodeConfig, Engine, Stats
    from .tuner import proposal_counts

    engine = Engine(model, stop_ids)
    cfg = DecodeConfig(block_size=block_size, max_new_tokens=max_new_tokens)
    engine.check_prompts(prompts, cfg)
    model.eval()
    stats, pairs = Stats(block_size), []
    step = batch_size or len(prompts)
    # Eagerly: decode shapes would each compile the training blocks again (seconds apiece on
    # a GPU) and use up their recompile limit; a few prompts decode in about a second.
    with torch.compiler.set_stance("force_eager"):
        with tqdm(total=len(prompts) * max_new_tokens, desc="decoding", unit="tok",
                  disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(prompts), step):
                chunk = prompts[start:start + step]
                outputs = [[] for _ in chunk]
                for row, tokens in engine.stream(chunk, cfg):
                    outputs[row] += tokens
                    bar.update(len(tokens))
                bar.update(len(chunk) * max_new_tokens - sum(map(len, outputs)))  # stopped
                stats.add(engine.last_stats)
                pairs += zip(chunk, outputs, strict=True)
        replayed = tokens_per_pass_by_proposals(
            model, tqdm(pairs, desc="replaying", unit="prompt", disable=not progress,
                        file=sys.stderr),
            block_size, proposal_counts(block_size))
    model.train()
    return {"eval/tokens_per_pass": stats.tokens_per_pass,
            "eval/acceptance_by_position": stats.acceptance,
            "eval/tokens_per_pass_by_proposals": replayed}


# -- checkpoints ---------------------------------------------------------------------------------
def _write_checkpoint(out: Path, trainable: dict, optim: dict, state: dict) -> None:
    """Atomically replace ``out/checkpoint``: write a sibling directory, then rename."""
    from safetensors.torch import save_file

    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.float().contiguous().cpu() for k, v in trainable.items()},
              str(tmp / "trainable.safetensors"))
    give_plain_mode(tmp / "trainable.safetensors")
    torch.save(optim, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(out: Path, run_key: str) -> tuple[dict, dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    final = out / "checkpoint"
    if not (final / "state.json").exists() and (out / "checkpoint.old" / "state.json").exists():
        final = out / "checkpoint.old"  # killed between _write_checkpoint's two renames
    if not (final / "state.json").exists():
        raise TidarError(f"--resume: no checkpoint in {out}")
    try:
        state = json.loads((final / "state.json").read_text())
        if state.get("run_key") != run_key:
            raise TidarError(
                f"--resume: the checkpoint in {out} belongs to another run (different model, "
                "data or settings); use a new --out or the original settings"
            )
        trainable = load_file(str(final / "trainable.safetensors"))
        optim = torch.load(final / "optimizer.pt", weights_only=False)
    except (ValueError, OSError, RuntimeError, EOFError, SafetensorError) as exc:
        raise TidarError(f"--resume: the checkpoint in {final} is unreadable ({exc})") from None
    return trainable, optim, state


# -- the run -------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _mean_over_ranks(*values: float, device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _peak_flops(device: torch.device) -> float | None:
    """Dense bf16 datasheet peak, for MFU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return 989e12 if ("H100" in name or "H200" in name) else None


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    from .data import PackedRows, held_out_rows
    from .generate import stop_ids
    from .loading import load_model
    from .prefetch import Prefetched

    cfg.validate()
    rank, world = _distributed()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TidarError(
            f"--batch-size {cfg.batch_size} must be divisible by GPUs x --grad-accum "
            f"({world} x {cfg.grad_accum})"
        )
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda"
                          else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TidarError("--device cuda requested but no CUDA device is available")
    if cfg.eval_prompts is None:
        cfg = replace(cfg, eval_prompts=default_eval_prompts(device))
    torch.manual_seed(cfg.seed)
    out = output_dir(cfg.out)

    loaded = load_model(cfg.model, device="cpu", dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise TidarError("the model has no tokenizer: conversion needs one to read the data")
    prompt_ids = eval_prompt_ids(loaded, cfg)
    run_key = cfg.run_key(loaded.fingerprint)
    eos = (loaded.config.eos_token_ids or (tokenizer.eos_token_id,))[0]
    rows_source = PackedRows(cfg.data, tokenizer, eos, cfg.seq_len, cfg.batch_size, cfg.seed)
    eval_rows = held_out_rows(cfg.data, tokenizer, eos, cfg.seq_len, cfg.eval_rows)
    named = prepare(model, cfg)
    tokens_before = init_from_drafter(named, cfg, loaded.fingerprint) if cfg.init_drafter else 0
    amp = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    if device.type == "cuda" and cfg.mode == "frozen-ar":
        frozen_to(model, amp)
    model.to(device)
    model.checkpointing = cfg.grad_checkpointing
    model.train()
    if world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    # fully_shard swaps parameters for sharded ones: collect the trainable ones only now.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    names = [n for n, _ in named]
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    autotune = cfg.compile and uses_flex(model, cfg.mode, device)
    if cfg.compile:
        compile_blocks(model, autotune_attention=autotune)
    flex = device.type == "cuda"

    start_step, history = 0, []
    if resume:
        saved, optim_state, state = _read_checkpoint(out, run_key)
        with torch.no_grad():
            for n, p in named:
                p.copy_(saved[n].to(p.dtype))
        optimizer.load_state_dict(optim_state)
        start_step, history = state["step"], state["history"]
        rows_source.load_state_dict(state["data"])
        # Metrics logged after the checkpoint are replayed by this run: drop them.
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))

    writer = _tensorboard(out) if rank == 0 else None
    total_params = sum(p.numel() for p in model.parameters())
    flops_per_clean_token = (6 if cfg.mode == "full" else 4) * 2 * total_params
    peak = _peak_flops(device)
    bar = _progress(start_step, cfg.steps, enabled=progress and rank == 0)
    if cfg.compile:  # the first step waits for compilation: say so instead of a still bar
        bar.set_postfix_str("compiling" + (", autotuning attention tiles (~40 s)"
                                           if autotune else ""))
    tokens_done, t0 = 0, time.perf_counter()
    batches = Prefetched(rows_source)  # tokenising overlaps the steps
    try:
        for step in range(start_step, cfg.steps):
            batch = batches.next_batch()[rank::world].to(device)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            offsets = torch.randint(0, cfg.block_size, (batch.shape[0],), generator=gen)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ar_loss, diff_loss, grad_norm = _optimizer_step(
                model, optimizer, trainable, batch, offsets.to(device), cfg, amp, flex)
            if world > 1:  # log the global mean, not rank 0's share of the batch
                ar_loss, diff_loss = _mean_over_ranks(ar_loss, diff_loss, device=device)
            tokens_done += cfg.batch_size * cfg.seq_len
            done = step + 1
            record = {"step": done, "lr": lr, "diff_loss": diff_loss, "grad_norm": grad_norm,
                      "tokens_per_second": tokens_done / (time.perf_counter() - t0)}
            if cfg.mode == "full":
                record["ar_loss"] = ar_loss
            if peak:
                record["mfu"] = record["tokens_per_second"] * flops_per_clean_token / (peak * world)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                record.update(evaluate(model, eval_rows.to(device), cfg, flex))
                if prompt_ids and world == 1:
                    record.update(measure_acceptance(model, prompt_ids, stop_ids(loaded),
                                                     cfg.block_size))
            if done % cfg.log_every == 0 or "eval/diff_loss" in record:
                history.append(record)
                _log(writer, out, record, rank)
            bar.update(1)
            bar.set_postfix(loss=f"{diff_loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            if done % cfg.save_every == 0 or done == cfg.steps:
                _save(model, optimizer, names, cfg, out, loaded.fingerprint, run_key, done,
                      history, batches.state_dict(), rank, tokens_before)
    finally:
        batches.close()
    bar.close()
    return {"history": history, "drafter": str(out / "drafter.safetensors")}


def _optimizer_step(model, optimizer, trainable, batch: Tensor, offsets: Tensor,
                    cfg: TrainConfig, amp: torch.dtype, flex: bool) -> tuple[float, float, float]:
    """One optimizer step over ``batch``, in ``cfg.grad_accum`` micro-batches: (AR loss,
    diffusion loss, gradient norm). The losses stay on the device until the step is queued,
    so the host waits for the GPU once per step, at its end."""
    micro = batch.shape[0] // cfg.grad_accum
    ar_total = diff_total = torch.zeros((), device=batch.device)
    for m in range(cfg.grad_accum):
        rows, offs = batch[m * micro : (m + 1) * micro], offsets[m * micro : (m + 1) * micro]
        with torch.autocast(batch.device.type, dtype=amp, enabled=amp != torch.float32):
            ar, diff, _ = tidar_losses(model, rows, cfg.block_size, offs, cfg.mode, flex)
        diff_mean = diff / rows.numel()
        loss = diff_mean
        if ar is not None:
            ar_mean = ar / (rows.numel() - rows.shape[0])
            loss = (cfg.alpha * ar_mean + diff_mean) / (1 + cfg.alpha)
            ar_total = ar_total + ar_mean.detach() / cfg.grad_accum
        aux = router_aux_loss(model) if cfg.mode == "full" else None
        if aux is not None and cfg.router_aux:
            loss = loss + cfg.router_aux * aux
        (loss / cfg.grad_accum).backward()
        diff_total = diff_total + diff_mean.detach() / cfg.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ar_loss, diff_loss = torch.stack([ar_total, diff_total]).tolist()
    return ar_loss, diff_loss, float(grad_norm)


def _save(model, optimizer, names, cfg, out, fingerprint, run_key, step, history, data, rank,
          tokens_before: int = 0):
    """Checkpoint and drafter file; ``tokens_before``: what an ``--init-drafter`` had seen."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:
        return
    trainable = {n: full[n] for n in names}
    state = {"step": step, "run_key": run_key, "config": asdict(cfg), "history": history,
             "data": data}
    _write_checkpoint(out, trainable, optim, state)
    tokens = step * cfg.batch_size * cfg.seq_len
    info = DrafterInfo(
        block_size=cfg.block_size, mode=cfg.mode, base_fingerprint=fingerprint,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        extra={"steps": step, "clean_tokens": tokens, "seq_len": cfg.seq_len},
    )
    if tokens_before:  # a continued drafter: what it has seen over all its runs
        info.extra["clean_tokens_total"] = tokens_before + tokens
    calibrated = [r for r in history if "eval/acceptance_by_position" in r]
    if calibrated:  # the latest calibration, for the tuner of `--proposals auto`
        latest = calibrated[-1]
        info.extra |= calibration_extra(latest) | {
            "calibration": {"step": latest["step"], "prompts": len(cfg.eval_prompts),
                            "tokens_per_pass": latest["eval/tokens_per_pass"]}}
    save_drafter(out / "drafter.safetensors", _drafter_tensors(full, names), info)


def _drafter_key(name: str) -> str:
    """The drafter file's name for a trainable parameter (peft's adapter names or ours)."""
    if name == "mask_embedding":
        return name
    if "lora_A" in name or "lora_B" in name:
        kind = "lora_A" if ".lora_A" in name else "lora_B"
        return f"{name.split('.lora_')[0]}.{kind}"
    return f"weights.{name}"  # full mode without adapters: every weight


def _drafter_tensors(full: dict[str, Tensor], names: list[str]) -> dict:
    """Drafter file tensors from a full state dict (plain or FSDP-gathered), peft or ours;
    ``names``: the trainable parameters, the mask embedding among them."""
    return {_drafter_key(n): full[n] for n in names}


def init_from_drafter(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig,
                      fingerprint: str) -> int:
    """Load ``cfg.init_drafter`` into the trainable parameters: continue a drafter's training
    in a new run (fresh optimizer and schedule), e.g. on more data. Returns the clean tokens
    that drafter had seen over all its runs."""
    from .drafter import read_drafter

    tensors, info = read_drafter(cfg.init_drafter, fingerprint)
    theirs = (info.mode, info.block_size, info.lora_rank, info.lora_alpha)
    mine = (cfg.mode, cfg.block_size, cfg.lora_rank, cfg.lora_alpha)
    if theirs != mine:
        raise TidarError(
            f"--init-drafter {cfg.init_drafter} has mode, block size, LoRA rank and alpha "
            f"{theirs}; this run has {mine}"
        )
    with torch.no_grad():
        for name, param in named:
            param.copy_(tensors[_drafter_key(name)])
    extra = info.extra or {}
    return int(extra.get("clean_tokens_total", extra.get("clean_tokens", 0)))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _log(writer, out: Path, record: dict, rank: int) -> None:
    if rank != 0:
        return
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                writer.add_scalar(key, value, record["step"])
        writer.flush()


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="convert", unit="step",
                file=sys.stderr, dynamic_ncols=True)
