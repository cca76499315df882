"""The ``cartridges`` command: train, evaluate, serve and query cartridges on one machine, no cluster needed.

Each subcommand lives in its own module with a ``register(subparsers)``; heavy imports (torch, the trainer, Triton)
happen inside the commands, so ``--help`` is instant. Errors print one line on stderr (a traceback with
``--debug``) and exit with the codes listed in ``cartridges --help``. This package module imports nothing heavy
(the parser and the commands are in ``app``), so Ctrl-C is handled from the command's first moment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

from cartridges.cli.exits import EXIT_INTERRUPTED, interrupted

HELD_INTERRUPT_RETRY_S = 0.05
"""How soon a Ctrl-C held back while an import (or finalizer) runs is tried again."""


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: the program's arguments) and return its exit code. Ctrl-C at any moment,
    while the commands and their libraries are still importing or while an error is being reported included, is
    the interrupt line and ``EXIT_INTERRUPTED``, not a traceback."""
    with _interrupts_outside_imports():
        try:
            from cartridges.cli.app import run

            return run(argv)
        except KeyboardInterrupt:
            return interrupted()


@contextlib.contextmanager
def _interrupts_outside_imports() -> Iterator[None]:
    """While the command runs, Ctrl-C raises KeyboardInterrupt only where no import (or finalizer) is running.

    Most commands spend their first seconds importing torch, transformers and triton, lazily and from many places.
    A KeyboardInterrupt raised inside one of those imports leaves modules half-initialized: transformers then
    reports a misleading import error (exit 1), and extension modules interrupted in their initialization can
    abort the interpreter as it exits (nanobind, exit 134). So the handler holds the interrupt back while any
    import is on the stack and tries again shortly after: one handler covers every lazy import, where wrapping
    the heavy imports one by one would miss the next one added. A second Ctrl-C while one is held back by an
    import interrupts at once (an import that hangs must not make the command unstoppable). Only the main thread
    can set a handler, and a command started with Ctrl-C ignored (``cmd &`` in a script) keeps ignoring it; the
    previous handler comes back afterwards, so callers in-process keep theirs."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield
        return
    handler = _HeldInterrupts()
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        handler.cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


class _HeldInterrupts:
    """The SIGINT handler: KeyboardInterrupt, unless an import or a finalizer runs (see
    ``_interrupts_outside_imports``)."""

    def __init__(self) -> None:
        self.timer: threading.Timer | None = None  # the retry of an interrupt held back, while one is armed
        self.retrying = False  # set by the retry just before it sends the held signal again

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.retrying:  # the armed retry has fired: this is it
            self.retrying, self.timer = False, None
        holder = _holder(frame)
        insisted = self.timer is not None and holder == "import"  # not in a finalizer, where Python drops it
        if holder is None or insisted:
            self.cancel()
            raise KeyboardInterrupt
        if self.timer is None:
            self.timer = threading.Timer(HELD_INTERRUPT_RETRY_S, self._retry, (signum,))
            self.timer.daemon = True
            self.timer.start()

    def _retry(self, signum: int) -> None:
        if self.timer is not None:  # not cancelled meanwhile
            self.retrying = True
            os.kill(os.getpid(), signum)

    def cancel(self) -> None:
        """No retry any more: the interrupt was raised, or the command is over (a stray SIGINT would hit whatever
        runs next)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _holder(frame: FrameType | None) -> str | None:
    """What on the stack holds an interrupt back: "import" (importlib's frozen bootstrap frames), "finalizer" (a
    ``__del__``, which the garbage collector may run anywhere: Python prints an exception raised there and drops
    it, so the command would go on as if Ctrl-C had not been pressed), or None."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib._bootstrap"):
            return "import"
        if code.co_name == "__del__":
            return "finalizer"
        frame = frame.f_back
    return None


def entry() -> NoReturn:
    """The ``cartridges`` program (the console script and ``python -m cartridges.cli``): :func:`main`, then exit.

    After Ctrl-C it leaves with ``os._exit``, skipping the interpreter's finalization, which after an interrupt
    can still end the process by SIGINT (-2, not the documented code) or tear down what a library left
    half-done. Nothing needed is skipped: the interrupt's exception has already unwound the commands' ``with``
    blocks (temporary directories, the Triton server), and the streams are flushed here. Any other exit
    finalizes as usual."""
    code = main()
    if code != EXIT_INTERRUPTED:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more to say on it
            stream.flush()
    os._exit(code)
