"""The operator end to end on a real API server: admission rules, Corpus and Cartridge reconciliation, Jobs run by
the node harness (with a contract-honouring stand-in trainer), promotion, serving objects, failures, deletion."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cartridges import api, layout
from cartridges.process import free_port
from cartridges_e2e.operator_env import OperatorEnv, wait_for
from cartridges_operator import manifests

pytestmark = pytest.mark.cluster

BASE_MODEL = {"name": "tiny", "uri": "file:///models/tiny"}


def cartridge_spec(corpus: str, **overrides: Any) -> dict[str, Any]:
    spec = {"corpusRefs": [{"name": corpus}], "baseModel": BASE_MODEL, "size": 16, "resources": {"gpus": 0}}
    return {**spec, **overrides}


def test_corpus_from_inline_and_configmap(operator_env: OperatorEnv) -> None:
    core = client.CoreV1Api(operator_env.api)
    core.create_namespaced_config_map(
        operator_env.namespace, {"metadata": {"name": "handbook"}, "data": {"ch1.md": "Chapter one.\r\nLine two.  \n"}}
    )
    spec = {
        "description": "The handbook",
        "sources": [{"name": "intro", "inline": "Welcome."}, {"configMap": {"name": "handbook", "key": "ch1.md"}}],
    }
    operator_env.create("corpora", "handbook", spec)
    operator_env.wait_condition("corpora", "handbook", "Ready", "True")
    status = (operator_env.get("corpora", "handbook") or {})["status"]
    assert status["documents"] == 2 and len(status["digest"]) == 64
    documents = list(layout.read_documents(operator_env.store, status["artifact"]))
    assert [d.text for d in documents] == ["Welcome.\n", "Chapter one.\nLine two.\n"]

    operator_env.create(
        "corpora", "broken", {"description": "d", "sources": [{"configMap": {"name": "nope", "key": "k"}}]}
    )
    stalled = operator_env.wait_condition("corpora", "broken", "Stalled", "True")
    assert stalled["reason"] == "InvalidSource" and "ConfigMap" in stalled["message"] and "nope" in stalled["message"]


def test_a_corpus_reads_neither_the_operators_files_nor_other_namespaces_data(operator_env: OperatorEnv) -> None:
    """The operator reads sources with its own pod and credentials: a Corpus gets only its namespace's share."""
    env, root = operator_env, f"s3://{operator_env.namespace}"
    env.store.put_bytes(f"{root}/sources/{env.namespace}/notes.md", b"Our own notes.")
    refused = {"environ": "file:///proc/self/environ", "corpora": f"{root}/corpora/", "bucket": f"{root}/"}
    for name, uri in refused.items():
        env.create("corpora", name, {"description": "d", "sources": [{"object": {"uri": uri}}]})
    env.create(
        "corpora", "own", {"description": "d", "sources": [{"object": {"uri": f"{root}/sources/{env.namespace}/"}}]}
    )
    assert env.wait_condition("corpora", "own", "Ready", "True")
    for name in refused:
        stalled = env.wait_condition("corpora", name, "Stalled", "True")
        assert stalled["reason"] == "InvalidSource", stalled
        assert "may not name file://" in stalled["message"] or f"{root}/sources/{env.namespace}/" in stalled["message"]


def test_cartridge_trains_promotes_and_rolls_out_serving(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.create("corpora", "facts", {"description": "Facts", "sources": [{"inline": "The sky is green here."}]})
    env.create("cartridges", "facts", cartridge_spec("facts"))
    waiting = env.wait_condition("cartridges", "facts", "CorpusReady", "True")
    assert "facts@" in waiting["message"]

    job = client.BatchV1Api(env.api).read_namespaced_job("facts-g1", env.namespace)
    assert job.metadata.owner_references[0].kind == "Cartridge"
    assert job.spec.pod_failure_policy.rules[0].on_exit_codes.values == [65]
    container = job.spec.template.spec.containers[0]
    secret_refs = {e.name: e.value_from.secret_key_ref.name for e in container.env if e.value_from}
    assert secret_refs == {
        "CARTRIDGES_S3_ACCESS_KEY": "cartridges-store",
        "CARTRIDGES_S3_SECRET_KEY": "cartridges-store",
        "CARTRIDGES_S3_CA_PEM": "cartridges-store",
    }
    assert job.spec.template.spec.security_context.run_as_non_root is True

    env.wait_condition("cartridges", "facts", "Trained", "True")
    env.wait_condition("cartridges", "facts", "Evaluated", "True")
    status = (env.get("cartridges", "facts") or {})["status"]
    assert status["generation"] == 1 and status["artifact"]["p"] == 16
    assert status["evaluation"]["iclGainRecovered"] == 0.75
    pointer_uri = layout.current_pointer(env.store_root, env.namespace, "facts")
    pointer = layout.Pointer.model_validate(env.store.get_json(pointer_uri))
    assert pointer.generation == 1 and pointer.sha256 == status["artifact"]["sha256"]

    serving = env.wait_condition("cartridges", "facts", "Serving", "False")
    assert serving["reason"] == "ServingNotReady"  # the harness cannot run the Triton image; e2e covers that
    deployment = client.AppsV1Api(env.api).read_namespaced_deployment("triton-tiny", env.namespace)
    pod = deployment.spec.template.spec
    assert pod.containers[0].readiness_probe.http_get.path == "/v2/models/router/ready"
    assert {p.container_port for p in pod.containers[0].ports} == {8000, 8001, 8002}
    assert any(v.empty_dir and v.empty_dir.medium == "Memory" for v in pod.volumes)
    assert status["endpoint"]["url"] == f"http://triton-tiny.{env.namespace}.svc:8000"

    # A training input changes: generation 2 trains while generation 1 stays promoted until 2 verifies.
    env.patch_spec("cartridges", "facts", {"training": {"steps": 7}})
    wait_for("generation 2", lambda: (env.get("cartridges", "facts") or {})["status"].get("generation") == 2)
    wait_for(
        "promotion of generation 2",
        lambda: env.store.get_json(pointer_uri)["generation"] == 2,
        60,
    )
    # A serving-only change does not retrain.
    env.patch_spec("cartridges", "facts", {"serving": {"replicas": 2}})
    wait_for("replicas 2", lambda: client.AppsV1Api(env.api).read_namespaced_deployment(
        "triton-tiny", env.namespace).spec.replicas == 2)  # fmt: skip
    assert (env.get("cartridges", "facts") or {})["status"]["generation"] == 2


def test_permanent_trainer_failure_fails_fast_with_the_reason(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.create("corpora", "poison", {"description": "d", "sources": [{"inline": "PERMANENT-FAILURE"}]})
    env.create("cartridges", "poison", cartridge_spec("poison"))
    stalled = env.wait_condition("cartridges", "poison", "Stalled", "True", timeout_s=90)
    assert stalled["reason"] == "TrainingFailed" and "PodFailurePolicy" in stalled["message"]
    failure = (env.get("cartridges", "poison") or {})["status"]["lastFailure"]
    assert failure["exitCode"] == 65 and "PERMANENT-FAILURE" in failure["message"]
    pods = client.CoreV1Api(env.api).list_namespaced_pod(env.namespace, label_selector="job-name=poison-g1").items
    assert len(pods) == 1  # no retries for a permanent error


def test_deletion_removes_serving_owner_and_artifacts(operator_env: OperatorEnv) -> None:
    """Deleting one of two Cartridges served by the same Deployment drops only its owner reference (the
    Deployment stays for the other) and, with retention Delete, its artifacts."""
    env = operator_env
    env.create("corpora", "gone", {"description": "d", "sources": [{"inline": "Short-lived facts."}]})
    env.create("cartridges", "keeper", cartridge_spec("gone"))
    env.create("cartridges", "gone", cartridge_spec("gone", retention="Delete"))
    for name in ("keeper", "gone"):
        env.wait_condition("cartridges", name, "Trained", "True")
    apps = client.AppsV1Api(env.api)

    def owners() -> set[str]:
        deployment = apps.read_namespaced_deployment("triton-tiny", env.namespace)
        return {o.name for o in deployment.metadata.owner_references or []}

    wait_for("both cartridges own the serving Deployment", lambda: {"keeper", "gone"} <= owners())
    prefix = layout.cartridge_prefix(env.store_root, env.namespace, "gone")
    assert env.store.list(prefix)
    env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "gone")
    wait_for("cartridge deleted", lambda: env.get("cartridges", "gone") is None)
    assert env.store.list(prefix) == []
    assert "gone" not in owners() and "keeper" in owners()


def test_a_deletion_cut_short_between_leaving_and_deleting_the_serving_objects_finishes_after_a_restart(
    operator_env: OperatorEnv,
) -> None:
    """The last Cartridge to leave its serving objects drops its owner reference, then deletes them: an operator
    killed between the two (or a delete call that failed) leaves them with no owner, the Deployment holding its
    GPUs, and no garbage collection. The deletion handler, run again, deletes them."""
    env = operator_env
    model = {"name": "orphaned", "uri": BASE_MODEL["uri"]}
    serving = manifests.serving_name(model["name"])
    env.create("corpora", "orphaning", {"description": "d", "sources": [{"inline": "Facts served once."}]})
    env.create("cartridges", "orphaning", cartridge_spec("orphaning", baseModel=model))
    env.wait_condition("cartridges", "orphaning", "Trained", "True")
    apps, core = client.AppsV1Api(env.api), client.CoreV1Api(env.api)
    reads = (functools.partial(apps.read_namespaced_deployment, serving, env.namespace),
             functools.partial(core.read_namespaced_service, serving, env.namespace))  # fmt: skip
    wait_for("the serving objects", lambda: all(read().metadata.owner_references for read in reads))
    with env.stopped():
        env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "orphaning")
        assert (env.get("cartridges", "orphaning") or {})["metadata"]["deletionTimestamp"]  # the finalizer holds it
        unowned = {"metadata": {"ownerReferences": None}}  # where the killed operator's removal stopped
        apps.patch_namespaced_deployment(serving, env.namespace, unowned)
        core.patch_namespaced_service(serving, env.namespace, unowned)
    wait_for("cartridge deleted", lambda: env.get("cartridges", "orphaning") is None)

    def gone(read: Callable[[], Any]) -> bool:
        try:
            read()
        except ApiException as err:
            return err.status == 404
        return False

    wait_for("the serving objects deleted", lambda: all(gone(read) for read in reads))


def test_disabling_serving_leaves_the_shared_serving_objects(operator_env: OperatorEnv) -> None:
    """serving.enabled true -> false drops this Cartridge's owner reference; the last one to leave deletes the
    Deployment and Service (the other Cartridge's serving is untouched until then)."""
    env = operator_env
    model = {"name": "flip", "uri": "file:///models/flip"}
    env.create("corpora", "flip", {"description": "d", "sources": [{"inline": "Facts served, then not."}]})
    for name in ("flip-a", "flip-b"):
        env.create("cartridges", name, cartridge_spec("flip", baseModel=model))
    apps, core = client.AppsV1Api(env.api), client.CoreV1Api(env.api)

    def owners(read: Any) -> set[str] | None:
        try:
            return {o.name for o in read("triton-flip", env.namespace).metadata.owner_references or []}
        except client.ApiException as err:
            assert err.status == 404
            return None

    deployment, service = apps.read_namespaced_deployment, core.read_namespaced_service
    wait_for("both own the serving objects", lambda: owners(deployment) == owners(service) == {"flip-a", "flip-b"})
    env.patch_spec("cartridges", "flip-a", {"serving": {"enabled": False}})
    wait_for("flip-a left", lambda: owners(deployment) == owners(service) == {"flip-b"})
    disabled = env.wait_condition("cartridges", "flip-a", "Serving", "False")
    assert disabled["reason"] == "ServingDisabled"
    assert (env.get("cartridges", "flip-a") or {})["status"].get("endpoint") is None
    env.patch_spec("cartridges", "flip-b", {"serving": {"enabled": False}})
    wait_for("serving objects deleted", lambda: owners(deployment) is None and owners(service) is None)
    env.wait_condition("cartridges", "flip-b", "Ready", "True")


def test_a_base_model_with_dots_is_served_and_its_pre_label_deployment_goes(operator_env: OperatorEnv) -> None:
    """Base-model names may have dots; Service names may not. The serving objects get a DNS-1035 name, so the
    Cartridge reaches its serving stage; a Deployment under the name operators used before (dots kept, created
    before its Service was refused) is left, so it does not hold a GPU."""
    env = operator_env
    model = {"name": "llama-3.1-8b", "uri": "file:///models/llama"}
    env.create("corpora", "dotted", {"description": "d", "sources": [{"inline": "Facts for a dotted model."}]})
    created = env.create("cartridges", "dotted", cartridge_spec("dotted", baseModel=model))
    legacy = {
        "metadata": {"name": "triton-llama-3.1-8b", "ownerReferences": [
            {"apiVersion": api.API_VERSION, "kind": "Cartridge", "name": "dotted", "uid": created["metadata"]["uid"]}]},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "legacy"}},
                 "template": {"metadata": {"labels": {"app": "legacy"}},
                              "spec": {"containers": [{"name": "c", "image": "x"}]}}},
    }  # fmt: skip
    apps = client.AppsV1Api(env.api)
    apps.create_namespaced_deployment(env.namespace, legacy)
    wait_for("serving objects", lambda: (env.condition("cartridges", "dotted", "Serving") or {}).get("reason")
             == "ServingNotReady")  # fmt: skip
    name = (env.get("cartridges", "dotted") or {})["status"]["endpoint"]["url"].split("//")[1].split(".")[0]
    assert name.startswith("triton-llama-3-1-8b-")
    assert client.CoreV1Api(env.api).read_namespaced_service(name, env.namespace).metadata.name == name
    assert apps.read_namespaced_deployment(name, env.namespace).metadata.owner_references[0].name == "dotted"

    def legacy_gone() -> bool:
        try:
            apps.read_namespaced_deployment("triton-llama-3.1-8b", env.namespace)
        except client.ApiException as err:
            return err.status == 404
        return False

    wait_for("the Deployment under the old name deleted", legacy_gone)


def test_cartridges_sharing_a_base_model_apply_the_same_deployment(operator_env: OperatorEnv) -> None:
    """Two Cartridges of one base model asking for 2 and 1 replicas: every pass of either applies the most, so the
    shared Deployment never scales up and down. A third naming the same base model with another uri is refused
    with the reason, and the Deployment (its pods) is not rolled onto other weights."""
    env = operator_env
    model = {"name": "pair", "uri": "file:///models/pair"}
    env.create("corpora", "pair", {"description": "d", "sources": [{"inline": "Facts served by a pair."}]})
    env.create("cartridges", "pair-big", cartridge_spec("pair", baseModel=model, serving={"replicas": 2}))
    env.create("cartridges", "pair-small", cartridge_spec("pair", baseModel=model))
    apps = client.AppsV1Api(env.api)

    def deployment() -> Any:
        try:
            return apps.read_namespaced_deployment("triton-pair", env.namespace)
        except client.ApiException as err:
            assert err.status == 404
            return None

    def owners() -> set[str]:
        found = deployment()
        return {o.name for o in found.metadata.owner_references or []} if found else set()

    wait_for("both own the serving Deployment", lambda: owners() == {"pair-big", "pair-small"}, 60)
    before = deployment()
    assert before.spec.replicas == 2
    time.sleep(12)  # two passes of each (every 5 s)
    after = deployment()
    assert after.spec.replicas == 2 and after.metadata.generation == before.metadata.generation

    other = {"name": "pair", "uri": "file:///models/elsewhere"}
    env.create("cartridges", "pair-other", cartridge_spec("pair", baseModel=other))
    serving = wait_for("the conflict reported", lambda: (c := env.condition("cartridges", "pair-other", "Serving"))
                       and c["reason"] == "ConflictingBaseModel" and c, 60)  # fmt: skip
    assert "pair-big" in serving["message"] and "file:///models/pair" in serving["message"]
    assert "file:///models/elsewhere" in serving["message"]
    assert (env.condition("cartridges", "pair-other", "Stalled") or {}).get("status") == "True"
    final = deployment()
    env_uri = {e.name: e.value for e in final.spec.template.spec.containers[0].env}["CARTRIDGES_MODEL_URI"]
    assert env_uri == "file:///models/pair" and final.metadata.generation == before.metadata.generation
    assert owners() == {"pair-big", "pair-small"}

    # The operator's index of Cartridges by base model follows deletions: the one asking for 2 replicas gone, the
    # remaining one's passes scale the Deployment down to its own 1.
    env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "pair-big")
    wait_for("scaled to the remaining Cartridge's replicas", lambda: deployment().spec.replicas == 1, 60)
    assert owners() == {"pair-small"}


def test_deletion_with_the_store_down_releases_the_cartridge_and_keeps_its_artifacts(operator_env: OperatorEnv) -> None:
    """retention Delete while the store stays down: a few tries, then the finalizer is released (deletion is never
    blocked forever) with an error that says the artifacts were NOT deleted, and they are all still there."""
    env = operator_env
    env.create("corpora", "stranded", {"description": "d", "sources": [{"inline": "Facts kept through an outage."}]})
    env.create("cartridges", "stranded", cartridge_spec("stranded", retention="Delete"))
    env.wait_condition("cartridges", "stranded", "Trained", "True")
    prefix = layout.cartridge_prefix(env.store_root, env.namespace, "stranded")
    stored = env.store.list(prefix)
    assert stored
    healthy = env.settings
    env.settings = {**healthy, "CARTRIDGES_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    env.restart()
    try:
        env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "stranded")
        wait_for("the finalizer released", lambda: env.get("cartridges", "stranded") is None, 120)
        assert f"artifacts under {prefix} were NOT deleted" in env.operator.log_path.read_text()
        selector = "involvedObject.kind=Cartridge,involvedObject.name=stranded,reason=ArtifactsNotDeleted"
        events = functools.partial(client.CoreV1Api(env.api).list_namespaced_event, env.namespace)
        warned = wait_for("the Warning Event", lambda: events(field_selector=selector).items or None, 30)
        assert [event.type for event in warned] == ["Warning"]
    finally:
        env.settings = healthy
        env.restart()
    assert env.store.list(prefix) == stored


def test_serving_pods_no_node_takes_are_reported_not_stalled(operator_env: OperatorEnv) -> None:
    """An operator whose chart places serving pods where no node matches (serving.nodeSelector; in a cluster, also a
    missing toleration or no free GPU): the Cartridge says why it is not served, with the scheduler's message, not
    stalled (a node may come). Once the chart drops the selector, the Deployment drops it too and its new pod is
    placed."""
    env = operator_env
    label = f"cartridges.test/{env.namespace}"
    model = {"name": "pooled", "uri": "file:///models/pooled"}
    healthy = env.settings
    env.settings = {**healthy, "CARTRIDGES_SERVING_NODE_SELECTOR": json.dumps({label: "serving"})}
    env.restart()
    try:
        env.create("corpora", "pooled", {"description": "d", "sources": [{"inline": "Facts served from a pool."}]})
        env.create("cartridges", "pooled", cartridge_spec("pooled", baseModel=model))
        serving = wait_for("the scheduler's message", lambda: (c := env.condition("cartridges", "pooled", "Serving"))
                           and c["reason"] == "ServingPodsNotStarting" and c, 90)  # fmt: skip
        assert serving["message"].startswith("serving pod triton-pooled-"), serving
        assert "waits for a node: 0/1 nodes are available: 1 node(s) didn't match" in serving["message"], serving
        assert (env.condition("cartridges", "pooled", "Ready") or {}).get("reason") == "ServingPodsNotStarting"
        assert (env.condition("cartridges", "pooled", "Stalled") or {}).get("status") == "False"
    finally:
        env.settings = healthy
        env.restart()
    apps = client.AppsV1Api(env.api)
    wait_for("the node selector dropped", lambda: not apps.read_namespaced_deployment(
        "triton-pooled", env.namespace).spec.template.spec.node_selector)  # fmt: skip
    pods = functools.partial(client.CoreV1Api(env.api).list_namespaced_pod, env.namespace,
                             label_selector=f"{manifests.MODEL_LABEL}=pooled")  # fmt: skip
    wait_for("a serving pod on the node", lambda: any(pod.spec.node_name for pod in pods().items), 60)
    env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "pooled")


def test_serving_pods_the_api_server_refuses_are_reported_and_created_once_allowed(operator_env: OperatorEnv) -> None:
    """An operator whose chart names a serving PriorityClass that does not exist (in a cluster, as often: an exhausted
    GPU quota, a LimitRange): the ReplicaSet creates no pod at all, and the Cartridge says why with the API server's
    message from the ReplicaSet's FailedCreate Events, stalled (it lasts until someone acts). Once the PriorityClass
    exists, the ReplicaSet controller's next try creates the pod."""
    env = operator_env
    priority = f"missing-serving-{env.namespace}"
    model = {"name": "refused", "uri": "file:///models/refused"}
    pods = functools.partial(client.CoreV1Api(env.api).list_namespaced_pod, env.namespace,
                             label_selector=f"{manifests.MODEL_LABEL}=refused")  # fmt: skip
    scheduling = client.SchedulingV1Api(env.api)
    healthy = env.settings
    env.settings = {**healthy, "CARTRIDGES_SERVING_PRIORITY_CLASS": priority}
    env.restart()
    try:
        env.create("corpora", "refused", {"description": "d", "sources": [{"inline": "Facts no pod serves."}]})
        env.create("cartridges", "refused", cartridge_spec("refused", baseModel=model))
        serving = wait_for("the ReplicaSet's FailedCreate", lambda: (c := env.condition("cartridges", "refused",
                           "Serving")) and c["reason"] == "ServingPodsNotStarting" and c, 90)  # fmt: skip
        assert serving["message"].startswith("serving ReplicaSet triton-refused-"), serving
        assert "cannot create pods: Error creating: pods " in serving["message"], serving
        assert f"no PriorityClass with name {priority} was found" in serving["message"], serving
        assert (env.condition("cartridges", "refused", "Stalled") or {}).get("status") == "True"
        assert not pods().items
        scheduling.create_priority_class({"metadata": {"name": priority}, "value": 1000})
        try:
            wait_for(
                "a serving pod", lambda: any(pod.spec.priority_class_name == priority for pod in pods().items), 180
            )
        finally:
            scheduling.delete_priority_class(priority)
    finally:
        env.settings = healthy
        env.restart()
    env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "refused")
