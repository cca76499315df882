"""SIGTERM, the kubelet stopping the pod (preemption, a node drain) ``contract.TRAINER_GRACE_S`` before SIGKILL.

While distilling, the run finishes its step and checkpoints at that boundary: otherwise up to ``checkpoint_every``
steps are lost. Elsewhere it stops at once: what a restart skips (synthesis shards, checkpoints) is stored as it is
made. Without a handler, Python as the container's PID 1 would not even stop: the kernel drops default-handled
signals to a namespace's init, so the pod would run on until SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupted(BaseException):
    """The pod is being stopped. Not an ``Exception``: handlers of failures (a "failed" progress) let it through."""


@contextmanager
def _on_sigterm(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handler`` handles SIGTERM in this block; the previous one (the caller's, e.g. a test runner's) after it."""
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """Whether SIGTERM arrived; inside ``deferred`` the handler only records it, for the training loop to act on."""

    def __init__(self) -> None:
        self.requested = False
        self._deferring = False

    @contextmanager
    def handled(self) -> Iterator[None]:
        """SIGTERM raises :class:`Interrupted` (or is recorded, when deferred) in this block."""
        with _on_sigterm(self._handle):
            yield

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that checks ``requested`` at its safe points; a request it did not act on stops the run after it."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.requested:
            raise Interrupted("SIGTERM")

    @contextmanager
    def forwarded_to(self, child: subprocess.Popen[bytes]) -> Iterator[None]:
        """SIGTERM goes to ``child`` (the multi-GPU launcher, which passes it to every rank) and is recorded here."""

        def forward(signum: int, frame: FrameType | None) -> None:
            self.requested = True
            child.send_signal(signum)

        with _on_sigterm(forward):
            yield

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if not self._deferring:
            raise Interrupted("SIGTERM")


STOP = StopRequest()
"""The process's one request: signal handlers are per process."""
