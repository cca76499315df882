"""Run a service as a child process on loopback, wait until it answers, and keep its log for failures."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType


class ServiceError(RuntimeError):
    """A service did not start; the message carries the tail of its log."""


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORT_DRAWS = random.Random()  # not the global generator, which a test may seed alike in every process
os.register_at_fork(after_in_child=_PORT_DRAWS.seed)  # nor drawing what the parent and its other children draw
_GIVEN_PORTS: set[int] = set()  # a service asking for several ports at once gets different ones
_GIVING = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the ephemeral range where the system can:
    a port from that range (what binding port 0 gives) may be taken by any outgoing connection, a MinIO client's
    say, between this check and the service binding it."""
    low = int(EPHEMERAL_PORTS.read_text().split()[0]) if EPHEMERAL_PORTS.exists() else 0
    candidates = [_PORT_DRAWS.randrange(10_000, low) for _ in range(64)] if low > 10_000 else []
    with _GIVING:
        for port in [*candidates, 0]:
            if port in _GIVEN_PORTS:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                _GIVEN_PORTS.add(given := int(sock.getsockname()[1]))
                return given
    raise ServiceError("no free TCP port on 127.0.0.1")


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


class Service:
    """One running process with its log file; ``stop()`` terminates its whole process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )

    def wait_until(self, ready: Callable[[], bool], timeout_s: float = 60.0, interval_s: float = 0.2) -> float:
        """Poll ``ready`` until true; returns the seconds it took. Fails fast if the process dies.

        Any failure (the process exited, not ready in time, Ctrl-C) stops the service before it propagates: a leader
        that exits leaves what it started running in its group (Triton's backend stubs), and the log open."""
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServiceError(f"{self.name} exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")
                try:
                    if ready():
                        return time.monotonic() - self.started_at
                except OSError:
                    pass
                time.sleep(interval_s)
            raise ServiceError(f"{self.name} not ready after {timeout_s:.0f}s:\n{log_tail(self.log_path)}")
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 10.0) -> None:
        stop_group(self.proc, grace_s)
        self._log.close()


def stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``; then SIGKILL what of the group outlived its leader
    (Triton's Python-backend stubs ignore SIGTERM and were left running after tritonserver exited). Reaps the
    leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM (``kill``, a CI job's timeout) raises KeyboardInterrupt as Ctrl-C does, so the ``with``
    blocks and fixtures that started services unwind and stop them: each service runs in a session of its own, which
    a signal to this process never reaches, and without this its default action ends the process on the spot. Call
    it from the main thread."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def http_ok(url: str, timeout_s: float = 2.0, context: ssl.SSLContext | None = None) -> bool:
    """True when ``url`` answers 2xx (``context`` carries client certificates for TLS endpoints)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
