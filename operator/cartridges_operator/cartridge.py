"""The Cartridge reconciler, level-triggered: corpora → training Job per generation → verify → promote → serve.

Each pass reads the world (Corpus status, the Job, the store) and returns the status it implies, so a pass can be
repeated or interrupted at any point: the Job name is deterministic, promotion is one pointer write, and a new
generation starts only when what training depends on (spec and corpus digests) changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cartridges import api, layout
from cartridges.contract import TrainerConfig
from cartridges.manifest import MANIFEST_FILE, TENSORS_FILE, CartridgeManifest
from cartridges.store import IntegrityError, ObjectNotFound, Store, StoreError, sha256_once
from cartridges_operator import kube, manifests
from cartridges_operator.conditions import TIME_FORMAT, is_true, now, set_condition
from cartridges_operator.config import OperatorConfig
from cartridges_operator.pod_start import serving_problem, start_problem
from cartridges_operator.redaction import redacted

LOG = logging.getLogger(__name__)


PeerLookup = Callable[[str], Iterable[dict[str, Any]]]
"""The Cartridges of this namespace that name a base model (each as ``{"metadata", "spec"}``), none being deleted."""


@dataclass
class Pass:
    """One reconcile pass: the inputs, and the status being built."""

    body: dict[str, Any]
    spec: api.CartridgeSpec
    status: dict[str, Any]
    namespace: str
    name: str
    generation: int
    config: OperatorConfig
    store: Store
    same_base_model: PeerLookup
    # current.json as read or written in this pass: the gate, the waiting path and the status read-back all ask
    pointer: layout.Pointer | None = field(default=None, init=False)
    pointer_known: bool = field(default=False, init=False)

    def condition(self, type_: str, ok: bool | None, reason: str, message: str = "") -> None:
        conditions = self.status.get("conditions") or []
        self.status["conditions"] = set_condition(conditions, type_, ok, reason, message, self.generation)

    def not_ready(self, reason: str, message: str, stalled: bool = False) -> dict[str, Any]:
        self.condition("Stalled", stalled, reason if stalled else "Progressing", message if stalled else "")
        self.condition("Ready", False, reason, message)
        return self.status


def reconcile_cartridge(
    body: dict[str, Any],
    namespace: str,
    name: str,
    config: OperatorConfig,
    store: Store,
    same_base_model: PeerLookup,
) -> dict[str, Any]:
    status = dict(body.get("status") or {})
    generation = int(body["metadata"].get("generation") or 0)
    status["observedGeneration"] = generation
    try:
        spec = api.CartridgeSpec.model_validate(body.get("spec") or {})
    except ValidationError as err:
        conditions = set_condition(status.get("conditions") or [], "Ready", False, "InvalidSpec", str(err), generation)
        return {**status, "conditions": set_condition(conditions, "Stalled", True, "InvalidSpec", str(err), generation)}
    run = Pass(body, spec, status, namespace, name, generation, config, store, same_base_model)
    try:
        return _reconcile(run)
    except StoreError as err:
        return run.not_ready("StoreUnavailable", str(err))


def _reconcile(run: Pass) -> dict[str, Any]:
    corpora = _ready_corpora(run)
    trainer = None if corpora is None else _current_generation(run, corpora)
    if trainer is None or not _trained_and_promoted(run, trainer):
        return _serve_promoted(run)
    _prune(run, trainer.generation)
    return _serve(run)


def _trained_and_promoted(run: Pass, trainer: TrainerConfig) -> bool:
    """Whether the current generation is trained, verified and promoted; when not, the status says why (training,
    failed, suspended, its artifact refused, held back by the quality gate)."""
    trained = (run.status.get("artifact") or {}).get("uri", "").startswith(trainer.output_prefix + "/")
    if not trained and not _train(run, trainer):
        return False
    return _gate_and_promote(run, trainer)


def _train(run: Pass, trainer: TrainerConfig) -> bool:
    """Whether the generation's Job completed and its artifact is verified; else start or follow the Job."""
    _read_back_promoted(run)  # a trained generation's pass records it from the pointer it reads anyway
    job = kube.get_job(run.namespace, manifests.job_name(run.name, trainer.generation))
    if job is not None and _built_from_other_inputs(run, job, trainer) and not _job_finished(job):
        if _stop_stale_job(run, job, trainer):
            return False
        job = None
    if job is None:
        _start_job(run, trainer)
        return False
    if bool(job.spec.suspend) != run.spec.suspend:
        kube.set_job_suspended(run.namespace, job.metadata.name, run.spec.suspend)
    if run.spec.suspend:
        run.condition("Trained", False, "Suspended", "spec.suspend is true")
        run.not_ready("Suspended", "training is suspended")
        return False
    finished = _job_finished(job)
    if finished is None:
        _training(run, trainer, job)
        return False
    if not finished:
        _record_failure(run, job)
        return False
    return _verify_and_record(run, trainer)


def _start_job(run: Pass, trainer: TrainerConfig) -> None:
    """Create the generation's Job, after cancelling the earlier generations' unfinished ones; else say why not."""
    if run.body["metadata"].get("deletionTimestamp"):  # the deletion handler stops its Jobs: start none
        run.not_ready("Deleting", "the Cartridge is being deleted")
        return
    if not kube.secret_exists(run.namespace, run.config.store_secret):
        message = f"Secret {run.config.store_secret} with the object-store credentials is missing"
        run.not_ready("StoreSecretMissing", f"{message} in namespace {run.namespace}", stalled=True)
        return
    _cancel_superseded(run, trainer.generation)
    try:
        kube.create_job(manifests.training_job(run.body, trainer, run.config))
    except (kube.Invalid, manifests.ConfigTooLarge) as err:
        run.condition("Trained", False, "InvalidJob", str(err))
        run.not_ready("InvalidJob", str(err), stalled=True)
        return
    run.condition("Trained", False, "Training", f"generation {trainer.generation} started")
    run.not_ready("Training", f"training generation {trainer.generation}")


def _built_from_other_inputs(run: Pass, job: Any, trainer: TrainerConfig) -> bool:
    """Whether this Cartridge created ``job`` from other training inputs than the generation's: its spec changed
    while the status write naming the Job's inputs was lost, so the generation number was taken again. A Job
    created before Jobs were labelled with their training hash is taken as built from the current inputs (its
    training is never cut short by an upgrade). Such a Job that completed is not stopped: its artifact records
    the other inputs, so verifying it moves the Cartridge past its number."""
    built_from = (job.metadata.labels or {}).get(manifests.TRAINING_HASH_LABEL)
    return built_from not in (None, trainer.training_hash) and kube.owned_by(job, run.body["metadata"].get("uid"))


def _stop_stale_job(run: Pass, job: Any, trainer: TrainerConfig) -> bool:
    """Stop a Job built from other training inputs; True (the status saying so) while it or its pods are still there.
    The generation then trains under the same number, which stays the first one trained on the current inputs: the
    trainer discards what other inputs left under its prefix, and waiting for the pods keeps a stopping one from
    writing there beside the new one."""
    if not kube.stop_job(run.namespace, job.metadata.name, run.body["metadata"]["uid"]):
        return False
    message = (
        f"stopping Job {job.metadata.name}, built from earlier training inputs, before generation "
        f"{trainer.generation} trains on the current ones"
    )
    run.condition("Trained", False, "Training", message)
    run.not_ready("Training", message)
    return True


def _gate_and_promote(run: Pass, trainer: TrainerConfig) -> bool:
    """Promote the verified generation unless the quality gate holds it back (False). The pointer is read once:
    what the gate says stays promoted, and what ``_promote`` compares with."""
    current = _read_pointer(run)
    if not _passes_quality_gate(run, trainer.generation, current):
        return False
    _promote(run, trainer, current)
    return True


def _serve_promoted(run: Pass) -> dict[str, Any]:
    """A Cartridge whose current generation is not promoted (its corpora awaited, training, failed, held back by the
    quality gate) keeps serving its promoted generation, and a change of its spec.serving is applied meanwhile
    (scaled down or disabled: a broken Corpus or a failed generation must not pin the GPUs it holds). Ready and
    Stalled keep saying what it waits for; Serving says how serving goes. The wait may last days: current.json is
    read each pass (once), so a pointer deleted or changed by hand meanwhile is followed rather than outlived. A
    Cartridge being deleted is not served again: its deletion handler leaves serving."""
    if run.body["metadata"].get("deletionTimestamp"):
        return run.status
    if not (run.status.get("promoted") or run.status.get("artifact")):
        return run.status  # nothing trained yet: nothing promoted, nothing to serve
    problem = _check_promoted(run)
    if problem is not None:
        return _promoted_gone(run, *problem)
    waiting = [c for c in run.status["conditions"] if c["type"] in ("Ready", "Stalled")]
    _serve(run)
    run.status["conditions"] = [c for c in run.status["conditions"] if c["type"] not in ("Ready", "Stalled")]
    run.status["conditions"] += waiting
    return run.status


def _check_promoted(run: Pass) -> tuple[str, str] | None:
    """Record in status.promoted what current.json names, a generation of this Cartridge whose manifest records the
    pointer's sha256 (checked when the pointer is not the one status.promoted already names); else unset it and
    return (reason, message) saying why nothing is promoted."""
    claimed = run.status.get("promoted")
    pointer = _read_pointer(run)
    _record_promoted(run, pointer)
    pointer_uri = layout.current_pointer(run.config.store_root, run.namespace, run.name)
    if pointer is None:
        return "NothingPromoted", f"{pointer_uri} is missing or not a valid pointer (deleted or changed by hand?)"
    if run.status["promoted"] == claimed:
        return None
    manifest, problem = _pointed_manifest(run, pointer)
    if manifest is None:
        run.status["promoted"] = None
        named = f"{pointer_uri} names generation {pointer.generation}"
        return "PromotedUnverified", f"{named}, not a verified generation of this Cartridge: {problem}"
    LOG.info("Cartridge %s/%s: %s names generation %d", run.namespace, run.name, pointer_uri, pointer.generation)
    return None


def _promoted_gone(run: Pass, reason: str, problem: str) -> dict[str, Any]:
    """Nothing is promoted any more: the router resolves current.json per request, so a Deployment kept for this
    Cartridge would answer "not found" while holding its GPUs for as long as the wait lasts. Its share of the serving
    objects is released (they stay for the other Cartridges of its base model); ``_serve`` applies them again once
    a generation is promoted. Ready and Stalled keep saying what it waits for."""
    if not run.status.get("endpoint"):  # not served: never promoted, serving disabled, or left in an earlier pass
        return run.status
    _release_serving(run)
    run.condition(
        "Serving",
        False,
        reason,
        f"not served, nothing of this Cartridge is promoted: {problem}. The operator writes current.json again "
        "when it next promotes a verified generation (once the corpora are Ready and the generation is trained), "
        "and serves it",
    )
    return run.status


def _read_back_promoted(run: Pass) -> None:
    """status.promoted from current.json for a status written before status.promoted existed (one read, once)."""
    if "promoted" not in run.status and run.status.get("artifact"):
        _record_promoted(run, _read_pointer(run))


def _why_not_ready(corpus: dict[str, Any] | None) -> str:
    """What a Cartridge waiting for a Corpus says: the Corpus's own reason and message when it has one (an empty
    source, a missing ConfigMap), so the fix is named where the wait shows, not one lookup away."""
    if corpus is None:
        return "does not exist"
    conditions = (corpus.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") == "True":
        return "is not Ready yet"
    return f"is not Ready ({ready.get('reason')}: {ready.get('message')})"


def _ready_corpora(run: Pass) -> list[tuple[str, str, str]] | None:
    """(name, digest, description) per referenced corpus, or None (with CorpusReady=False) while waiting."""
    found = []
    for ref in run.spec.corpusRefs:
        corpus = _pinned_corpus(run, ref.name, ref.digest) if ref.digest else _current_corpus(run, ref.name)
        if corpus is None:
            return None
        found.append(corpus)
    run.condition("CorpusReady", True, "CorporaReady", ", ".join(f"{n}@{d[:12]}" for n, d, _ in found))
    return found


def _waiting_for_corpus(run: Pass, reason: str, message: str) -> None:
    run.condition("CorpusReady", False, reason, message)
    run.not_ready(reason, message)


def _current_corpus(run: Pass, name: str) -> tuple[str, str, str] | None:
    """The Corpus's current version: it must be Ready, with its digest stored."""
    corpus = kube.get_corpus(run.namespace, name)
    status = (corpus or {}).get("status") or {}
    if corpus is None or not is_true(status.get("conditions"), "Ready") or not status.get("digest"):
        _waiting_for_corpus(run, "WaitingForCorpus", f"Corpus {name} {_why_not_ready(corpus)}")
        return None
    digest = status["digest"]
    repair = "the operator stores it again from the Corpus's sources when it next reads them (within seconds)"
    if _stored_corpus(run, name, digest, f"digest {digest} of Corpus {name}", repair) is None:
        return None
    return name, digest, corpus["spec"].get("description", "")


def _pinned_corpus(run: Pass, name: str, digest: str) -> tuple[str, str, str] | None:
    """A pinned version is immutable data in the store: it needs no Corpus, Ready or not (one whose sources broke
    since, or that was deleted, must not hold back what was trained on the version pinned). Its description is the
    one stored with it."""
    repair = (
        f"the operator stores it again while Corpus {name}'s sources still give this digest; else restore it "
        "from a backup, or pin another digest"
    )
    manifest = _stored_corpus(run, name, digest, f"pinned digest {digest} of Corpus {name}", repair)
    return None if manifest is None else (name, digest, manifest.description)


def _stored_corpus(run: Pass, name: str, digest: str, what: str, repair: str) -> layout.CorpusManifest | None:
    """The manifest of a corpus version stored intact, or None (waiting, with a condition that names the object
    and what is wrong with it): a torn or altered version would fail every training Job started on it for good."""
    prefix = layout.corpus_prefix(run.config.store_root, run.namespace, name, digest)
    try:
        return layout.verified_corpus(run.store, prefix)
    except ObjectNotFound as err:
        _waiting_for_corpus(run, "CorpusDigestNotFound", f"{what} is not in the store ({err})")
    except (IntegrityError, ValueError) as err:  # ValueError: layout.CorpusUnusable
        _waiting_for_corpus(run, "CorpusDigestUnusable", f"{what} is not usable: {err}; {repair}")
    return None


def _training_hash(spec: api.CartridgeSpec, corpora: list[tuple[str, str, str]]) -> str:
    payload = json.dumps({"spec": spec.training_inputs(), "corpora": [(n, d) for n, d, _ in corpora]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _current_generation(run: Pass, corpora: list[tuple[str, str, str]]) -> TrainerConfig:
    """The generation to train or serve: a new one exactly when the training inputs changed."""
    training_hash = _training_hash(run.spec, corpora)
    generation = int(run.status.get("generation") or 0)
    if run.status.get("trainingHash") != training_hash:
        if generation:
            _describe_promoted(run, generation)
        generation = generation + 1 if generation else _first_generation(run)
        run.status.update(generation=generation, trainingHash=training_hash, progress=None, lastFailure=None)
    run.status["trainingJob"] = manifests.job_name(run.name, generation)
    return TrainerConfig(
        namespace=run.namespace,
        cartridge=run.name,
        generation=generation,
        store_root=run.config.store_root,
        corpus_prefixes=[layout.corpus_prefix(run.config.store_root, run.namespace, n, d) for n, d, _ in corpora],
        corpus_description=" ".join(desc for _, _, desc in corpora),
        spec=run.spec,
        training_hash=training_hash,
    )


def _first_generation(run: Pass) -> int:
    """The first generation of a Cartridge without one in its status: after every generation with anything stored
    (a Cartridge of this name may have been deleted mid-training, leaving synthesized data or checkpoints that the
    trainer would resume from, although they came from other inputs). The exception is a newest generation whose
    Job this very Cartridge created: its status write was lost, and that generation is its own."""
    stored = layout.stored_generations(run.store, run.config.store_root, run.namespace, run.name)
    newest = max(stored, default=0)
    if newest:
        job = kube.get_job(run.namespace, manifests.job_name(run.name, newest))
        uid = run.body["metadata"].get("uid")
        if job is not None and kube.owned_by(job, uid):
            return newest
    return newest + 1


def _cancel_superseded(run: Pass, generation: int) -> None:
    """Before generation's Job starts, delete the Jobs of this Cartridge's earlier generations that did not complete:
    an unfinished one, so it never trains two generations at once (each holding GPUs until its
    activeDeadlineSeconds); a failed one, which was kept (with its pod and logs) only until the Cartridge moved on
    to another generation, its TTL being taken off. Completed Jobs, the promoted generation's among them, go by
    their TTL. What the deleted ones stored stays (``keepGenerations`` decides about it, as for any generation).
    Found by the Cartridge's label: a generation that stored nothing yet and is no longer in the status still has
    its Job."""
    uid = run.body["metadata"].get("uid")
    for job in kube.cartridge_jobs(run.namespace, run.name):
        old = _job_generation(job)
        finished = _job_finished(job)
        if old is None or old >= generation or finished:
            continue
        if not kube.owned_by(job, uid):
            continue  # an earlier Cartridge of this name's: the garbage collector deletes it
        kube.delete_job(run.namespace, job.metadata.name)
        LOG.info("Cartridge %s/%s: %s training Job %s of generation %d, superseded by generation %d",
                 run.namespace, run.name, "cancelled" if finished is None else "deleted the failed",
                 job.metadata.name, old, generation)  # fmt: skip


def _job_generation(job: Any) -> int | None:
    """The generation a training Job trains, from its label (None on a Job without one: not this operator's)."""
    value = (job.metadata.labels or {}).get(manifests.GENERATION_LABEL, "")
    return int(value) if value.isdigit() else None


def _job_finished(job: Any) -> bool | None:
    """True when Complete, False when Failed, None while running."""
    for condition in job.status.conditions or []:
        if condition.status == "True" and condition.type in ("Complete", "Failed"):
            return bool(condition.type == "Complete")
    return None


def _training(run: Pass, trainer: TrainerConfig, job: Any) -> None:
    """A generation whose Job has not finished: its progress, or why its pod does not start (for that, a Job gets
    no condition until its activeDeadlineSeconds)."""
    problem = start_problem(run.namespace, job)
    if problem is not None:
        run.condition("Trained", False, "TrainingPodsNotStarting", problem.message)
        run.not_ready("TrainingPodsNotStarting", problem.message, stalled=problem.stalled)
        return
    unusable = _copy_progress(run, trainer)
    run.condition("Trained", False, "Training", f"generation {trainer.generation} running{unusable}")
    run.not_ready("Training", f"training generation {trainer.generation}")


def _copy_progress(run: Pass, trainer: TrainerConfig) -> str:
    """Copy the trainer's progress.json into status; "" when copied or absent, else why it is unusable (a NaN loss:
    the API server would refuse the whole status write), for the Trained condition, the progress being cleared."""
    uri = f"{trainer.output_prefix}/{layout.PROGRESS_FILE}"
    try:
        progress = layout.Progress.model_validate(run.store.get_json(uri))
    except ObjectNotFound:
        return ""
    except (IntegrityError, ValueError) as err:  # altered, not JSON, or a record Progress refuses (ValidationError)
        run.status["progress"] = None
        return f"; {uri} is unusable: {' '.join(str(err).split())}"[:500]
    eta = None if progress.eta_s is None else int(progress.eta_s)
    run.status["progress"] = {
        "phase": progress.phase,
        "step": progress.step,
        "total": progress.total,
        "loss": progress.loss,
        "etaSeconds": eta,
    }
    return ""


def _record_failure(run: Pass, job: Any) -> None:
    """Report the failed Job's reason and its pod's termination message; keep the Job, so that the generation is not
    trained again by itself (deleting the Job retries it)."""
    if job.spec.ttl_seconds_after_finished is not None:
        kube.keep_finished_job(run.namespace, job.metadata.name)
    pod, exit_code, message = kube.failed_pod_details(run.namespace, job.metadata.name)
    failed = next((c for c in job.status.conditions or [] if c.type == "Failed"), None)
    reason = (failed.reason if failed else None) or "JobFailed"
    run.status["lastFailure"] = {
        "reason": reason,
        "message": message[-1024:],
        "exitCode": exit_code,
        "pod": pod,
        "time": _failure_time(run, failed),
    }
    summary = f"training Job {job.metadata.name} failed ({reason}, exit code {exit_code}): {message[-300:]}"
    run.condition("Trained", False, "TrainingFailed", summary)
    run.not_ready("TrainingFailed", summary, stalled=True)


def _failure_time(run: Pass, failed: Any) -> str:
    """When the Job failed, as its Failed condition says (else as recorded before): the same in every pass, so the
    status of a Cartridge that stays failed for days is not rewritten every few seconds."""
    when = None if failed is None else failed.last_transition_time
    if when is not None:
        return str(when.strftime(TIME_FORMAT))
    return str((run.status.get("lastFailure") or {}).get("time") or now())


def _verify_and_record(run: Pass, trainer: TrainerConfig) -> bool:
    """Check the uploaded artifact before trusting it: manifest parses, tensors' sha256 and p match the spec. The
    tensors' bytes are hashed too (once per uploaded version: a cartridge is MBs), so a file altered or truncated
    after upload is refused here, while the promoted generation keeps serving, rather than promoted and refused by
    serving."""
    prefix = trainer.output_prefix
    try:
        manifest = _artifact_manifest(run, trainer)
        tensors = run.store.stat(f"{prefix}/{TENSORS_FILE}")
    except ObjectNotFound as err:
        problem = f"artifact under {prefix} is missing or unreadable: {err}"
    except ValueError as err:  # see _artifact_manifest
        problem = str(err)
    else:
        problem = ""
        if tensors.sha256 != manifest.file_sha256:
            problem = f"{TENSORS_FILE} sha256 {tensors.sha256} does not match the manifest's {manifest.file_sha256}"
        elif manifest.training.get("training_hash") not in (None, trainer.training_hash):  # None: trained before
            _move_past_stored_generations(run, trainer)  # hashes were recorded
            return False
        elif manifest.p != run.spec.size:
            problem = f"artifact has p={manifest.p}, spec.size is {run.spec.size}"
        elif (actual := sha256_once(run.store, tensors)) != manifest.file_sha256:
            problem = (
                f"{TENSORS_FILE} is corrupt: its bytes hash to sha256 {actual}, the manifest says "
                f"{manifest.file_sha256}; not promoted (a promoted generation keeps serving)"
            )
    if problem:
        run.condition("Trained", False, "ArtifactInvalid", problem)
        run.not_ready("ArtifactInvalid", problem, stalled=True)
        return False
    run.status["progress"] = {**(run.status.get("progress") or {}), "phase": "done"}
    run.condition("Trained", True, "ArtifactVerified", f"generation {trainer.generation}: {prefix}/{TENSORS_FILE}")
    _record_artifact(run, prefix, manifest)
    return True


def _artifact_manifest(run: Pass, trainer: TrainerConfig) -> CartridgeManifest:
    """The generation's uploaded manifest. One altered, or that does not parse (a file store records no sha256 to
    catch a torn one, nor does an object another tool wrote) raises a ValueError that names it and says how to
    train the generation again: the trainer takes a generation with a manifest as done."""
    uri = f"{trainer.output_prefix}/{MANIFEST_FILE}"
    try:
        return CartridgeManifest.model_validate(run.store.get_json(uri))
    except (IntegrityError, ValueError) as err:  # altered, not JSON, or not a manifest (ValidationError)
        raise ValueError(
            f"{uri} is unusable ({' '.join(str(err).split())[:300]}); not promoted (a promoted "
            f"generation keeps serving): delete it and Job {manifests.job_name(run.name, trainer.generation)} "
            f"to train generation {trainer.generation} again"
        ) from err


def _record_artifact(run: Pass, prefix: str, manifest: CartridgeManifest) -> None:
    """status.artifact and status.evaluation: the verified generation under ``prefix``."""
    run.status["artifact"] = {
        "uri": f"{prefix}/{TENSORS_FILE}",
        "sha256": manifest.file_sha256,
        "bytes": manifest.file_bytes,
        "p": manifest.p,
        "dtype": manifest.dtype,
    }
    _record_evaluation(run, prefix)


def _describe_promoted(run: Pass, superseded: int) -> None:
    """Before the generation after ``superseded`` starts (hours of training, during which the status is what users
    and Argo CD see of the Cartridge), make status.artifact and status.evaluation describe ``superseded`` if it is
    the one served: the pass that verified and promoted it may have lost its status write (an operator killed after
    the pointer write, a failed status patch), leaving them, and status.promoted, describing the generation before.
    The pointer is read only when a new generation starts and the status does not describe the superseded one
    already (verified, and promoted or held back by the quality gate, in the pass that recorded status.promoted)."""
    prefix = layout.generation_prefix(run.config.store_root, run.namespace, run.name, superseded)
    if (run.status.get("artifact") or {}).get("uri", "").startswith(prefix + "/"):
        return
    pointer = _read_pointer(run)
    _record_promoted(run, pointer)
    if pointer is None or (pointer.generation, pointer.prefix) != (superseded, prefix):
        return  # not promoted (failed, cancelled, refused): the status describes the promoted one already
    manifest, problem = _pointed_manifest(run, pointer)
    if manifest is None:
        LOG.warning("Cartridge %s/%s: promoted generation %d: %s", run.namespace, run.name, superseded, problem)
        return
    _record_artifact(run, prefix, manifest)


def _pointed_manifest(run: Pass, pointer: layout.Pointer) -> tuple[CartridgeManifest | None, str]:
    """The manifest of the generation ``pointer`` names, when it is one of this Cartridge's (under its generation
    prefix) and records the pointer's sha256, as a promoted generation's does; else None and why not."""
    prefix = layout.generation_prefix(run.config.store_root, run.namespace, run.name, pointer.generation)
    if pointer.prefix != prefix:
        return None, f"its prefix {pointer.prefix} is not {prefix}"
    try:
        manifest = CartridgeManifest.model_validate(run.store.get_json(f"{prefix}/{MANIFEST_FILE}"))
    except (ObjectNotFound, IntegrityError, ValueError) as err:
        return None, str(err)
    if manifest.file_sha256 != pointer.sha256:
        return None, f"its manifest's sha256 {manifest.file_sha256} is not the promoted {pointer.sha256}"
    return manifest, ""


def _move_past_stored_generations(run: Pass, trainer: TrainerConfig) -> None:
    """The generation's prefix held an artifact trained from other inputs, which the trainer took as already done:
    a Cartridge of this name existed before and its artifacts were retained. Train under the next free number.

    Idempotent: until the status write lands, every pass computes the same number (no Job exists for it yet)."""
    stored = layout.stored_generations(run.store, run.config.store_root, run.namespace, run.name)
    generation = max(trainer.generation, *stored) + 1
    message = (
        f"generation {trainer.generation} in the store was trained from other inputs (the spec changed while its "
        f"status was not written, or an earlier Cartridge named {run.name} trained it); training generation "
        f"{generation}"
    )
    run.status.update(generation=generation, progress=None, trainingJob=manifests.job_name(run.name, generation))
    run.condition("Trained", False, "StaleArtifact", message)
    run.not_ready("Training", message)


def _record_evaluation(run: Pass, prefix: str) -> None:
    try:
        scores = run.store.get_json(f"{prefix}/{layout.EVAL_FILE}")
        evaluation = api.Evaluation.model_validate({k: scores.get(k) for k in api.Evaluation.model_fields})
    except (ObjectNotFound, IntegrityError, ValueError, AttributeError) as err:
        run.status["evaluation"] = None  # never an earlier generation's scores, which the quality gate would read
        run.condition("Evaluated", False, "NoEvaluation", f"{layout.EVAL_FILE}: {err}")
        return
    run.status["evaluation"] = evaluation.model_dump()
    run.condition(
        "Evaluated",
        True,
        "Evaluated",
        f"ICL gain recovered: {api.recovered_text(evaluation.iclGainRecovered, evaluation.icl is not None)}",
    )


def _passes_quality_gate(run: Pass, generation: int, current: layout.Pointer | None) -> bool:
    """Whether ``generation``'s evaluation passes the gate; when it does not, the status says which generation
    stays promoted (``current``, read this pass), as status.artifact describes the held-back one."""
    minimum = run.spec.serving.qualityGate.minIclGainRecovered
    if minimum is None:
        return True
    problem = _quality_gate_problem(run.status.get("evaluation") or {}, minimum)
    if problem is not None:
        _record_promoted(run, current)
        if current is None:
            outcome = f"generation {generation} is not promoted, and no generation is promoted yet"
        elif current.generation == generation:
            outcome = f"generation {generation} stays promoted (it was promoted before the gate held it back)"
        else:
            outcome = f"generation {generation} is not promoted; generation {current.generation} stays promoted"
        run.not_ready("QualityGateFailed", f"{problem}: {outcome}", stalled=True)
        return False
    return True


def _quality_gate_problem(evaluation: dict[str, Any], minimum: float) -> str | None:
    """Why ``evaluation`` does not pass a gate of ``minimum``, or None when it does. ICL no better than no context
    leaves no gain to recover, so no score can be judged: checked first, since a trainer from before that rule
    divided by such a gain and scored a cartridge worse than no context as a large positive fraction."""
    no_context, icl = evaluation.get("noContext"), evaluation.get("icl")
    if icl is None and evaluation.get("iclGainRecovered") is None:
        return (
            f"the quality gate (minIclGainRecovered {minimum}) cannot judge this generation: {api.NOTHING_SCORED}; "
            "ask for more self-study conversations (spec.selfStudy), or remove "
            "spec.serving.qualityGate.minIclGainRecovered to promote without the gate"
        )
    if no_context is not None and icl is not None and api.icl_gain(no_context, icl) is None:
        return (
            f"the quality gate (minIclGainRecovered {minimum}) cannot judge this generation: ICL gave no gain on "
            f"the held-out self-study questions (answer NLL/token {icl:.3f} with the corpus in context, "
            f"{no_context:.3f} without), so there is no ICL gain to recover; make the questions depend on the corpus "
            "(spec.selfStudy: recipe grounded, more conversations; a base model that reads its context), or remove "
            "spec.serving.qualityGate.minIclGainRecovered to promote without the gate"
        )
    recovered = evaluation.get("iclGainRecovered")
    if recovered is None or not recovered >= minimum:  # a NaN score fails: every comparison with NaN is False
        return f"ICL gain recovered {recovered} is below the quality gate {minimum}"
    return None


def _promote(run: Pass, trainer: TrainerConfig, current: layout.Pointer | None) -> None:
    """Point current.json at the verified generation, unless ``current`` (read this pass) does already; the previous
    one served until this write. Written with its prefix resolved (absolute), which operators before relative
    prefixes were read also read: a rollback of the operator keeps serving (the store root is the operator's fixed
    setting, so nothing is gained by a relative one here)."""
    relative = layout.promoted_pointer(trainer.generation, run.status["artifact"]["sha256"])
    pointer = layout.confined_pointer(run.config.store_root, run.namespace, run.name, relative)
    if current != pointer:  # none yet, or altered: written afresh
        run.store.put_json(layout.current_pointer(run.config.store_root, run.namespace, run.name), pointer.model_dump())
    run.pointer, run.pointer_known = pointer, True
    _record_promoted(run, pointer)


def _read_pointer(run: Pass) -> layout.Pointer | None:
    """current.json, the promoted generation; None when there is none yet or it was altered (its bytes, or its JSON
    replaced by hand, or leaving the cartridge's prefix: written afresh when promoting). Its prefix comes back
    resolved under the store root (``cartridges train`` writes it relative to the cartridge's). Read once a pass."""
    if not run.pointer_known:
        root = run.config.store_root
        try:
            stored = layout.Pointer.model_validate(
                run.store.get_json(layout.current_pointer(root, run.namespace, run.name))
            )
            run.pointer = layout.confined_pointer(root, run.namespace, run.name, stored)
        except (ObjectNotFound, IntegrityError, ValueError):  # ValueError: not JSON, not a pointer, or outside
            run.pointer = None
        run.pointer_known = True
    return run.pointer


def _record_promoted(run: Pass, pointer: layout.Pointer | None) -> None:
    """status.promoted: what current.json names, the generation served; unset while none is."""
    if pointer is None:
        run.status["promoted"] = None
        return
    uri = f"{pointer.prefix}/{TENSORS_FILE}"
    run.status["promoted"] = {"generation": pointer.generation, "uri": uri, "sha256": pointer.sha256}


def _prune(run: Pass, promoted: int) -> None:
    """With ``keepGenerations`` set, delete the generations it does not keep, and their Jobs (finished: a superseded
    one still running was cancelled when the next generation started). Checked every pass (one small listing), so a
    delete that failed, or a lowered keepGenerations, is acted on in the next pass. A store that refuses deletes
    costs space, never serving: the failure is logged, not put in the Ready condition."""
    keep = run.spec.keepGenerations
    if keep is None:
        return
    root = run.config.store_root
    uid = run.body["metadata"].get("uid") or ""
    try:
        stored = layout.stored_generations(run.store, root, run.namespace, run.name)
        deleted = layout.prune_generations(run.store, root, run.namespace, run.name, promoted, keep, stored)
    except StoreError as err:
        LOG.warning("Cartridge %s/%s: cannot delete old generations yet: %s", run.namespace, run.name, err)
        return
    swept = (promoted, frozenset(stored) - frozenset(deleted))
    if _JOBS_SWEPT.get(uid) != swept:
        _delete_unstored_jobs(run, *swept)
        _JOBS_SWEPT[uid] = swept
    if deleted:
        LOG.info("Cartridge %s/%s: deleted generations %s (keepGenerations %d)", run.namespace, run.name, deleted, keep)


_JOBS_SWEPT: dict[str, tuple[int, frozenset[int]]] = {}
"""Cartridge uid → (promoted generation, stored generations) when this process last deleted the Jobs of generations
with nothing stored. The Jobs are listed again only when either changed (a generation pruned, by this pass or by one
cut short before deleting its Job, or promoted) or the operator restarted, not every 5 s pass."""


def forget_cartridge(uid: str) -> None:
    """Drop what this process remembers of a deleted Cartridge."""
    _JOBS_SWEPT.pop(uid, None)


def _delete_unstored_jobs(run: Pass, promoted: int, stored: frozenset[int]) -> None:
    """Delete this Cartridge's Jobs of generations before the promoted one with nothing stored any more. Found from
    the Jobs rather than from what this pass pruned: a pass cut short after deleting a generation's files (a killed
    operator, a failed call) would otherwise leave its Job for ever, as no later pass finds that generation."""
    uid = run.body["metadata"].get("uid")
    for job in kube.cartridge_jobs(run.namespace, run.name):
        generation = _job_generation(job)
        if generation is not None and generation < promoted and generation not in stored and kube.owned_by(job, uid):
            kube.delete_job(run.namespace, job.metadata.name)


def _shared_serving(run: Pass) -> tuple[str, str, int]:
    """(first Cartridge, uri, replicas) of the Deployment shared by every Cartridge in the namespace that serves this
    base model, the same in every one's pass, so their passes never undo each other: the uri is the one the
    Cartridge created first names (baseModel is immutable; ties go by name), the replicas the most any Cartridge
    with that uri asks for. Cartridges being deleted or with serving disabled do not count."""
    model = run.spec.baseModel.name
    served = [(run.body["metadata"].get("creationTimestamp") or "", run.name, run.spec)]
    for item in run.same_base_model(model):
        meta = item["metadata"]
        if meta["name"] == run.name:
            continue
        try:
            spec = api.CartridgeSpec.model_validate(item.get("spec") or {})
        except ValidationError:
            continue
        if spec.baseModel.name == model and spec.serving.enabled:
            served.append((meta.get("creationTimestamp") or "", meta["name"], spec))
    _, first, spec = min(served, key=lambda s: (s[0], s[1]))
    uri = spec.baseModel.uri
    return first, uri, max(s.serving.replicas for _, _, s in served if s.baseModel.uri == uri)


def _serve(run: Pass) -> dict[str, Any]:
    serving, model = run.spec.serving, run.spec.baseModel
    legacy = manifests.legacy_serving_name(model.name)
    if legacy is not None:  # created before its Service was refused for the dots in its name: it must not hold a GPU
        kube.remove_owner("Deployment", run.namespace, legacy, run.body["metadata"]["uid"])
    if not serving.enabled:
        _release_serving(run)
        return _ready_unserved(run, "ServingDisabled", "spec.serving.enabled is false", "serving disabled")
    first, uri, replicas = _shared_serving(run)
    if uri != model.uri:  # never roll the GPU pods of the Cartridges served now onto other weights
        _release_serving(run)
        message = (
            f"base model {model.name} is served in namespace {run.namespace} from {redacted(uri)}, the uri of "
            f"Cartridge {first} (created first); this Cartridge names {redacted(model.uri)}: re-create it with "
            "the same baseModel.uri, or with another baseModel.name (baseModel is immutable)"
        )
        run.condition("Serving", False, "ConflictingBaseModel", message)
        return run.not_ready("ConflictingBaseModel", message, stalled=True)
    owner = [manifests.owner_reference(run.body, controller=False)]
    try:
        kube.apply_owned(manifests.serving_deployment(run.namespace, model, replicas, owner, run.config))
        kube.apply_owned(manifests.serving_service(run.namespace, model.name, owner))
    except kube.Invalid as err:
        run.condition("Serving", False, "InvalidServing", str(err))
        return run.not_ready("InvalidServing", str(err), stalled=True)
    run.status["endpoint"] = {
        "url": manifests.endpoint_url(run.namespace, model.name),
        "model": manifests.ROUTER_MODEL,
        "cartridge": run.name,
    }
    if replicas == 0:  # no replica will ever be ready: waiting for one would never end
        why = f"spec.serving.replicas is 0 for every Cartridge served by base model {model.name}"
        return _ready_unserved(run, "ScaledToZero", why, "serving scaled to zero")
    ready, desired = kube.deployment_ready(run.namespace, manifests.serving_name(model.name))
    if ready < 1:
        return _not_serving(run, f"{ready}/{desired} serving replicas ready")
    run.condition("Serving", True, "ReplicasReady", f"{ready}/{desired} serving replicas ready")
    run.condition("Stalled", False, "Serving")
    run.condition("Ready", True, "Serving", f"generation {run.status['generation']} serving")
    return run.status


def _release_serving(run: Pass) -> None:
    """Leave the shared serving objects of this Cartridge's base model: deleted once no other Cartridge of that base
    model is served by them."""
    for kind in ("Deployment", "Service"):
        kube.remove_owner(
            kind, run.namespace, manifests.serving_name(run.spec.baseModel.name), run.body["metadata"]["uid"]
        )
    run.status["endpoint"] = None


def _ready_unserved(run: Pass, reason: str, message: str, summary: str) -> dict[str, Any]:
    """Trained and promoted, and by the spec's choice served by no replica: Ready, with Serving saying why not."""
    run.condition("Serving", False, reason, message)
    run.condition("Stalled", False, "Trained")
    run.condition("Ready", True, "Trained", f"trained and promoted; {summary}")
    return run.status


def _not_serving(run: Pass, replicas: str) -> dict[str, Any]:
    """No serving replica is ready: why its pods do not start when they or their ReplicaSet say so (no node takes
    them, an image or a Secret key missing, a quota or PriorityClass refusing them), else how many replicas are
    ready. The Deployment itself only says that replicas are unavailable, for as long as that lasts; its pods and
    ReplicaSets are looked up only here, never for a serving Cartridge."""
    model = run.spec.baseModel.name
    problem = serving_problem(run.namespace, manifests.serving_name(model), manifests.serving_selector(model))
    if problem is not None:
        run.condition("Serving", False, "ServingPodsNotStarting", problem.message)
        return run.not_ready("ServingPodsNotStarting", problem.message, stalled=problem.stalled)
    run.condition("Serving", False, "ServingNotReady", replicas)
    return run.not_ready("ServingNotReady", replicas)
