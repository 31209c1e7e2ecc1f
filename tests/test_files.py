"""Atomic writes: a file is replaced whole, or left as it was."""

from __future__ import annotations

import pytest

from tidar.files import replaced_atomically, write_jsonl_atomic, write_text_atomic


def test_write_text_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "a.json"
    assert write_text_atomic(path, "first") == 5
    assert write_jsonl_atomic(path, [{"x": "é"}, {"y": 2}]) == path.stat().st_size
    assert path.read_text(encoding="utf-8") == '{"x": "é"}\n{"y": 2}\n'
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "drafter.safetensors"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), replaced_atomically(path) as tmp:
        tmp.write_text("half of the new")
        raise KeyboardInterrupt  # e.g. the run was killed mid-write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["drafter.safetensors"]
