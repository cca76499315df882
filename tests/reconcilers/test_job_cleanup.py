"""Finding a Cartridge's training Jobs by its label: deletion stops every one, pruning lists them only when needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from cartridges import api, layout
from cartridges.store import Store
from cartridges_operator import cartridge, handlers, kube, manifests
from cartridges_operator.config import OperatorConfig


def labelled_job(namespace: str, name: str, generation: int, owner_uid: str) -> None:
    """A suspended training Job of ``generation`` as the operator labels them, owned by ``owner_uid`` (no pods)."""
    labels = {manifests.CARTRIDGE_LABEL: manifests.cartridge_label(name), manifests.GENERATION_LABEL: str(generation)}
    pod = {"metadata": {"labels": labels},
           "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "trainer"}]}}  # fmt: skip
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    metadata = {"name": manifests.job_name(name, generation), "labels": labels, "ownerReferences": [owner]}
    kube.batch().create_namespaced_job(namespace, {"metadata": metadata, "spec": {"suspend": True, "template": pod}})


@pytest.mark.cluster
def test_deletion_stops_a_job_whose_generation_stored_nothing_and_is_not_in_status(namespace: str) -> None:
    """A generation whose pod has not started yet has stored nothing, and the status may not name it (its write was
    lost): found by label, its Job is stopped before the prefix goes, so its trainer cannot write there later."""
    owner = kube.core().create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    labelled_job(namespace, "doomed", 7, owner.metadata.uid)
    labelled_job(namespace, "other", 1, owner.metadata.uid)  # another Cartridge's: not stopped
    assert handlers._stop_training_jobs(namespace, "doomed", owner.metadata.uid) == ["doomed-g7"]
    assert kube.get_job(namespace, "other-g1") is not None


def stored_pass(root: str, keep: int) -> cartridge.Pass:
    model = {"name": "m", "uri": "s3://b/m"}
    spec = api.CartridgeSpec.model_validate({"corpusRefs": [{"name": "c"}], "baseModel": model})
    spec.keepGenerations = keep
    body = {"kind": "Cartridge", "metadata": {"name": "c", "uid": "uid-c", "generation": 1}, "spec": spec.model_dump()}
    return cartridge.Pass(body, spec, {}, "ns", "c", 1, OperatorConfig(store_root=root), Store(), lambda model: [])


@pytest.fixture
def job_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each listing of the Cartridge's Jobs, by name; the first fails (the API server went away)."""
    listings: list[str] = []

    def list_jobs(namespace: str, name: str, deleting: bool = False) -> list[Any]:
        listings.append(name)
        if len(listings) == 1:
            raise ApiException(status=503)
        return []

    monkeypatch.setattr(kube, "cartridge_jobs", list_jobs)
    monkeypatch.setattr(cartridge, "_JOBS_SWEPT", {})
    return listings


def test_pruning_lists_the_jobs_only_when_the_stored_generations_changed(
    tmp_path: Path, job_listings: list[str]
) -> None:
    """Every 5 s pass prunes; the Jobs are listed again only after a generation went, until a listing succeeds."""
    root = f"file://{tmp_path}/store"
    store = Store()
    for generation in (1, 2, 3):
        store.put_bytes(f"{layout.generation_prefix(root, 'ns', 'c', generation)}/{layout.MANIFEST_FILE}", b"{}")
    run = stored_pass(root, keep=2)
    with pytest.raises(ApiException):  # generation 1's files deleted, its Job not yet
        cartridge._prune(run, promoted=3)
    assert layout.stored_generations(store, root, "ns", "c") == [2, 3]
    for _ in range(3):
        cartridge._prune(run, promoted=3)
    assert job_listings == ["c", "c"]  # the failed sweep was retried once, then no more
    store.delete_prefix(layout.generation_prefix(root, "ns", "c", 2))  # deleted by another pass cut short
    cartridge._prune(run, promoted=3)
    assert job_listings == ["c", "c", "c"]
