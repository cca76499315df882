"""Services started by the tests and the CLI leave no process behind when stopped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cartridges.process import Service


def test_stop_kills_a_child_that_ignores_sigterm_after_its_leader_exits(tmp_path: Path) -> None:
    # like tritonserver and its Python-backend stub: the leader exits on SIGTERM, the child ignores it
    script = "(trap '' TERM; exec sleep 300) & echo started; exec sleep 300"
    service = Service("leader", ["bash", "-c", script], tmp_path / "log")
    service.wait_until(lambda: "started" in (tmp_path / "log").read_text(), timeout_s=10, interval_s=0.05)
    group = service.proc.pid
    service.stop(grace_s=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("a process of the stopped service's group is still running")
