"""Programmatic dependent launch (``tidar.pdl``): off where it cannot run; where it runs, the
decode kernels wait for the kernel before them before they read its results. The kernels are
compiled for an H100 here, without a GPU, and their PTX is read (``pdl_ptx.py``): the
matvec's and the matmul's weights load before their wait and their input after; the
attention kernels load nothing before theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
from tidar import pdl  # noqa: E402


def test_on_for_hopper_and_later_only_and_when_switched_on(monkeypatch):
    """A CUDA tensor on sm_90 or later launches with PDL, unless ``PDL`` is off; the CPU
    (Triton's interpreter) and older GPUs never do."""
    on_cuda = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "_hopper_or_later", lambda index: True)
    assert pdl.enabled(on_cuda) and not pdl.enabled(torch.zeros(1))
    monkeypatch.setattr(pdl, "PDL", False)
    assert not pdl.enabled(on_cuda)
    monkeypatch.setattr(pdl, "PDL", True)
    monkeypatch.setattr(pdl, "_hopper_or_later", lambda index: False)
    assert not pdl.enabled(on_cuda)


@pytest.fixture(scope="module")
def ptx_counts() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("pdl_ptx.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("swiglu", [False, True])
def test_matvec_loads_its_weights_before_the_wait_and_its_input_after(ptx_counts, swiglu):
    counts = ptx_counts[f"matvec swiglu={swiglu} pdl=True"]
    assert counts["waits"] == 1
    assert counts["loads_before"] > 0 and counts["loads_after"] > 0


@pytest.mark.parametrize("swiglu", [False, True])
def test_matvec_without_pdl_does_not_wait(ptx_counts, swiglu):
    assert ptx_counts[f"matvec swiglu={swiglu} pdl=False"]["waits"] == 0


def test_the_fused_qkv_loads_its_weights_before_the_wait_and_the_rest_after(ptx_counts):
    """The input, RoPE tables and cache slots are earlier kernels' outputs."""
    counts = ptx_counts["qkv"]
    assert counts["waits"] == 1
    assert counts["loads_before"] > 0 and counts["loads_after"] > 0


@pytest.mark.parametrize("swiglu", [False, True])
def test_matmul_loads_its_weights_before_the_wait_and_its_rows_after(ptx_counts, swiglu):
    counts = ptx_counts[f"matmul swiglu={swiglu}"]
    assert counts["waits"] == 1
    assert counts["loads_before"] > 0 and counts["loads_after"] > 0


@pytest.mark.parametrize("kernel", ["slice one_slice=False", "slice one_slice=True", "merge"])
def test_attention_kernels_wait_before_any_load(ptx_counts, kernel):
    counts = ptx_counts[kernel]
    assert counts["waits"] == 1
    assert counts["loads_before"] == 0 and counts["loads_after"] > 0
