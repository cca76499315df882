"""The serving pods' resources from the chart's JSON (the operator): a malformed value stops the operator at start-up
naming it, and a CPU-only value gives serving pods without a GPU (the engine runs on CPU too)."""

from __future__ import annotations

from typing import Any

import pytest

from cartridges import api
from cartridges_operator import manifests
from cartridges_operator.config import OperatorConfig, serving_resources

CPU_ONLY = '{"requests": {"cpu": 4, "memory": "8Gi"}, "limits": {"memory": "16Gi"}}'


def serving_resources_of(config: OperatorConfig) -> dict[str, Any]:
    model = api.BaseModelRef(name="m", uri="s3://cartridges/models/m")
    deployment = manifests.serving_deployment("ns", model, 1, [], config)
    resources: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    return resources


def test_serving_pods_ask_for_a_gpu_unless_the_chart_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARTRIDGES_SERVING_RESOURCES", raising=False)
    assert serving_resources_of(OperatorConfig.from_env())["limits"]["nvidia.com/gpu"] == 1
    monkeypatch.setenv("CARTRIDGES_SERVING_RESOURCES", CPU_ONLY)
    cpu = serving_resources_of(OperatorConfig.from_env())
    assert cpu == {"requests": {"cpu": 4, "memory": "8Gi"}, "limits": {"memory": "16Gi"}}


@pytest.mark.parametrize("text", [CPU_ONLY, '{"limits": {"nvidia.com/gpu": 1, "memory": "80Gi", "cpu": "500m"}}', "{}"])
def test_requests_and_limits_of_quantities_are_accepted(text: str) -> None:
    assert serving_resources(text) is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{limits: {memory: 16Gi}}", r"CARTRIDGES_SERVING_RESOURCES \(serving.resources\) must be JSON"),
        ('["2", "8Gi"]', r'must be \{"requests": \{...\}, "limits": \{...\}\}'),
        ('{"gpus": 1}', r'must be \{"requests"'),
        ('{"limits": "16Gi"}', r'must be \{"requests"'),
        ('{"limits": {"memory": "16 GB"}}', "limits.memory must be a quantity such as 2, 500m or 16Gi, got '16 GB'"),
        ('{"requests": {"cpu": -1}}', "requests.cpu must be a quantity"),
        ('{"limits": {"nvidia.com/gpu": true}}', "limits.nvidia.com/gpu must be a quantity"),
    ],
)
def test_malformed_resources_stop_the_operator_naming_the_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serving_resources(text)
