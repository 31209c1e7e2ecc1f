"""Programmatic dependent launch for the decode kernels (Hopper and later).

In a CUDA graph each kernel of the AR step starts only when the one before it has finished,
and most of a small kernel's time is that start and its first loads from memory. Launched
with PDL, a kernel may start while the kernel before it still runs: ``decode_matvec``
issues the loads of its weights (which no kernel writes) and then waits
(``griddepcontrol.wait``) for the previous kernel's results before it reads its input. Every
kernel launched this way waits in every thread block before it reads or writes anything
that another kernel writes, so completion stays ordered along the stream.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

PDL = True  # benchmarks turn it off: pass_latency.py --kernel-settings PDL=False


def enabled(x: Tensor) -> bool:
    """Whether kernels on ``x``'s device launch with PDL: a CUDA device of compute
    capability 9 or more (Triton's interpreter and older GPUs run without it)."""
    return PDL and x.device.type == "cuda" and _hopper_or_later(x.device.index)


@cache
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9
