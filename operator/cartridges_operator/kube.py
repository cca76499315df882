"""Thin access to the Kubernetes API for the handlers: typed clients, create-or-patch, and the lookups we need."""

from __future__ import annotations

import base64
import copy
import functools
import json
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from cartridges import api
from cartridges.corpus import SourceError, decode_utf8
from cartridges_operator import manifests
from cartridges_operator.http_fetch import SourceUnavailable, status_may_pass


class Invalid(Exception):
    """The API server refused an object the operator built (422): a spec value the CRD admits that the object's own
    validation does not. The message is the API server's, for a status condition (it names the field)."""

    def __init__(self, kind: str, name: str, err: ApiException):
        super().__init__(f"the API server refused {kind} {name}: {api_message(err)}"[:2000])


def api_message(err: ApiException) -> str:
    """What the API server said in its answer (a Status's message), else the HTTP reason."""
    try:
        return str(json.loads(err.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(err.reason)


@functools.cache
def api_client() -> client.ApiClient:
    """In-cluster credentials when running as a pod, else the kubeconfig (``$KUBECONFIG``)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def batch() -> client.BatchV1Api:
    return client.BatchV1Api(api_client())


def apps() -> client.AppsV1Api:
    return client.AppsV1Api(api_client())


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def configmap_reader(namespace: str) -> Any:
    def read(name: str, key: str) -> str:
        where = f"ConfigMap {namespace}/{name}"
        cm = _read_configmap(namespace, name, where)
        if key in (cm.data or {}):
            return str(cm.data[key])
        if key in (cm.binary_data or {}):
            return decode_utf8(base64.b64decode(cm.binary_data[key]), f"{where} key {key!r}")
        keys = sorted({*(cm.data or {}), *(cm.binary_data or {})})
        raise SourceError(f"{where} has no key {key!r} (keys: {keys})")

    return read


def _read_configmap(namespace: str, name: str, where: str) -> client.V1ConfigMap:
    """The ConfigMap; a refusal is a source to fix (SourceError), an API server that is down, overloaded or out of
    reach one that may pass (SourceUnavailable): neither escapes the Corpus's read."""
    try:
        return core().read_namespaced_config_map(name, namespace)
    except ApiException as err:
        if err.status == 404:
            raise SourceError(f"{where} does not exist") from err
        message = f"cannot read {where}: HTTP {err.status}: {api_message(err)}"
        if not err.status or status_may_pass(err.status):
            raise SourceUnavailable(message) from err
        raise SourceError(message) from err
    except urllib3.exceptions.HTTPError as err:
        raise SourceUnavailable(f"cannot read {where}: the API server is unreachable ({err})") from err


def get_corpus(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        body: dict[str, Any] = custom().get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "corpora", name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    return body


def corpora_using_configmap(namespace: str, configmap: str) -> list[dict[str, Any]]:
    listed = custom().list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "corpora")
    return [
        corpus
        for corpus in listed.get("items", [])
        if any((s.get("configMap") or {}).get("name") == configmap for s in corpus["spec"].get("sources", []))
    ]


def secret_exists(namespace: str, name: str) -> bool:
    try:
        core().read_namespaced_secret(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def owned_by(obj: Any, uid: str) -> bool:
    """Whether a read object (Job, Deployment, Service) lists the owner ``uid`` among its owner references."""
    return any(ref.uid == uid for ref in obj.metadata.owner_references or [])


def get_job(namespace: str, name: str) -> client.V1Job | None:
    try:
        return batch().read_namespaced_job(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def cartridge_jobs(namespace: str, cartridge: str, deleting: bool = False) -> list[client.V1Job]:
    """The training Jobs of a Cartridge of this name (by the label its Jobs carry); those being deleted only with
    ``deleting`` (their pods may still run)."""
    selector = _selector({manifests.CARTRIDGE_LABEL: manifests.cartridge_label(cartridge)})
    jobs: list[client.V1Job] = batch().list_namespaced_job(namespace, label_selector=selector).items
    return [job for job in jobs if deleting or job.metadata.deletion_timestamp is None]


def create_job(body: dict[str, Any]) -> None:
    """Create the Job unless it already exists: a deterministic name makes this idempotent."""
    try:
        batch().create_namespaced_job(body["metadata"]["namespace"], body)
    except ApiException as err:
        if err.status == 422:
            raise Invalid("Job", body["metadata"]["name"], err) from err
        if err.status != 409:
            raise


def delete_job(namespace: str, name: str) -> None:
    """Delete a Job and its pods if it exists (a pruned generation's, or a superseded one still running)."""
    try:
        batch().delete_namespaced_job(name, namespace, propagation_policy="Background")
    except ApiException as err:
        if err.status != 404:
            raise


def keep_finished_job(namespace: str, name: str) -> None:
    """Take the TTL off a finished Job. A failed generation's Job (and its pod, with its logs) then stays until the
    Cartridge moves on to another generation or someone deletes the Job to retry: once the TTL deleted it, the next
    pass would find no Job for the generation and train it again, failing again, one more time each TTL."""
    batch().patch_namespaced_job(name, namespace, {"spec": {"ttlSecondsAfterFinished": None}})


def stop_job(namespace: str, name: str, owner_uid: str) -> bool:
    """Delete a Job the given owner has, with its pods first (Foreground); True while the Job or any of its pods is
    still there (a pod gets its grace period to stop). A Job of another owner is not touched (False)."""
    job = get_job(namespace, name)
    if job is not None:
        if not owned_by(job, owner_uid):
            return False
        if job.metadata.deletion_timestamp is None:
            try:
                batch().delete_namespaced_job(name, namespace, propagation_policy="Foreground")
            except ApiException as err:
                if err.status != 404:
                    raise
        return True
    return bool(job_pods(namespace, name))


def set_job_suspended(namespace: str, name: str, suspend: bool) -> None:
    batch().patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})


def job_pods(namespace: str, job: str) -> list[client.V1Pod]:
    """The pods a Job created (the Job controller labels them with its name)."""
    return labelled_pods(namespace, {"job-name": job})


def labelled_pods(namespace: str, labels: dict[str, str]) -> list[client.V1Pod]:
    """The pods that carry all of ``labels``, such as a Deployment's selector."""
    pods: list[client.V1Pod] = core().list_namespaced_pod(namespace, label_selector=_selector(labels)).items
    return pods


REVISION = "deployment.kubernetes.io/revision"
"""The Deployment controller's annotation on each ReplicaSet: which revision of the pod template it runs."""


def current_replica_set(namespace: str, deployment: str, labels: dict[str, str]) -> client.V1ReplicaSet | None:
    """The ReplicaSet of a Deployment's newest revision (its pods carry ``labels``): the one that creates its pods,
    older ones only scale down. None before the Deployment controller has made one."""
    listed = apps().list_namespaced_replica_set(namespace, label_selector=_selector(labels)).items
    owned = [
        rs
        for rs in listed
        if any(ref.kind == "Deployment" and ref.name == deployment for ref in rs.metadata.owner_references or [])
    ]
    return max(owned, key=lambda rs: int((rs.metadata.annotations or {}).get(REVISION, "0")), default=None)


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels.items())


def failed_creates(namespace: str, uid: str) -> list[client.CoreV1Event]:
    """The ``FailedCreate`` Events of one Job or ReplicaSet: why its controller could not create a pod (a Job shows
    no sign of it until its activeDeadlineSeconds, a Deployment only that replicas are unavailable)."""
    selector = f"involvedObject.uid={uid},reason=FailedCreate"
    events: list[client.CoreV1Event] = core().list_namespaced_event(namespace, field_selector=selector).items
    return events


def failed_pod_details(namespace: str, job: str) -> tuple[str | None, int | None, str]:
    """(pod, exit code, termination message) of the most recent failed trainer pod of a Job."""
    failed = [p for p in job_pods(namespace, job) if p.status and p.status.phase == "Failed"]
    failed.sort(key=lambda p: p.metadata.creation_timestamp)
    for pod in reversed(failed):
        for status in pod.status.container_statuses or []:
            terminated = status.state.terminated if status.state else None
            if terminated is not None:
                return pod.metadata.name, terminated.exit_code, (terminated.message or "").strip()
    return None, None, ""


def apply_owned(body: dict[str, Any]) -> None:
    """Create a Deployment or Service, or merge our fields into the existing one (owners are unioned). Raises
    :class:`Invalid` when the API server refuses the object."""
    try:
        _apply_owned(body)
    except ApiException as err:
        if err.status == 422:
            raise Invalid(body["kind"], body["metadata"]["name"], err) from err
        raise


def _apply_owned(body: dict[str, Any]) -> None:
    kind, meta = body["kind"], body["metadata"]
    create, read, patch = {
        "Deployment": (
            apps().create_namespaced_deployment,
            apps().read_namespaced_deployment,
            apps().patch_namespaced_deployment,
        ),
        "Service": (core().create_namespaced_service, core().read_namespaced_service, core().patch_namespaced_service),
    }[kind]
    try:
        create(meta["namespace"], body)
        return
    except ApiException as err:
        if err.status != 409:
            raise
    existing = read(meta["name"], meta["namespace"])
    owners = _merged_owners(existing.metadata.owner_references or [], meta.get("ownerReferences", []))
    merged = {**_replacing_pod_settings(body), "metadata": {**meta, "ownerReferences": owners}}
    patch(meta["name"], meta["namespace"], merged)


def _merged_owners(existing: list[Any], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The existing owner references in their order (ours written over theirs by uid), then ours that are new. The
    Cartridges sharing a serving object apply it in turn: an order that followed the applying one would change the
    object, bumping its resourceVersion (and waking its watchers), on every pass of each."""
    given = {ref["uid"]: ref for ref in ours}
    kept = [given.pop(ref.uid, None) or api_client().sanitize_for_serialization(ref) for ref in existing]
    return kept + list(given.values())


def _replacing_pod_settings(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as a strategic merge patch that replaces its pod's ``nodeSelector`` and ``priorityClassName`` and its
    containers' ``resources`` and ``env`` rather than merging them: a merge keeps every label, field, limit and
    variable the new body leaves out, so a serving pod would stay pinned to a node pool, keep a priority, keep its GPU
    and a setting after the chart's ``serving`` values dropped them. (``tolerations`` is an atomic list: the body's,
    even empty, replaces it already; a ``$patch`` entry there is read as a toleration and refused.)"""
    if body["kind"] != "Deployment":
        return body
    patch = copy.deepcopy(body)
    pod = patch["spec"]["template"]["spec"]
    pod["nodeSelector"] = {"$patch": "replace", **pod.get("nodeSelector", {})}
    pod.setdefault("priorityClassName", None)  # null deletes the field a previous body set
    for container in pod["containers"]:
        container["resources"] = {"$patch": "replace", **container.get("resources", {})}
        container["env"] = [*container.get("env", []), {"$patch": "replace"}]
    return patch


DELETE_ATTEMPTS = 5


def remove_owner(kind: str, namespace: str, name: str, uid: str) -> None:
    """Drop one Cartridge from a shared object's owners; delete the object once no owner is left.

    The owner is removed on the server (a strategic-merge ``$patch: delete`` by uid), never by writing back a list
    read earlier: Cartridges deleted at the same moment would otherwise restore each other's references, and the
    object would wait for the garbage collector instead of going at once."""
    read, patch, delete = {
        "Deployment": (
            apps().read_namespaced_deployment,
            apps().patch_namespaced_deployment,
            apps().delete_namespaced_deployment,
        ),
        "Service": (core().read_namespaced_service, core().patch_namespaced_service, core().delete_namespaced_service),
    }[kind]
    try:
        existing = read(name, namespace)
        if not owned_by(existing, uid) and not _left_by_its_last_owner(existing):
            return  # not ours to touch
        current = patch(name, namespace, {"metadata": {"ownerReferences": [{"$patch": "delete", "uid": uid}]}})
        for _ in range(DELETE_ATTEMPTS):
            if current.metadata.owner_references:
                return  # another owner remains (or was added since): it stays
            try:
                version = current.metadata.resource_version
                delete(name, namespace, body={"preconditions": {"resourceVersion": version}})
                return
            except ApiException as err:
                if err.status != 409:
                    raise
            current = read(name, namespace)  # changed since (a controller's status write, a new owner): look again
    except ApiException as err:
        if err.status != 404:  # gone already
            raise


def _left_by_its_last_owner(obj: Any) -> bool:
    """An object of ours without owners: a removal that dropped the last reference and was cut short before the
    delete (a killed operator, a failed call). The garbage collector never deletes it, so the next removal does."""
    labels = obj.metadata.labels or {}
    return not obj.metadata.owner_references and labels.items() >= manifests.MANAGED_BY.items()


def deployment_ready(namespace: str, name: str) -> tuple[int, int]:
    """(ready replicas, desired replicas) of a Deployment; (0, 0) when absent."""
    try:
        dep = apps().read_namespaced_deployment(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return 0, 0
        raise
    return dep.status.ready_replicas or 0, dep.spec.replicas or 0
