"""Host-to-device copies that do not stall the host.

A copy from pageable host memory waits for the device's stream to drain first, so a small table copied every
layer makes the host wait for the previous layer's kernels each time (no launch runs ahead). From pinned memory
with ``non_blocking`` the copy is queued like a launch; torch's pinned-memory allocator keeps the staging buffer
until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` (a CPU tensor) on ``device``, queued without waiting where the device is a GPU."""
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():  # from pageable memory CUDA refuses; from pinned it would not
        raise RuntimeError(
            "a host-to-device copy inside CUDA-graph capture would replay a reused host buffer; "
            "run the step once before capturing it (plans and tables are cached then)"
        )
    return host.pin_memory().to(device, non_blocking=True)


def int32_tensor(values: Sequence[int] | Sequence[tuple[int, ...]], device: torch.device) -> Tensor:
    """A plan's index list as an int32 tensor on ``device``."""
    return to_device(torch.tensor(values, dtype=torch.int32), device)
