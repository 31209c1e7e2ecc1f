"""Throughput and latency of ``tidar serve`` under concurrent clients, in one process.

The server (the embedded default and its shipped drafter, or the flags given) runs under
uvicorn on a free local port. For each client count, that many clients each send
``--requests`` of the bench's chat prompts in turn as streamed chat completions, after a
warm-up at that count (with ``--compile`` each new batch size compiles its graphs). The
clients start together, or ``--stagger-ms`` apart, so that requests arrive while a batch
runs (what continuous batching serves; compare with ``-- --no-join``).
Reported per count: completion tokens per second over the run, the median and 90th
percentile of the time to the first streamed text and to the whole reply, and the batch
sizes the server ran.

    python benchmarks/serve_load.py --clients 1 4 8 -- --device cuda --dtype bfloat16 \
        --compile
    python benchmarks/serve_load.py --clients 1 2 --requests 2 --max-tokens 16  # CPU smoke
    python benchmarks/serve_load.py --clients 1 4 --stagger-ms 50 --batched-starts -- \
        --device cuda --dtype bfloat16 --sampler ar

``--batched-starts``: every new batch is prefilled by one eager batched forward, as before
session 27 (``Engine.start_by_joins`` off), for an A/B of the time to the first text.

Flags after ``--`` go to ``tidar serve`` (model, drafter, sampler, proposals, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

import httpx
import uvicorn
from common import write_json

from tidar.bench import prompt_texts
from tidar.cli import build_parser
from tidar.generate import load_decoder
from tidar.serve import Server, build_app


def start_server(serve_args: list[str]) -> tuple[str, Server, uvicorn.Server]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = build_parser().parse_args(["serve", "--port", str(port), *serve_args])
    decoder = load_decoder(args)
    tuner = decoder.tune(args)
    server = Server(decoder, "bench", tuner, max_batch=args.max_batch,
                    window=args.batch_window / 1000, join=args.join,
                    batch_rows=args.batch_rows)
    web = uvicorn.Server(uvicorn.Config(build_app(server), port=port, log_level="warning"))
    threading.Thread(target=web.run, daemon=True).start()
    while not web.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, web


async def one_reply(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """Seconds to the first streamed text and to the end, and the completion tokens."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True}
    start, first, usage = time.perf_counter(), None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as events:
        async for line in events.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            usage = chunk.get("usage", usage)
    end = time.perf_counter() - start
    return {"first_s": end if first is None else first, "end_s": end,
            "tokens": usage["completion_tokens"]}


async def load(url: str, clients: int, prompts: list[str], max_tokens: int,
               stagger_s: float = 0.0) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        async def one_client(offset: int) -> list[dict]:
            await asyncio.sleep(offset * stagger_s)
            return [await one_reply(client, prompts[(offset + i) % len(prompts)], max_tokens)
                    for i in range(len(prompts))]

        start = time.perf_counter()
        replies = [r for rs in await asyncio.gather(*map(one_client, range(clients))) for r in rs]
        seconds = time.perf_counter() - start

    def quantiles(key: str) -> dict:
        values = sorted(r[key] for r in replies)
        return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))]}

    return {"clients": clients, "replies": len(replies), "seconds": seconds,
            "tokens_per_second": sum(r["tokens"] for r in replies) / seconds,
            "first_text_s": quantiles("first_s"), "reply_s": quantiles("end_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=8, help="replies per client")
    ap.add_argument("--stagger-ms", type=float, default=0.0,
                    help="client k sends its first request k times this late")
    ap.add_argument("--batched-starts", action="store_true",
                    help="new batches prefilled by one eager batched forward, not by joins")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: tidar serve flags")
    args = ap.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"]
    url, server, web = start_server(serve_args)
    if args.batched_starts:
        server.decoder.engine.start_by_joins = False
    prompts = (prompt_texts("chat", raw=False) * args.requests)[: args.requests]
    report = {"serve_args": serve_args, "max_tokens": args.max_tokens,
              "starts_by_joins": server.decoder.engine.start_by_joins,
              "requests_per_client": args.requests, "stagger_ms": args.stagger_ms, "runs": []}
    warmed = 0
    for clients in args.clients:
        # Warm-up: graphs of every batch size up to this count (staggered clients start
        # batches of fewer rows), so that no measured run compiles.
        for count in range(warmed + 1, clients + 1):
            asyncio.run(load(url, count, prompts, 8))
        warmed = max(warmed, clients)
        server.batch_sizes.clear()
        engine = server.decoder.engine
        joined, moves, stalls = server.joined, engine.moves, engine.stalls.seconds()
        run = asyncio.run(load(url, clients, prompts, args.max_tokens, args.stagger_ms / 1000))
        run["batches_by_size"] = dict(sorted(server.batch_sizes.items()))
        run["joined_running_batches"] = server.joined - joined
        run["batches_moved_to_more_rows"] = engine.moves - moves
        # Device seconds running batches waited for joining prompts' prefills and moves.
        run["seconds_batches_stood_still"] = {
            what: round(total - stalls.get(what, 0.0), 4)
            for what, total in engine.stalls.seconds().items()}
        report["runs"].append(run)
        write_json("serve_load.json", report)
        print(f"{clients} clients: {run['tokens_per_second']:.1f} tokens/s, first text "
              f"{run['first_text_s']['median']:.3f} s, reply {run['reply_s']['median']:.3f} s "
              f"(medians), batches {run['batches_by_size']}, "
              f"{run['joined_running_batches']} joined running ones, "
              f"{run['batches_moved_to_more_rows']} moves to more rows, stood still "
              f"{run['seconds_batches_stood_still']} s", flush=True)
    web.should_exit = True


if __name__ == "__main__":
    main()
