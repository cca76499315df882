"""CUDA-graph semantics on the CPU, for testing what the serving engine captures.

A CUDA graph replays the launches a step made while it was captured, with the same arguments: Python does not
run again, so only what lives in tensors can change between replays. This records a step's aten ops (through a
dispatch mode) and its Triton launches (interpreted on the CPU), and a replay runs them again over the same
tensor objects, writing each op's fresh result into the tensor the step got from it. Whatever the step decided
in Python (lengths, plans, pointers in a table made then) stays as it was at capture, as on a GPU. Like CUDA
capture, it refuses host-to-device copies and reads of a tensor's value on the host while recording.

It is the seam where the real thing needs a GPU: bench/serving_gpu.py checks real CUDA graphs on one. What it
cannot see: it keeps every tensor it recorded alive, so a buffer a real graph would read after it was freed
(DecodeGraphs keeps them: ``retain_cached``) passes here; it has no streams; and it catches host copies only
through ``transfer`` (a bare ``.to("cuda")`` would be invisible on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from cartridges_kernels import fused_kernel, merge_kernel, segment_kernel, transfer
from cartridges_serving.graphs import Capture, Replay

KERNELS = [
    (fused_kernel, "_fused_decode_kernel"),
    (segment_kernel, "_segment_partials_kernel"),
    (merge_kernel, "_merge_kernel"),
]
HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2"}


class _Recording(TorchDispatchMode):
    """The ops and launches of one captured step, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Callable[[], None]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.__name__.split(".")[0] in HOST_READS:
            raise RuntimeError(f"{func} reads a tensor's value on the host: a CUDA graph cannot capture it")
        out = func(*args, **kwargs)
        self.ops.append(lambda: _overwrite(out, func(*args, **kwargs)))
        return out

    def replay(self) -> None:
        with torch.inference_mode():
            for op in self.ops:
                op()


def _overwrite(recorded: Any, fresh: Any) -> None:
    """Put an op's fresh result into the tensor(s) the captured step got from it. In-place ops wrote already, and
    views see their base's new values; both share storage with their result (``is_view`` will not do: an op
    such as ``to`` may alias or copy)."""
    if isinstance(recorded, Tensor):
        if recorded.untyped_storage().data_ptr() != fresh.untyped_storage().data_ptr():
            recorded.copy_(fresh)
    elif isinstance(recorded, tuple | list):
        for a, b in zip(recorded, fresh, strict=True):
            _overwrite(a, b)


class _RecordedKernel:
    """A @triton.jit kernel whose launches inside a recording are recorded (and run, outside the dispatch mode:
    the interpreter's own tensor copies are not the step's)."""

    def __init__(self, kernel: Any, recordings: list[_Recording]) -> None:
        self.kernel, self.recordings = kernel, recordings

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            run = lambda: self.kernel[grid](*args, **kwargs)  # noqa: E731
            with _disable_current_modes():
                run()
            if self.recordings:
                self.recordings[-1].ops.append(run)

        return launch


def emulated_capture(monkeypatch: pytest.MonkeyPatch) -> Capture:
    """A ``Capture`` for ``DecodeGraphs`` on the CPU (Triton kernels interpreted): see the module doc."""
    recordings: list[_Recording] = []
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, _RecordedKernel(getattr(module, name), recordings))

    def refuse_copies(device: torch.device) -> None:
        if recordings:
            raise RuntimeError("a host-to-device copy inside capture")

    monkeypatch.setattr(transfer, "_refuse_in_capture", refuse_copies)

    def capture(step: Callable[[], Tensor]) -> tuple[Tensor, Replay]:
        expected = step()
        recording = _Recording()
        recordings.append(recording)
        try:
            with recording:
                out = step()
        finally:
            recordings.remove(recording)

        def replay() -> Tensor:
            recording.replay()
            return out

        return expected, replay

    return capture
