"""Atomic writes: a file is replaced whole, or left as it was."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tidar import files
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


@pytest.fixture
def umask_027():
    """Files made under umask 027 get 0640: owner and group read, others nothing."""
    files._umask.cache_clear()
    old = os.umask(0o027)
    yield
    os.umask(old)
    files._umask.cache_clear()


def test_a_safetensors_file_replaced_atomically_gets_a_plain_files_mode(tmp_path, umask_027):
    """safetensors (0.8.1 on) writes 0600 whatever the umask; a drafter written so could
    not be read by the other users of a machine."""
    path = tmp_path / "drafter.safetensors"
    with replaced_atomically(path) as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o604)  # a file replaced keeps the mode it had
    with replaced_atomically(path) as tmp:
        save_file({"x": torch.ones(2)}, str(tmp))
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


def test_give_plain_mode_on_a_temporary_directory(tmp_path, umask_027):
    made = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700
    files.give_plain_mode(made)
    assert stat.S_IMODE(made.stat().st_mode) == 0o750
