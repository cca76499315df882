"""What a trained and promoted Cartridge's status says about serving (DESIGN.md §3, §7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cartridges import api, layout
from cartridges.manifest import MANIFEST_FILE, CartridgeManifest, ModelFingerprint
from cartridges.store import Store
from cartridges_operator import kube
from cartridges_operator.cartridge import Pass, _reconcile, _serve
from cartridges_operator.config import OperatorConfig

NAMESPACE = "team-a"


def promoted(replicas: int) -> Pass:
    model = {"name": "m", "uri": "s3://b/m"}
    spec = api.CartridgeSpec.model_validate(
        {"corpusRefs": [{"name": "c"}], "baseModel": model, "serving": {"replicas": replicas}}
    )
    meta = {"name": "c", "uid": "uid-c", "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"}
    body = {"kind": "Cartridge", "metadata": meta, "spec": spec.model_dump()}
    config = OperatorConfig(store_root="file:///unused")
    return Pass(body, spec, {"generation": 1}, NAMESPACE, "c", 1, config, Store(), lambda model: [])


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The serving objects the pass applies; the Deployment reports no ready replica (none asked for, or starting)."""
    objects: list[dict[str, Any]] = []
    monkeypatch.setattr(kube, "apply_owned", objects.append)
    monkeypatch.setattr(kube, "deployment_ready", lambda namespace, name: (0, objects[0]["spec"]["replicas"]))
    monkeypatch.setattr("cartridges_operator.cartridge.serving_problem", lambda namespace, name, selector: None)
    return objects


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds of the shared serving objects the pass leaves (drops the Cartridge from their owners)."""
    kinds: list[str] = []
    monkeypatch.setattr(kube, "remove_owner", lambda kind, namespace, name, uid: kinds.append(kind))
    return kinds


def waiting_in(root: str) -> Pass:
    """A pass of Cartridge c, promoted and served, whose Corpus is gone, with its store under ``root``."""
    run = promoted(replicas=0)
    run.config = OperatorConfig(store_root=root)
    run.status["endpoint"] = {"url": "http://m", "model": "cartridges", "cartridge": "c"}
    return run


def store_generation(root: str, generation: int) -> dict[str, Any]:
    """Generation ``generation`` of Cartridge c as a pass verified it (its manifest stored); its status.promoted."""
    prefix = layout.generation_prefix(root, NAMESPACE, "c", generation)
    sha256 = f"{generation:02d}" * 32
    model = ModelFingerprint(
        model_id="m", weights_sha256="w", tokenizer_sha256="t", num_layers=1, num_kv_heads=1, head_dim=8, rope_theta=1.0
    )
    manifest = CartridgeManifest(
        base_model=model, p=16, frozen_tokens=1, dtype="bf16", file_sha256=sha256, file_bytes=1
    )
    Store().put_json(f"{prefix}/{MANIFEST_FILE}", manifest.model_dump(mode="json"))
    return {"generation": generation, "uri": f"{prefix}/cartridge.safetensors", "sha256": sha256}


def promote_by_hand(root: str, promoted: dict[str, Any]) -> None:
    prefix = promoted["uri"].rsplit("/", 1)[0]
    pointer = {"generation": promoted["generation"], "prefix": prefix, "sha256": promoted["sha256"]}
    Store().put_json(layout.current_pointer(root, NAMESPACE, "c"), pointer)


def test_serving_scaled_to_zero_is_ready_not_serving(applied: list[dict[str, Any]]) -> None:
    """replicas 0 asks for no serving pod: waiting for one to be ready would never end (Argo CD: Progressing)."""
    status = _serve(promoted(replicas=0))
    assert applied[0]["kind"] == "Deployment" and applied[0]["spec"]["replicas"] == 0
    serving, ready = condition(status, "Serving"), condition(status, "Ready")
    assert (serving["status"], serving["reason"]) == ("False", "ScaledToZero")
    assert (ready["status"], ready["reason"]) == ("True", "Trained") and "scaled to zero" in ready["message"]
    assert condition(status, "Stalled")["status"] == "False"


def test_a_replica_asked_for_and_not_ready_is_waited_for(applied: list[dict[str, Any]]) -> None:
    status = _serve(promoted(replicas=1))
    assert condition(status, "Serving")["reason"] == "ServingNotReady"
    assert condition(status, "Ready")["status"] == "False"


def test_a_cartridge_waiting_for_its_corpus_keeps_serving_and_takes_serving_changes(
    applied: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Its Corpus broken (or deleted), a promoted Cartridge still serves, and a change of spec.serving (scaled down
    to free GPUs, or disabled) is applied meanwhile; Ready stays False with the reason it waits for. One never
    promoted has nothing to serve."""
    monkeypatch.setattr(kube, "get_corpus", lambda namespace, name: None)
    root = f"file://{tmp_path}/store"
    run = waiting_in(root)
    run.status["promoted"] = store_generation(root, 1)
    promote_by_hand(root, run.status["promoted"])
    status = _reconcile(run)
    assert applied[0]["kind"] == "Deployment" and applied[0]["spec"]["replicas"] == 0
    assert condition(status, "Serving")["reason"] == "ScaledToZero"
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForCorpus") and "Corpus c" in ready["message"]
    assert condition(status, "Stalled")["status"] == "False"
    applied.clear()
    never = _reconcile(promoted(replicas=0))
    assert applied == [] and condition(never, "Ready")["reason"] == "WaitingForCorpus"


def test_a_waiting_cartridge_from_before_status_promoted_reads_it_back_and_serves(
    applied: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A status an operator from before status.promoted wrote: the promoted generation is read from current.json,
    so waiting for a broken Corpus does not keep it from taking serving changes either."""
    monkeypatch.setattr(kube, "get_corpus", lambda namespace, name: None)
    root = f"file://{tmp_path}/store"
    generation = store_generation(root, 1)
    promote_by_hand(root, generation)
    run = promoted(replicas=0)
    run.config = OperatorConfig(store_root=root)
    run.status["artifact"] = {"uri": generation["uri"], "sha256": generation["sha256"]}
    status = _reconcile(run)
    assert status["promoted"] == generation
    assert applied[0]["kind"] == "Deployment" and applied[0]["spec"]["replicas"] == 0
    assert condition(status, "Ready")["reason"] == "WaitingForCorpus"


def test_a_waiting_cartridge_whose_pointer_was_deleted_claims_nothing_promoted_and_leaves_serving(
    applied: list[dict[str, Any]], released: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """current.json deleted by hand while the Corpus is broken: the router answers "not found" for the Cartridge, so
    status.promoted no longer names a generation, Serving says why and what brings it back, and its share of the
    serving objects is left once (they would hold GPUs for nothing until the Corpus is fixed)."""
    monkeypatch.setattr(kube, "get_corpus", lambda namespace, name: None)
    root = f"file://{tmp_path}/store"
    run = waiting_in(root)
    run.status["promoted"] = run.status["artifact"] = store_generation(root, 1)  # no pointer: deleted by hand
    status = _reconcile(run)
    assert status["promoted"] is None and status["endpoint"] is None
    assert applied == [] and released == ["Deployment", "Service"]
    serving = condition(status, "Serving")
    assert (serving["status"], serving["reason"]) == ("False", "NothingPromoted")
    assert serving["message"] == (
        f"not served, nothing of this Cartridge is promoted: {layout.current_pointer(root, NAMESPACE, 'c')} is "
        "missing or not a valid pointer (deleted or changed by hand?). The operator writes current.json again when "
        "it next promotes a verified generation (once the corpora are Ready and the generation is trained), and "
        "serves it"
    )
    assert condition(status, "Ready")["reason"] == "WaitingForCorpus"
    released.clear()
    again = waiting_in(root)
    again.status = status
    status = _reconcile(again)
    assert status["promoted"] is None and released == [] and applied == []
    assert condition(status, "Serving") == serving


def test_a_waiting_cartridge_follows_a_pointer_changed_to_another_verified_generation_only(
    applied: list[dict[str, Any]], released: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """current.json rolled back by hand to generation 1 while the Corpus is broken: that is what the router serves,
    so status.promoted says so and serving goes on. Moved to a generation with no matching manifest (gone, or other
    tensors): nothing usable is promoted, and serving is left."""
    monkeypatch.setattr(kube, "get_corpus", lambda namespace, name: None)
    root = f"file://{tmp_path}/store"
    first = store_generation(root, 1)
    run = waiting_in(root)
    run.status["promoted"] = run.status["artifact"] = store_generation(root, 2)
    promote_by_hand(root, first)
    status = _reconcile(run)
    assert status["promoted"] == first and status["artifact"]["sha256"] == "02" * 32
    assert applied[0]["kind"] == "Deployment" and released == []
    assert condition(status, "Serving")["reason"] == "ScaledToZero"
    applied.clear()
    promote_by_hand(root, {**first, "sha256": "ff" * 32})
    moved = waiting_in(root)
    moved.status = status
    status = _reconcile(moved)
    assert status["promoted"] is None and applied == [] and released == ["Deployment", "Service"]
    serving = condition(status, "Serving")
    assert serving["reason"] == "PromotedUnverified"
    assert (
        f"names generation 1, not a verified generation of this Cartridge: its manifest's sha256 {'01' * 32}"
        in serving["message"]
    )
