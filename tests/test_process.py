"""Services started by the tests and the CLI leave no process behind when stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _processes import assert_none_left, lines_until
from kubernetes import client

from cartridges import process
from cartridges.process import Service, ServiceError
from cartridges_e2e.node import NodeHarness, _Run

WAIT_S = 60.0  # a failure guard only: processes start and die long before, even on a loaded machine


def test_stop_kills_a_child_that_ignores_sigterm_after_its_leader_exits(tmp_path: Path) -> None:
    # like tritonserver and its Python-backend stub: the leader exits on SIGTERM, the child ignores it
    script = "(trap '' TERM; echo started; exec sleep 300) & exec sleep 300"  # started: the child ignores SIGTERM
    service = Service("leader", ["bash", "-c", script], tmp_path / "log")
    service.wait_until(lambda: "started" in (tmp_path / "log").read_text(), timeout_s=WAIT_S, interval_s=0.05)
    service.stop(grace_s=5)
    assert_group_gone(service)


def test_a_leader_exiting_during_start_up_leaves_nothing_running(tmp_path: Path) -> None:
    # like tritonserver failing a model load: it exits, its backend stub (the sleep) would run on
    service = Service("leader", ["sh", "-c", "sleep 300 & echo started; exit 1"], tmp_path / "log")
    with pytest.raises(ServiceError, match="leader exited with 1:\nstarted"):
        service.wait_until(lambda: False, timeout_s=WAIT_S, interval_s=0.05)
    assert service._log.closed
    assert_group_gone(service)


def pod_run(tmp_path: Path, script: str) -> _Run:
    """A pod's container as the node harness runs it, once its script said ``started``."""
    run = _Run("uid", ["bash", "-c", script], {}, tmp_path, tmp_path / "log", "File", None)
    run.launch()
    deadline = time.monotonic() + WAIT_S
    while "started" not in (tmp_path / "log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return run


def test_killing_a_pod_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    # a serving pod: tritonserver exits on SIGTERM, its Python-backend stubs ignore it (a kubelet kills the cgroup)
    run = pod_run(tmp_path, "(trap '' TERM; echo started; exec sleep 300) & exec sleep 300")
    run.kill(grace_s=5)
    assert_group_gone(run.proc)


def test_killing_a_pod_whose_process_exited_kills_what_it_left_running(tmp_path: Path) -> None:
    run = pod_run(tmp_path, "sleep 300 & echo started; exit 1")
    assert run.proc is not None
    run.proc.wait(WAIT_S)
    run.kill(grace_s=5)
    assert_group_gone(run.proc)


def test_a_pod_process_that_exits_takes_what_it_started_with_it(tmp_path: Path) -> None:
    # as when a container's main process exits; before a restart, or the stubs of a crashed tritonserver live on
    run = pod_run(tmp_path, "sleep 300 & echo started; exit 1")
    assert run.proc is not None
    run.proc.wait(WAIT_S)
    harness = NodeHarness(client.ApiClient(), tmp_path)
    reported: list[str] = []
    harness._report = lambda pod, run, phase, state: reported.append(phase)  # type: ignore[method-assign]
    pod = {"metadata": {"name": "p"}, "spec": {"restartPolicy": "Always", "containers": [{"name": "main"}]}}
    harness._advance(pod, run)
    assert reported == ["Running"] and run.restart_at is not None
    assert_group_gone(run.proc)


def test_killing_a_pod_removes_what_its_image_leaves_once_its_processes_are_gone(tmp_path: Path) -> None:
    # a serving pod: Triton killed leaves its shared-memory regions, which a kubelet drops with the pod's /dev/shm
    seen: list[tuple[list[str], bool]] = []

    def leftovers(argv: list[str]) -> None:
        assert run.proc is not None
        seen.append((argv, group_alive(run.proc.pid)))

    run = _Run("uid", ["bash", "-c", "echo started; exec sleep 300"], {}, tmp_path, tmp_path / "log", "File", None)
    run.leftovers = leftovers
    run.launch()
    run.kill(grace_s=0.0)
    assert seen == [(run.argv, False)]


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_group_gone(service: Service | subprocess.Popen[bytes] | None) -> None:
    assert service is not None
    pid = service.proc.pid if isinstance(service, Service) else service.pid
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if not group_alive(pid):
            return
        time.sleep(0.05)
    pytest.fail("a process of the stopped service's group is still running")


def test_free_ports_are_below_the_range_outgoing_connections_take_theirs_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port from the ephemeral range may be taken by any client's connection before the service binds it. The range
    is Linux's default here, whatever this machine is tuned to."""
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(process, "EPHEMERAL_PORTS", ranges)
    ports = [process.free_port() for _ in range(20)]
    assert all(10_000 <= port < 32768 for port in ports) and len(set(ports)) == len(ports), ports


HELD_SERVICE_TEST = """
import time
from pathlib import Path

import pytest

from cartridges.process import Service


@pytest.fixture(scope="session")
def service():
    service = Service("sleeper", ["sleep", "300"], Path({workdir!r}) / "sleeper.log", env={{"MARK": {workdir!r}}})
    yield service
    service.stop()


def test_holds_the_service(service):
    print("service started", flush=True)
    time.sleep(300)
"""


def test_a_test_run_stopped_by_sigterm_stops_the_services_of_its_fixtures(tmp_path: Path) -> None:
    """A SIGTERM to pytest (a CI job's timeout, ``kill``) tears the session's fixtures down as Ctrl-C does: each
    service runs in a session of its own, which the signal never reaches, and ran on for good."""
    test_file = tmp_path / "test_held.py"
    test_file.write_text(HELD_SERVICE_TEST.format(workdir=str(tmp_path)), encoding="utf-8")
    paths = [Path(__file__).parent, *(Path(entry) for entry in sys.path if entry)]
    pythonpath = os.pathsep.join(str(path.resolve()) for path in paths)  # absolute: the run starts in tmp_path
    argv = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:randomly", "-p", "no:cacheprovider", "-s"]
    env = {**os.environ, "PYTHONPATH": pythonpath}  # -p conftest: the project's conftest.py, as in the real runs
    run = subprocess.Popen(
        [*argv, str(test_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env
    )
    try:
        lines = lines_until(run, "service started")
        assert "service started" in lines[-1], "".join(lines)
        run.send_signal(signal.SIGTERM)
        assert run.wait(WAIT_S) == pytest.ExitCode.INTERRUPTED
    finally:
        run.kill()
    assert_none_left(tmp_path)
