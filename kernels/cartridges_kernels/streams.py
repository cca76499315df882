"""Independent launches of one step on CUDA streams of their own, so the GPU may run them side by side.

The multi-launch path's partial launches write disjoint partial-output slots and read nothing another one
writes; only the merge needs them all. Queued on one stream each waits for the one before, so at batch 64 with
a shared cartridge the cartridge walk (bound by its dot products' latency) and the own-KV walk (bound by memory
bandwidth) take the sum of their times. On streams of their own their programs can share the SMs.

Each side stream first waits for the current stream's work so far (what the launches read was written there),
and the current stream then waits for every side stream before whatever comes next (the merge). Under CUDA-graph
capture the same waits fork and join the captured graph into parallel branches. Buffers allocated on the
current stream and used on a side stream are freed after that join, so the caching allocator reuses them only
for work ordered after it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch


def run_side_by_side(jobs: Sequence[Callable[[], object]], device: torch.device) -> None:
    """Run ``jobs`` (each queues device work on the current stream when called): on CUDA the first on the
    current stream and every other on a side stream of its own, ordered after the current stream's work so far
    and before its next; elsewhere, or for a single job, one after the other."""
    if device.type != "cuda" or len(jobs) < 2:
        for job in jobs:
            job()
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    current = torch.cuda.current_stream(index)
    fork = current.record_event()  # the current stream's work so far, before the first job's
    jobs[0]()
    for position, job in enumerate(jobs[1:]):
        side = _side_stream(index, position)
        side.wait_event(fork)
        try:
            with torch.cuda.stream(side):
                job()
        finally:  # joined even when a job fails: a CUDA-graph capture left with a stream outside it errs on that
            current.wait_stream(side)


@functools.cache
def _side_stream(device_index: int, position: int) -> torch.cuda.Stream:
    """The ``position``-th side stream of a device, made once: streams are cheap to reuse, not to create."""
    return torch.cuda.Stream(device_index)
