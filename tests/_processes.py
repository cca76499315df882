"""Which processes a test left running: those whose command line or environment names a path of the test's."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def processes_naming(path: Path) -> list[str]:
    """Command lines of live processes whose arguments or environment name ``path`` (each service's flags, or its
    KUBECONFIG, point into its work directory)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if str(path).encode() in cmdline + environ:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def assert_none_left(path: Path, grace_s: float = 10.0) -> None:
    """Fails when, after ``grace_s`` for stopping ones to go, a process still names ``path``."""
    deadline = time.monotonic() + grace_s
    while processes_naming(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(path) == []


def lines_until(proc: subprocess.Popen[str], text: str) -> list[str]:
    """The lines ``proc`` wrote on its stdout up to the first that holds ``text`` (all of them, should it end first):
    a service's command is ready once it printed that line."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            break
    return lines
