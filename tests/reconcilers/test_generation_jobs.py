"""A Cartridge between generations, its training Jobs and store mocked: the promoted generation keeps taking serving
changes while the next one trains, fails or is held back, a failed Job goes once the Cartridge moves on, a failed
Cartridge's status stays as it is, and a Job built from other inputs never trains the generation."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from kubernetes import client

from cartridges import api, layout
from cartridges.artifact import Cartridge, save_cartridge, upload_artifact
from cartridges.manifest import TENSORS_FILE
from cartridges.models import tiny_llama
from cartridges.store import Store
from cartridges_operator import cartridge, kube, manifests
from cartridges_operator.cartridge import reconcile_cartridge
from cartridges_operator.config import OperatorConfig

NAMESPACE = "team-a"
CORPORA = [("c", "d" * 64, "facts")]
FAILED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def spec(**overrides: Any) -> dict[str, Any]:
    base = {"corpusRefs": [{"name": "c"}], "baseModel": {"name": "m", "uri": "s3://b/m"}, "size": 16,
            "resources": {"gpus": 0}, "serving": {"enabled": True, "replicas": 1}}  # fmt: skip
    return {**base, **overrides}


def training_hash(spec_: dict[str, Any]) -> str:
    return cartridge._training_hash(api.CartridgeSpec.model_validate(spec_), CORPORA)


def job(generation: int, finished: str | None = None, built_from: str | None = None) -> client.V1Job:
    """Cartridge c's Job of ``generation``: running, or finished (``"Complete"``, ``"Failed"``), labelled with the
    training hash it was built from (none: created before Jobs were)."""
    labels = {manifests.CARTRIDGE_LABEL: "c", manifests.GENERATION_LABEL: str(generation)}
    if built_from is not None:
        labels[manifests.TRAINING_HASH_LABEL] = built_from
    conditions = [client.V1JobCondition(type=finished, status="True", reason="BackoffLimitExceeded",
                                        last_transition_time=FAILED_AT)] if finished else []  # fmt: skip
    owner = client.V1OwnerReference(api_version="cartridges.dev/v1alpha1", kind="Cartridge", name="c", uid="uid-c")
    metadata = client.V1ObjectMeta(name=manifests.job_name("c", generation), labels=labels, owner_references=[owner])
    return client.V1Job(
        metadata=metadata,
        spec=client.V1JobSpec(template=client.V1PodTemplateSpec(), suspend=False, ttl_seconds_after_finished=None),
        status=client.V1JobStatus(conditions=conditions, ready=1),
    )


class World:
    """What the mocked Kubernetes API holds and was asked to do."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.jobs: dict[str, client.V1Job] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.stopping: set[str] = set()
        self.applied: list[dict[str, Any]] = []
        self.released: list[str] = []

    def create_job(self, body: dict[str, Any]) -> None:
        metadata = body["metadata"]
        if metadata["name"] not in self.jobs:
            labels = metadata["labels"]
            generation = int(labels[manifests.GENERATION_LABEL])
            self.jobs[metadata["name"]] = job(generation, built_from=labels[manifests.TRAINING_HASH_LABEL])
            self.created.append(body)

    def delete_job(self, namespace: str, name: str) -> None:
        self.deleted.append(name)
        self.jobs.pop(name, None)

    def stop_job(self, namespace: str, name: str, owner_uid: str) -> bool:
        """The Job goes at once; its pod takes one more pass to stop."""
        if name in self.jobs:
            self.stopping.add(name)
            del self.jobs[name]
            return True
        return False

    def passes(self, spec_: dict[str, Any], status: dict[str, Any], count: int = 1) -> dict[str, Any]:
        """``count`` passes of Cartridge c, each reading the status the one before wrote."""
        for _ in range(count):
            meta = {"name": "c", "uid": "uid-c", "generation": 2, "creationTimestamp": "2026-01-01T00:00:00Z"}
            body = {"kind": "Cartridge", "metadata": meta, "spec": spec_, "status": copy.deepcopy(status)}
            config = OperatorConfig(store_root=self.root)
            status = reconcile_cartridge(body, NAMESPACE, "c", config, Store(), lambda model: [])
        return status


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> World:
    world = World(f"file://{tmp_path}/store")
    monkeypatch.setattr(cartridge, "_ready_corpora", lambda run: CORPORA)
    monkeypatch.setattr(cartridge, "start_problem", lambda namespace, job: None)
    monkeypatch.setattr(kube, "get_job", lambda namespace, name: world.jobs.get(name))
    monkeypatch.setattr(kube, "cartridge_jobs", lambda namespace, name, deleting=False: list(world.jobs.values()))
    monkeypatch.setattr(kube, "secret_exists", lambda namespace, name: True)
    monkeypatch.setattr(kube, "create_job", world.create_job)
    monkeypatch.setattr(kube, "delete_job", world.delete_job)
    monkeypatch.setattr(kube, "stop_job", world.stop_job)
    monkeypatch.setattr(kube, "keep_finished_job", lambda namespace, name: None)
    monkeypatch.setattr(kube, "failed_pod_details", lambda namespace, name: ("c-g2-x", 65, "corpus unusable"))
    monkeypatch.setattr(kube, "apply_owned", world.applied.append)
    monkeypatch.setattr(kube, "remove_owner", lambda kind, namespace, name, uid: world.released.append(kind))
    monkeypatch.setattr(kube, "deployment_ready", lambda namespace, name: (1, 1))
    return world


def uri(root: str, generation: int) -> str:
    return f"{layout.generation_prefix(root, NAMESPACE, 'c', generation)}/{TENSORS_FILE}"


def served_generation_1(world: World, spec_: dict[str, Any], generation: int) -> dict[str, Any]:
    """The status of Cartridge c training ``generation`` from ``spec_``, generation 1 promoted and served."""
    promoted = {"generation": 1, "uri": uri(world.root, 1), "sha256": "01" * 32}
    pointer = {"generation": 1, "prefix": layout.generation_prefix(world.root, NAMESPACE, "c", 1), "sha256": "01" * 32}
    Store().put_json(layout.current_pointer(world.root, NAMESPACE, "c"), pointer)
    return {
        "generation": generation,
        "trainingHash": training_hash(spec_),
        "artifact": promoted,
        "promoted": promoted,
        "endpoint": {"url": "http://triton-m.team-a.svc:8000", "model": "router", "cartridge": "c"},
        "conditions": [],
    }


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def next_generation_training(world: World, spec_: dict[str, Any]) -> dict[str, Any]:
    world.jobs["c-g2"] = job(2, built_from=training_hash(spec_))
    return served_generation_1(world, spec_, 2)


def next_generation_failed(world: World, spec_: dict[str, Any]) -> dict[str, Any]:
    world.jobs["c-g2"] = job(2, "Failed", built_from=training_hash(spec_))
    return served_generation_1(world, spec_, 2)


def next_generation_held_back(world: World, spec_: dict[str, Any]) -> dict[str, Any]:
    status = served_generation_1(world, spec_, 2)
    status["artifact"] = {"uri": uri(world.root, 2), "sha256": "02" * 32}
    status["evaluation"] = {"iclGainRecovered": 0.1}
    return status


@pytest.mark.parametrize(
    ("state", "reason", "gate"),
    [
        (next_generation_training, "Training", None),
        (next_generation_failed, "TrainingFailed", None),
        (next_generation_held_back, "QualityGateFailed", 0.5),
    ],
)
def test_the_promoted_generation_takes_serving_changes_while_the_next_one_is_not_promoted(
    world: World, state: Any, reason: str, gate: float | None
) -> None:
    """Serving disabled while generation 2 trains, has failed, or is held back by the quality gate: generation 1,
    still promoted, leaves the serving objects (a generation that failed or trains for hours must not pin the GPUs),
    Ready keeps saying why generation 2 is not promoted, and a second pass changes nothing (no status write, no
    Event)."""
    disabled = spec(serving={"enabled": False, "qualityGate": {"minIclGainRecovered": gate}})
    first = world.passes(disabled, state(world, disabled))
    assert world.released == ["Deployment", "Service"] and first["endpoint"] is None
    assert condition(first, "Serving")["reason"] == "ServingDisabled"
    assert (condition(first, "Ready")["status"], condition(first, "Ready")["reason"]) == ("False", reason)
    assert first["promoted"]["generation"] == 1
    assert world.passes(disabled, first) == first


def test_a_serving_change_is_applied_while_the_next_generation_trains(world: World) -> None:
    """Scaled while generation 2 trains: the shared Deployment is applied with the new replicas at once."""
    scaled = spec(serving={"enabled": True, "replicas": 3})
    status = world.passes(scaled, next_generation_training(world, scaled))
    assert [o["kind"] for o in world.applied] == ["Deployment", "Service"]
    assert world.applied[0]["spec"]["replicas"] == 3 and status["endpoint"]["cartridge"] == "c"
    assert condition(status, "Serving")["reason"] == "ReplicasReady"
    assert condition(status, "Ready")["reason"] == "Training"


def test_a_failed_cartridge_keeps_the_same_status_pass_after_pass(world: World) -> None:
    """The failure's time is the Job's, not the pass's: a Cartridge failed for days is not written every 5 s."""
    failing = spec()
    status = world.passes(failing, next_generation_failed(world, failing))
    assert status["lastFailure"]["time"] == "2026-01-02T03:04:05Z"
    assert condition(status, "Stalled")["reason"] == "TrainingFailed"
    assert world.passes(failing, status, count=2) == status


def test_a_failed_job_is_deleted_once_the_cartridge_moves_on(world: World) -> None:
    """Generation 2's failed Job stays (with its pod's logs) while the Cartridge is at generation 2; a spec change
    starts generation 3, and the failed Job goes. Generation 1's completed Job is left to its TTL."""
    failing = spec()
    world.jobs["c-g1"] = job(1, "Complete", built_from="0" * 16)
    status = world.passes(failing, next_generation_failed(world, failing), count=2)
    assert sorted(world.jobs) == ["c-g1", "c-g2"] and world.deleted == []
    status = world.passes(spec(size=32), status)
    assert status["generation"] == 3 and status["lastFailure"] is None
    assert world.deleted == ["c-g2"] and sorted(world.jobs) == ["c-g1", "c-g3"]


def test_a_job_built_from_earlier_inputs_is_stopped_and_the_generation_trains_on_the_current_ones(
    world: World,
) -> None:
    """Pass A creates generation 2's Job from spec.size 32, and its status write is refused: the spec changed to
    48 meanwhile. Pass B, from the same status, takes number 2 for size 48: the size-32 Job is stopped, and once
    its pod is gone generation 2 trains on size 48 (the number stays that of the first generation trained on it)."""
    before = served_generation_1(world, spec(), 1)
    world.passes(spec(size=32), before)  # its status write lost
    assert [j.metadata.name for j in world.jobs.values()] == ["c-g2"]
    stopping = world.passes(spec(size=48), before)
    assert world.stopping == {"c-g2"} and len(world.created) == 1
    assert stopping["generation"] == 2 and "stopping Job c-g2" in condition(stopping, "Ready")["message"]
    status = world.passes(spec(size=48), stopping)
    assert status["generation"] == 2 and len(world.created) == 2
    trained = world.created[-1]
    assert trained["metadata"]["labels"][manifests.TRAINING_HASH_LABEL] == training_hash(spec(size=48))
    assert json.loads(trained["spec"]["template"]["spec"]["containers"][0]["args"][-1])["spec"]["size"] == 48
    assert condition(status, "Ready")["reason"] == "Training"


def test_a_job_from_before_jobs_were_labelled_with_their_inputs_trains_on(world: World) -> None:
    """An upgraded operator does not cut short the training its predecessor started: the unlabelled Job is
    followed."""
    current = spec()
    world.jobs["c-g2"] = job(2)
    status = world.passes(current, served_generation_1(world, current, 2))
    assert world.stopping == set() and world.created == [] and "c-g2" in world.jobs
    assert condition(status, "Trained")["reason"] == "Training"


def test_a_completed_job_built_from_earlier_inputs_moves_the_cartridge_to_the_next_generation(
    world: World, tmp_path: Path
) -> None:
    """Generation 2's Job, built from size 32, completed and every status write of it was lost; the spec says 48.
    Its artifact is kept (nothing to stop, no pointless Job under number 2): the Cartridge moves on to generation
    3, and the message says the spec changed while that status was not written."""
    world.jobs["c-g2"] = job(2, "Complete", built_from=training_hash(spec(size=32)))
    stored = tmp_path / "g2"
    shape = (2, 32, 16)
    keys, values = ([torch.randn(shape) for _ in range(2)] for _ in "kv")
    save_cartridge(Cartridge(keys, values), stored, tiny_llama().fingerprint,
                   training={"training_hash": training_hash(spec(size=32))})  # fmt: skip
    upload_artifact(Store(), stored, layout.generation_prefix(world.root, NAMESPACE, "c", 2))
    status = world.passes(spec(size=48), served_generation_1(world, spec(size=48), 2))
    assert world.stopping == set() and world.created == [] and "c-g2" in world.jobs
    assert status["generation"] == 3 and condition(status, "Trained")["reason"] == "StaleArtifact"
    assert "the spec changed while its status was not written" in condition(status, "Trained")["message"]
    status = world.passes(spec(size=48), status)
    assert [c["metadata"]["name"] for c in world.created] == ["c-g3"]
