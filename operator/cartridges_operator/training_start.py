"""Why a training Job runs no pod: what the Job controller, the scheduler and the kubelet say about it, for the
Cartridge's status.

A Job whose pod cannot be created (a missing PriorityClass, an exhausted quota), placed on a node (no node with a
free GPU) or whose container cannot start (an invalid image name, a missing Secret key) gets no condition until its
activeDeadlineSeconds, hours later; its ``FailedCreate`` Events, its pods' PodScheduled conditions and waiting
reasons say why at once. Serving pods that cannot be placed or started are told apart the same way (``pod_problem``):
their Deployment only says that no replica is available.
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
    newest_pod = max((pod.metadata.creation_timestamp for pod in pods), default=None)
    return creation_problem(job.metadata.name, kube.failed_creates(namespace, job.metadata.uid), newest_pod)


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


def creation_problem(job: str, events: list[client.CoreV1Event], since: datetime | None) -> StartProblem | None:
    """The newest ``FailedCreate`` of the Job, unless a pod was created after it (then that pod tells)."""
    recent = [event for event in events if since is None or _when(event) >= since]
    if not recent:
        return None
    newest = max(recent, key=_when)
    message = " ".join((newest.message or "").split())
    transient = any(text in message for text in TRANSIENT_CREATE_FAILURES)
    return StartProblem(f"the Job controller cannot create the pod of training Job {job}: {message}", not transient)


def _phase(pod: client.V1Pod) -> str | None:
    return pod.status.phase if pod.status else None


def _when(event: client.CoreV1Event) -> datetime:
    """When the event last happened (core v1 Events from the older recorder set lastTimestamp, newer eventTime)."""
    when: datetime = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
    return when
