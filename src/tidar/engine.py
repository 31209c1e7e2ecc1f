"""The decoding engine: prefill, then verify/propose passes over one shared KV cache.

It sees token ids, not text. Each pass verifies the previous pass's drafts with the AR head
and proposes the next drafts for every acceptance length in the proposal set ``S``
(DESIGN.md section 3); ``ar`` is the same engine with ``b = 1`` and no proposals.

All decoding state lives in fixed-shape device tensors that a pass updates in place, with no
host synchronisation: token bookkeeping (stop tokens, budgets, output buffer) is tensor
arithmetic and randomness is a counter-based hash of (row seed, pass, slot). On CUDA the pass
is captured in a CUDA graph and replayed; the host looks at the state every ``sync_every``
passes (fewer when the rows' token budget ends sooner) to stream tokens, and between looks
stops queueing passes once no row is live (``_run_passes``). Graphs,
caches and state buffers are kept per (batch-size bucket, cache-capacity bucket,
configuration) and reused by later calls: a call with the same shapes only prefills and
replays.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .errors import TidarError
from .layouts import Layout, decode_layout, prefill_layout
from .model import KVCache, Transformer
from .sampling import (
    SamplingParams,
    hash_uniforms,
    mix_logits,
    one_hot,
    probabilities,
    sample,
    verify_greedy,
    verify_sampled,
)
from .spans import Spans

SAMPLERS = ("ar", "lossless", "mix")


@dataclass(frozen=True)
class DecodeConfig:
    sampler: str = "lossless"
    block_size: int = 16
    proposals: tuple[int, ...] | None = None  # the set S; None is every length 0 .. b-1
    beta: float = 1.0
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 256
    seed: int = 0

    def resolved(self) -> DecodeConfig:
        """Validated, with ``ar`` turned into ``b = 1, S = {}`` and ``S`` made explicit."""
        if self.sampler not in SAMPLERS:
            raise TidarError(
                f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise TidarError(f"--beta must be in [0, 1], got {self.beta}")
        p = self.sampling
        if not 0.0 <= p.temperature < math.inf or not 0.0 < p.top_p <= 1.0 or p.top_k < 0:
            raise TidarError("need a finite temperature >= 0, 0 < top-p <= 1 and top-k >= 0")
        if self.max_new_tokens < 1:
            raise TidarError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.sampler == "ar":
            return replace(self, block_size=1, proposals=(), beta=1.0)
        b = self.block_size
        if not 2 <= b <= 64:
            raise TidarError(f"--block-size must be between 2 and 64, got {b}")
        proposals = tuple(sorted(set(range(b) if self.proposals is None else self.proposals)))
        if not proposals or proposals[0] != 0 or proposals[-1] >= b:
            raise TidarError(f"the proposal set must contain 0 and lie in 0 .. {b - 1}")
        return replace(self, proposals=proposals)


def proposal_floor(proposals: tuple[int, ...], block_size: int) -> list[int]:
    """The block each accepted count ``k`` continues from: ``k' = max{j in S : j <= k}``
    (DESIGN.md section 3; ``S`` holds 0)."""
    return [max(j for j in proposals if j <= k) for k in range(block_size)]


def proposal_set(count: int, block_size: int) -> tuple[int, ...]:
    """``count`` proposal blocks: the shortest acceptance lengths, the most likely ones."""
    if not 1 <= count <= block_size:
        raise TidarError(f"--proposals takes 1 .. {block_size} (the block size), all or auto, "
                         f"got {count}")
    return tuple(range(count))


@dataclass
class Stats:
    """Per run: passes (prefill included), tokens, and what each pass accepted."""

    block_size: int
    passes: list[int] = field(default_factory=list)  # per row
    tokens: list[int] = field(default_factory=list)  # per row
    committed_hist: list[int] = field(default_factory=list)  # [n] = decode passes with k+1 = n

    @property
    def decode_passes(self) -> int:
        return sum(self.committed_hist)

    @property
    def tokens_per_pass(self) -> float:
        return sum(self.tokens) / max(1, sum(self.passes))

    def add(self, other: Stats) -> None:
        """Count another run's rows and passes in with this one's."""
        self.passes += other.passes
        self.tokens += other.tokens
        self.committed_hist = [a + b for a, b in itertools.zip_longest(
            self.committed_hist, other.committed_hist, fillvalue=0)]

    def row_tokens_per_pass(self, row: int) -> float:
        return self.tokens[row] / max(1, self.passes[row])

    @property
    def acceptance(self) -> list[float]:
        """``P(k >= j)`` for draft positions ``j = 1 .. b-1`` over decode passes."""
        total = max(1, self.decode_passes)
        return [sum(self.committed_hist[j + 1 :]) / total for j in range(1, self.block_size)]

    def as_dict(self) -> dict:
        return {
            "passes": sum(self.passes),
            "num_tokens": sum(self.tokens),
            "tokens_per_pass": self.tokens_per_pass,
            "committed_per_pass_histogram": self.committed_hist[1:],
            "acceptance_by_position": self.acceptance,
        }


@dataclass
class _State:
    """Per-row decoding state: fixed-shape device tensors, updated in place by each pass."""

    committed: Tensor  # [B] tokens in the cache
    next_token: Tensor  # [B] g: committed, not yet in the cache
    drafts: Tensor  # [B, b-1]
    draft_valid: Tensor  # [B, b-1] False for fillers of a partial proposal set
    draft_logits: Tensor | None  # [B, b-1, V] z_D of the drafting block (mix)
    draft_probs: Tensor | None  # [B, b-1, V] q (sampling)
    active: Tensor  # [B] bool
    generated: Tensor  # [B] tokens emitted
    budget: Tensor  # [B] max new tokens
    out: Tensor  # [B, capacity + b + 1] emitted tokens; the last column absorbs masked writes
    passes: Tensor  # [B] passes while active, prefill included
    counter: Tensor  # [B] passes run, the RNG counter
    seeds: Tensor  # [B]
    hist: Tensor  # [b + 1] decode passes by k+1 (index 0 collects inactive rows)

    def tensors(self) -> list[Tensor]:
        return [t for t in vars(self).values() if isinstance(t, Tensor)]


@dataclass
class _Runner:
    """What one (batch, capacity, configuration) keeps between calls: the KV cache, the state
    buffers a pass updates in place, and the captured pass."""

    cache: KVCache
    consts: dict
    state: _State | None = None
    step: Callable[[], None] | None = None
    live_copies: Tensor | None = None  # [2, rows] on the host: liveness after recent passes
    live_events: list | None = None  # CUDA: when each of those copies has landed
    joins: dict[int, _Join] = field(default_factory=dict)  # by padded prompt length
    join_cache: KVCache | None = None  # one row: where a joining prompt is prefilled


@dataclass
class _Join:
    """A joining prompt's prefill at one padded length, on buffers a captured graph reads:
    the layout, the last prompt token's index, the seed, the token budget and the row it
    joins."""

    layout: Layout
    last: Tensor
    seeds: Tensor
    budget: Tensor
    row: Tensor
    run: Callable[[], None] | None = None


CAPACITY_BUCKET = 256  # cache capacities are rounded up to this, so lengths share graphs
# With CUDA graphs a joining prompt is padded to a multiple of this and prefilled by the
# runner's captured graph for that length: eager, its 30-layer prefill held a running batch
# of the default for 39 ms of host launches (H200, docs/results.md section 5).
JOIN_LENGTH_MULTIPLE = 64
MAX_RUNNERS = 8  # kept per engine, least recently used dropped first
# A new batch of at most this many prompts is prefilled one prompt at a time by the joins'
# captured graphs (Engine._start); a larger one by one eager batched prefill.
START_BY_JOINS = 8
# Inductor tunes the fused kernels' tile sizes (the AR step 1.83 -> 1.61 ms on the H100) and
# launches independent kernels of a pass as one (combo kernels; H100, batch 1: 387 -> 347
# kernels, t(272) 1.41 -> 1.35 ms, t(32) 0.89 -> 0.83 ms; batch 4 and 16 faster too, except
# t(272) at batch 4, 2-4% slower; docs/results.md section 2).
COMPILE_OPTIONS = {"coordinate_descent_tuning": True, "combo_kernels": True}
# Inductor's kernels launch with programmatic dependent launch (``tidar.pdl``; Hopper and
# later, ignored elsewhere) in the AR step and in drafting passes of at most PDL_DRAFT_ROWS
# rows, all sequences together. On the H200 it made the AR step 8% faster and, with the fused
# drafting matmuls, a batch-1 pass of one proposal block (32 rows) 10% faster; a pass of 80
# rows gained nothing and larger ones got 2-18% slower (docs/results.md section 2).
INDUCTOR_PDL = True
PDL_DRAFT_ROWS = 32
# Drafting passes of at most this many rows (all sequences together) run the head once over
# every row instead of twice (verify rows, then the block rows picked after verification):
# a small GEMM costs about one read of the head's weights, 56 MB for the default. H100, one
# proposal block: batch 1 (32 rows) 0.84 -> 0.83 ms, batch 4 (128 rows) 1.29 -> 1.26 ms;
# at 256 rows (batch 8) one head was 0.5-1% slower (docs/results.md section 2).
ONE_HEAD_MAX_ROWS = 128


def compile_options(pdl: bool) -> dict:
    """Inductor options for the graphs of passes with (``pdl``) or without PDL."""
    return {**COMPILE_OPTIONS, "triton.enable_pdl": True} if pdl and INDUCTOR_PDL \
        else COMPILE_OPTIONS


def takes_pdl(batch: int, cfg: DecodeConfig) -> bool:
    """Whether a pass over ``batch`` sequences (the bucket) under ``cfg`` runs the graphs
    compiled with PDL."""
    return not cfg.proposals or batch * (cfg.block_size + scratch_slots(cfg)) <= PDL_DRAFT_ROWS


def compile_static(fn: Callable, options: dict | None = None) -> Callable:
    """``fn`` under torch.compile, one static graph per pass shape (dynamo would otherwise
    make a second shape's sizes symbolic and serve every later shape from that graph)."""
    return torch.compile(fn, dynamic=False,
                         options=COMPILE_OPTIONS if options is None else options)


class Engine:
    def __init__(self, model: Transformer, stop_ids: tuple[int, ...] = (),
                 cuda_graphs: bool | None = None, compile: bool = False):
        """``compile``: fuse the decode pass with torch.compile in three parts: the layout
        and block inputs, each block (one compiled graph serves every block), and the head
        with verification and bookkeeping. Each pass shape (batch bucket, queries per row) gets
        its own static graphs, compiled on its first pass (14-30 s on an H200); the cache's
        slot count stays symbolic and ``mix``'s beta, the temperature and top-p are data, so
        every capacity bucket and value shares them (each top-k count compiles its own).
        Prefill stays eager, as its shapes vary per call; with CUDA graphs, a prompt that
        joins a running batch is prefilled by a graph captured per padded length (``_admit``),
        and so is each prompt of a small new batch on a runner that has decoded before.

        The engine assumes the model's weights stay as they are while it exists.
        """
        self.model = model
        self.stop_ids = tuple(stop_ids)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # a pass's three parts (inputs, blocks, head and bookkeeping), by whether it takes
        # PDL (``takes_pdl``): compiled, those graphs take other inductor options
        self._parts = dict.fromkeys((False, True), (self._enter_pass, None, self._leave_pass))
        self.compiled = compile
        if compile:
            raise_recompile_limit()
            for pdl in (False, True):
                options = compile_options(pdl)
                self._parts[pdl] = (
                    compile_static(self._enter_pass, options),
                    [compile_static(block, options) for block in model.layers],
                    compile_static(self._leave_pass, options))
        self.last_stats: Stats | None = None
        self._live: _State | None = None  # the running stream's state, for finish()
        self._ended: set[int] = set()  # and the rows finish() ended
        self._runners: OrderedDict[tuple, _Runner] = OrderedDict()
        self.moves = 0  # running batches moved into a larger batch-size bucket (_grow)
        # Device seconds a running batch stood still: "join" (a joining prompt's prefill)
        # and "move" (_grow).
        self.stalls = Spans(self.device)
        self._join_pool = None  # the memory pool of the joins' CUDA graphs (_admit)
        # Joining prompts are prefilled by captured graphs (_admit), padded to a multiple of
        # this: one graph per multiple.
        self.join_graphs = self.cuda_graphs
        self.join_length_multiple = JOIN_LENGTH_MULTIPLE if self.cuda_graphs else 1
        # New batches of at most START_BY_JOINS prompts enter a runner that has decoded
        # before as joining prompts do, one admission each (_start).
        self.start_by_joins = self.cuda_graphs

    # -- public API -------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], cfg: DecodeConfig, seeds: list[int] | None = None
    ) -> tuple[list[list[int]], Stats]:
        outputs: list[list[int]] = [[] for _ in prompts]
        for row, tokens in self.stream(prompts, cfg, seeds):
            outputs[row].extend(tokens)
        return outputs, self.last_stats

    def stream(
        self, prompts: list[list[int]], cfg: DecodeConfig, seeds: list[int] | None = None,
        sync_every: int | None = None, more: Callable[[int], list[int] | None] | None = None,
        min_rows: int = 1, max_rows: int = 0,
    ) -> Iterator[tuple[int, list[int]]]:
        """Yield ``(row, tokens)`` as tokens are committed; stats end up in ``last_stats``.

        Each row's randomness is a function of its seed (``seeds[row]``, default
        ``cfg.seed``) and its pass count, so a row gets the same tokens in a batch as alone.
        ``sync_every``: passes between looks at the state (default: 8 replays of a CUDA graph,
        where a look stalls the device; else 1, where it costs little).

        ``more(longest)`` (continuous batching): asked at a look while a row of the batch is
        free (its sequence ended, or an idle filler of the batch-size bucket) and another
        still decodes, for another prompt of at most ``longest`` tokens, or None. A prompt it
        gives is prefilled alone into the free row and decodes with the rest (seed
        ``cfg.seed``); its tokens come as row ``len(prompts) + k`` for the k-th prompt
        ``more`` gave. Once no row decodes the stream ends. ``min_rows``: decode at least this
        many rows (idle ones wait for ``more``'s prompts), so that a batch started by one
        prompt has room for others; every pass pays for them. ``max_rows``: at most this many
        sequences decode at once, and ``more`` is asked when no row is free too: a prompt it
        gives moves the batch into the next batch-size bucket (``_grow``), up to the bucket
        of ``max_rows``. 0: no growth, and as many sequences as the bucket has rows.
        """
        sync_every = sync_every or (8 if self.cuda_graphs else 1)
        cfg = cfg.resolved()
        self.check_prompts(prompts, cfg)
        batch = len(prompts)
        seeds = seeds if seeds is not None else [cfg.seed] * batch
        if len(seeds) != batch:
            raise TidarError(f"got {len(seeds)} seeds for {batch} prompts")
        rows = batch_bucket(max(batch, min_rows))
        length = max(map(len, prompts)) + cfg.max_new_tokens
        with torch.inference_mode(), self.model.decode_weights():
            runner = self._runner(rows, length, cfg)
            filler = rows - batch  # rows past the batch: idle
            st = self._live = self._start(runner, prompts, cfg, seeds, rows,
                                          by_joins=self.start_by_joins)
            if filler:
                st.active[batch:] = False
            # The longest prompt another row may bring: within the cache and the context.
            b = cfg.block_size
            longest = min(runner.cache.capacity - b - 1,
                          self.model.cfg.max_position - 2 * b) - cfg.max_new_tokens
            # The sequence in each row (None: free) and, per sequence, tokens shown and passes.
            self._sequence_in = list(range(batch)) + [None] * filler
            self._ended = set()  # rows the caller finished
            shown, passes = [0] * batch, [0] * batch
            while True:
                # One copy (one sync) per look: each row's count, passes, liveness and output.
                host = torch.cat([st.generated[:, None], st.passes[:, None],
                                  st.active[:, None], st.out], 1).cpu()
                live = host[:, 2].bool()
                live[list(self._ended)] = False
                for r, seq in enumerate(self._sequence_in):
                    if seq is None:
                        continue
                    generated = int(host[r, 0])
                    if generated > shown[seq]:
                        yield seq, host[r, 3 + shown[seq] : 3 + generated].tolist()
                        shown[seq] = generated
                    passes[seq] = int(host[r, 1])
                    if not live[r]:
                        self._sequence_in[r] = None
                # Free rows take more prompts while the batch still runs (not after: the
                # caller's next batch may take a larger bucket), and so do the rows of a
                # larger bucket, up to max_rows sequences.
                free = [r for r, seq in enumerate(self._sequence_in) if seq is None]
                taken = len(self._sequence_in) - len(free)
                while more is not None and bool(live.any()) and (
                        free or batch_bucket(rows + 1) <= batch_bucket(max_rows)) and (
                        not max_rows or taken < max_rows):
                    prompt = more(longest)
                    if prompt is None:
                        break
                    self.check_prompts([prompt], cfg)
                    if len(prompt) > longest:
                        raise TidarError(f"a prompt of {len(prompt)} tokens cannot join this "
                                         f"batch: it takes at most {longest}")
                    if not free:
                        with self.stalls.span("move"):
                            runner, st = self._grow(runner, st, length, cfg)
                        free = list(range(rows, st.active.shape[0]))
                        self._sequence_in += [None] * len(free)
                        live = torch.cat([live, live.new_zeros(len(free))])
                        host = torch.cat([host, host.new_zeros(len(free), host.shape[1])])
                        rows = st.active.shape[0]
                    r = free.pop(0)
                    taken += 1
                    with self.stalls.span("join"):
                        self._admit(runner, r, prompt, cfg, cfg.seed)
                    self._ended.discard(r)
                    self._sequence_in[r] = len(shown)
                    shown.append(0)
                    passes.append(0)
                    live[r], host[r, 0] = True, 0
                if not bool(live.any()):
                    break
                # A live row emits a token or more a pass: no more passes than its budget left.
                room = int((cfg.max_new_tokens - host[:, 0])[live].max())
                self._run_passes(runner, st, min(sync_every, room))
            hist = st.hist.tolist()
            hist[0] = 0
            self.last_stats = Stats(cfg.block_size, passes, shown, hist)

    def finish(self, row: int) -> None:
        """End ``row`` of the running stream, e.g. when its text reached a stop string.

        Takes effect at the next pass; the engine sees token ids, the caller decides on text.
        """
        if row in self._sequence_in:
            slot = self._sequence_in.index(row)
            self._live.active[slot] = False
            self._ended.add(slot)

    # -- internals --------------------------------------------------------------------
    def _run_passes(self, runner: _Runner, st: _State, passes: int) -> None:
        """Up to ``passes`` passes, fewer once every row has finished (a stop token). After
        each pass the rows' liveness is copied to the host without a sync; before queueing a
        pass the host reads the copy from two passes back, so on CUDA the device always has
        a pass queued and at most one pass runs after the rows finished (a look every
        ``sync_every`` passes alone ran up to ``sync_every - 1``)."""
        if runner.live_copies is None:
            cuda = self.device.type == "cuda"
            runner.live_copies = torch.zeros(2, st.active.shape[0], dtype=torch.bool,
                                             pin_memory=cuda)
            runner.live_events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        copies, events = runner.live_copies, runner.live_events
        for i in range(passes):
            slot = i % 2
            if i >= 2:
                if events is not None:
                    events[slot].synchronize()  # pass i - 2 is done; pass i - 1 is queued
                if not bool(copies[slot].any()):
                    return
            runner.step()
            copies[slot].copy_(st.active, non_blocking=True)
            if events is not None:
                events[slot].record()

    def _runner(self, batch: int, length: int, cfg: DecodeConfig) -> _Runner:
        """The runner for ``batch`` rows of up to ``length`` tokens (prompt plus output)."""
        need = length + cfg.block_size + 1
        capacity = -(-need // CAPACITY_BUCKET) * CAPACITY_BUCKET
        key = (batch, capacity, pass_config(cfg))
        runner = self._runners.pop(key, None)
        if runner is None:
            while len(self._runners) >= MAX_RUNNERS:
                self._runners.popitem(last=False)
            cache = KVCache(self.model.cfg, batch, capacity, scratch_slots(cfg), self.dtype,
                            self.device)
            runner = _Runner(cache, self._constants(cfg))
        self._runners[key] = runner
        # In place: captured passes read these.
        runner.consts["beta"].fill_(cfg.beta)
        runner.consts["temperature"].fill_(cfg.sampling.temperature)
        runner.consts["top_p"].fill_(cfg.sampling.top_p)
        return runner

    def _start(self, runner: _Runner, prompts, cfg: DecodeConfig, seeds,
               rows: int | None = None, by_joins: bool = False) -> _State:
        """Prefill into the runner's buffers (in place, where a captured pass reads them);
        rows past the prompts (up to ``rows``) idle. ``by_joins``: a small batch on a runner
        that has decoded before is admitted prompt by prompt (``_admit``, which keeps a
        one-row cache per runner); with CUDA graphs each admission replays a captured
        prefill. An eager batched prefill of the default launched its kernels from the host
        for about 30 ms; one prompt's first tokens came in 5 ms by a join, eight prompts' in
        21-23 ms (H100, docs/results.md section 5)."""
        if by_joins and runner.state is not None and len(prompts) <= START_BY_JOINS:
            st = runner.state
            st.hist.zero_()
            for row, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
                self._admit(runner, row, prompt, cfg, seed)
            return st
        filler = (rows or len(prompts)) - len(prompts)  # copies of the first prompt
        fresh = self._prefill(prompts + prompts[:1] * filler, cfg, runner.cache,
                              seeds + seeds[:1] * filler, runner.consts)
        if runner.state is None:
            runner.state = fresh
            if self.compiled:
                _share_across_capacities(fresh, runner.cache)
            shape = pass_config(cfg)
            if self.cuda_graphs:
                runner.step = self._capture(fresh, shape, runner.cache, runner.consts)
            else:
                runner.step = lambda: self._pass(fresh, shape, runner.cache, runner.consts)
        else:
            for kept, new in zip(runner.state.tensors(), fresh.tensors(), strict=True):
                kept.copy_(new)
        return runner.state

    def _admit(self, runner: _Runner, row: int, prompt: list[int], cfg: DecodeConfig,
               seed: int) -> None:
        """Prefill ``prompt`` alone into ``row`` of the running batch: that row's cache and
        state, in place (a captured pass reads them); stale keys past the prompt lie beyond
        its horizon. The prompt, padded (``JOIN_LENGTH_MULTIPLE``), is prefilled into a
        one-row cache and copied into the row, by a graph captured per padded length."""
        multiple = self.join_length_multiple
        length = min(-(-len(prompt) // multiple) * multiple,
                     runner.cache.capacity - cfg.block_size - 1)
        join = runner.joins.get(length)
        fresh = join is None
        if fresh:
            inputs = self._prefill_inputs([prompt], cfg, runner.cache.capacity, [seed],
                                          length)
            join = _Join(*inputs, torch.tensor([row], device=self.device))
        else:
            layout, *rest = self._prefill_inputs([prompt], cfg, runner.cache.capacity,
                                                 [seed], length, "cpu")
            for name in ("tokens", "positions", "horizon", "block", "slots"):
                getattr(join.layout, name).copy_(getattr(layout, name), non_blocking=True)
            for kept, value in zip((join.last, join.seeds, join.budget), rest, strict=True):
                kept.copy_(value, non_blocking=True)
            join.row.fill_(row)
        if runner.join_cache is None:
            cache = runner.cache
            runner.join_cache = KVCache(self.model.cfg, 1, cache.capacity,
                                        cache.slots - cache.capacity, self.dtype, self.device)

        def admit() -> None:
            st, cache, into = runner.state, runner.join_cache, runner.cache
            new = self._prefill_state(join.layout, join.last, join.seeds, join.budget, cfg,
                                      cache, runner.consts)
            for kept, value in zip(st.tensors(), new.tensors(), strict=True):
                if kept is not st.hist:
                    kept.index_copy_(0, join.row, value)
            for kept, value in zip(into.k + into.v, cache.k + cache.v, strict=True):
                kept[:, :, :length].index_copy_(0, join.row, value[:, :, :length])

        if not fresh:
            join.run()
            return
        if self.join_graphs:  # the warm-up admits the prompt; replays admit later ones
            if self._join_pool is None:  # one memory pool: the joins' graphs run in turn
                self._join_pool = torch.cuda.graph_pool_handle()
            join.run = captured(admit, self._join_pool)
        else:
            join.run = admit
            admit()
        runner.joins[length] = join

    def _grow(self, runner: _Runner, st: _State, length: int,
              cfg: DecodeConfig) -> tuple[_Runner, _State]:
        """The running batch moved into the runner of the next batch-size bucket (the same
        capacity): its rows' caches and state copied over, the new rows idle. Rows keep
        their numbers and, being batch-invariant, their tokens. A runner that has decoded
        before keeps its last batch's state in the new rows, idle as rows that ended are
        (a joining prompt's prefill replaces a row's state); a new one is prefilled once
        to build its state and graphs."""
        rows, more_rows = st.active.shape[0], batch_bucket(st.active.shape[0] + 1)
        bigger = self._runner(more_rows, length, cfg)
        if bigger.state is None:
            self._start(bigger, [[0]] * more_rows, cfg, [cfg.seed] * more_rows)
        grown = self._live = bigger.state
        for kept, new in zip(st.tensors(), grown.tensors(), strict=True):
            if kept is st.hist:
                new.copy_(kept)
            else:
                new[:rows] = kept
        grown.active[rows:] = False
        self.moves += 1
        for old, new in zip(runner.cache.k + runner.cache.v, bigger.cache.k + bigger.cache.v,
                            strict=True):
            new[:rows] = old
        return bigger, grown

    def check_prompts(self, prompts: list[list[int]], cfg: DecodeConfig) -> None:
        """A one-line error for prompts ``cfg`` cannot decode (empty, past the context, ids
        outside the vocabulary); callers may check before long work, as the tuner's."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TidarError("every prompt needs at least one token")
        limit = self.model.cfg.max_position
        longest = max(map(len, prompts))
        if longest + cfg.max_new_tokens + 2 * cfg.block_size > limit:
            raise TidarError(
                f"prompt ({longest} tokens) plus {cfg.max_new_tokens} new tokens exceeds the "
                f"model's context of {limit} tokens"
            )
        vocab = self.model.cfg.vocab_size
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise TidarError(f"prompt token ids must lie in 0 .. {vocab - 1}")

    def _constants(self, cfg: DecodeConfig) -> dict:
        """Per-configuration lookup tensors, built once so a pass does no host work."""
        S, b, dev = cfg.proposals, cfg.block_size, self.device
        floor = proposal_floor(S, b) if S else [0] * b
        return {
            "floor": torch.tensor(floor, device=dev),
            "slot_of": torch.tensor([S.index(f) if S else 0 for f in floor], device=dev),
            "stop_ids": torch.tensor(self.stop_ids or (-1,), device=dev),
            "offsets": torch.arange(b, device=dev),
            "ks": torch.tensor(S, dtype=torch.long, device=dev),
            # Values as data, set by _runner: one runner, and its graphs, serve every value.
            "beta": torch.zeros((), device=dev),
            "temperature": torch.zeros((), device=dev),
            "top_p": torch.zeros((), device=dev),
        }

    def _draw(self, logits: Tensor, cfg: DecodeConfig, u: Tensor,
              consts: dict) -> tuple[Tensor, Tensor | None]:
        """Tokens (and their distributions when sampling) from logits ``[..., V]``."""
        if cfg.sampling.greedy:
            return logits.argmax(-1), None
        probs = probabilities(logits, cfg.sampling, consts["temperature"], consts["top_p"])
        return sample(probs, u), probs

    def _prefill(self, prompts, cfg: DecodeConfig, cache: KVCache, seeds, consts) -> _State:
        inputs = self._prefill_inputs(prompts, cfg, cache.capacity, seeds)
        return self._prefill_state(*inputs, cfg, cache, consts)

    def _prefill_inputs(self, prompts, cfg: DecodeConfig, capacity: int, seeds,
                        length: int | None = None, device=None) -> tuple[Layout, Tensor, ...]:
        """What a prefill of ``prompts`` (padded to ``length``) reads: its layout, each
        prompt's last token index, the seeds and the token budgets, on ``device`` (default:
        the engine's)."""
        device = device or self.device
        n_mask = 0 if cfg.sampler == "ar" else cfg.block_size
        layout = prefill_layout(prompts, n_mask, capacity, self.model.cfg.mask_id, device,
                                length)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        budget = torch.full((len(prompts),), cfg.max_new_tokens, device=device)
        return layout, last, torch.tensor(seeds, device=device), budget

    def _prefill_state(self, layout: Layout, last: Tensor, seeds_t: Tensor, budget: Tensor,
                       cfg: DecodeConfig, cache: KVCache, consts) -> _State:
        """The prefill on the device alone (a CUDA graph can capture it): what varies
        between calls of one runner comes as tensors (``beta`` too, from ``consts``)."""
        b, batch, dev, model = cfg.block_size, last.shape[0], self.device, self.model
        hidden = model(layout, cache, hidden_only=True)
        rows = torch.arange(batch, device=dev)
        z_ar = model.head(hidden[rows, last])  # [B, V], the target for position m
        z_block = model.head(hidden[:, layout.clean:])  # [B, n_mask, V], positions m ..
        counter = torch.zeros(batch, dtype=torch.long, device=dev)
        u = hash_uniforms(seeds_t, counter, 2 * b)
        target = z_ar
        if cfg.sampler == "mix":
            target = mix_logits(z_ar, z_block[:, 0], consts["beta"])
        first, _ = self._draw(target, cfg, u[:, 0], consts)
        vocab = z_ar.shape[-1]
        sampled = not cfg.sampling.greedy
        st = _State(
            committed=last + 1,
            next_token=first,
            drafts=torch.zeros(batch, b - 1, dtype=torch.long, device=dev),
            draft_valid=torch.zeros(batch, b - 1, dtype=torch.bool, device=dev),
            draft_logits=(torch.zeros(batch, b - 1, vocab, device=dev)
                          if cfg.sampler == "mix" else None),
            draft_probs=torch.zeros(batch, b - 1, vocab, device=dev) if sampled else None,
            active=torch.ones(batch, dtype=torch.bool, device=dev),
            generated=torch.zeros(batch, dtype=torch.long, device=dev),
            budget=budget,
            out=torch.zeros(batch, cache.capacity + b + 1, dtype=torch.long, device=dev),
            passes=torch.zeros(batch, dtype=torch.long, device=dev),
            counter=counter + 1,
            seeds=seeds_t,
            hist=torch.zeros(b + 1, dtype=torch.long, device=dev),
        )
        self._emit(st, first[:, None], torch.ones_like(first), consts)
        ahead = z_block[:, 1:]
        self._set_drafts(st, cfg, ahead, torch.ones(batch, b - 1, dtype=torch.bool, device=dev),
                         u[:, b:], consts)
        return st

    def _emit(self, st: _State, tokens: Tensor, count: Tensor, consts: dict) -> None:
        """Append the first ``count`` of ``tokens [B, n]`` to each active row, in place."""
        n = tokens.shape[1]
        j = torch.arange(n, device=tokens.device)
        stop = torch.isin(tokens, consts["stop_ids"]) & (j < count[:, None])
        first_stop = torch.where(stop.any(1), stop.int().argmax(1), n)
        room = st.budget - st.generated
        count = torch.minimum(torch.minimum(count, first_stop + 1), room) * st.active
        dump = st.out.shape[1] - 1
        index = torch.where(j < count[:, None], st.generated[:, None] + j, dump)
        st.out.scatter_(1, index, tokens)
        st.generated.add_(count)
        st.passes.add_(st.active.long())
        st.active.logical_and_(~stop.any(1) & (st.generated < st.budget))

    def _set_drafts(self, st: _State, cfg: DecodeConfig, ahead: Tensor, real: Tensor, u: Tensor,
                    consts: dict):
        """Next drafts from block logits ``ahead [B, b-1, V]`` (``real``: not fillers)."""
        if ahead.shape[1] == 0:
            return
        drafts, probs = self._draw(ahead, cfg, u[:, : ahead.shape[1]], consts)
        st.drafts.copy_(torch.where(real, drafts, 0))
        st.draft_valid.copy_(real)
        if st.draft_logits is not None:
            st.draft_logits.copy_(ahead)
        if st.draft_probs is not None:
            st.draft_probs.copy_(probs)

    def _pass(self, st: _State, cfg: DecodeConfig, cache: KVCache, consts: dict) -> None:
        enter, blocks, leave = self._parts[takes_pdl(st.next_token.shape[0], cfg)]
        inputs, clean = enter(st, cfg, cache, consts)
        self.model.row_gate.start = clean
        hidden = self.model.run_blocks(inputs, cache, blocks)
        leave(st, cfg, hidden, consts)

    def _enter_pass(self, st: _State, cfg: DecodeConfig, cache: KVCache, consts: dict):
        """The pass's layout, from the state by position arithmetic, as block inputs."""
        verify = torch.cat([st.next_token[:, None], st.drafts], dim=1)
        # The mask tokens take the cache's last slots. Counted from the buffers' size, not
        # from the capacity (a Python int a compiled graph would bake in), they leave a
        # compiled pass one graph for every capacity (see _share_across_capacities).
        scratch_start = cache.slots - scratch_slots(cfg)
        layout = decode_layout(st.committed, verify, consts["ks"], cfg.block_size,
                               scratch_start, self.model.cfg.mask_id)
        return self.model.prepare(layout, cache), layout.clean

    def _leave_pass(self, st: _State, cfg: DecodeConfig, hidden: Tensor, consts: dict) -> None:
        """Verify the drafts, commit tokens and set the next drafts, from the blocks' output."""
        b, S, model = cfg.block_size, cfg.proposals, self.model
        batch = st.next_token.shape[0]
        hidden = model.norm(hidden)
        # A small pass's rows go through the head in one GEMM, which reads its weights once;
        # a larger one's verify rows and picked block rows in two, which compute fewer rows.
        logits = (model.head(hidden) if S and batch * hidden.shape[1] <= ONE_HEAD_MAX_ROWS
                  else None)

        def head_at(*index) -> Tensor:
            return model.head(hidden[index]) if logits is None else logits[index]

        z_ar = head_at(slice(None), slice(b))  # [B, b, V]
        u = hash_uniforms(st.seeds, st.counter, 2 * b)
        target = z_ar
        if cfg.sampler == "mix" and S:
            # Drafted positions mix with their drafting block; the bonus position with the
            # block that covers it (the last proposal block).
            bonus = head_at(slice(None), b + (len(S) - 1) * b + (b - 1 - S[-1]))
            z_d = torch.cat([st.draft_logits, bonus[:, None]], dim=1)
            valid = torch.cat([st.draft_valid, st.draft_valid.new_ones(batch, 1)], dim=1)
            mixed = mix_logits(z_ar, z_d, consts["beta"])
            target = torch.where(valid[..., None], mixed, z_ar.float())
        if cfg.sampling.greedy:
            k, c = verify_greedy(target, st.drafts)
        else:
            p = probabilities(target, cfg.sampling, consts["temperature"], consts["top_p"])
            q = st.draft_probs if st.draft_probs is not None else p[:, :0]
            # Fillers of a partial proposal set are drafts with a one-hot q.
            q = torch.where(st.draft_valid[..., None], q, one_hot(st.drafts, p.shape[-1]))
            k, c = verify_sampled(p, q, st.drafts, u[:, : b - 1], u[:, b - 1])
        live = st.active.long()
        st.hist.scatter_add_(0, (k + 1) * live, torch.ones_like(k))
        tokens = torch.cat([st.drafts, c[:, None]], dim=1)
        tokens = torch.where(consts["offsets"] == k[:, None], c[:, None], tokens)
        self._emit(st, tokens, k + 1, consts)
        st.committed.add_((k + 1) * live)
        st.next_token.copy_(torch.where(live.bool(), c, st.next_token))
        st.counter.add_(1)
        if S:
            # The block for the largest proposed length k' <= k covers s+k'+1 ..; c sits at
            # its index k-k', the next drafts after it (fewer when k' < k: fillers).
            shift = k - consts["floor"][k]
            slot = consts["slot_of"][k]
            idx = shift[:, None] + consts["offsets"][1:]
            real = idx < b
            rows = torch.arange(batch, device=k.device)[:, None]
            pos = b + slot[:, None] * b + idx.clamp(max=b - 1)
            ahead = head_at(rows, pos)  # [B, b-1, V]
            self._set_drafts(st, cfg, ahead, real, u[:, b:], consts)

    def _capture(self, st: _State, cfg: DecodeConfig, cache: KVCache, consts: dict):
        """Capture one pass in a CUDA graph; return its replay."""
        saved = [t.clone() for t in st.tensors()]
        replay = captured(lambda: self._pass(st, cfg, cache, consts))
        # Warm-up passes advanced the state; their cache writes lie past `committed`.
        for t, s in zip(st.tensors(), saved, strict=True):
            t.copy_(s)
        return replay

    def time_pass(self, cfg: DecodeConfig, batch: int, context: int, repeats: int = 30,
                  burst: int | None = None) -> float:
        """Median seconds of one decode pass of ``cfg``'s shape (``time_passes``)."""
        return self.time_passes({0: cfg}, batch, context, repeats, burst)[0]

    @torch.inference_mode()
    def time_passes(self, cfgs: dict, batch: int, context: int, repeats: int = 30,
                    burst: int | None = None) -> dict:
        """Median seconds of one decode pass of each of ``cfgs`` (any keys) after ``context``
        tokens, on the runners generations of those shapes use. A timing is ``burst`` passes
        back to back (on CUDA 8, as ``generate`` replays them between looks), each from a
        fresh prefill so the context stays near ``context``. The shapes take turns, one
        timing each a round, so a drift over the measurement reaches all of them alike: in
        one process the same AR graph timed 3-7% apart by its place in the order. On the H200
        bursts came within 2% of decoding with random weights and 6% with the real model
        (docs/results.md, section 2)."""
        burst = burst or (8 if self.cuda_graphs else 1)
        rows = batch_bucket(batch)  # the rows decoding runs
        prompts = [[(7 * i + r) % self.model.cfg.vocab_size for i in range(context)]
                   for r in range(rows)]
        times: dict = {key: [] for key in cfgs}
        with self.model.decode_weights():
            plans = {}
            for key, cfg in cfgs.items():
                cfg = replace(cfg.resolved(), max_new_tokens=burst * cfg.block_size + 1)
                plans[key] = cfg, self._runner(rows, context + cfg.max_new_tokens, cfg)
            for _ in range(repeats):
                for key, (cfg, runner) in plans.items():
                    self._start(runner, prompts, cfg, [0] * rows)
                    times[key].append(self._burst_seconds(runner, burst))
        return {key: sorted(t)[len(t) // 2] for key, t in times.items()}

    def _burst_seconds(self, runner: _Runner, burst: int) -> float:
        """Seconds per pass of ``burst`` passes back to back (CUDA events on CUDA)."""
        timed = Spans(self.device)
        with timed.span("burst"):
            for _ in range(burst):
                runner.step()
        return timed.seconds()["burst"] / burst


def captured(fn: Callable[[], None], pool=None) -> Callable[[], None]:
    """``fn`` run twice on a side stream (allocator and kernels settle outside the graph),
    then captured in a CUDA graph (in memory ``pool``, if given); its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


def pass_config(cfg: DecodeConfig) -> DecodeConfig:
    """``cfg`` as runners and their passes see it: without the values passes read as data
    (``beta``, temperature, top-p; see ``Engine._constants``), so that all values share one
    runner, its CUDA graphs and its compiled graphs. What is left decides the passes'
    structure: greedy or not, top-p or not, the top-k count (a shape: each compiles)."""
    p = cfg.sampling
    sampling = replace(p, temperature=0.0 if p.greedy else 1.0,
                       top_p=1.0 if p.top_p >= 1.0 else 0.5)
    return replace(cfg, beta=1.0, sampling=sampling, max_new_tokens=0, seed=0)


def scratch_slots(cfg: DecodeConfig) -> int:
    """Cache slots past the capacity for a pass's mask tokens (the prefill's one block among
    them). AR has none: its cache, and the keys every AR step reads, end at the capacity."""
    return len(cfg.proposals) * cfg.block_size


def batch_bucket(batch: int) -> int:
    """The batch size runners, CUDA graphs and compiled graphs are built for: 1, 2, 4, 8,
    then multiples of 8. A smaller batch fills the rest with idle rows."""
    for size in (1, 2, 4, 8):
        if batch <= size:
            return size
    return -(-batch // 8) * 8


def _share_across_capacities(st: _State, cache: KVCache) -> None:
    """Make the cache's slot count (and the output buffer's length) symbolic in compiled
    passes: a new capacity bucket then reuses the graphs of its batch bucket and pass shape
    instead of compiling its own. Only attention and the cache writes see that size."""
    import torch._dynamo

    for buffer in cache.k + cache.v:
        torch._dynamo.mark_dynamic(buffer, 2)
    torch._dynamo.mark_dynamic(st.out, 1)


def raise_recompile_limit() -> None:
    """One compiled graph per pass shape: allow more than dynamo's default of 8."""
    import torch._dynamo

    conf = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(conf, name):
            setattr(conf, name, max(getattr(conf, name), 256))
