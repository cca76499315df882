"""Host-to-device copies that do not stall the host, and the device tensors cached from them.

A copy from pageable host memory waits for the device's stream to drain first, so a small table copied every
layer makes the host wait for the previous layer's kernels each time (no launch runs ahead). From pinned memory
with ``non_blocking`` the copy is queued like a launch; torch's pinned-memory allocator keeps the staging buffer
until the copy has run.

Plans and cartridge tables are cached on the device by their contents and handed out through ``retained``. A
CUDA graph that captured a launch reading one keeps only its address, so whoever captures takes references to
every cached tensor the captured work looked up (``retain_cached``): an entry the cache drops stays allocated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

R = TypeVar("R")
_retainers = threading.local()


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` (a CPU tensor) on ``device``, queued without waiting where the device is a GPU."""
    _refuse_in_capture(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_into(target: Tensor, host: Tensor) -> None:
    """Overwrite ``target`` (same shape, any device) with ``host``, queued without waiting on a GPU: how a
    captured step's input buffers get the next step's values before a replay."""
    if target.shape != host.shape:  # copy_ would broadcast
        raise ValueError(f"cannot overwrite {tuple(target.shape)} with {tuple(host.shape)}")
    _refuse_in_capture(target.device)
    if target.device.type != "cuda":
        target.copy_(host)
        return
    target.copy_(host.pin_memory(), non_blocking=True)


def int32_tensor(values: Sequence[int] | Sequence[tuple[int, ...]], device: torch.device) -> Tensor:
    """A plan's index list as an int32 tensor on ``device``."""
    return to_device(torch.tensor(values, dtype=torch.int32), device)


def retained(value: R) -> R:
    """``value`` (a cached device tensor, or a plan holding some), also handed to every ``retain_cached`` list
    active on this thread."""
    for kept in getattr(_retainers, "stack", ()):
        kept.append(value)
    return value


@contextmanager
def retain_cached() -> Iterator[list[object]]:
    """Collects every ``retained`` value looked up on this thread inside the block (see the module doc)."""
    kept: list[object] = []
    stack = _retainers.__dict__.setdefault("stack", [])
    stack.append(kept)
    try:
        yield kept
    finally:
        stack.remove(kept)


def _refuse_in_capture(device: torch.device) -> None:
    if (
        device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    ):  # from pageable memory CUDA refuses; from pinned it would not
        raise RuntimeError(
            "a host-to-device copy inside CUDA-graph capture would replay a reused host buffer; "
            "run the step once before capturing it (plans and tables are cached then)"
        )
