"""SIGTERM, the kubelet stopping the pod (preemption, a node drain) ``contract.TRAINER_GRACE_S`` before SIGKILL.

While distilling, the run finishes its step and checkpoints at that boundary: otherwise up to ``checkpoint_every``
steps are lost. Elsewhere it stops at once: what a restart skips (synthesis shards, checkpoints) is stored as it is
made. Without a handler, Python as the container's PID 1 would not even stop: the kernel drops default-handled
signals to a namespace's init, so the pod would run on until SIGKILL.

Ctrl-C (SIGINT: ``cartridges train`` on a terminal) is deferred alike while distilling, so the same command again
resumes from the step it stopped at, not from the last periodic checkpoint; it then stops as KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import subprocess
import threading
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
    """Whether SIGTERM arrived; inside ``deferred`` the handler only records it, for the training loop to act on
    (as it records Ctrl-C there)."""

    def __init__(self) -> None:
        self.requested = False
        self.ctrl_c = False  # SIGINT inside ``deferred``
        self._deferring = False

    @property
    def stopping(self) -> bool:
        return self.requested or self.ctrl_c

    def interruption(self) -> BaseException:
        """What stops the run: KeyboardInterrupt after Ctrl-C alone (what a command on a terminal reports), else
        :class:`Interrupted` (SIGTERM here, or on another rank)."""
        return KeyboardInterrupt() if self.ctrl_c and not self.requested else Interrupted("SIGTERM")

    @contextmanager
    def handled(self) -> Iterator[None]:
        """SIGTERM raises :class:`Interrupted` (or is recorded, when deferred) in this block."""
        with _on_sigterm(self._handle):
            yield

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that checks ``stopping`` at its safe points; a request it did not act on stops the run after it."""
        self._deferring = True
        try:
            with self._ctrl_c_deferred():
                yield
        finally:
            self._deferring = False
            interruption = self.interruption() if self.stopping else None
            self.ctrl_c = False  # one run's: a command run in-process may train again
        if interruption is not None:
            raise interruption

    @contextmanager
    def _ctrl_c_deferred(self) -> Iterator[None]:
        """Ctrl-C in this block is recorded; a second one interrupts at once (a step that hangs must not make the
        command unstoppable). Only the main thread can set a handler, and a process started with SIGINT ignored
        keeps ignoring it; the previous handler comes back afterwards."""
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
            yield
            return

        def record(signum: int, frame: FrameType | None) -> None:
            if self.ctrl_c:
                raise KeyboardInterrupt
            self.ctrl_c = True

        signal.signal(signal.SIGINT, record)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)

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
