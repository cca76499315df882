"""kopf registrations: thin handlers that run the reconcilers and write back what changed.

Status is written with the resourceVersion the pass read (optimistic concurrency): if the object changed meanwhile,
the write is refused and the next pass recomputes from fresh state. Each condition transition becomes an Event.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException

from cartridges import api, layout
from cartridges.store import Store, StoreError
from cartridges_operator import kube, manifests, metrics
from cartridges_operator.cartridge import forget_cartridge, reconcile_cartridge
from cartridges_operator.conditions import is_true
from cartridges_operator.config import OperatorConfig
from cartridges_operator.corpus import SOURCES_READ, read_skipped, reconcile_corpus, stored_version_damaged
from cartridges_operator.source_access import ReadSlots

PREFIX = "cartridges.dev"
RESYNC_S = 5.0
CORPUS_RETRY_S = 10.0
DELETE_RETRIES = 3
API_RETRIES = 60  # 2 s apart (the handler's backoff): an API server away for a couple of minutes
JOB_POLL_S = 2.0
JOB_STOP_POLLS = 60  # JOB_POLL_S apart: time for the training pods' grace period (TRAINER_GRACE_S)
WARNINGS = {("Stalled", "True"), (SOURCES_READ, "False")}  # (condition, status) posted as a Warning Event

CONFIG = OperatorConfig.from_env()
STORE = Store.from_env()
READS = ReadSlots(CONFIG.corpus_limits.concurrent_reads)  # shared by the worker threads that read Corpora


class Passes:
    """One pass at a time per object (by uid), across kopf's worker threads, and none once its deletion has begun.

    kopf runs a resource's change handlers, its timer and our raw-event handlers concurrently. Two passes over one
    Corpus would read its sources twice (a slow source holds every read slot meanwhile, and the later status write
    conflicts); a Cartridge's pass in flight when its deletion starts acts on the body it read before, and could
    create a Job or write current.json after the deletion handler stopped the Jobs and deleted the prefix. A lock
    is kept per object seen (a few hundred bytes; a Cartridge's goes with its deletion)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}  # held while a pass runs
        self._deleting: set[str] = set()  # uids whose deletion has begun (a few bytes per deleted object)

    def _lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def run(self, uid: str, pass_: Callable[[], object], *, wait: bool = True) -> None:
        """``pass_`` once the pass in flight has ended (or, unless ``wait``, not at all while one runs: a timer's
        next tick looks again), unless the object's deletion has begun."""
        lock = self._lock(uid)
        if not lock.acquire(blocking=wait):
            return
        try:
            if uid not in self._deleting:
                pass_()
        finally:
            lock.release()

    def begin_deletion(self, uid: str) -> None:
        """Once the pass in flight (if any) has ended; none runs after."""
        with self._lock(uid):
            self._deleting.add(uid)
        with self._guard:
            self._locks.pop(uid, None)


CORPUS_PASSES, CARTRIDGE_PASSES = Passes(), Passes()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our own finalizer and annotation prefixes from day one, so other kopf operators never collide with us."""
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.execution.max_workers = 16  # sync handlers wait on the API server, not the CPU
    settings.watching.server_timeout = 60


def write_status(plural: str, body: kopf.Body, desired: dict[str, Any]) -> bool:
    """Patch the fields that changed, guarded by resourceVersion; emit an Event per condition transition."""
    current = dict(body.get("status") or {})
    changed = {k: v for k, v in desired.items() if current.get(k) != v}
    if not changed:
        return True
    meta = body.metadata
    patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": changed}
    try:
        kube.custom().patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, meta["namespace"], plural, meta["name"], patch
        )
    except ApiException as err:
        if err.status in (404, 409):
            return False  # deleted or changed meanwhile: the next pass sees the new state
        raise
    _post_transitions(body, current.get("conditions") or [], desired.get("conditions") or [])
    return True


def _post_transitions(body: kopf.Body, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """One Event per condition that changed; a Warning for trouble, but one per failure: a read that stalls the
    Corpus is said by Stalled's Warning, its SourcesRead=False is then a Normal Event."""
    old = {c["type"]: c.get("status") for c in before}
    stalled = is_true(after, "Stalled")
    for condition in after:
        if old.get(condition["type"]) == condition["status"]:
            continue
        kind = condition["type"]
        warning = (kind, condition["status"]) in WARNINGS and not (kind == SOURCES_READ and stalled)
        message = f"{condition['type']}={condition['status']}: {condition.get('message', '')}"[:1000]
        post = kopf.warn if warning else kopf.info
        post(body, reason=condition.get("reason") or condition["type"], message=message)


def _read_corpus(body: kopf.Body) -> bool:
    """Read the Corpus's sources and write its status; False when the Corpus changed meanwhile (the write refused)."""
    return write_status("corpora", body, _reconcile_corpus(body))


def _reconcile_corpus(body: kopf.Body) -> dict[str, Any]:
    meta = body.metadata
    with metrics.reconciling("Corpus"):
        return reconcile_corpus(
            dict(body.spec), dict(body.status), meta["namespace"], meta["name"], int(meta["generation"]),
            STORE, CONFIG.store_root, CONFIG.corpus_limits, READS,
        )  # fmt: skip


@kopf.on.resume(api.GROUP, api.VERSION, "corpora")
@kopf.on.create(api.GROUP, api.VERSION, "corpora")
@kopf.on.update(api.GROUP, api.VERSION, "corpora", field="spec")
def corpus_changed(body: kopf.Body, **_: Any) -> None:
    def read() -> None:
        if not _read_corpus(body):
            raise kopf.TemporaryError("the Corpus changed while it was being read; retrying", delay=1)

    CORPUS_PASSES.run(body.metadata["uid"], read)


@kopf.timer(api.GROUP, api.VERSION, "corpora", interval=CORPUS_RETRY_S, initial_delay=CORPUS_RETRY_S)
def corpus_retry(body: kopf.Body, **_: Any) -> None:
    """A Corpus that is not Ready is retried, so it recovers once the missing ConfigMap or store is back; so is one
    whose last read failed or found no read slot free (a Ready one keeps its stored digest meanwhile), as kopf calls
    no handler again for that change, one whose generation is unobserved, and one whose stored version was damaged
    (the read stores it again)."""
    status = body.get("status") or {}
    conditions = status.get("conditions")
    unobserved = status.get("observedGeneration") != body.metadata.get("generation")
    unread = read_skipped(status) or not is_true(conditions, "Ready") or not is_true(conditions, SOURCES_READ)
    meta = body.metadata
    if (
        unobserved
        or unread
        or stored_version_damaged(status, meta["namespace"], meta["name"], STORE, CONFIG.store_root)
    ):  # not while a change handler reads it: this body is older than that read's status, and would read again
        CORPUS_PASSES.run(meta["uid"], functools.partial(_read_corpus, body), wait=False)


class ConfigMapVersions:
    """The resourceVersion each ConfigMap had when last seen, to tell which changed while the watch was broken.

    After a watch fails (410 Gone, an API server restarting), kopf lists the ConfigMaps again, as events of no type:
    the changes made meanwhile arrive only there. A ConfigMap seen before with another version changed; one not
    seen before is from the first listing (at start-up, ``corpus_changed`` reads every Corpus anyway) or was created
    meanwhile (a Corpus that waited for it is not Ready, so the retry timer reads it)."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], str] = {}

    def changed(self, event: kopf.RawEvent, namespace: str, name: str) -> bool:
        """Whether ``event`` brings a new text of the ConfigMap (recording its version)."""
        key, kind = (namespace, name), event.get("type")
        if kind == "DELETED":
            self._versions.pop(key, None)
            return False
        version = str(((event.get("object") or {}).get("metadata") or {}).get("resourceVersion", ""))
        seen = self._versions.get(key)
        self._versions[key] = version
        if kind is None:  # a listing
            return seen is not None and seen != version
        return kind in ("ADDED", "MODIFIED")


CONFIGMAP_VERSIONS = ConfigMapVersions()


@kopf.on.event("", "v1", "configmaps")
def configmap_changed(event: kopf.RawEvent, namespace: str | None, name: str, logger: kopf.Logger, **_: Any) -> None:
    """Re-read every Corpus that uses a ConfigMap that appeared or changed; unchanged text keeps its digest.

    Each Corpus on its own: one that fails unexpectedly is logged, and the others are still read (else a Ready one
    would keep the old text, as kopf calls this handler no more for this change). Raw events, not change handlers:
    those would annotate users' ConfigMaps with kopf's bookkeeping."""
    if namespace is None or not CONFIGMAP_VERSIONS.changed(event, namespace, name):
        return
    for corpus in kube.corpora_using_configmap(namespace, name):
        corpus_name = corpus["metadata"]["name"]
        logger.info(f"ConfigMap {name} changed: re-reading Corpus {corpus_name}")
        corpus_body = kopf.Body(cast(kopf.RawBody, corpus))
        try:
            CORPUS_PASSES.run(corpus["metadata"]["uid"], functools.partial(_read_corpus, corpus_body))
        except Exception:
            logger.exception(f"ConfigMap {name} changed: re-reading Corpus {corpus_name} failed")


@kopf.index(api.GROUP, api.VERSION, "cartridges", when=lambda meta, **_: not meta.get("deletionTimestamp"))
def cartridges_by_base_model(
    namespace: str | None, name: str, meta: kopf.Meta, spec: kopf.Spec, **_: Any
) -> dict[tuple[str | None, Any], dict[str, Any]]:
    """Cartridges not being deleted, by (namespace, base model name), kept current from the watch: a serving pass
    finds the Cartridges sharing its Deployment without listing the namespace (every pass of every Cartridge)."""
    model = (spec.get("baseModel") or {}).get("name")
    item = {"metadata": {"name": name, "creationTimestamp": meta.get("creationTimestamp")}, "spec": dict(spec)}
    return {(namespace, model): item}


@kopf.timer(api.GROUP, api.VERSION, "cartridges", interval=RESYNC_S, initial_delay=0.5)
def cartridge_resync(body: kopf.Body, namespace: str | None, name: str, **kwargs: Any) -> None:
    """Level-triggered: every pass recomputes status from the world (Job, corpora, store, serving replicas)."""
    assert namespace is not None
    index: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["cartridges_by_base_model"]  # kopf passes indices

    def same_base_model(model: str) -> list[dict[str, Any]]:
        return list(index.get((namespace, model), []))

    def reconcile() -> None:
        with metrics.reconciling("Cartridge"):
            desired = reconcile_cartridge(_plain(body), namespace, name, CONFIG, STORE, same_base_model)
        write_status("cartridges", body, desired)
        ready: dict[str, Any] = next((c for c in desired.get("conditions") or [] if c["type"] == "Ready"), {})
        metrics.record_cartridge(f"{namespace}/{name}", ready.get("status", "Unknown"), ready.get("reason", ""))

    CARTRIDGE_PASSES.run(body.metadata["uid"], reconcile)


@kopf.on.delete(api.GROUP, api.VERSION, "cartridges", retries=API_RETRIES + DELETE_RETRIES, backoff=2)
async def cartridge_deleted(
    body: kopf.Body,
    spec: kopf.Spec,
    namespace: str | None,
    name: str,
    meta: kopf.Meta,
    retry: int,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Leave serving, then delete or keep artifacts. A store that stays down never blocks deletion forever.

    With retention Delete, the training Jobs are stopped first (their pods gone): a trainer still running would
    write progress, shards and checkpoints under the prefix after it was deleted. Async so that this wait, as long
    as a trainer's grace period, holds none of the worker threads the other handlers run in; the calls to the API
    server and the store run in threads of their own."""
    assert namespace is not None
    await asyncio.to_thread(_leave_serving, spec, namespace, name, meta["uid"])
    if spec.get("retention", "Retain") != "Delete":
        return
    prefix = layout.cartridge_prefix(CONFIG.store_root, namespace, name)
    running = await _stop_training(body, namespace, name, prefix, logger)
    if running:
        _trouble(body, logger, "TrainingNotStopped",
                 f"training Job(s) {', '.join(running)} still have pods after {JOB_STOP_POLLS * JOB_POLL_S:.0f} s; "
                 f"deleting the artifacts under {prefix} anyway (what they write later stays)")  # fmt: skip
    await asyncio.to_thread(_delete_artifacts, body, prefix, retry, memo, logger)


def _trouble(body: kopf.Body, logger: kopf.Logger, reason: str, message: str) -> None:
    """An error in the operator's log and a Warning Event on the object: kopf (1.44 on) posts no log line as an
    Event, and whoever deletes a Cartridge reads its Events, not the operator's log."""
    logger.error(message)
    kopf.warn(body, reason=reason, message=message)


def _leave_serving(spec: kopf.Spec, namespace: str, name: str, uid: str) -> None:
    """No pass of the Cartridge after the one in flight; its serving objects lose it as an owner."""
    CARTRIDGE_PASSES.begin_deletion(uid)
    metrics.forget_cartridge(f"{namespace}/{name}")
    forget_cartridge(uid)
    model = spec.get("baseModel", {}).get("name", "")
    for kind in ("Deployment", "Service"):
        kube.remove_owner(kind, namespace, manifests.serving_name(model), uid)


async def _stop_training(body: kopf.Body, namespace: str, name: str, prefix: str, logger: kopf.Logger) -> list[str]:
    """Stop the training Jobs and wait for their pods to go, looking every JOB_POLL_S up to JOB_STOP_POLLS times;
    the Jobs still there then. Waiting is progress, not trouble: one INFO line and one Normal Event, where a retry
    per look (a TemporaryError) would be logged by kopf as an error each time."""
    uid = body.metadata["uid"]
    running = await asyncio.to_thread(_stop_training_jobs, namespace, name, uid)
    if running:
        message = f"waiting for training Job(s) {', '.join(running)} to stop before deleting {prefix}"
        logger.info(message)
        kopf.info(body, reason="WaitingForTraining", message=message)
    for _look in range(JOB_STOP_POLLS):
        if not running:
            break
        await asyncio.sleep(JOB_POLL_S)
        running = await asyncio.to_thread(_stop_training_jobs, namespace, name, uid)
    return running


def _delete_artifacts(body: kopf.Body, prefix: str, retry: int, memo: kopf.Memo, logger: kopf.Logger) -> None:
    """Delete the prefix; a store failure is retried, up to DELETE_RETRIES times, then the Cartridge is released."""
    try:
        deleted = STORE.delete_prefix(prefix)
        logger.info(f"deleted {deleted} objects under {prefix}")
    except StoreError as err:
        memo.store_failures = memo.get("store_failures", 0) + 1  # counted apart from the API server's failures
        if memo.store_failures >= DELETE_RETRIES or retry + 1 >= API_RETRIES + DELETE_RETRIES:
            message = f"artifacts under {prefix} were NOT deleted after {memo.store_failures} tries ({err}); releasing"
            _trouble(body, logger, "ArtifactsNotDeleted", message)
            return
        raise kopf.TemporaryError(f"cannot delete artifacts yet: {err}", delay=2) from err


def _stop_training_jobs(namespace: str, name: str, uid: str) -> list[str]:
    """Stop the Cartridge's training Jobs, found by its label (whatever generation they train, stored or not); the
    names of those whose Job or pods are still there. Pods are looked up too, so a Job gone before its pods (an
    orphaning delete) is still waited for."""
    label = {manifests.CARTRIDGE_LABEL: manifests.cartridge_label(name)}
    names = {job.metadata.name for job in kube.cartridge_jobs(namespace, name, deleting=True)}
    names |= {(pod.metadata.labels or {}).get("job-name", "") for pod in kube.labelled_pods(namespace, label)} - {""}
    return [job for job in sorted(names) if kube.stop_job(namespace, job, uid)]


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {"kind": body.get("kind"), "metadata": dict(body.metadata), "spec": dict(body.spec),
            "status": dict(body.status)}  # fmt: skip
