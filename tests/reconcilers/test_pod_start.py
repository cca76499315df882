"""Why a training Job or a serving Deployment runs no pod, read from what the kubelet reports on its pods and the
Job and ReplicaSet controllers' Events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from cartridges_operator import kube
from cartridges_operator.pod_start import StartProblem, creation_problem, pod_problem, serving_problem

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def waiting_pod(reason: str, message: str = "") -> client.V1Pod:
    state = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason=reason, message=message))
    status = client.V1ContainerStatus(name="trainer", image="x", image_id="", ready=False, restart_count=0, state=state)
    meta = client.V1ObjectMeta(name="c-g1-abcde", creation_timestamp=T0)
    return client.V1Pod(metadata=meta, status=client.V1PodStatus(phase="Pending", container_statuses=[status]))


def failed_create(message: str, when: datetime) -> client.CoreV1Event:
    meta = client.V1ObjectMeta(name="c-g1.1", creation_timestamp=when)
    return client.CoreV1Event(
        metadata=meta, involved_object=client.V1ObjectReference(), reason="FailedCreate", message=message,
        last_timestamp=when,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("reason", "stalled"),
    [("InvalidImageName", True), ("CreateContainerConfigError", True), ("ErrImageNeverPull", True),
     ("ImagePullBackOff", False), ("ErrImagePull", False)],
)  # fmt: skip
def test_a_pod_waiting_on_its_image_or_config_is_reported(reason: str, stalled: bool) -> None:
    problem = pod_problem([waiting_pod(reason, 'couldn\'t parse image name "Bad:Image"')], "training")
    assert problem is not None and problem.stalled is stalled
    assert problem.message == f'training pod c-g1-abcde cannot start ({reason}): couldn\'t parse image name "Bad:Image"'


def test_a_pod_starting_normally_is_no_problem() -> None:
    assert pod_problem([waiting_pod("ContainerCreating")], "training") is None


def test_a_pod_no_node_can_take_is_reported_with_the_schedulers_message_not_stalled() -> None:
    """A node may come (a cluster autoscaler's, a GPU another pod frees): reported, never stalled."""
    pod = client.V1Pod(metadata=client.V1ObjectMeta(name="c-g1-abcde"), status=client.V1PodStatus(phase="Pending"))
    assert pod_problem([pod], "training") is None  # not tried yet: no PodScheduled condition
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    unschedulable = client.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable", message=message)
    pod.status.conditions = [unschedulable]
    problem = pod_problem([pod], "training")
    assert problem is not None and not problem.stalled
    assert problem.message == f"training pod c-g1-abcde waits for a node: {message}"


def test_a_serving_pod_is_named_as_one() -> None:
    """The serving Deployment's pods are told apart the same way; the message says which pod it is."""
    missing_key = 'key "accessKey" not found in secret "cartridges-store"'
    problem = pod_problem([waiting_pod("CreateContainerConfigError", missing_key)], "serving")
    assert problem is not None and problem.stalled
    assert problem.message == f"serving pod c-g1-abcde cannot start (CreateContainerConfigError): {missing_key}"


def test_the_newest_failed_create_tells_and_a_quota_clears_by_itself() -> None:
    events = [
        failed_create('pods "c-g1-" is forbidden: no PriorityClass with name gone was found', T0),
        failed_create('pods "c-g1-x" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1', T0 + DAY),
    ]
    problem = creation_problem("training Job c-g1", events, [])
    assert problem is not None and not problem.stalled and "exceeded quota: gpus" in problem.message
    problem = creation_problem("training Job c-g1", events[:1], [])
    assert problem is not None and problem.stalled
    assert problem.message == (
        'training Job c-g1 cannot create pods: pods "c-g1-" is forbidden: no PriorityClass with name gone was found'
    )


def test_a_failed_create_before_the_newest_pod_is_history() -> None:
    events = [failed_create("exceeded quota: gpus", T0)]
    assert creation_problem("training Job c-g1", events, [waiting_pod("ContainerCreating")]) is not None
    later = waiting_pod("ContainerCreating")
    later.metadata.creation_timestamp = T0 + DAY
    assert creation_problem("training Job c-g1", events, [waiting_pod("ContainerCreating"), later]) is None


@pytest.mark.parametrize(
    ("message", "stalled"),
    [('pods "triton-m-5d9c-" is forbidden: no PriorityClass with name gpu-serving was found', True),
     ('pods "triton-m-5d9c-x" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1', False)],
)  # fmt: skip
def test_a_serving_replica_set_that_cannot_create_pods_says_why(
    monkeypatch: pytest.MonkeyPatch, message: str, stalled: bool
) -> None:
    """No pod at all: the current ReplicaSet's FailedCreate Events tell, classified like a training Job's."""
    replica_set = client.V1ReplicaSet(metadata=client.V1ObjectMeta(name="triton-m-5d9c", uid="rs-uid"))
    monkeypatch.setattr(kube, "labelled_pods", lambda namespace, labels: [])
    monkeypatch.setattr(kube, "current_replica_set", lambda namespace, deployment, labels: replica_set)
    monkeypatch.setattr(kube, "failed_creates", lambda namespace, uid: {"rs-uid": [failed_create(message, T0)]}[uid])
    problem = serving_problem("ns", "triton-m", {"app": "serving"})
    assert problem == StartProblem(f"serving ReplicaSet triton-m-5d9c cannot create pods: {message}", stalled)


def test_a_serving_pod_that_says_why_needs_no_replica_set(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = waiting_pod("InvalidImageName")
    monkeypatch.setattr(kube, "labelled_pods", lambda namespace, labels: [pod])
    monkeypatch.setattr(kube, "current_replica_set", None)  # not looked up: calling it would fail
    problem = serving_problem("ns", "triton-m", {"app": "serving"})
    assert problem is not None and problem.message.startswith("serving pod c-g1-abcde cannot start (InvalidImageName)")


def test_a_serving_deployment_without_a_replica_set_yet_is_no_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "labelled_pods", lambda namespace, labels: [])
    monkeypatch.setattr(kube, "current_replica_set", lambda namespace, deployment, labels: None)
    assert serving_problem("ns", "triton-m", {"app": "serving"}) is None
