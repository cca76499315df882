"""``progress.json`` for the operator (throttled); for a human, a tqdm bar on a terminal, else (CI logs, ``| tee``,
``kubectl logs``) a line on stderr now and then."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from cartridges.layout import PROGRESS_FILE, Progress
from cartridges.store import Store


class StatusLines:
    """One line on stderr at most every ``interval_s`` when stderr is no terminal (where a bar would not show), so a
    long run is not silent for minutes; nothing on a terminal, which gets a bar instead."""

    interval_s = 15.0

    def __init__(self) -> None:
        self._shown = -float("inf")

    @staticmethod
    def wanted() -> bool:
        return not sys.stderr.isatty()

    def show(self, text: str, *, now: bool = False) -> None:
        """Print ``text`` if the last line is ``interval_s`` old (or ``now``: a new phase is worth a line)."""
        if self.wanted() and (now or time.monotonic() - self._shown >= self.interval_s):
            print(text, file=sys.stderr, flush=True)
            self._shown = time.monotonic()


class Console:
    """What a person watching sees of a phase: a tqdm bar on a terminal, else :class:`StatusLines` now and then.
    Shared by training and ``cartridges eval``, so both look alike."""

    def __init__(self) -> None:
        self._bar: tqdm[Any] | None = None
        self._lines = StatusLines()

    def start(self, desc: str, total: int, done: int = 0, unit: str = "step") -> None:
        """A new phase: the last one's bar closes; a terminal gets a bar for what is left of this one."""
        self.close()
        if done < total and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=done, desc=desc, unit=unit, dynamic_ncols=True)

    def advance(self, done: int, **postfix: str) -> None:
        """Move the bar (if any) to ``done`` units, with ``postfix`` (``loss=...``) after it."""
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            if postfix:
                self._bar.set_postfix(**postfix)

    def show(self, text: str, *, now: bool = False) -> None:
        """A status line where there is no bar (see :meth:`StatusLines.show`)."""
        self._lines.show(text, now=now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def status_line(progress: Progress) -> str:
    """``training: step 12/40, loss 1.2345, ETA 1m05s``: the phase, how far, the loss and the time left."""
    parts = [f"step {progress.step}/{progress.total}" if progress.total else "", progress.message]
    if progress.loss is not None and progress.phase == "training":
        parts.append(f"loss {progress.loss:.4f}")
    if progress.eta_s is not None:
        minutes, seconds = divmod(round(progress.eta_s), 60)
        parts.append(f"ETA {minutes}m{seconds:02d}s")
    return f"{progress.phase}: {', '.join(p for p in parts if p)}"


class ProgressReporter:
    """Tracks one phase at a time; rewrites ``progress.json`` at most every ``interval_s`` seconds.

    Only one process of a data-parallel run reports; the others pass ``enabled=False``.
    """

    def __init__(self, store: Store, prefix: str, interval_s: float = 5.0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.store = store
        self.uri = f"{prefix.rstrip('/')}/{PROGRESS_FILE}"
        self.interval_s = interval_s
        self.progress = Progress(phase="starting")
        self._console = Console()
        self._started = time.monotonic()
        self._first_step = 0
        self._tokens = 0
        self._written = 0.0

    def phase(self, phase: str, total: int = 0, done: int = 0, message: str = "") -> None:
        """Enter a phase; ``done`` counts units finished before a restart (they do not count towards speed).

        The last loss is kept, so the operator still sees it while evaluating and once done.
        """
        self._console.close()
        update = {"phase": phase, "step": done, "total": total, "message": message, "tokens_per_s": None, "eta_s": None}
        self.progress = Progress.model_validate({**self.progress.model_dump(), **update})
        self._started, self._first_step, self._tokens = time.monotonic(), done, 0
        if self.enabled:
            self._console.start(phase, total, done)
        self._show(now=True)
        self._write()

    def advance(self, step: int, tokens: int = 0, loss: float | None = None) -> None:
        elapsed = time.monotonic() - self._started
        self._tokens += tokens
        rate = (step - self._first_step) / elapsed if elapsed > 0 else 0.0
        self.progress.step = step
        self.progress.loss = loss if loss is not None else self.progress.loss
        self.progress.tokens_per_s = self._tokens / elapsed if elapsed > 0 else None
        self.progress.eta_s = (self.progress.total - step) / rate if rate > 0 else None
        if self.enabled:
            self._console.advance(step, **({"loss": f"{loss:.4f}"} if loss is not None else {}))
        self._show()
        if time.monotonic() - self._written >= self.interval_s or step >= self.progress.total:
            self._write()

    def finish(self, phase: str, message: str = "") -> None:
        """The last state this process writes (``done``, ``failed``, or the phase a stopped pod was in), always."""
        self._console.close()
        update = {"phase": phase, "message": message, "eta_s": None}
        self.progress = Progress.model_validate({**self.progress.model_dump(), **update})
        self._write()

    def _show(self, now: bool = False) -> None:
        if self.enabled:
            self._console.show(status_line(self.progress), now=now)

    def _write(self) -> None:
        if not self.enabled:
            return
        self.store.put_json(self.uri, self.progress.model_dump())
        self._written = time.monotonic()
