"""The test control plane and node harness: real controllers drive Jobs whose pods run as local processes."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from cartridges.contract import EXIT_INTERRUPTED
from cartridges.process import http_ok
from cartridges_e2e.cluster import Cluster
from cartridges_e2e.node import LocalImage, NodeHarness, PodProcess
from cartridges_operator import manifests

pytestmark = pytest.mark.cluster

T = TypeVar("T")
Json = dict[str, Any]


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while (value := probe()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout_s:.0f}s")
        time.sleep(0.1)
    return value


@pytest.fixture
def api(k8s_cluster: Cluster) -> Iterator[client.ApiClient]:
    with k8s_cluster.api_client() as api:
        yield api


@pytest.fixture
def namespace(api: client.ApiClient, node_harness: NodeHarness) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists (pods are refused until it does)."""
    core = client.CoreV1Api(api)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for("default ServiceAccount", lambda: core.list_namespaced_service_account(name).items or None)
    yield name
    core.delete_namespace(name)
    assert not node_harness.errors, node_harness.errors


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def job_body(name: str, command: list[str], backoff_limit: int = 0, **container: Any) -> Json:
    pod = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "harness", "command": command, **container}],
    }
    return {
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {"spec": pod}},
    }


def finished(batch: client.BatchV1Api, namespace: str, name: str) -> client.V1JobCondition | None:
    """The Job's Complete or Failed condition once it has one."""
    conditions = batch.read_namespaced_job_status(name, namespace).status.conditions or []
    return next((c for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"), None)


def job_pods(api: client.ApiClient, namespace: str, job: str) -> list[client.V1Pod]:
    selector = f"batch.kubernetes.io/job-name={job}"
    return list(client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items)


def terminated(core: client.CoreV1Api, namespace: str, pod: str) -> client.V1ContainerStateTerminated | None:
    statuses = core.read_namespaced_pod(pod, namespace).status.container_statuses or []
    return statuses[0].state.terminated if statuses else None


def test_job_completes_by_running_its_command(
    api: client.ApiClient, namespace: str, node_harness: NodeHarness, tmp_path: Path
) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"}, "data": {"GREETING": "hello"}})
    out = tmp_path / "out.txt"
    code = (
        "import os, pathlib, sys; print('running in', os.environ['POD_NAMESPACE']);"
        "pathlib.Path(os.environ['OUT']).write_text(' '.join([os.environ['TOKEN'], sys.argv[1]]))"
    )
    body = job_body(
        "writer",
        python(code),
        args=["$(GREETING)-world"],
        envFrom=[{"configMapRef": {"name": "settings"}}],
        env=[
            {"name": "OUT", "value": str(out)},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
    )
    batch.create_namespaced_job(namespace, body)

    condition = wait_for("finished Job", lambda: finished(batch, namespace, "writer"))

    assert condition.type == "Complete", condition
    assert out.read_text() == "s3cr3t hello-world"
    [pod] = job_pods(api, namespace, "writer")
    assert pod.status.phase == "Succeeded"
    assert f"running in {namespace}" in node_harness.logs(namespace, pod.metadata.name)


def test_pod_failure_policy_fails_the_job_on_a_permanent_exit_code(api: client.ApiClient, namespace: str) -> None:
    batch = client.BatchV1Api(api)
    body = job_body("permanent", python("import sys; sys.exit(42)"), backoff_limit=6)
    body["spec"]["podFailurePolicy"] = {
        "rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}}]
    }
    batch.create_namespaced_job(namespace, body)

    condition = wait_for("finished Job", lambda: finished(batch, namespace, "permanent"))

    assert (condition.type, condition.reason) == ("Failed", "PodFailurePolicy"), condition
    [pod] = job_pods(api, namespace, "permanent")  # failed fast: no retries despite backoffLimit 6
    assert pod.status.container_statuses[0].state.terminated.exit_code == 42


def test_the_training_jobs_policy_replaces_an_interrupted_trainer_with_no_retry_left(
    api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """A trainer stopped by SIGTERM outside a disruption (its pod deleted: no DisruptionTarget condition) stored what
    it did and exits EXIT_INTERRUPTED: the Job runs a pod that resumes, even with backoffLimit 0."""
    batch = client.BatchV1Api(api)
    code = (
        "import os, pathlib, sys; marker = pathlib.Path(os.environ['MARKER']);"
        f"sys.exit(0 if marker.exists() else marker.touch() or {EXIT_INTERRUPTED})"
    )
    body = job_body("resumed", python(code), env=[{"name": "MARKER", "value": str(tmp_path / "interrupted")}])
    body["spec"]["template"]["spec"]["containers"][0]["name"] = manifests.TRAINER_CONTAINER
    body["spec"]["podFailurePolicy"] = manifests.pod_failure_policy()
    batch.create_namespaced_job(namespace, body)

    condition = wait_for("finished Job", lambda: finished(batch, namespace, "resumed"))

    assert condition.type == "Complete", condition
    pods = job_pods(api, namespace, "resumed")
    assert sorted(p.status.container_statuses[0].state.terminated.exit_code for p in pods) == [0, EXIT_INTERRUPTED]


def test_scripted_outcome_replaces_running_the_pod(
    api: client.ApiClient, namespace: str, node_harness: NodeHarness
) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    node_harness.script(f"case={namespace}", exit_code=0, message="scripted ok", delay_s=0.3)
    body = job_body("scripted", python("import sys; sys.exit(1)"))  # would fail if it really ran
    body["spec"]["template"]["metadata"] = {"labels": {"case": namespace}}
    batch.create_namespaced_job(namespace, body)

    condition = wait_for("finished Job", lambda: finished(batch, namespace, "scripted"))

    assert condition.type == "Complete", condition
    [pod] = job_pods(api, namespace, "scripted")
    state = terminated(core, namespace, pod.metadata.name)
    assert state is not None
    assert (state.exit_code, state.message) == (0, "scripted ok")


def test_deleting_a_job_collects_its_pods_and_kills_their_processes(
    api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    batch = client.BatchV1Api(api)
    pid_file = tmp_path / "pid"
    code = "import os, time; open(os.environ['PID_FILE'], 'w').write(str(os.getpid())); time.sleep(99)"
    batch.create_namespaced_job(
        namespace, job_body("sleeper", python(code), env=[{"name": "PID_FILE", "value": str(pid_file)}])
    )
    pid = wait_for(
        "running process",
        lambda: int(pid_file.read_text()) if pid_file.exists() and pid_file.read_text() else None,
    )

    batch.delete_namespaced_job("sleeper", namespace, propagation_policy="Background")

    wait_for("pods collected", lambda: True if not job_pods(api, namespace, "sleeper") else None)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_termination_message_round_trips(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    pods: dict[str, Json] = {
        "from-file": {
            "command": python("import os; open(os.environ['TERMINATION_MESSAGE_PATH'], 'w').write('result: 7')"),
        },
        "from-log": {
            "command": python("import sys; print('fatal: bad corpus', file=sys.stderr); sys.exit(3)"),
            "terminationMessagePolicy": "FallbackToLogsOnError",
        },
    }
    for name, container in pods.items():
        spec = {"restartPolicy": "Never", "containers": [{"name": "main", "image": "harness", **container}]}
        core.create_namespaced_pod(namespace, {"metadata": {"name": name}, "spec": spec})

    from_file = wait_for("terminated from-file", lambda: terminated(core, namespace, "from-file"))
    from_log = wait_for("terminated from-log", lambda: terminated(core, namespace, "from-log"))

    assert (from_file.exit_code, from_file.reason, from_file.message) == (0, "Completed", "result: 7")
    assert (from_log.exit_code, from_log.reason) == (3, "Error")
    assert "fatal: bad corpus" in from_log.message


def test_local_image_runs_on_host_ports_behind_its_service(
    api: client.ApiClient, namespace: str, node_harness: NodeHarness
) -> None:
    """A pod that starts a mapped entry point runs the local equivalent on a free host port, which its readiness
    probe and the Service's endpoint use."""
    core = client.CoreV1Api(api)

    def translate(argv: list[str], pod: PodProcess) -> tuple[list[str], dict[str, str]]:
        port = pod.ports[int(argv[1].removeprefix("--port="))]
        return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], {}

    node_harness.run_images(namespace, [LocalImage(("web-image",), translate)])
    labels = {"app": "web"}
    container = {
        "name": "web", "image": "web", "command": ["web-image", "--port=80"],
        "ports": [{"name": "http", "containerPort": 80}],
        "readinessProbe": {"httpGet": {"port": "http", "path": "/"}},
    }  # fmt: skip
    core.create_namespaced_pod(
        namespace, {"metadata": {"name": "web", "labels": labels}, "spec": {"containers": [container]}}
    )
    service = {"selector": labels, "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]}
    core.create_namespaced_service(namespace, {"metadata": {"name": "web"}, "spec": service})

    url = wait_for("a ready endpoint", lambda: node_harness.endpoint(namespace, "web", "http"))
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":80")
    assert http_ok(url)
    pod = core.read_namespaced_pod("web", namespace)
    assert pod.status.container_statuses[0].ready
    assert node_harness.endpoint(namespace, "web", "http") == url
