"""Argo CD health checks for Corpus and Cartridge, run in a real Lua interpreter the way Argo CD runs them: the
script body sees the object as the global ``obj`` and returns ``{status, message}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart import REPO
from lupa import LuaRuntime

ARGOCD = REPO / "charts" / "argocd"
SCRIPTS = {"Corpus": ARGOCD / "health-corpus.lua", "Cartridge": ARGOCD / "health-cartridge.lua"}


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=False)
    check = lua.eval(f"function(obj)\n{SCRIPTS[kind].read_text()}\nend")
    result = check(lua.table_from(obj, recursive=True))
    return str(result["status"]), str(result["message"])


def cond(type_: str, status: str, reason: str = "", message: str = "", generation: int = 2) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "observedGeneration": generation}


def body(conditions: list[dict[str, Any]] | None, observed: int | None = 2, **spec: Any) -> dict[str, Any]:
    status: dict[str, Any] | None = None
    if conditions is not None:
        status = {"conditions": conditions} | ({"observedGeneration": observed} if observed is not None else {})
    return {"metadata": {"name": "x", "generation": 2}, "spec": spec} | ({"status": status} if status else {})


READY = cond("Ready", "True", "Serving", "serving 1/1")
STALLED = cond("Stalled", "True", "TrainingFailed", "exit code 65: bad corpus")
NOT_STALLED = cond("Stalled", "False", "AsExpected")
TRAINING = cond("Ready", "False", "Training", "step 3/10")

# (kind, object, expected status, text the message must contain)
CASES = [
    ("Corpus", body(None), "Progressing", "Waiting for the operator"),
    ("Corpus", body([]), "Progressing", "Waiting for the operator"),
    ("Corpus", body([READY, NOT_STALLED]), "Healthy", "Serving: serving 1/1"),
    ("Corpus", body([READY, cond("Stalled", "False", "SourceUnavailable", "503"),  # its stored version serves
                     cond("SourcesRead", "False", "SourceUnavailable", "503")]), "Healthy", "serving 1/1"),
    ("Corpus", body([READY], observed=1), "Progressing", "observe generation 2"),
    ("Corpus", body([READY], observed=None), "Progressing", "observe generation 2"),
    ("Corpus", body([cond("Ready", "True", "Normalized", generation=1)]), "Progressing", "describes generation 1"),
    ("Corpus", body([cond("Ready", "False", "InvalidSource", "no ConfigMap"), STALLED]), "Degraded", "exit code 65"),
    ("Corpus", body([cond("Ready", "Unknown", "Reading")]), "Progressing", "Reading"),
    ("Corpus", body([NOT_STALLED]), "Progressing", "Waiting for the operator"),
    ("Cartridge", body([READY, NOT_STALLED]), "Healthy", "serving 1/1"),
    ("Cartridge", body([TRAINING, NOT_STALLED, cond("CorpusReady", "True")]), "Progressing", "Training: step 3/10"),
    ("Cartridge", body([TRAINING, STALLED]), "Degraded", "TrainingFailed: exit code 65"),
    ("Cartridge", body([cond("Ready", "False", "Suspended")], suspend=True), "Suspended", "spec.suspend"),
    ("Cartridge", body(None, suspend=True), "Suspended", "spec.suspend"),
    ("Cartridge", body([READY], suspend=False), "Healthy", ""),
    ("Cartridge", body([READY, STALLED]), "Degraded", "TrainingFailed"),
    ("Cartridge", body([READY], observed=1), "Progressing", "generation 2"),
    ("Cartridge", body([cond("Ready", "False", "ServingNotReady", "0/1 serving replicas ready")]), "Progressing",
     "0/1 serving replicas"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "obj", "status", "message"), CASES)
def test_health(kind: str, obj: dict[str, Any], status: str, message: str) -> None:
    got_status, got_message = health(kind, obj)
    assert (got_status, message in got_message) == (status, True), got_message


def test_argocd_cm_snippet_embeds_the_scripts_verbatim() -> None:
    data = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())["data"]
    for kind, path in SCRIPTS.items():
        assert data[f"resource.customizations.health.cartridges.dev_{kind}"] == path.read_text()
    assert data["application.resourceTrackingMethod"] == "annotation"


def test_example_application_points_at_the_chart() -> None:
    apps = list(yaml.safe_load_all((ARGOCD / "application.yaml").read_text()))
    chart = next(a for a in apps if a["spec"]["source"]["path"] == "charts/cartridges")
    assert Path(REPO, chart["spec"]["source"]["path"], "Chart.yaml").exists()
    examples = next(a for a in apps if a["spec"]["source"]["path"] == "examples")
    assert examples["spec"]["destination"]["namespace"] in chart["spec"]["source"]["helm"]["valuesObject"][
        "operator"]["watchNamespaces"]  # fmt: skip
