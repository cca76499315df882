"""What a trained and promoted Cartridge's status says about serving (DESIGN.md §3, §7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cartridges import api, layout
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
    applied: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its Corpus broken (or deleted), a promoted Cartridge still serves, and a change of spec.serving (scaled down
    to free GPUs, or disabled) is applied meanwhile; Ready stays False with the reason it waits for. One never
    promoted has nothing to serve."""
    monkeypatch.setattr(kube, "get_corpus", lambda namespace, name: None)
    run = promoted(replicas=0)
    run.status["promoted"] = {"generation": 1, "uri": "file:///unused/g1/cartridge.safetensors", "sha256": "ab"}
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
    prefix = layout.generation_prefix(root, NAMESPACE, "c", 1)
    Store().put_json(layout.current_pointer(root, NAMESPACE, "c"), {"generation": 1, "prefix": prefix, "sha256": "ab"})
    run = promoted(replicas=0)
    run.config = OperatorConfig(store_root=root)
    run.status["artifact"] = {"uri": f"{prefix}/cartridge.safetensors", "sha256": "ab"}
    status = _reconcile(run)
    assert status["promoted"]["generation"] == 1
    assert applied[0]["kind"] == "Deployment" and applied[0]["spec"]["replicas"] == 0
    assert condition(status, "Ready")["reason"] == "WaitingForCorpus"
