"""``tidar serve`` on the embedded default (CPU): replies, streaming, stop strings and bad
requests, through FastAPI's test client."""

from __future__ import annotations

import json
import socket
import time

import pytest
from fastapi.testclient import TestClient

from tidar.cli import build_parser, main
from tidar.engine import DecodeConfig
from tidar.generate import encode_prompt, load_decoder
from tidar.serve import CompletionRequest, Server, _Job, build_app, request_config

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def decoder(default_gguf, single_thread):
    args = build_parser().parse_args(["serve", "--proposals", "2", "--max-new-tokens", "12"])
    return load_decoder(args)


@pytest.fixture(scope="module")
def client(decoder):
    return TestClient(build_app(Server(decoder, "smollm2-135m-instruct")))


def _chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": PROMPT}]} | fields


def test_chat_reply_is_the_engines_greedy_text(client, decoder):
    reply = client.post("/v1/chat/completions", json=_chat())
    assert reply.status_code == 200
    body = reply.json()
    ids = encode_prompt(decoder.loaded.tokenizer, PROMPT, raw=False)
    tokens, _ = decoder.engine.generate([ids], DecodeConfig(sampler="ar", max_new_tokens=12))
    expected = decoder.loaded.tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert body["object"] == "chat.completion" and body["model"] == "smollm2-135m-instruct"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    usage = body["usage"]
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": len(tokens[0]),
                     "total_tokens": len(ids) + len(tokens[0])}
    assert body["tidar"]["sampler"] == "lossless" and body["tidar"]["proposals"] == 2


def test_completion_with_ar_equals_lossless(client):
    request = {"prompt": "def add(a, b):", "max_tokens": 8, "model": "smollm2-135m-instruct"}
    drafted = client.post("/v1/completions", json=request).json()
    plain = client.post("/v1/completions", json=request | {"sampler": "ar"}).json()
    assert plain["tidar"]["sampler"] == "ar" and plain["tidar"]["passes"] == 8
    assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
    assert drafted["choices"][0]["finish_reason"] == "length"
    assert drafted["usage"]["completion_tokens"] == 8


def test_streamed_text_adds_up_to_the_reply(client):
    whole = client.post("/v1/chat/completions", json=_chat()).json()
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in events.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["usage"] == whole["usage"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stop_string_ends_the_text(client):
    whole = client.post("/v1/chat/completions", json=_chat()).json()
    text = whole["choices"][0]["message"]["content"]
    stop = text.split()[2]  # a word from the middle of the reply
    cut = client.post("/v1/chat/completions", json=_chat(stop=[stop])).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < whole["usage"]["completion_tokens"]


@pytest.mark.parametrize(("path", "request_body", "status", "message"), [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 422, "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 422, "literal_error"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 422, "greater than 0"),
    ("/v1/completions", {"max_tokens": 4}, 422, "missing"),
    ("/v1/chat/completions", {"messages": []}, 422, "at least 1"),
    ("/v1/completions", {"prompt": "x", "beta": 0.5}, 400, "mix sampler"),
    ("/v1/completions", {"prompt": "x", "temperature": float("inf")}, 400, "finite temperature"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "must not be empty"),
    ("/v1/completions", {"prompt": "hello " * 9000}, 400, "context"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "serves 'smollm2-135m-instruct'"),
])
def test_bad_requests_get_a_clear_error(client, path, request_body, status, message):
    # json.dumps writes inf as Infinity, which Python's JSON reader (and so FastAPI) takes
    reply = client.post(path, content=json.dumps(request_body),
                        headers={"Content-Type": "application/json"})
    assert reply.status_code == status
    assert message in reply.text


def test_waiting_requests_of_one_configuration_decode_as_one_batch(decoder):
    """Requests queued while the decoding thread is busy: those sharing the oldest one's
    configuration run together, and each row gets what it gets alone (a stop string ends
    only its own row); another configuration waits for the next batch."""
    server = Server(decoder, "m", start=False)
    cfg = request_config(decoder.cfg, CompletionRequest(prompt="", max_tokens=10))
    other = request_config(decoder.cfg, CompletionRequest(prompt="", max_tokens=6))
    tokenizer = decoder.loaded.tokenizer
    prompts = [tokenizer.encode(t) for t in ("def add(a, b):", "The sky is", "1, 2, 3,")]
    alone = [decoder.engine.generate([ids], cfg)[0][0] for ids in prompts]
    first_word = tokenizer.decode(alone[1]).split()[0]
    jobs = [server.submit(_Job(prompts[0], cfg, (), None)),
            server.submit(_Job(prompts[1], cfg, (first_word,), None)),
            server.submit(_Job(prompts[1], other, (), None)),
            server.submit(_Job(prompts[2], cfg, (), None))]
    server.thread.start()
    results = [job.done.result(timeout=120) for job in jobs]
    assert dict(server.batch_sizes) == {3: 1, 1: 1}
    assert results[0]["token_ids"] == alone[0] and results[3]["token_ids"] == alone[2]
    assert results[1]["finish_reason"] == "stop" and first_word not in results[1]["text"]
    assert results[2]["token_ids"] == alone[1][:6]


def test_an_idle_server_waits_its_window_for_more_requests(decoder):
    """A request 0.3 s after another starts in its batch when the idle thread waits 1 s
    before starting."""
    server = Server(decoder, "m", window=1.0)
    cfg = request_config(decoder.cfg, CompletionRequest(prompt="", max_tokens=10))
    ids = decoder.loaded.tokenizer.encode("The sky is")
    first = server.submit(_Job(ids, cfg, (), None))
    time.sleep(0.3)
    second = server.submit(_Job(ids, cfg, (), None))
    results = [job.done.result(timeout=120) for job in (first, second)]
    assert results[0]["token_ids"] == results[1]["token_ids"]
    assert dict(server.batch_sizes) == {2: 1} and server.joined == 0


class SubmitOnFirstText:
    """A streamed reply's queue that, when the first text arrives, submits the jobs
    ``make(cfg)`` gives to ``server``: they surely come while the batch runs."""

    def __init__(self, make):
        self.make, self.jobs, self.server, self.cfg = make, None, None, None

    def put(self, delta) -> None:
        if self.jobs is None:
            self.jobs = [self.server.submit(job) for job in self.make(self.cfg)]


def two_row_batch(decoder, later: SubmitOnFirstText, join: bool = True):
    """A server decoding a batch of two `ar` requests: one of 10 tokens, and one that its
    stop string ends at its first word, whose first text calls ``later``."""
    server = Server(decoder, "m", window=0.0, join=join, start=False)
    cfg = request_config(decoder.cfg, CompletionRequest(prompt="", max_tokens=10, sampler="ar"))
    tokenizer = decoder.loaded.tokenizer
    ids = tokenizer.encode("The sky is")
    first_word = tokenizer.decode(decoder.engine.generate([ids], cfg)[0][0]).split()[0]
    jobs = [server.submit(_Job(tokenizer.encode("def add(a, b):"), cfg, (), None)),
            server.submit(_Job(ids, cfg, (first_word,), later))]
    later.server, later.cfg = server, cfg
    server.thread.start()
    return server, cfg, jobs


@pytest.mark.parametrize("join", [True, False])
def test_a_request_joins_a_running_batch(decoder, join):
    """A request that comes while a batch decodes joins it in the row a stop string freed,
    while the other row still decodes, and gets what it gets alone; with ``--no-join`` it
    waits for the next batch."""
    ids = decoder.loaded.tokenizer.encode("1, 2, 3,")
    later = SubmitOnFirstText(lambda cfg: [_Job(ids, cfg, (), None)])
    server, cfg, jobs = two_row_batch(decoder, later, join)
    for job in jobs:
        job.done.result(timeout=120)
    result = later.jobs[0].done.result(timeout=120)
    assert result["token_ids"] == decoder.engine.generate([ids], cfg)[0][0]
    assert server.joined == join
    assert dict(server.batch_sizes) == ({2: 1} if join else {2: 1, 1: 1})


@pytest.mark.parametrize(("batch_rows", "max_batch"), [(1, 1), (1, 8), (2, 8)])
def test_a_request_joins_a_batch_started_by_one(decoder, batch_rows, max_batch):
    """A batch of one request has no free row while it runs: a later request joins it in a
    new row as the batch grows, or in a spare row that ``--batch-rows 2`` gave it; with
    ``--max-batch 1`` it waits for the next batch."""
    server = Server(decoder, "m", max_batch=max_batch, window=0.0, batch_rows=batch_rows,
                    start=False)
    cfg = request_config(decoder.cfg, CompletionRequest(prompt="", max_tokens=10, sampler="ar"))
    ids = decoder.loaded.tokenizer.encode("1, 2, 3,")
    later = SubmitOnFirstText(lambda cfg: [_Job(ids, cfg, (), None)])
    later.server, later.cfg = server, cfg
    moves = decoder.engine.moves  # the decoder is shared between tests
    first = server.submit(_Job(decoder.loaded.tokenizer.encode("The sky is"), cfg, (), later))
    server.thread.start()
    first.done.result(timeout=120)
    result = later.jobs[0].done.result(timeout=120)
    assert result["token_ids"] == decoder.engine.generate([ids], cfg)[0][0]
    joined = max_batch > 1
    assert server.joined == joined
    assert decoder.engine.moves - moves == (batch_rows == 1 and joined)
    assert dict(server.batch_sizes) == ({1: 1} if joined else {1: 2})


def test_no_request_joins_past_an_older_one_of_another_configuration(decoder):
    """The oldest waiting request cannot join (another configuration): the running batch
    takes no later one either, so the oldest is not starved; each then runs in turn."""
    ids = decoder.loaded.tokenizer.encode("1, 2, 3,")
    other = request_config(decoder.cfg, CompletionRequest(prompt="", max_tokens=4))
    later = SubmitOnFirstText(lambda cfg: [_Job(ids, other, (), None), _Job(ids, cfg, (), None)])
    server, cfg, jobs = two_row_batch(decoder, later)
    for job in jobs:
        job.done.result(timeout=120)
    for job in later.jobs:
        job.done.result(timeout=120)
    assert dict(server.batch_sizes) == {2: 1, 1: 2} and server.joined == 0


def test_health_and_models(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["block_size"] == 16
    assert health["proposals"] == 2 and health["device"] == "cpu"
    assert isinstance(health["seconds_batches_stood_still"], dict)
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]


def test_a_taken_port_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"127.0.0.1:{port}" in err[0]


@pytest.mark.parametrize("flags", [["--port", "-1"], ["--port", "70000"],
                                   ["--max-batch", "0"], ["--batch-window", "-1"],
                                   ["--batch-rows", "0"], ["--batch-rows", "3", "--max-batch", "2"],
                                   ["--batch-rows", "2", "--no-join"]])
def test_a_bad_port_or_batch_setting_is_one_line(capsys, monkeypatch, flags):
    def load_decoder(*args, **kwargs):  # a flag that passed would start a server here
        raise AssertionError(f"serve {flags} went on to load its model")

    monkeypatch.setattr("tidar.generate.load_decoder", load_decoder)
    code = main(["serve", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and flags[0] in err[0]
