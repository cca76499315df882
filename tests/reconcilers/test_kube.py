"""The operator's API helpers against the real API server, where concurrency matters."""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from _web_page import WebPage
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cartridges import api
from cartridges.corpus import SourceError
from cartridges.process import free_port
from cartridges_operator import kube, manifests
from cartridges_operator.config import SERVING_RESOURCES, OperatorConfig, Resources, ServingEngine
from cartridges_operator.http_fetch import SourceUnavailable

pytestmark = pytest.mark.cluster


def leave(start: threading.Barrier, namespace: str, uid: str) -> None:
    start.wait()
    kube.remove_owner("Deployment", namespace, "shared", uid)


def test_owners_removed_at_the_same_moment_delete_the_shared_deployment(namespace: str) -> None:
    """Two Cartridges leaving one serving Deployment at once: neither writes back the other's reference, so the
    Deployment goes at once instead of waiting for the garbage collector. Owners are ConfigMaps that stay, so
    only the operator's code can remove it."""
    core, apps = kube.core(), kube.apps()
    for round_ in range(3):
        owners = [core.create_namespaced_config_map(namespace, {"metadata": {"name": f"owner-{round_}-{i}"}})
                  for i in range(2)]  # fmt: skip
        references = [{"apiVersion": "v1", "kind": "ConfigMap", "name": o.metadata.name, "uid": o.metadata.uid}
                      for o in owners]  # fmt: skip
        labels = {"app": "shared"}
        pod = {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
        deployment = {
            "metadata": {"name": "shared", "ownerReferences": references},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels}, "template": pod},
        }
        apps.create_namespaced_deployment(namespace, deployment)
        start = threading.Barrier(2)

        threads = [threading.Thread(target=leave, args=(start, namespace, o.metadata.uid)) for o in owners]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with pytest.raises(ApiException) as gone:
            apps.read_namespaced_deployment("shared", namespace)
        assert gone.value.status == 404, f"round {round_}: the Deployment outlived its last owner"


def test_an_object_we_do_not_own_is_left_alone(namespace: str) -> None:
    service = {"metadata": {"name": "theirs"}, "spec": {"ports": [{"port": 80}]}}
    kube.core().create_namespaced_service(namespace, service)
    kube.remove_owner("Service", namespace, "theirs", str(uuid.uuid4()))
    assert kube.core().read_namespaced_service("theirs", namespace).metadata.name == "theirs"


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-3-1-8b", "q" * 63])
def test_serving_objects_of_any_admitted_base_model_name_are_accepted(namespace: str, model: str) -> None:
    """The CRD admits dots in base-model names (and 63 characters); Service names are DNS-1035 labels, so the
    serving name maps them and keeps models that differ only there apart."""
    base_model = api.BaseModelRef(name=model, uri="file:///models/m")
    owner = kube.core().create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]
    kube.apply_owned(
        manifests.serving_deployment(namespace, base_model, 0, refs, OperatorConfig(store_root="s3://cartridges"))
    )
    kube.apply_owned(manifests.serving_service(namespace, model, refs))
    name = manifests.serving_name(model)
    assert kube.core().read_namespaced_service(name, namespace).metadata.name == name
    assert kube.deployment_ready(namespace, name) == (0, 0)
    assert manifests.endpoint_url(namespace, model) == f"http://{name}.{namespace}.svc:8000"
    assert manifests.serving_name("llama-3.1-8b") != manifests.serving_name("llama-3-1-8b")
    assert manifests.serving_name("tiny") == "triton-tiny"  # names that are labels already do not move


def test_a_serving_deployment_drops_its_gpu_and_settings_when_the_chart_does(namespace: str) -> None:
    """Re-applied with CPU-only resources and no engine settings, the Deployment holds no GPU and no engine
    variable: a strategic merge alone keeps the limits and env entries the new body leaves out."""
    base_model = api.BaseModelRef(name="m", uri="file:///models/m")
    owner = kube.core().create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]
    cpu: Resources = {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    gpu_tuned = OperatorConfig(
        store_root="s3://cartridges",
        serving_resources=SERVING_RESOURCES,
        serving_engine=ServingEngine.from_json('{"maxBatchSize": 8}'),
    )
    cpu_plain = OperatorConfig(store_root="s3://cartridges", serving_resources=cpu)
    for config in (gpu_tuned, cpu_plain):
        kube.apply_owned(manifests.serving_deployment(namespace, base_model, 0, refs, config))
    deployment = kube.apps().read_namespaced_deployment(manifests.serving_name("m"), namespace)
    container = deployment.spec.template.spec.containers[0]
    assert (container.resources.requests, container.resources.limits) == (cpu["requests"], cpu["limits"])
    env = {variable.name for variable in container.env}
    assert "CARTRIDGES_MAX_BATCH_SIZE" not in env and "CARTRIDGES_MODEL_URI" in env


def test_a_serving_deployment_leaves_a_node_pool_when_the_chart_does(namespace: str) -> None:
    """Re-applied with another placement, then none, the Deployment keeps none of the labels, taints or priority the
    chart dropped: a strategic merge alone keeps nodeSelector keys and a priorityClassName the new body leaves out."""
    base_model = api.BaseModelRef(name="m", uri="file:///models/m")
    owner = kube.core().create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]
    gpu = api.Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    pool = OperatorConfig(
        store_root="s3://cartridges",
        serving_node_selector={"pool": "gpu", "zone": "a"},
        serving_tolerations=(gpu, api.Toleration(key="dedicated", value="serving")),
        serving_priority_class="serving-high",
    )
    other_pool = OperatorConfig(
        store_root="s3://cartridges", serving_node_selector={"pool": "h100"}, serving_tolerations=(gpu,)
    )
    name = manifests.serving_name("m")

    def applied(config: OperatorConfig) -> Any:
        kube.apply_owned(manifests.serving_deployment(namespace, base_model, 0, refs, config))
        return kube.apps().read_namespaced_deployment(name, namespace).spec.template.spec

    assert applied(pool).priority_class_name == "serving-high"
    moved = applied(other_pool)
    assert moved.node_selector == {"pool": "h100"} and moved.priority_class_name is None
    assert [(t.key, t.operator, t.effect) for t in moved.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    anywhere = applied(OperatorConfig(store_root="s3://cartridges"))
    assert (anywhere.node_selector, anywhere.tolerations, anywhere.priority_class_name) == (None, None, None)


def test_a_configmap_key_is_read_from_data_or_binary_data_and_a_missing_one_lists_both(namespace: str) -> None:
    docs = {
        "metadata": {"name": "docs"},
        "data": {"a.txt": "A"},
        "binaryData": {"b.txt": base64.b64encode(b"B").decode()},
    }
    kube.core().create_namespaced_config_map(namespace, docs)
    read = kube.configmap_reader(namespace)
    assert (read("docs", "a.txt"), read("docs", "b.txt")) == ("A", "B")
    with pytest.raises(SourceError, match=r"docs has no key 'c.txt' \(keys: \['a.txt', 'b.txt'\]\)"):
        read("docs", "c.txt")


def test_a_configmap_read_the_api_server_refuses_is_a_source_to_fix(namespace: str) -> None:
    """A name the API server cannot take (a spec stored before the CRD's pattern) answers 400: said, not raised."""
    with pytest.raises(SourceError, match=f"cannot read ConfigMap {namespace}/100%-docs: HTTP 400") as refused:
        kube.configmap_reader(namespace)("100%-docs", "k")
    assert not isinstance(refused.value, SourceUnavailable)


def api_server_at(host: str) -> Callable[[], client.ApiClient]:
    configuration = client.Configuration()
    configuration.host = host
    return lambda: client.ApiClient(configuration)


@pytest.mark.parametrize(("status", "may_pass"), [(503, True), (500, True), (429, True), (403, False)])
def test_an_api_server_failing_a_configmap_read_may_pass_or_need_a_fix(
    web_server: WebPage, monkeypatch: pytest.MonkeyPatch, status: int, may_pass: bool
) -> None:
    """An API server down or overloaded may pass (a Ready Corpus keeps its version); a refusal (the operator not
    allowed to read ConfigMaps there) is a fix to make."""
    web_server.status = status
    monkeypatch.setattr(kube, "api_client", api_server_at(web_server.url.removesuffix("/page")))
    with pytest.raises(SourceError, match=f"cannot read ConfigMap ns/docs: HTTP {status}") as failed:
        kube.configmap_reader("ns")("docs", "k")
    assert isinstance(failed.value, SourceUnavailable) == may_pass


def test_an_api_server_out_of_reach_may_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "api_client", api_server_at(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(SourceUnavailable, match="cannot read ConfigMap ns/docs: the API server is unreachable"):
        kube.configmap_reader("ns")("docs", "k")


def test_cartridges_sharing_a_serving_deployment_leave_it_unchanged_once_it_has_them_all(namespace: str) -> None:
    """Two Cartridges of one base model apply its Deployment and Service in turn, each with its own reference: once
    both are owners, a pass changes neither, whichever Cartridge applies (the Service keeps its resourceVersion; the
    Deployment, whose status its controller writes meanwhile, keeps its owners' order and its generation)."""
    base_model = api.BaseModelRef(name="m", uri="file:///models/m")
    config = OperatorConfig(store_root="s3://cartridges")
    owners = [kube.core().create_namespaced_config_map(namespace, {"metadata": {"name": f"o{i}"}}) for i in range(2)]
    name = manifests.serving_name("m")

    def applied(owner: Any) -> tuple[list[str], int, str]:
        refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid,
                 "controller": False, "blockOwnerDeletion": True}]  # fmt: skip
        kube.apply_owned(manifests.serving_deployment(namespace, base_model, 1, refs, config))
        kube.apply_owned(manifests.serving_service(namespace, "m", refs))
        deployment = kube.apps().read_namespaced_deployment(name, namespace).metadata
        service = kube.core().read_namespaced_service(name, namespace).metadata
        return [ref.name for ref in deployment.owner_references], deployment.generation, service.resource_version

    converged = [applied(owner) for owner in owners][-1]
    assert converged[0] == ["o0", "o1"]
    assert [applied(owners[i % 2]) for i in range(4)] == [converged] * 4
