"""The Helm chart renders cleanly, says what is wrong with bad values, and wires the operator as its code expects."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _chart import CHART, CI_VALUES, Render, container, find, run_helm, template_args

from cartridges import api, crd
from cartridges.store import S3Config
from cartridges_operator import manifests
from cartridges_operator.config import CorpusLimits, OperatorConfig
from cartridges_serving.engine import EngineConfig

VALUES_FILES = sorted(p.name for p in CI_VALUES.glob("*.yaml"))


@pytest.mark.parametrize("values", VALUES_FILES)
def test_helm_lint_is_clean(helm: Path, values: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(CI_VALUES / values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


A_FAILED_RENDER = """
import os
from pathlib import Path
from cartridges_e2e import chart

def test_render() -> None:
    sets = {"store.credentials.secretKey": os.environ["SECRET_KEY"], "minio.enabled": "maybe"}
    chart.render(Path(os.environ["HELM"]), "quickstart-values.yaml", "cartridges-system", "cartridges", sets)
"""


def test_a_failed_render_shows_helms_error_and_not_the_secret_key(helm: Path, tmp_path: Path) -> None:
    """As pytest reports a failure of the end-to-end test's render, whose settings hold the run's MinIO secret."""
    secret = "per-run-secret-0123456789"
    test_file = tmp_path / "test_render.py"
    test_file.write_text(A_FAILED_RENDER)
    argv = [sys.executable, "-m", "pytest", str(test_file), "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    env = {**os.environ, "SECRET_KEY": secret, "HELM": str(helm), "PYTHONPATH": os.pathsep.join(sys.path)}
    report = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert report.returncode == 1 and "HelmError" in report.stdout, report.stdout + report.stderr
    assert "at '/minio/enabled': got string, want boolean" in report.stdout
    assert secret not in report.stdout + report.stderr


def rendered_crds(render: Render, sets: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return find(render("production-values.yaml", sets=sets), "CustomResourceDefinition")


def test_chart_renders_the_generated_crds_and_keeps_them(render: Render) -> None:
    """The CRDs come from templates, which `helm upgrade` applies (Helm's crds/ folder it never updates): exactly
    the generated ones, once each, kept by `helm uninstall` and never pruned or deleted by Argo CD, since deleting a
    CRD deletes every Corpus and Cartridge; and applied before the operator that watches them."""
    generated = [yaml.safe_load(p.read_text()) for p in sorted(crd.CRD_DIR.glob("*.yaml"))]
    crds = rendered_crds(render)
    rendered = {c["metadata"]["name"]: c for c in crds}
    assert len(crds) == len(rendered) == len(generated) == 2  # once each: not also from Helm's crds/ folder
    for expected in generated:
        found = rendered[expected["metadata"]["name"]]
        annotations = found["metadata"]["annotations"]
        assert annotations["helm.sh/resource-policy"] == "keep"
        assert annotations["argocd.argoproj.io/sync-options"] == "Prune=false,Delete=false"
        assert int(annotations["argocd.argoproj.io/sync-wave"]) < 0  # the operator's Deployment: wave 0
        assert found["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cartridges"
        assert {**found, "metadata": {"name": found["metadata"]["name"]}} == expected


def test_crds_can_be_left_to_the_user(render: Render) -> None:
    assert not rendered_crds(render, {"crds.install": "false"})


def test_crds_fit_client_side_apply(render: Render) -> None:
    """`kubectl apply` without --server-side, and Argo CD without ServerSideApply, keep the whole object as JSON in
    the last-applied-configuration annotation, and an object's annotations may hold 262144 bytes in all. Beyond
    that the CRDs would need ServerSideApply=true in their argocd.argoproj.io/sync-options."""
    for found in rendered_crds(render):
        assert len(json.dumps(found, separators=(",", ":"))) < 262144, found["metadata"]["name"]


def test_operator_deployment_is_single_locked_down_and_configured(render: Render) -> None:
    objects = render("production-values.yaml", namespace="cartridges-system")
    (deployment,) = find(objects, "Deployment", "cartridges-operator")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    operator = container(objects, "cartridges-operator")
    assert operator["securityContext"]["readOnlyRootFilesystem"] is True
    assert operator["securityContext"]["allowPrivilegeEscalation"] is False
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert operator["resources"]["requests"] and operator["resources"]["limits"]["memory"]
    assert {"--namespace=team-docs", "--namespace=team-support", "--log-format=json"} <= set(operator["args"])
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in operator["env"]}
    assert env["CARTRIDGES_STORE_ROOT"] == "s3://cartridges/prod"
    assert env["CARTRIDGES_S3_ENDPOINT"] == "https://s3.example.internal"
    assert env["CARTRIDGES_S3_TLS"] == "true"
    assert env["CARTRIDGES_S3_CA_BUNDLE"] == "/etc/cartridges/store-ca/ca.crt"
    assert env["CARTRIDGES_STORE_SECRET"] == "cartridges-store"
    assert env["CARTRIDGES_S3_ACCESS_KEY"] == {"secretKeyRef": {"name": "cartridges-store", "key": "accessKey"}}
    assert env["CARTRIDGES_TRAINER_IMAGE"] == "ghcr.io/cartridges-dev/trainer:0.1.0"
    assert env["CARTRIDGES_SERVING_IMAGE"] == "ghcr.io/cartridges-dev/serving:0.1.0"
    assert not find(objects, "Secret"), "an existing Secret is used, none is created"


def test_operator_reads_what_the_chart_sets(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """The env the chart renders, fed to the operator's own config loader, gives the intended settings."""
    operator = container(render("quickstart-values.yaml", namespace="demo"), "cartridges-operator")
    for item in operator["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    config = OperatorConfig.from_env()
    assert config.store_root == "s3://cartridges"
    assert config.s3_endpoint == "http://cartridges-minio.demo.svc:9000"
    assert config.trainer_image.endswith("/trainer:0.1.0") and config.serving_image.endswith("/serving:0.1.0")
    assert config.corpus_limits == CorpusLimits(max_bytes=32 * 2**20, source_buckets=())


def test_corpus_limits_reach_the_operator(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = {
        "corpus.maxBytes": "134217728",
        "corpus.concurrentReads": "4",
        "corpus.stallAfterSeconds": "1800",
        "corpus.sourceBuckets[0]": "docs",
        "corpus.sourceBuckets[1]": "team-a/wiki",
        "corpus.httpAllowedCidrs": "{10.20.0.0/16,fd00:1::/64}",
    }
    operator = container(render("quickstart-values.yaml", namespace="demo", sets=sets), "cartridges-operator")
    for item in operator["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    limits = OperatorConfig.from_env().corpus_limits
    assert limits == CorpusLimits(
        max_bytes=128 * 2**20,
        source_buckets=("docs", "team-a/wiki"),
        concurrent_reads=4,
        stall_after_s=1800,
        http_allowed_cidrs=(ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("fd00:1::/64")),
    )
    assert limits.buckets_for("team-a") == ("docs", "wiki") and limits.buckets_for("team-b") == ("docs",)


def serving_pod(
    render: Render, monkeypatch: pytest.MonkeyPatch, sets: dict[str, str], values: str = "quickstart-values.yaml"
) -> dict[str, Any]:
    """The spec of a serving pod the operator creates when it runs with the env the chart renders for ``sets``."""
    operator = container(render(values, namespace="demo", sets=sets), "cartridges-operator")
    for item in operator["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    model = api.BaseModelRef(name="m", uri="s3://cartridges/models/m")
    deployment = manifests.serving_deployment("ns", model, 1, [], OperatorConfig.from_env())
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def serving_container(
    render: Render, monkeypatch: pytest.MonkeyPatch, sets: dict[str, str], values: str = "quickstart-values.yaml"
) -> dict[str, Any]:
    triton: dict[str, Any] = serving_pod(render, monkeypatch, sets, values)["containers"][0]
    return triton


def serving_pod_env(
    render: Render, monkeypatch: pytest.MonkeyPatch, sets: dict[str, str], values: str = "quickstart-values.yaml"
) -> dict[str, str]:
    triton = serving_container(render, monkeypatch, sets, values)
    return {e["name"]: e["value"] for e in triton["env"] if "value" in e}


def test_pods_get_the_charts_store_tls_and_region(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the chart tells the operator about the store reaches the trainer and serving pods it creates."""
    env = serving_pod_env(render, monkeypatch, {"store.tls.enabled": "true", "store.region": "eu-west-1"})
    pod_store = S3Config.from_env({**env, "CARTRIDGES_S3_ACCESS_KEY": "a", "CARTRIDGES_S3_SECRET_KEY": "s"})
    assert pod_store.endpoint == "cartridges-minio.demo.svc:9000"
    assert pod_store.secure and pod_store.region == "eu-west-1"


def test_serving_engine_settings_reach_the_engine(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """serving.engine in the chart -> the operator's env -> every serving pod's env -> the engine's config."""
    sets = {"serving.engine.maxBatchSize": "64", "serving.engine.kvBytes": "85899345920"}  # 80 GiB
    sets = {**sets, "serving.engine.cudaGraphs": "true", "serving.engine.dtype": "float16"}
    engine = EngineConfig.from_env(serving_pod_env(render, monkeypatch, sets, "production-values.yaml"))
    assert (engine.max_batch_size, engine.kv_bytes, engine.cuda_graphs) == (64, 80 * 2**30, True)
    assert engine.model_dtype() == torch.float16
    assert (engine.max_prefill_tokens, engine.cache_bytes) == (1024, 2 * 2**30)  # unset: the engine's defaults


def test_serving_resources_reach_the_serving_pods(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """serving.resources in the chart -> the operator's env -> every serving pod. Unset: one GPU. A CPU-only value
    has no GPU: the chart's default is empty, as Helm would merge a default GPU limit into the user's map."""
    monkeypatch.delenv("CARTRIDGES_SERVING_RESOURCES", raising=False)
    unset = serving_container(render, monkeypatch, {}, "production-values.yaml")
    assert unset["resources"]["limits"]["nvidia.com/gpu"] == 1
    cpu = {"serving.resources.requests.cpu": "4", "serving.resources.limits.memory": "16Gi"}
    assert serving_container(render, monkeypatch, cpu, "production-values.yaml")["resources"] == {
        "requests": {"cpu": 4},
        "limits": {"memory": "16Gi"},
    }


def test_serving_startup_budget_reaches_the_serving_pods(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """serving.startupSeconds in the chart -> the operator's env -> every serving pod's startup probe: a large model
    gets the time to download and load before the kubelet restarts the pod. Unset: 30 minutes."""

    def startup_s(sets: dict[str, str]) -> int:
        probe = serving_container(render, monkeypatch, sets, "production-values.yaml")["startupProbe"]
        seconds: int = probe["periodSeconds"] * probe["failureThreshold"]
        return seconds

    assert startup_s({}) == 1800
    assert startup_s({"serving.startupSeconds": "7200"}) == 7200
    assert 3601 <= startup_s({"serving.startupSeconds": "3601"}) < 3601 + 5


def test_quickstart_serves_on_cpu(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick start runs on a cluster without GPUs (examples/cartridge.yaml trains with gpus: 0): its serving
    pods ask for no GPU, which would leave them Pending there, and the engine's cache, host memory on CPU, fits
    within their memory limit."""
    monkeypatch.delenv("CARTRIDGES_SERVING_RESOURCES", raising=False)
    triton = serving_container(render, monkeypatch, {})
    assert not any("gpu" in name for kind in triton["resources"].values() for name in kind), triton["resources"]
    assert triton["resources"]["requests"]["cpu"] and triton["resources"]["limits"]["memory"] == "4Gi"
    engine = EngineConfig.from_env({e["name"]: e["value"] for e in triton["env"] if "value" in e})
    assert not engine.cuda_graphs and engine.cache_bytes + engine.kv_bytes < 4 * 2**30


def test_serving_placement_reaches_the_serving_pods(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """serving.nodeSelector, tolerations and priorityClassName in the chart -> the operator's env -> every serving
    pod, so serving pods reach tainted GPU nodes of a pool. Unset: no variable, and pods go anywhere."""
    for name in ("NODE_SELECTOR", "TOLERATIONS", "PRIORITY_CLASS"):
        monkeypatch.delenv(f"CARTRIDGES_SERVING_{name}", raising=False)
    anywhere = serving_pod(render, monkeypatch, {})
    assert (anywhere["nodeSelector"], anywhere["tolerations"], anywhere.get("priorityClassName")) == ({}, [], None)
    sets = {
        "serving.nodeSelector.pool": "gpu",
        "serving.tolerations[0].key": "nvidia.com/gpu",
        "serving.tolerations[0].operator": "Exists",
        "serving.tolerations[0].effect": "NoSchedule",
        "serving.priorityClassName": "serving-high",
    }
    pod = serving_pod(render, monkeypatch, sets)
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "serving-high"


def test_a_private_ca_reaches_every_store_secret_and_the_operator(render: Render) -> None:
    """store.tls.caCert goes under ca.crt into each Secret the chart creates, where the operator reads it as the
    trainer and serving pods do (optional: a Secret without it means the system's CAs)."""
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    sets = {"store.tls.caCert": pem, "operator.watchNamespaces[0]": "team-a"}
    objects = render("quickstart-values.yaml", namespace="demo", sets=sets)
    secrets = find(objects, "Secret", "cartridges-store")
    assert sorted(s["metadata"]["namespace"] for s in secrets) == ["demo", "team-a"]
    assert all(s["stringData"]["ca.crt"] == pem for s in secrets)
    env = {e["name"]: e.get("valueFrom") for e in container(objects, "cartridges-operator")["env"]}
    ref = {"name": "cartridges-store", "key": "ca.crt", "optional": True}
    assert env["CARTRIDGES_S3_CA_PEM"] == {"secretKeyRef": ref}


def test_quickstart_creates_credentials_minio_and_bucket(render: Render) -> None:
    objects = render("quickstart-values.yaml", namespace="demo")
    (secret,) = find(objects, "Secret", "cartridges-store")
    assert secret["stringData"] == {"accessKey": "cartridges", "secretKey": "cartridges-quickstart"}
    assert find(objects, "Deployment", "cartridges-minio") and find(objects, "Service", "cartridges-minio")
    (setup,) = find(objects, "Job", "cartridges-minio-setup")
    assert "mc mb --ignore-existing" in setup["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert not find(objects, "PersistentVolumeClaim"), "persistence is off in the quick-start values"
    # Cluster-wide: the workload permissions are bound by a ClusterRoleBinding, and kopf needs no namespace list.
    assert find(objects, "ClusterRoleBinding", "cartridges-workloads") and not find(objects, "RoleBinding")


def test_minio_setup_passes_the_root_keys_on_stdin_not_in_argv(render: Render, tmp_path: Path) -> None:
    """Every process on a node may read any process's argv (ps): the setup Job's script, run with an mc that records
    what it gets, hands mc the root keys on its stdin alone, whatever characters they hold, and still stops at the
    first failure."""
    objects = render("quickstart-values.yaml", namespace="demo")
    (setup,) = find(objects, "Job", "cartridges-minio-setup")
    mc = setup["spec"]["template"]["spec"]["containers"][0]
    (tmp_path / "mc").write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> argv\ncat >> stdin\nexit "${MC_FAILS:-0}"\n')
    (tmp_path / "mc").chmod(0o755)
    keys = {"ACCESS_KEY": "cartridges", "SECRET_KEY": "s3cr$t/+@:`x`\\n 'q\""}
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **keys}
    script = [*mc["command"], *mc["args"]]
    subprocess.run(script, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, check=True)
    argv = (tmp_path / "argv").read_text()
    assert argv.splitlines() == [
        "alias set store http://cartridges-minio:9000",
        "mb --ignore-existing store/cartridges",
    ]
    assert (tmp_path / "stdin").read_text() == f"cartridges\n{keys['SECRET_KEY']}\n"
    failed = subprocess.run(script, cwd=tmp_path, env=env | {"MC_FAILS": "1"}, stdin=subprocess.DEVNULL)
    assert failed.returncode == 1 and (tmp_path / "argv").read_text().count("\n") == 3, "mb after a failed alias"


def _rules(objects: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    (role,) = find(objects, "ClusterRole", name)
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_rbac_is_least_privilege(render: Render) -> None:
    objects = render("production-values.yaml")
    for name in ("cartridges-cluster", "cartridges-workloads"):
        for rule in _rules(objects, name):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert not {"update", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]) or (
                rule["resources"] == ["cartridges/finalizers"] and rule["verbs"] == ["update"]
            )
    secrets = [r for r in _rules(objects, "cartridges-workloads") if "secrets" in r["resources"]]
    assert secrets == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["cartridges-store"], "verbs": ["get"]}
    ]
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-docs", "team-support"]
    assert not find(objects, "ClusterRoleBinding", "cartridges-workloads")


def test_network_policies(render: Render) -> None:
    objects = render("production-values.yaml")
    serving = find(objects, "NetworkPolicy", "cartridges-serving")
    assert sorted(p["metadata"]["namespace"] for p in serving) == ["team-docs", "team-support"]
    ingress = serving[0]["spec"]["ingress"]
    assert ingress == [
        {
            "from": [{"namespaceSelector": {"matchLabels": {"cartridges.dev/client": "true"}}}],
            "ports": [{"port": 8000, "protocol": "TCP"}, {"port": 8001, "protocol": "TCP"}],
        }
    ]
    trainer = find(objects, "NetworkPolicy", "cartridges-trainer")[0]["spec"]
    assert trainer["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in trainer
    (operator,) = find(objects, "NetworkPolicy", "cartridges-operator")
    egress = operator["spec"]["egress"]
    for policy in [*serving, *find(objects, "NetworkPolicy", "cartridges-trainer")]:
        assert policy["spec"]["egress"] == [egress[0], egress[2]], "training and serving pods: DNS and the store"
    assert egress[1]["to"] == [{"ipBlock": {"cidr": f"192.168.10.{n}/32"}} for n in (11, 12, 13)]
    assert egress[2] == {"ports": [{"port": 443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}
    web = [{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}]
    assert egress[3] == {"ports": web, "to": PUBLIC}, (
        "the operator downloads http(s) Corpus sources itself, but never from cloud metadata (169.254.169.254) nor "
        "the cluster's Services and pods"
    )
    assert len(egress) == 4
    assert not operator["spec"]["ingress"], "no metrics namespaces configured: nothing may connect"


def minio_peers(render: Render, sets: dict[str, str]) -> list[dict[str, Any]]:
    """Who the bundled MinIO's NetworkPolicy admits on its API port."""
    (policy,) = find(render("quickstart-values.yaml", sets=sets), "NetworkPolicy", "cartridges-minio")
    (rule,) = policy["spec"]["ingress"]
    peers: list[dict[str, Any]] = rule["from"]
    return peers


def test_minio_admits_workload_pods_of_the_watched_namespaces_only(render: Render) -> None:
    """Any pod anywhere may carry the labels of the operator's pods: with watched namespaces listed, MinIO admits
    such pods only there (and in the serving namespaces), and the operator and setup Job of its own namespace."""
    sets = {"operator.watchNamespaces": "{team-a,team-b}", "networkPolicy.servingNamespaces": "{team-b,team-c}"}
    peers = minio_peers(render, sets)
    assert all(peer.get("namespaceSelector") != {} for peer in peers), peers
    (workloads,) = [peer for peer in peers if "namespaceSelector" in peer]
    assert workloads["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b", "team-c"]}
        ]
    }
    assert workloads["podSelector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "cartridges-operator"
    assert [peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in peers if peer != workloads] == [
        "cartridges-operator",
        "cartridges-minio-setup",
    ]
    every_namespace = [peer for peer in minio_peers(render, {}) if "namespaceSelector" in peer]
    assert every_namespace == [{"namespaceSelector": {}, "podSelector": workloads["podSelector"]}], (
        "watching every namespace, the pods the operator creates may run in any of them"
    )


def workload_egress(render: Render, values: str, sets: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """The egress rules of the serving and training pods' NetworkPolicies, by policy name (those of each namespace
    are the same)."""
    policies = [p for p in find(render(values, namespace="demo", sets=sets), "NetworkPolicy") if "egress" in p["spec"]]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for policy in policies:
        assert "Egress" in policy["spec"]["policyTypes"]
        assert by_name.setdefault(policy["metadata"]["name"], policy["spec"]["egress"]) == policy["spec"]["egress"]
    return {name: rules for name, rules in by_name.items() if name in ("cartridges-serving", "cartridges-trainer")}


DNS_RULE = {
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
}


def test_training_and_serving_pods_reach_only_dns_and_the_store(render: Render) -> None:
    """They parse tenants' models and corpora and mount no service-account token: nothing but DNS and the store, so
    neither the API server nor cloud metadata (169.254.169.254), whichever store the chart is given."""
    bundled = workload_egress(render, "quickstart-values.yaml", {"operator.watchNamespaces": "{team-a}"})
    minio = {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "demo"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "cartridges-minio",
                                                "app.kubernetes.io/instance": "cartridges"}},
            }
        ],
        "ports": [{"port": 9000, "protocol": "TCP"}],
    }  # fmt: skip
    assert bundled == {"cartridges-serving": [DNS_RULE, minio], "cartridges-trainer": [DNS_RULE, minio]}
    sets = {"operator.watchNamespaces": "{team-a}", "minio.enabled": "false", "store.endpoint": "http://rgw.internal"}
    external = workload_egress(render, "quickstart-values.yaml", sets)
    store = {
        "ports": [{"port": port, "protocol": "TCP"} for port in (443, 9000, 80)],
        "to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}},
            {"ipBlock": {"cidr": "::/0", "except": ["fe80::/10"]}},
        ],
    }
    assert external == {"cartridges-serving": [DNS_RULE, store], "cartridges-trainer": [DNS_RULE, store]}


ENDPOINTS_COMMAND = "kubectl get endpointslice -l kubernetes.io/service-name=kubernetes -n default"


def test_api_server_egress_example_names_endpoints_not_the_service_ip() -> None:
    """Many network plugins match egress after the kubernetes Service's ClusterIP is rewritten to the API server's
    own address, so a policy naming the ClusterIP blocks the operator: the example names endpoint addresses, none in
    a usual Service range, and the values say where to read them."""
    values = yaml.safe_load((CI_VALUES / "production-values.yaml").read_text())
    service_ranges = [ipaddress.ip_network(r) for r in ("10.96.0.0/12", "10.0.0.0/16", "172.20.0.0/16")]
    for cidr in values["networkPolicy"]["apiServer"]["cidrs"]:
        assert not any(ipaddress.ip_network(cidr).overlaps(r) for r in service_ranges), cidr
    for path in (CHART / "values.yaml", CI_VALUES / "production-values.yaml"):
        assert ENDPOINTS_COMMAND in " ".join(path.read_text().replace("#", " ").split()), path


PUBLIC = [
    {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12",
                                                 "192.168.0.0/16"]}},
    {"ipBlock": {"cidr": "::/0", "except": ["fc00::/7", "fe80::/10"]}},
]  # fmt: skip
"""Any address but link-local (cloud metadata), private and shared ones."""


def test_corpus_source_egress_can_be_narrowed_or_turned_off(render: Render) -> None:
    def egress(**sets: str) -> list[dict[str, Any]]:
        (operator,) = find(render("production-values.yaml", sets=sets), "NetworkPolicy", "cartridges-operator")
        rules: list[dict[str, Any]] = operator["spec"]["egress"]
        return rules

    narrowed = egress(**{"networkPolicy.corpusSources.cidrs[0]": "192.0.2.0/24"})
    assert narrowed[3]["to"] == [{"ipBlock": {"cidr": "192.0.2.0/24"}}]
    assert len(egress(**{"networkPolicy.corpusSources.enabled": "false"})) == 3
    allowed = {"corpus.httpAllowedCidrs[0]": "10.20.0.0/16"}  # the operator fetches from it: the policy lets it
    assert egress(**allowed)[3]["to"] == [*PUBLIC, {"ipBlock": {"cidr": "10.20.0.0/16"}}]
    both = egress(**allowed, **{"networkPolicy.corpusSources.cidrs[0]": "192.0.2.0/24"})
    assert both[3]["to"] == [{"ipBlock": {"cidr": "192.0.2.0/24"}}, {"ipBlock": {"cidr": "10.20.0.0/16"}}]


STORE_PORTS = [
    ({"store.endpoint": "http://rgw.internal:7480"}, [443, 7480]),
    ({"store.endpoint": "rgw.internal:7480"}, [443, 7480]),
    ({"store.endpoint": "http://10.1.2.3", "store.tls.enabled": "false"}, [443, 80]),
    ({"store.endpoint": "10.1.2.3", "store.tls.enabled": "false"}, [443, 80]),
    ({"store.endpoint": "10.1.2.3", "store.tls.enabled": "true"}, [443]),
    ({"store.endpoint": "https://s3.example.internal:443"}, [443]),
    ({"networkPolicy.store.ports[0]": "9000", "store.endpoint": "https://s3.example.internal"}, [9000, 443]),
]


@pytest.mark.parametrize(("sets", "ports"), STORE_PORTS, ids=[" ".join(s.values()) for s, _ in STORE_PORTS])
def test_store_egress_opens_the_endpoints_port(render: Render, sets: dict[str, str], ports: list[int]) -> None:
    """The operator reaches its store on the port store.endpoint names (else 443 with TLS, 80 without, as its S3
    client does), whatever networkPolicy.store.ports lists: those are added, each port once."""
    (operator,) = find(render("production-values.yaml", sets=sets), "NetworkPolicy", "cartridges-operator")
    (store,) = [
        rule for rule in operator["spec"]["egress"] if rule.get("to") == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    ]
    assert store["ports"] == [{"port": port, "protocol": "TCP"} for port in ports]


def test_dns_egress_can_reach_a_node_local_cache(render: Render) -> None:
    """DNS goes to kube-system's pods; NodeLocal DNSCache answers on the node's host network (169.254.20.10), which
    no namespace selector matches, so networkPolicy.dns.cidrs adds it."""

    def dns_peers(sets: dict[str, str] | None = None) -> list[dict[str, Any]]:
        (operator,) = find(render("production-values.yaml", sets=sets), "NetworkPolicy", "cartridges-operator")
        (dns,) = [rule for rule in operator["spec"]["egress"] if {"port": 53, "protocol": "UDP"} in rule["ports"]]
        peers: list[dict[str, Any]] = dns["to"]
        return peers

    kube_system = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}
    assert dns_peers() == [kube_system]
    cache = dns_peers({"networkPolicy.dns.cidrs[0]": "169.254.20.10/32"})
    assert cache == [kube_system, {"ipBlock": {"cidr": "169.254.20.10/32"}}]


def test_ipv6_cidrs_render_as_strings(render: Render) -> None:
    """An IPv6 block may start with ':' (::1/128, ::/0), which YAML cannot read unquoted; each list renders it."""
    lists = ("dns", "apiServer", "store", "corpusSources")
    sets = {f"networkPolicy.{name}.cidrs": "{::/0}" for name in lists} | {"networkPolicy.dns.cidrs": "{::/0,::1/128}"}
    (operator,) = find(render("production-values.yaml", sets=sets), "NetworkPolicy", "cartridges-operator")
    blocks = [
        peer["ipBlock"]["cidr"] for rule in operator["spec"]["egress"] for peer in rule["to"] if "ipBlock" in peer
    ]
    assert blocks == ["::/0", "::1/128", "::/0", "::/0", "::/0"]


NAME_KEYS = {"name", "namespace", "serviceAccountName", "priorityClassName", "storageClassName", "secretName",
             "claimName", "image", "app.kubernetes.io/instance"}  # fmt: skip


def name_values(node: object) -> list[object]:
    """Every value under one of NAME_KEYS in a rendered object."""
    if isinstance(node, dict):
        here = [value for key, value in node.items() if key in NAME_KEYS and not isinstance(value, dict | list)]
        return here + [found for value in node.values() for found in name_values(value)]
    if isinstance(node, list):
        return [found for item in node for found in name_values(item)]
    return []


def test_names_that_read_as_numbers_or_null_stay_strings(helm: Path) -> None:
    """Kubernetes names may be all digits, or words YAML reads as null or booleans: the chart quotes every name it
    is given (release, namespaces, Secrets, classes), so none renders as a number, a boolean or null."""
    strings = {
        "store.credentials.secretName": "true",
        "operator.serviceAccount.name": "0755",
        "operator.priorityClassName": "null",
        "minio.persistence.storageClass": "yes",
    }
    args = template_args("quickstart-values.yaml", "2024", "2024", {"minio.persistence.enabled": "true"})
    args += ["--set-json", 'operator.watchNamespaces=["1234", "null"]']
    args += [arg for key, value in strings.items() for arg in ("--set-string", f"{key}={value}")]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stderr
    objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    assert all(isinstance(value, str) for value in name_values(objects)), name_values(objects)
    assert sorted(b["metadata"]["namespace"] for b in find(objects, "RoleBinding")) == ["1234", "null"]
    assert sorted(s["metadata"]["namespace"] for s in find(objects, "Secret", "true")) == ["1234", "2024", "null"]
    policies = find(objects, "NetworkPolicy", "cartridges-trainer")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["1234", "null"]


# (what is set, what the error must say): helm prints the JSON-schema path and the rule that failed.
BAD_VALUES = [
    ({"store.bucket": "Bad_Bucket"}, ["/store/bucket", "does not match pattern"]),
    ({"store.endpoint": "s3.example.com/path"}, ["/store/endpoint", "does not match pattern"]),
    ({"store.credentials.existingSecret": "", "store.credentials.accessKey": ""}, ["/store/credentials/accessKey"]),
    ({"operator.logFormat": "xml"}, ["/operator/logFormat", "json", "plain"]),
    ({"operator.watchNamespaces[0]": "Team_Docs"}, ["/operator/watchNamespaces/0", "does not match pattern"]),
    ({"operator.replicas": "2"}, ["additional properties 'replicas' not allowed"]),
    ({"networkPolicy.apiServer.cidrs[0]": "10.0.0.1"}, ["/networkPolicy/apiServer/cidrs/0"]),
    ({"networkPolicy.dns.cidrs[0]": "169.254.20.10"}, ["/networkPolicy/dns/cidrs/0"]),
    ({"networkPolicy.corpusSources.ports[0]": "0"}, ["/networkPolicy/corpusSources/ports/0"]),
    ({"corpus.maxBytes": "0"}, ["/corpus/maxBytes", "minimum"]),
    ({"corpus.concurrentReads": "0"}, ["/corpus/concurrentReads", "minimum"]),
    ({"corpus.stallAfterSeconds": "0"}, ["/corpus/stallAfterSeconds", "minimum"]),
    ({"corpus.sourceBuckets[0]": "Docs_Bucket"}, ["/corpus/sourceBuckets/0", "does not match pattern"]),
    ({"corpus.httpAllowedCidrs[0]": "wiki.internal"}, ["/corpus/httpAllowedCidrs/0", "does not match pattern"]),
    ({"corpus.sourceBuckets[0]": "team-a/b/docs"}, ["/corpus/sourceBuckets/0", "does not match pattern"]),
    ({"trainer.image.tag": "has space"}, ["/trainer/image/tag"]),
    ({"store.tls.caCert": "not a certificate"}, ["/store/tls/caCert", "BEGIN CERTIFICATE"]),
    ({"serving.engine.maxBatchSize": "0"}, ["/serving/engine/maxBatchSize", "minimum"]),
    ({"serving.engine.gpuMemory": "1"}, ["additional properties 'gpuMemory' not allowed"]),
    ({"serving.engine.dtype": "fp16"}, ["/serving/engine/dtype", "bfloat16"]),
    ({"serving.resources.limits.memory": "16 GB"}, ["/serving/resources/limits/memory", "does not match pattern"]),
    ({"serving.resources.requests.cpu": "-1"}, ["/serving/resources/requests/cpu", "minimum"]),
    ({"serving.resources.gpus": "1"}, ["additional properties 'gpus' not allowed"]),
    ({"serving.nodeSelector.pool": "1"}, ["/serving/nodeSelector/pool", "want string"]),
    ({"serving.tolerations[0].effect": "NoRun"}, ["/serving/tolerations/0/effect", "NoSchedule"]),
    ({"serving.tolerations[0].keys": "gpu"}, ["additional properties 'keys' not allowed"]),
    ({"operator.tolerations[0].effect": "NoRun"}, ["/operator/tolerations/0/effect", "NoSchedule"]),
    # The API server's rules between a toleration's fields, which would have every serving Deployment refused.
    (
        {
            "serving.tolerations[0].value": "present",
            "serving.tolerations[0].key": "gpu",
            "serving.tolerations[0].operator": "Exists",
        },
        ["/serving/tolerations/0/value", "value must be ''"],
    ),
    (
        {
            "serving.tolerations[0].tolerationSeconds": "60",
            "serving.tolerations[0].key": "spot",
            "serving.tolerations[0].effect": "NoSchedule",
        },
        ["/serving/tolerations/0/effect", "value must be 'NoExecute'"],
    ),
    (
        {"operator.tolerations[0].tolerationSeconds": "60", "operator.tolerations[0].key": "spot"},
        ["/operator/tolerations/0", "missing property 'effect'"],
    ),
    ({"serving.tolerations[0].operator": "Equal"}, ["/serving/tolerations/0/operator", "value must be 'Exists'"]),
    ({"serving.startupSeconds": "30"}, ["/serving/startupSeconds", "minimum"]),
    ({"serving.priorityClassName": "High_Priority"}, ["/serving/priorityClassName", "does not match pattern"]),
    ({"crds.install": "yes"}, ["/crds/install", "want boolean"]),
]


@pytest.mark.parametrize(("sets", "expected"), BAD_VALUES, ids=[next(iter(s)) for s, _ in BAD_VALUES])
def test_schema_rejects_bad_values_clearly(helm: Path, sets: dict[str, str], expected: list[str]) -> None:
    proc = run_helm(helm, *template_args("production-values.yaml", "cartridges-system", "cartridges", sets))
    assert proc.returncode != 0, "helm accepted invalid values"
    assert "values don't meet the specifications of the schema" in proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr


def test_missing_store_endpoint_is_explained(helm: Path) -> None:
    proc = run_helm(helm, "template", "x", str(CHART), "--set", "store.credentials.existingSecret=s")
    assert proc.returncode != 0
    assert "/store" in proc.stderr and "endpoint" in proc.stderr, proc.stderr


def test_metrics_port_equal_to_liveness_port_is_refused(helm: Path) -> None:
    """The operator binds both ports: equal, one bind fails and the operator crash-loops, so helm refuses first."""
    sets = {"operator.metricsPort": "8080", "operator.livenessPort": "8080"}
    proc = run_helm(helm, *template_args("production-values.yaml", "cartridges-system", "cartridges", sets))
    assert proc.returncode != 0, "helm accepted a metrics port equal to the liveness port"
    assert "operator.metricsPort and operator.livenessPort are both 8080" in proc.stderr, proc.stderr
