"""Services started by the tests and the CLI leave no process behind when stopped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cartridges.process import Service, ServiceError


def test_stop_kills_a_child_that_ignores_sigterm_after_its_leader_exits(tmp_path: Path) -> None:
    # like tritonserver and its Python-backend stub: the leader exits on SIGTERM, the child ignores it
    script = "(trap '' TERM; exec sleep 300) & echo started; exec sleep 300"
    service = Service("leader", ["bash", "-c", script], tmp_path / "log")
    service.wait_until(lambda: "started" in (tmp_path / "log").read_text(), timeout_s=10, interval_s=0.05)
    service.stop(grace_s=5)
    assert_group_gone(service)


def test_a_leader_exiting_during_start_up_leaves_nothing_running(tmp_path: Path) -> None:
    # like tritonserver failing a model load: it exits, its backend stub (the sleep) would run on
    service = Service("leader", ["sh", "-c", "sleep 300 & echo started; exit 1"], tmp_path / "log")
    with pytest.raises(ServiceError, match="leader exited with 1:\nstarted"):
        service.wait_until(lambda: False, timeout_s=10, interval_s=0.05)
    assert service._log.closed
    assert_group_gone(service)


def assert_group_gone(service: Service) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(service.proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("a process of the stopped service's group is still running")
