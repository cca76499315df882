"""Why a training Job or a serving Deployment runs no pod: what the Job or ReplicaSet controller, the scheduler and
the kubelet say about it, for the Cartridge's status.

A Job whose pod cannot be created (a missing PriorityClass, an exhausted quota), placed on a node (no node with a
free GPU) or whose container cannot start (an invalid image name, a missing Secret key) gets no condition until its
activeDeadlineSeconds, hours later; its ``FailedCreate`` Events, its pods' PodScheduled conditions and waiting
reasons say why at once. Serving pods that cannot be created, placed or started are told apart the same way
(``serving_problem``, from their ReplicaSet's Events): their Deployment only says that no replica is available.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kubernetes import client

from cartridges_operator import kube

STUCK = {"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}
"""Waiting reasons that last until someone changes the Job's image or the objects its pod reads."""
RETRYING = {"ErrImagePull", "ImagePullBackOff", "CreateContainerError"}
"""Waiting reasons the kubelet retries by itself (a registry or runtime that may come back)."""
TRANSIENT_CREATE_FAILURES = ("exceeded quota",)
"""FailedCreate messages that resolve by themselves (other pods finish); any other refusal needs a change."""


@dataclass(frozen=True)
class StartProblem:
    message: str
    stalled: bool
    """Whether it lasts until someone acts (Stalled=True), rather than resolving by itself."""


def start_problem(namespace: str, job: client.V1Job) -> StartProblem | None:
    """Why ``job`` has no running pod, or None when one runs or nothing is known to be wrong (yet)."""
    if (job.status.ready or 0) > 0:  # the Job controller counts ready pods: no lookup while training runs
        return None
    pods = kube.job_pods(namespace, job.metadata.name)
    if any(_phase(pod) == "Running" for pod in pods):
        return None
    pending = [pod for pod in pods if _phase(pod) == "Pending"]
    if pending:
        return pod_problem(pending, "training")
    return creation_problem(f"training Job {job.metadata.name}", kube.failed_creates(namespace, job.metadata.uid), pods)


def serving_problem(namespace: str, deployment: str, labels: dict[str, str]) -> StartProblem | None:
    """Why no replica of a serving Deployment (its pods carry ``labels``) is ready: what one of its pods says, else
    what its current ReplicaSet's controller says when it cannot create any (an exhausted quota, a missing
    PriorityClass). None when nothing is known to be wrong: the pods start, or the model still loads."""
    pods = kube.labelled_pods(namespace, labels)
    problem = pod_problem(pods, "serving")
    if problem is not None:
        return problem
    replica_set = kube.current_replica_set(namespace, deployment, labels)
    if replica_set is None:
        return None
    events = kube.failed_creates(namespace, replica_set.metadata.uid)
    return creation_problem(f"serving ReplicaSet {replica_set.metadata.name}", events, pods)


def pod_problem(pods: list[client.V1Pod], role: str) -> StartProblem | None:
    """The first of these pods (of a ``role`` such as "training", for the message) that the scheduler cannot place on
    any node, or whose container waits for a reason that is no normal start.

    An unschedulable pod is reported at once, not after a grace period, and never as stalled: the scheduler says so
    only after trying every node, and keeps trying (a cluster autoscaler may be adding a GPU node, another pod may
    free one). Its message ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu") is what someone looking at a
    Cartridge that does not train needs, and with no autoscaler coming it is the only sign that it never will."""
    for pod in pods:
        status = pod.status or client.V1PodStatus()
        for condition in status.conditions or []:
            if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
                return StartProblem(_about(role, pod, "waits for a node", condition.message), stalled=False)
        for container in status.container_statuses or []:
            waiting = container.state.waiting if container.state else None
            if waiting is not None and waiting.reason in STUCK | RETRYING:
                message = _about(role, pod, f"cannot start ({waiting.reason})", waiting.message)
                return StartProblem(message, waiting.reason in STUCK)
    return None


def _about(role: str, pod: client.V1Pod, problem: str, detail: str | None) -> str:
    return f"{role} pod {pod.metadata.name} {problem}: {detail or ''}".strip().rstrip(":")


def creation_problem(creator: str, events: list[client.CoreV1Event], pods: list[client.V1Pod]) -> StartProblem | None:
    """The newest ``FailedCreate`` of a pod's creator (such as "training Job c-g1", for the message), unless one of
    its ``pods`` was created after it (then that pod tells)."""
    since = max((pod.metadata.creation_timestamp for pod in pods), default=None)
    recent = [event for event in events if since is None or _when(event) >= since]
    if not recent:
        return None
    newest = max(recent, key=_when)
    message = " ".join((newest.message or "").split())
    transient = any(text in message for text in TRANSIENT_CREATE_FAILURES)
    return StartProblem(f"{creator} cannot create pods: {message}", not transient)


def _phase(pod: client.V1Pod) -> str | None:
    return pod.status.phase if pod.status else None


def _when(event: client.CoreV1Event) -> datetime:
    """When the event last happened (core v1 Events from the older recorder set lastTimestamp, newer eventTime)."""
    when: datetime = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
    return when
