"""Invalid manifests are refused by the real API server (schema + CEL), with messages a user understands."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from cartridges import api
from cartridges_e2e.cluster import Cluster

pytestmark = pytest.mark.cluster

MODEL = {"name": "tiny", "uri": "file:///models/tiny"}
CARTRIDGE = {"corpusRefs": [{"name": "c"}], "baseModel": MODEL, "size": 16}
CORPUS = {"description": "d", "sources": [{"inline": "text"}]}
TWO = {"name": "a", "key": "b"}

INVALID: list[tuple[str, str, dict[str, Any], str]] = [
    ("size-wrong-type", "cartridges", {**CARTRIDGE, "size": "big"}, "spec.size"),
    ("size-not-multiple", "cartridges", {**CARTRIDGE, "size": 100}, "multiple of 16"),
    ("size-too-small", "cartridges", {**CARTRIDGE, "size": 0}, "should be greater than or equal to 16"),
    ("size-too-large", "cartridges", {**CARTRIDGE, "size": 131072}, "should be less than or equal to 65536"),
    ("missing-corpus-refs", "cartridges", {"baseModel": MODEL, "size": 16}, "corpusRefs: Required value"),
    ("missing-base-model", "cartridges", {"corpusRefs": [{"name": "c"}]}, "baseModel: Required value"),
    ("bad-model-uri", "cartridges", {**CARTRIDGE, "baseModel": {"name": "m", "uri": "ftp://x"}}, "spec.baseModel.uri"),
    ("bad-model-name", "cartridges", {**CARTRIDGE, "baseModel": {"name": "Big_Model", "uri": "s3://b/m"}}, "name"),
    ("negative-steps", "cartridges", {**CARTRIDGE, "training": {"steps": -5}}, "spec.training.steps"),
    ("zero-learning-rate", "cartridges", {**CARTRIDGE, "training": {"learningRate": 0}}, "learningRate"),
    ("steps-and-epochs", "cartridges", {**CARTRIDGE, "training": {"steps": 10, "epochs": 2}},
     "set steps or epochs, not both"),
    ("zero-epochs", "cartridges", {**CARTRIDGE, "training": {"epochs": 0}}, "spec.training.epochs"),
    ("zero-max-grad-norm", "cartridges", {**CARTRIDGE, "training": {"maxGradNorm": 0}}, "spec.training.maxGradNorm"),
    ("unknown-seed-prompt", "cartridges", {**CARTRIDGE, "selfStudy": {"seedPrompts": ["poetry"]}}, "Unsupported value"),
    (
        "chunk-range-inverted",
        "cartridges",
        {**CARTRIDGE, "selfStudy": {"minChunkTokens": 4096, "maxChunkTokens": 512}},
        "minChunkTokens must not exceed maxChunkTokens",
    ),
    ("frozen-not-below-size", "cartridges", {**CARTRIDGE, "frozenTokens": 16}, "frozenTokens must be smaller"),
    ("text-init-without-text", "cartridges", {**CARTRIDGE, "initialization": {"strategy": "text"}}, "text is set"),
    ("text-init-too-long", "cartridges", {**CARTRIDGE, "initialization": {"strategy": "text", "text": "x" * 16385}},
     "spec.initialization.text: Too long"),
    ("bad-digest-pin", "cartridges", {**CARTRIDGE, "corpusRefs": [{"name": "c", "digest": "xyz"}]}, "digest"),
    ("bad-retention", "cartridges", {**CARTRIDGE, "retention": "Sometimes"}, "Unsupported value"),
    ("bad-quantization", "cartridges", {**CARTRIDGE, "quantization": "int4"}, "Unsupported value"),
    ("keep-one-generation", "cartridges", {**CARTRIDGE, "keepGenerations": 1}, "keepGenerations"),
    ("two-source-kinds", "corpora", {"description": "d", "sources": [{"inline": "x", "configMap": TWO}]},
     "exactly one of inline, configMap, object, http"),
    ("no-source-kind", "corpora", {"description": "d", "sources": [{"name": "empty"}]}, "exactly one of"),
    ("no-sources", "corpora", {"description": "d", "sources": []}, "should have at least 1 items"),
    ("bad-object-uri", "corpora", {"description": "d", "sources": [{"object": {"uri": "gs://b/k"}}]}, "object.uri"),
    ("object-uri-without-key", "corpora", {"description": "d", "sources": [{"object": {"uri": "s3://docs"}}]},
     "object.uri"),
    ("configmap-name-not-a-name", "corpora", {"description": "d", "sources": [{"configMap": {"name": "100%-docs",
     "key": "k"}}]}, "configMap.name"),
    ("configmap-name-dots", "corpora", {"description": "d", "sources": [{"configMap": {"name": "..", "key": "k"}}]},
     "configMap.name"),
    ("configmap-key-with-slash", "corpora", {"description": "d", "sources": [{"configMap": {"name": "docs",
     "key": "a/b"}}]}, "configMap.key"),
    ("globs-on-one-object", "corpora", {"description": "d", "sources": [{"object": {"uri": "s3://docs/handbook",
     "include": ["*.md"]}}]}, "include and exclude filter the objects under a prefix"),
    ("bad-http-url", "corpora", {"description": "d", "sources": [{"http": {"url": "ftp://x"}}]}, "http.url"),
    ("empty-description", "corpora", {**CORPUS, "description": ""}, "description"),
    ("exists-with-value", "cartridges", {**CARTRIDGE, "resources": {"tolerations": [
        {"key": "gpu", "operator": "Exists", "value": "yes"}]}}, "value must be empty when operator is Exists"),
    ("seconds-without-no-execute", "cartridges", {**CARTRIDGE, "resources": {"tolerations": [
        {"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 30}]}},
     "tolerationSeconds requires effect NoExecute"),
    ("no-key-equal", "cartridges", {**CARTRIDGE, "resources": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
     "operator must be Exists when key is empty"),
]  # fmt: skip


def create(k8s_cluster: Cluster, plural: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    kind = {"corpora": "Corpus", "cartridges": "Cartridge"}[plural]
    body = {"apiVersion": api.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
    custom = client.CustomObjectsApi(k8s_cluster.api_client())
    created: dict[str, Any] = custom.create_namespaced_custom_object(api.GROUP, api.VERSION, "default", plural, body)
    return created


@pytest.mark.parametrize(("case", "plural", "spec", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected(
    k8s_cluster: Cluster, crds_installed: None, case: str, plural: str, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as caught:
        create(k8s_cluster, plural, case, spec)
    assert caught.value.status == 422, caught.value.body
    assert message in str(caught.value.body)


def test_valid_manifests_get_defaults_and_immutable_base_model(k8s_cluster: Cluster, crds_installed: None) -> None:
    name = f"valid-{uuid.uuid4().hex[:6]}"
    sources = [{"object": {"uri": "s3://docs/handbook/", "include": ["*.md"]}}, {"object": {"uri": "s3://docs/a.md"}}]
    assert create(k8s_cluster, "corpora", name, {"description": "d", "sources": sources})["spec"]["sources"] == sources
    created = create(k8s_cluster, "cartridges", name, {**CARTRIDGE, "selfStudy": {"conversations": 64}})
    assert created["spec"]["selfStudy"]["topK"] == 20 and created["spec"]["selfStudy"]["conversations"] == 64
    assert created["spec"]["training"]["learningRate"] == 0.02 and created["spec"]["frozenTokens"] == 1
    custom = client.CustomObjectsApi(k8s_cluster.api_client())
    with pytest.raises(ApiException) as caught:
        patch = {"spec": {"baseModel": {"name": "other", "uri": "file:///models/other"}}}
        custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, "default", "cartridges", name, patch)
    assert caught.value.status == 422 and "baseModel is immutable" in str(caught.value.body)


def test_training_by_epochs_gets_no_default_steps(k8s_cluster: Cluster, crds_installed: None) -> None:
    """steps and epochs exclude each other, so the API server must not default steps next to epochs."""
    training = {"epochs": 3, "maxGradNorm": 1.0}
    created = create(k8s_cluster, "cartridges", f"epochs-{uuid.uuid4().hex[:6]}", {**CARTRIDGE, "training": training})
    assert created["spec"]["training"] == {**training, "learningRate": 0.02, "batchSize": 16, "sequenceLength": 1024}
    assert api.CartridgeSpec.model_validate(created["spec"]).training.total_steps(conversations=100) == 19
    default = create(k8s_cluster, "cartridges", f"steps-{uuid.uuid4().hex[:6]}", CARTRIDGE)["spec"]["training"]
    assert "steps" not in default and "epochs" not in default  # so epochs can be added later


def test_the_operators_model_refuses_steps_with_epochs_as_the_api_server_does() -> None:
    with pytest.raises(ValidationError, match="set steps or epochs, not both"):
        api.Training.model_validate({"steps": 10, "epochs": 2})
    assert api.Training.model_validate({}).total_steps(conversations=100) == 1000


@pytest.mark.parametrize(
    ("case", "spec", "message"),
    [(case, spec, message) for case, _, spec, message in INVALID if "tolerations" in spec.get("resources", {})],
)
def test_the_operators_model_refuses_the_tolerations_the_api_server_does(
    case: str, spec: dict[str, Any], message: str
) -> None:
    """The same rules, from the same source, hold wherever a toleration is read: a Cartridge's, or the chart's."""
    with pytest.raises(ValidationError, match=re.escape(message)):
        api.CartridgeSpec.model_validate(spec)
