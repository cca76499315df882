"""What the trainer writes (progress.json, eval.json, the artifact's manifest) on its way into a Cartridge's status:
NaN and infinity, which a diverged run produces, are refused, a NaN score never passes the quality gate, and a record
that is unreadable is reported, naming it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cartridges import api, layout
from cartridges.contract import TrainerConfig
from cartridges.manifest import MANIFEST_FILE, TENSORS_FILE
from cartridges.store import IntegrityError, Store
from cartridges_operator import manifests
from cartridges_operator.cartridge import (
    Pass,
    _copy_progress,
    _passes_quality_gate,
    _record_evaluation,
    _verify_and_record,
)
from cartridges_operator.conditions import is_true
from cartridges_operator.config import OperatorConfig

NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NON_FINITE)
def test_records_with_non_finite_numbers_are_refused(value: float) -> None:
    with pytest.raises(ValidationError, match="finite number"):
        layout.Progress.model_validate({"phase": "training", "loss": value})
    with pytest.raises(ValidationError, match="finite number"):
        api.Progress.model_validate({"phase": "training", "loss": value})
    with pytest.raises(ValidationError, match="finite number"):
        api.Evaluation.model_validate({"icl": 1.0, "iclGainRecovered": value})


def gate_pass(recovered: float | None, **scores: float) -> Pass:
    spec = api.CartridgeSpec.model_validate({
        "corpusRefs": [{"name": "c"}], "baseModel": {"name": "m", "uri": "s3://b/m"}, "size": 512,
        "serving": {"qualityGate": {"minIclGainRecovered": 0.5}},
    })  # fmt: skip
    status = {"evaluation": {"iclGainRecovered": recovered, **scores}}
    return Pass({}, spec, status, "ns", "c", 1, OperatorConfig(store_root="s3://b"), None, lambda _: [])  # type: ignore[arg-type]


@pytest.mark.parametrize("recovered", [math.nan, None, 0.49])
def test_a_nan_or_missing_or_low_score_fails_the_quality_gate(recovered: float | None) -> None:
    run = gate_pass(recovered)
    assert not _passes_quality_gate(run, 1, None)
    assert is_true(run.status["conditions"], "Stalled")
    assert next(c for c in run.status["conditions"] if c["type"] == "Ready")["reason"] == "QualityGateFailed"


def test_a_score_at_the_gate_passes() -> None:
    assert _passes_quality_gate(gate_pass(0.5), 1, None)


def trained_pass(tmp_path: Path) -> tuple[Pass, TrainerConfig]:
    """A pass of Cartridge c, on a file store, whose generation 1 has finished training."""
    root = f"file://{tmp_path}/store"
    spec = api.CartridgeSpec.model_validate(
        {"corpusRefs": [{"name": "k"}], "baseModel": {"name": "m", "uri": "s3://b/m"}}
    )
    run = Pass(
        {"metadata": {"name": "c"}}, spec, {}, "ns", "c", 1, OperatorConfig(store_root=root), Store(), lambda _: []
    )
    trainer = TrainerConfig(namespace="ns", cartridge="c", generation=1, store_root=root,
                            corpus_prefixes=[f"{root}/corpora/ns/k/d"], corpus_description="", spec=spec)  # fmt: skip
    return run, trainer


@pytest.mark.parametrize("manifest", [b"{truncated", b"{}"])
def test_an_unreadable_artifact_manifest_is_an_invalid_artifact_that_says_how_to_train_again(
    tmp_path: Path, manifest: bytes
) -> None:
    """A file store records no sha256 to catch a torn manifest, nor does an object another tool wrote to S3: the
    pass says which object is wrong and how to retrain (the trainer takes a generation with a manifest as done),
    rather than raising and writing no status at all."""
    run, trainer = trained_pass(tmp_path)
    run.store.put_bytes(f"{trainer.output_prefix}/{TENSORS_FILE}", b"tensors")
    run.store.put_bytes(f"{trainer.output_prefix}/{MANIFEST_FILE}", manifest)
    assert not _verify_and_record(run, trainer)
    stalled = next(c for c in run.status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ArtifactInvalid"
    assert f"{trainer.output_prefix}/{MANIFEST_FILE} is unusable" in stalled["message"]
    assert f"delete it and Job {manifests.job_name('c', 1)} to train generation 1 again" in stalled["message"]


def test_progress_altered_after_upload_is_reported_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """progress.json whose bytes no longer match their recorded sha256 says so in Trained, the progress cleared; the
    pass goes on (not StoreUnavailable, which would hide what is wrong and say it may pass)."""
    run, trainer = trained_pass(tmp_path)
    uri = f"{trainer.output_prefix}/{layout.PROGRESS_FILE}"

    def altered(uri: str) -> Any:
        raise IntegrityError("sha256 mismatch (expected a, read b)", uri)

    monkeypatch.setattr(run.store, "get_json", altered)
    run.status["progress"] = {"phase": "training"}
    unusable = _copy_progress(run, trainer)
    assert unusable.startswith(f"; {uri} is unusable: sha256 mismatch") and run.status["progress"] is None


@pytest.mark.parametrize("recovered", [None, 5.0])
def test_the_quality_gate_cannot_judge_a_generation_whose_icl_gave_no_gain(recovered: float | None) -> None:
    """ICL no better than no context leaves no gain to recover: the gate holds the generation back saying so and
    what to do, also when an older trainer scored it (+5.0: a cartridge worse than no context, ICL worse still)."""
    run = gate_pass(recovered, noContext=5.0, icl=5.1, cartridge=5.5)
    assert not _passes_quality_gate(run, 1, None)
    assert is_true(run.status["conditions"], "Stalled")
    ready = next(c for c in run.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "QualityGateFailed"
    assert "cannot judge" in ready["message"] and "ICL gave no gain" in ready["message"]
    assert "minIclGainRecovered" in ready["message"] and "no generation is promoted yet" in ready["message"]


def test_the_quality_gate_cannot_judge_a_generation_with_nothing_scored() -> None:
    """Every held-out conversation equalled a training one and was dropped: no score, and the gate says why."""
    run = gate_pass(None, noContext=None, icl=None, cartridge=None)  # type: ignore[arg-type]
    assert not _passes_quality_gate(run, 1, None)
    ready = next(c for c in run.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "QualityGateFailed" and "cannot judge" in ready["message"]
    assert api.NOTHING_SCORED in ready["message"] and "None" not in ready["message"]


@pytest.mark.parametrize(
    ("recovered", "icl", "shown"),
    [
        (0.6432, 1.0, "ICL gain recovered: 64%"),
        (None, 1.0, "ICL gain recovered: n/a (ICL gave no gain"),
        (None, None, f"ICL gain recovered: n/a ({api.NOTHING_SCORED})"),
    ],
)
def test_evaluated_says_the_score_as_people_read_it(
    tmp_path: Path, recovered: float | None, icl: float | None, shown: str
) -> None:
    """A fraction as a percentage; no score (ICL gave no gain, or no question left to score) says why rather than
    printing None."""
    run, trainer = trained_pass(tmp_path)
    prefix = trainer.output_prefix
    run.store.put_json(f"{prefix}/{layout.EVAL_FILE}", {"noContext": 2.0, "icl": icl, "iclGainRecovered": recovered})
    _record_evaluation(run, prefix)
    evaluated = next(c for c in run.status["conditions"] if c["type"] == "Evaluated")
    assert evaluated["message"].startswith(shown) and "None" not in evaluated["message"], evaluated
