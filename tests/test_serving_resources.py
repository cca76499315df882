"""The serving pods' resources from the chart's JSON (the operator): a malformed value stops the operator at start-up
naming it, and a CPU-only value gives serving pods without a GPU (the engine runs on CPU too). Their time to start."""

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


ACCEPTED = [
    CPU_ONLY,
    '{"limits": {"nvidia.com/gpu": 1, "memory": "80Gi", "cpu": "500m"}}',
    "{}",
    '{"requests": {"nvidia.com/gpu": "2", "cpu": "1500m"}, "limits": {"nvidia.com/gpu": 2, "cpu": 1.5}}',
    '{"requests": {"memory": "16384Mi", "ephemeral-storage": "1G"}, "limits": {"memory": "16Gi"}}',
    '{"requests": {"cpu": "1e-3"}, "limits": {"cpu": "1m"}}',
    '{"limits": {"nvidia.com/gpu": "1e30"}}',  # whole, if absurd: a Decimal too large for % 1 must not crash
]


@pytest.mark.parametrize("text", ACCEPTED)
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


# Values the API server refuses on every serving Deployment (its rules between a container's requests and limits).
REFUSED = [
    ('{"requests": {"memory": "24Gi"}, "limits": {"memory": "16Gi"}}', r"requests.memory \('24Gi'\) is above limits"),
    ('{"requests": {"cpu": "2500m"}, "limits": {"cpu": 2}}', r"requests.cpu \('2500m'\) is above limits.cpu \(2\)"),
    ('{"requests": {"nvidia.com/gpu": 1}}', "requests.nvidia.com/gpu needs limits.nvidia.com/gpu, equal to it"),
    (
        '{"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}}',
        r"requests.nvidia.com/gpu \(1\) must equal limits.nvidia.com/gpu \(2\)",
    ),
    ('{"limits": {"nvidia.com/gpu": 0.5}}', "limits.nvidia.com/gpu must be a whole number, got 0.5"),
    ('{"requests": {"hugepages-2Mi": "1Gi"}}', "requests.hugepages-2Mi needs limits.hugepages-2Mi"),
]


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_resources_kubernetes_refuses_stop_the_operator_naming_the_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"CARTRIDGES_SERVING_RESOURCES \(serving.resources\): " + message):
        serving_resources(text)


def startup_s(config: OperatorConfig) -> int:
    model = api.BaseModelRef(name="m", uri="s3://cartridges/models/m")
    probe = manifests.serving_deployment("ns", model, 1, [], config)["spec"]["template"]["spec"]["containers"][0]
    seconds: int = probe["startupProbe"]["periodSeconds"] * probe["startupProbe"]["failureThreshold"]
    return seconds


def test_serving_pods_get_the_startup_time_the_chart_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large model's download and load may take longer than any fixed budget: the kubelet would restart its pod
    before it ever answers. The chart's serving.startupSeconds sets it; unset, 30 minutes."""
    monkeypatch.delenv("CARTRIDGES_SERVING_STARTUP_SECONDS", raising=False)
    assert startup_s(OperatorConfig.from_env()) == 1800
    monkeypatch.setenv("CARTRIDGES_SERVING_STARTUP_SECONDS", "5400")
    assert startup_s(OperatorConfig.from_env()) == 5400
    for bad in ("0", "30m", "-60"):
        monkeypatch.setenv("CARTRIDGES_SERVING_STARTUP_SECONDS", bad)
        with pytest.raises(
            ValueError, match=f"CARTRIDGES_SERVING_STARTUP_SECONDS must be an integer >= 1, got '{bad}'"
        ):
            OperatorConfig.from_env()
