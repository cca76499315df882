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
    the heavy imports one by one would miss the next one added. A second Ctrl-C while one is held back interrupts
    at once (an import that hangs must not make the command unstoppable). Only the main thread can set a handler,
    and a command started with Ctrl-C ignored (``cmd &`` in a script) keeps ignoring it; the previous handler
    comes back afterwards, so callers in-process keep theirs."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, _HeldInterrupts())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


class _HeldInterrupts:
    """The SIGINT handler: KeyboardInterrupt, unless an import runs (see ``_interrupts_outside_imports``)."""

    def __init__(self) -> None:
        self.holding = False
        self.retrying = False  # set by the retry timer just before it sends the held signal again

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        insisted = self.holding and not self.retrying
        self.retrying = False
        if insisted or not _held_back(frame):
            self.holding = False
            raise KeyboardInterrupt
        if not self.holding:  # one retry timer at a time
            self.holding = True
            retry = threading.Timer(HELD_INTERRUPT_RETRY_S, self._retry, (signum,))
            retry.daemon = True
            retry.start()

    def _retry(self, signum: int) -> None:
        self.retrying, self.holding = True, False
        os.kill(os.getpid(), signum)


def _held_back(frame: FrameType | None) -> bool:
    """Whether the stack holds an import (importlib's frozen bootstrap frames) or a finalizer (``__del__``, which
    the garbage collector may run anywhere: Python prints an exception raised there and drops it, so the command
    would go on as if Ctrl-C had not been pressed)."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib._bootstrap") or code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


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
