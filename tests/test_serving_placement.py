"""Where serving pods run, from the chart (the operator): node labels, tolerated taints and a priority class reach
every serving Deployment; a malformed value stops the operator at start-up naming it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from cartridges import api
from cartridges.contract import TrainerConfig
from cartridges_operator import manifests
from cartridges_operator.config import OperatorConfig, serving_node_selector, serving_tolerations

SCHEMA = Path(__file__).resolve().parents[1] / "charts" / "cartridges" / "values.schema.json"
GPU_TAINT = '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]'


def serving_pod(config: OperatorConfig) -> dict[str, Any]:
    model = api.BaseModelRef(name="m", uri="s3://cartridges/models/m")
    pod: dict[str, Any] = manifests.serving_deployment("ns", model, 1, [], config)["spec"]["template"]["spec"]
    return pod


def test_serving_pods_go_where_the_chart_says(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NODE_SELECTOR", "TOLERATIONS", "PRIORITY_CLASS"):
        monkeypatch.delenv(f"CARTRIDGES_SERVING_{name}", raising=False)
    anywhere = serving_pod(OperatorConfig.from_env())
    assert (anywhere["nodeSelector"], anywhere["tolerations"], "priorityClassName" in anywhere) == ({}, [], False)
    monkeypatch.setenv("CARTRIDGES_SERVING_NODE_SELECTOR", '{"pool": "gpu"}')
    monkeypatch.setenv("CARTRIDGES_SERVING_TOLERATIONS", GPU_TAINT)
    monkeypatch.setenv("CARTRIDGES_SERVING_PRIORITY_CLASS", "serving-high")
    pod = serving_pod(OperatorConfig.from_env())
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == json.loads(GPU_TAINT)
    assert pod["priorityClassName"] == "serving-high"


def test_training_pods_keep_their_own_placement() -> None:
    """The chart's serving placement is not the Cartridge's: its spec.resources places its training pods only."""
    resources = {"nodeSelector": {"pool": "train"}, "priorityClassName": "batch"}
    spec = api.CartridgeSpec.model_validate(
        {"corpusRefs": [{"name": "c"}], "baseModel": {"name": "m", "uri": "s3://b/m"}, "resources": resources}
    )
    trainer = TrainerConfig(namespace="ns", cartridge="c", generation=1, store_root="s3://b", corpus_prefixes=["s3://b/c"],
                            corpus_description="d", spec=spec)  # fmt: skip
    config = OperatorConfig(store_root="s3://b", serving_node_selector={"pool": "serving"}, serving_priority_class="x")
    body = {"metadata": {"name": "c", "namespace": "ns", "uid": "u"}}
    pod = manifests.training_job(body, trainer, config)["spec"]["template"]["spec"]
    assert (pod["nodeSelector"], pod["tolerations"], pod["priorityClassName"]) == ({"pool": "train"}, [], "batch")


@pytest.mark.parametrize("text", [GPU_TAINT, "[]", '[{"operator": "Exists"}, {"key": "k", "value": "v"}]'])
def test_tolerations_a_cartridge_may_have_are_accepted(text: str) -> None:
    assert [t.model_dump(exclude_none=True) for t in serving_tolerations(text)] == json.loads(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[{key: gpu}]", "CARTRIDGES_SERVING_TOLERATIONS (serving.tolerations) must be JSON"),
        ('{"key": "gpu"}', "must be a JSON list of tolerations: Input should be a valid list"),
        ('[{"key": "gpu", "effect": "NoRun"}]', "0.effect: Input should be 'NoSchedule', 'PreferNoSchedule' or"),
        ('[{"key": "gpu"}, {"keys": "gpu"}]', "1.keys: Extra inputs are not permitted"),
        ('[{"key": "gpu", "tolerationSeconds": "soon"}]', "0.tolerationSeconds: Input should be a valid integer"),
    ],
)
def test_malformed_tolerations_stop_the_operator_naming_the_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        serving_tolerations(text)


@pytest.mark.parametrize(
    ("toleration", "rule"),
    [
        ({"key": "gpu", "operator": "Exists", "value": "yes"}, "value must be empty when operator is Exists"),
        (
            {"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 30},
            "tolerationSeconds requires effect NoExecute",
        ),
        (
            {"operator": "Equal", "value": "x"},
            "operator must be Exists when key is empty (a toleration of every taint)",
        ),
        ({"key": "", "effect": "NoSchedule"}, "operator must be Exists when key is empty"),
    ],
)
def test_a_toleration_the_api_server_refuses_stops_the_operator_at_start_up(
    monkeypatch: pytest.MonkeyPatch, toleration: dict[str, Any], rule: str
) -> None:
    """The rules between a toleration's fields (CEL on a Cartridge) hold for the chart's too: a chart installed past
    its schema (--skip-schema-validation) stops the operator naming the setting and the rule, not every serving
    Deployment later with the API server's refusal."""
    monkeypatch.setenv("CARTRIDGES_SERVING_TOLERATIONS", json.dumps([json.loads(GPU_TAINT)[0], toleration]))
    expected = f"CARTRIDGES_SERVING_TOLERATIONS (serving.tolerations) must be a JSON list of tolerations: 1: {rule}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        OperatorConfig.from_env()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pool=gpu", "CARTRIDGES_SERVING_NODE_SELECTOR (serving.nodeSelector) must be JSON"),
        ('[{"pool": "gpu"}]', 'must be a JSON object of label values such as {"pool": "gpu"}'),
        ('{"pool": 1}', "got '{\"pool\": 1}'"),
    ],
)
def test_a_malformed_node_selector_stops_the_operator_naming_the_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        serving_node_selector(text)


def test_the_charts_toleration_has_the_fields_and_values_of_a_cartridges() -> None:
    """values.schema.json checks serving.tolerations at install time; it must admit what the operator's model
    admits (the same model as a Cartridge's spec.resources.tolerations), and nothing else: the same fields, values
    and rules between them."""
    toleration = json.loads(SCHEMA.read_text())["definitions"]["toleration"]
    chart, model = toleration["properties"], api.Toleration.model_json_schema()["properties"]
    assert set(chart) == set(model)
    for field in ("operator", "effect"):
        assert chart[field]["enum"] == next(t["enum"] for t in model[field]["anyOf"] if "enum" in t)
    rules = {then["description"] for rule in toleration["allOf"] for then in rule["then"]["properties"].values()}
    assert rules == {rule.message for rule in api.Toleration.RULES}
