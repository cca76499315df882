"""What the trainer writes (progress.json, eval.json) on its way into a Cartridge's status: NaN and infinity, which
a diverged run produces, are refused, and a NaN score never passes the quality gate."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from cartridges import api, layout
from cartridges_operator.cartridge import Pass, _passes_quality_gate
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
