"""``tidar serve``: an HTTP API in the style of OpenAI's over one engine (FastAPI, uvicorn).

``POST /v1/completions`` takes a raw prompt, ``POST /v1/chat/completions`` messages through
the model's chat template; ``"stream": true`` sends the text as server-sent events as the
engine commits it. ``GET /v1/models`` and ``GET /health`` describe the server. The decode
shape (sampler, block size, proposal set) is fixed at start-up by the flags and the tuner; a
request sets ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, and may ask for
``"sampler": "ar"`` (plain decoding) or another ``beta`` for ``mix``. Replies carry OpenAI's
fields plus ``tidar`` (passes, tokens per pass, the configuration that ran).

One thread decodes (the engine's CUDA graphs and inference mode belong to it). An idle
thread waits ``--batch-window`` milliseconds for more requests, then takes the oldest with
every waiting request of the same configuration, up to ``--max-batch``, and decodes them as
one batch: a row gets the same tokens in a batch as alone (the engine's batch invariance). A
request that arrives while a batch runs joins it if it shares the batch's configuration and
its prompt fits the batch's cache (``Engine.stream(more=...)``; ``--no-join`` turns it off):
in a free row (one whose request ended, or an idle row of the batch-size bucket), or, with
none free and fewer than ``--max-batch`` requests running, in a new row of the next bucket
that the batch moves into. The oldest waiting request goes first: while it cannot join, no
later one does, and the batch drains. ``--batch-rows N`` makes every batch decode at least
N rows from its start (the idle ones cost every pass), so that joins need no move.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import DecodeConfig
from .errors import TidarError
from .generate import Decoder, TextStream, nonempty_stops, run_rows, tuner_summary
from .sampling import SamplingParams


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    sampler: Literal["ar"] | None = None
    beta: float | None = Field(None, ge=0, le=1)


class CompletionRequest(_Request):
    prompt: str


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class _Collect:
    """What a ``TextStream`` releases (text past any partial stop string), taken in pieces."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        text = "".join(self.parts)
        self.parts.clear()
        return text


def request_config(base: DecodeConfig, req: _Request) -> DecodeConfig:
    """The server's configuration with the request's sampling settings."""
    s = base.sampling
    sampling = SamplingParams(s.temperature if req.temperature is None else req.temperature,
                              s.top_k, s.top_p if req.top_p is None else req.top_p)
    cfg = replace(base, sampling=sampling, max_new_tokens=req.max_tokens or base.max_new_tokens,
                  seed=base.seed if req.seed is None else req.seed)
    if req.sampler == "ar":
        cfg = replace(cfg, sampler="ar")
    if req.beta is not None:
        if cfg.sampler != "mix":
            raise TidarError(f"beta applies to the mix sampler; this server runs {cfg.sampler}")
        cfg = replace(cfg, beta=req.beta)
    return cfg.resolved()


def stop_strings(req: _Request) -> tuple[str, ...]:
    return nonempty_stops((req.stop,) if isinstance(req.stop, str) else req.stop or (),
                          "stop strings")


@dataclass
class _Job:
    """One request on its way through the decoding thread."""

    prompt_ids: list[int]
    cfg: DecodeConfig
    stops: tuple[str, ...]
    deltas: queue.Queue | None  # streaming: the text as it comes, then None or an exception
    cancel: threading.Event = field(default_factory=threading.Event)
    done: Future = field(default_factory=Future)  # the result
    out: _Collect = field(default_factory=_Collect)


class Server:
    """The decoding thread and the replies around it."""

    def __init__(self, decoder: Decoder, name: str, tuner: dict | None = None,
                 max_batch: int = 16, window: float = 0.005, join: bool = True,
                 batch_rows: int = 1, start: bool = True):
        self.decoder, self.name, self.tuner, self.max_batch = decoder, name, tuner, max_batch
        self.window = window  # seconds an idle thread waits for more requests
        self.join = join  # requests may join a running batch
        self.batch_rows = batch_rows  # rows a batch decodes at least: room to join
        self.waiting: deque[_Job] = deque()
        self.wake = threading.Condition()
        self.batch_sizes: Counter[int] = Counter()  # batches started, by their first rows
        self.joined = 0  # requests that joined a running batch
        self.thread = threading.Thread(target=self._work, name="tidar-decode", daemon=True)
        if start:
            self.thread.start()

    def submit(self, job: _Job) -> _Job:
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()
        return job

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.waiting:
                    self.wake.wait()
                gather_until = time.monotonic() + self.window
                while (len(self.waiting) < self.max_batch
                       and (left := gather_until - time.monotonic()) > 0):
                    self.wake.wait(left)
                first = self.waiting.popleft()
                batch = [first] + [j for j in self.waiting if j.cfg == first.cfg
                                   ][: self.max_batch - 1]
                for job in batch[1:]:
                    self.waiting.remove(job)
            self.batch_sizes[len(batch)] += 1
            self._decode(batch)

    def _join(self, cfg: DecodeConfig, longest: int) -> _Job | None:
        """The oldest waiting job if it can join a running batch of ``cfg`` (the same
        configuration, a prompt of at most ``longest`` tokens). Only the oldest: one that
        cannot join lets the batch drain, so the next batch starts with it."""
        with self.wake:
            if not self.waiting:
                return None
            job = self.waiting[0]
            if job.cfg != cfg or len(job.prompt_ids) > longest:
                return None
            return self.waiting.popleft()

    def _decode(self, batch: list[_Job]) -> None:
        """One batch on the decoding thread: each job gets its text as it comes (streaming)
        and its result. Jobs that arrive meanwhile join it (``Engine.stream``'s ``more``)."""
        engine, tokenizer = self.decoder.engine, self.decoder.loaded.tokenizer
        texts = [TextStream(tokenizer, job.out, job.stops) for job in batch]

        def more(longest: int):
            job = self._join(batch[0].cfg, longest)
            if job is None:
                return None
            batch.append(job)
            texts.append(TextStream(tokenizer, job.out, job.stops))
            self.joined += 1
            return job.prompt_ids, texts[-1]

        def streamed(row: int) -> None:
            job = batch[row]
            if job.cancel.is_set():  # the client left: end the row at the next pass
                engine.finish(row)
            if job.deltas is not None and (delta := job.out.take()):
                job.deltas.put(delta)

        try:
            results = run_rows(engine, [job.prompt_ids for job in batch], batch[0].cfg, texts,
                               streamed, more if self.join else None,
                               self.batch_rows if self.join else 1, self.max_batch)
        except Exception as exc:
            for job in batch:
                job.done.set_exception(exc)
                if job.deltas is not None:
                    job.deltas.put(exc)
            return
        for job, text, result in zip(batch, texts, results, strict=True):
            ids = result["token_ids"]
            ended = text.stopped or (ids and ids[-1] in engine.stop_ids)
            result["text"] = text.text
            result["finish_reason"] = ("length" if not ended and result["num_tokens"]
                                       >= job.cfg.max_new_tokens else "stop")
            job.done.set_result(result)
            if job.deltas is not None:
                if delta := job.out.take():
                    job.deltas.put(delta)
                job.deltas.put(None)

    def prepare(self, req: _Request, prompt_ids: list[int]):
        """The request's configuration and stop strings, checked before any reply starts."""
        if req.model is not None and req.model != self.name:
            raise HTTPException(404, f"model {req.model!r} is not served here; this server "
                                f"serves {self.name!r} (GET /v1/models)")
        try:
            cfg = request_config(self.decoder.cfg, req)
            self.decoder.engine.check_prompts([prompt_ids], cfg)
            return cfg, stop_strings(req)
        except TidarError as exc:
            raise HTTPException(400, str(exc)) from None

    def usage(self, prompt_ids: list[int], result: dict) -> dict:
        return {"usage": {"prompt_tokens": len(prompt_ids),
                          "completion_tokens": result["num_tokens"],
                          "total_tokens": len(prompt_ids) + result["num_tokens"]},
                "tidar": {k: result[k] for k in ("sampler", "block_size", "proposals", "passes",
                                                 "tokens_per_pass", "tokens_per_second")}}

    async def reply(self, req: _Request, prompt_ids: list[int], chat: bool):
        cfg, stops = self.prepare(req, prompt_ids)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": self.name}
        if not req.stream:
            job = self.submit(_Job(prompt_ids, cfg, stops, None))
            result = await asyncio.wrap_future(job.done)
            choice = ({"message": {"role": "assistant", "content": result["text"]}} if chat
                      else {"text": result["text"], "logprobs": None})
            return head | {"object": "chat.completion" if chat else "text_completion",
                           "choices": [{"index": 0, **choice,
                                        "finish_reason": result["finish_reason"]}]
                           } | self.usage(prompt_ids, result)
        job = self.submit(_Job(prompt_ids, cfg, stops, queue.Queue()))
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        sent: list[bool] = []

        def chunk(text: str | None, finish: str | None = None, extra: dict | None = None
                  ) -> str:
            delta = {} if text is None else {"content": text}
            if chat and not sent:  # the first chunk names the role, as OpenAI's do
                delta = {"role": "assistant"} | delta
                sent.append(True)
            piece = {"delta": delta} if chat else {"text": text or ""}
            body = head | {"choices": [{"index": 0, **piece, "finish_reason": finish}]}
            return f"data: {json.dumps(body | (extra or {}))}\n\n"

        async def events():
            try:
                while (item := await asyncio.to_thread(job.deltas.get)) is not None:
                    if isinstance(item, Exception):
                        yield f"data: {json.dumps({'error': {'message': str(item)}})}\n\n"
                        return
                    yield chunk(item)
                result = await asyncio.wrap_future(job.done)
                yield chunk(None, result["finish_reason"], self.usage(prompt_ids, result))
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(server: Server):
    app = FastAPI(title="tidar", description=__doc__)
    tokenizer = server.decoder.loaded.tokenizer

    @app.get("/health")
    def health():
        cfg = server.decoder.cfg
        return {"status": "ok", "model": server.name, "drafter": server.decoder.drafter,
                "sampler": cfg.sampler, "block_size": cfg.block_size,
                "proposals": len(cfg.proposals), "device": str(server.decoder.engine.device),
                "max_batch": server.max_batch, "batch_window_ms": server.window * 1000,
                "join": server.join, "batch_rows": server.batch_rows,
                "tuner": server.tuner,
                "batches_by_size": dict(sorted(server.batch_sizes.items())),
                "joined_running_batches": server.joined,
                "batches_moved_to_more_rows": server.decoder.engine.moves,
                "seconds_batches_stood_still": server.decoder.engine.stalls.seconds()}

    @app.get("/v1/models")
    def models():
        return {"object": "list",
                "data": [{"id": server.name, "object": "model", "owned_by": "tidar"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        ids = tokenizer.encode(req.prompt, add_special_tokens=True)
        return await server.reply(req, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise HTTPException(400, "this model has no chat template: use /v1/completions")
        messages = [m.model_dump() for m in req.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return await server.reply(req, list(ids), chat=True)

    return app


def run_serve(args) -> int:
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise TidarError(f"--port must lie in 0 .. 65535, got {args.port}")
    if not 1 <= args.max_batch <= 1024:
        raise TidarError(f"--max-batch must lie in 1 .. 1024, got {args.max_batch}")
    if not 0 <= args.batch_window <= 1000:
        raise TidarError(f"--batch-window must lie in 0 .. 1000 ms, got {args.batch_window}")
    if not 1 <= args.batch_rows <= args.max_batch:
        raise TidarError(f"--batch-rows must lie in 1 .. --max-batch ({args.max_batch}), got "
                         f"{args.batch_rows}")
    if args.batch_rows > 1 and not args.join:
        raise TidarError("--batch-rows leaves rows for requests to join: it needs joins "
                         "(drop --no-join)")

    from .generate import load_decoder

    with socket.socket() as probe:  # a taken port is one line, before the model loads
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise TidarError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    decoder = load_decoder(args)
    tuner = decoder.tune(args)
    if tuner is not None:
        print(f"tuner: {tuner_summary(tuner)}", flush=True)
    name = args.model or "smollm2-135m-instruct"
    server = Server(decoder, name, tuner, max_batch=args.max_batch,
                    window=args.batch_window / 1000, join=args.join,
                    batch_rows=args.batch_rows)
    uvicorn.run(build_app(server), host=args.host, port=args.port)
    return 0
