"""Why a training Job runs no pod, read from what the kubelet reports on its pods and the Job controller's Events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from cartridges_operator.training_start import creation_problem, pod_problem

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
    problem = creation_problem("c-g1", events, None)
    assert problem is not None and not problem.stalled and "exceeded quota: gpus" in problem.message
    problem = creation_problem("c-g1", events[:1], None)
    assert problem is not None and problem.stalled
    assert problem.message == (
        'the Job controller cannot create the pod of training Job c-g1: pods "c-g1-" is forbidden: no PriorityClass '
        "with name gone was found"
    )


def test_a_failed_create_before_the_newest_pod_is_history() -> None:
    events = [failed_create("exceeded quota: gpus", T0)]
    assert creation_problem("c-g1", events, T0 + DAY) is None
