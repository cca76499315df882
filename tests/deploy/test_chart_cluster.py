"""The chart against a real API server: every rendered object passes server-side dry-run (CRDs are really applied),
the examples validate against the CRDs, and the operator runs a whole reconcile under the chart's ServiceAccount,
with RBAC enforced, without a single permission error."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart import CI_VALUES, REPO, Render, container, find, installable_chart, run_helm
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from cartridges import api
from cartridges_e2e.chart import apply, delete, token_kubeconfig, wait_established
from cartridges_e2e.cluster import Cluster
from cartridges_e2e.node import NodeHarness
from cartridges_e2e.operator_env import start_operator, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def dynamic(k8s_cluster: Cluster) -> DynamicClient:
    return DynamicClient(k8s_cluster.api_client())


@pytest.fixture
def namespaces(dynamic: DynamicClient) -> Iterator[Any]:
    """Creates namespaces on request (``make(prefix)``) and deletes them after the test."""
    core = client.CoreV1Api(dynamic.client)
    made: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": name}})
        made.append(name)
        return name

    yield make
    for name in made:
        core.delete_namespace(name)


@pytest.mark.parametrize("values", ["production-values.yaml", "quickstart-values.yaml"])
def test_rendered_chart_passes_server_side_dry_run(
    render: Render, dynamic: DynamicClient, namespaces: Any, values: str
) -> None:
    release = namespaces("rel")
    watched = [namespaces("team"), namespaces("team")]
    objects = render(values, namespace=release, release=f"c{uuid.uuid4().hex[:6]}",
                     sets={"operator.watchNamespaces": "{" + ",".join(watched) + "}"})  # fmt: skip
    crds = find(objects, "CustomResourceDefinition")
    assert len(crds) == 2
    for crd in crds:  # applied for real: the dry-run of the rest must not depend on them, the examples do
        apply(dynamic, crd, dry_run=False)
    wait_established(dynamic, crds)
    rest = [o for o in objects if o["kind"] != "CustomResourceDefinition"]
    assert {"Deployment", "ServiceAccount", "ClusterRole", "RoleBinding", "NetworkPolicy"} <= {o["kind"] for o in rest}
    for obj in rest:  # the templates name the namespace of every namespaced object themselves
        apply(dynamic, obj, dry_run=True)


def test_examples_validate_against_the_crds(dynamic: DynamicClient, namespaces: Any, render: Render) -> None:
    crds = find(render("quickstart-values.yaml"), "CustomResourceDefinition")
    for crd in crds:
        apply(dynamic, crd, dry_run=False)
    wait_established(dynamic, crds)
    namespace = namespaces("examples")
    documents = [d for name in ("corpus.yaml", "cartridge.yaml")
                 for d in yaml.safe_load_all((REPO / "examples" / name).read_text()) if d]  # fmt: skip
    assert {d["kind"] for d in documents} == {"ConfigMap", "Corpus", "Cartridge"}
    for document in documents:
        document["metadata"]["namespace"] = namespace
        apply(dynamic, document, dry_run=True)
    query = (REPO / "examples" / "query.sh").read_text()
    cartridges = [d["metadata"]["name"] for d in documents if d["kind"] == "Cartridge"]
    assert f'cartridges: ["{cartridges[0]}", "{cartridges[1]}"]' in query
    assert "/v2/models/$MODEL/generate" in query


def test_operator_reconciles_under_the_charts_service_account(
    render: Render,
    dynamic: DynamicClient,
    namespaces: Any,
    k8s_cluster: Cluster,
    node_harness: NodeHarness,
    tmp_path: Path,
) -> None:
    release_ns, work = namespaces("sys"), namespaces("work")
    release = f"r{uuid.uuid4().hex[:6]}"
    objects = render("quickstart-values.yaml", namespace=release_ns, release=release,
                     sets={"operator.watchNamespaces": "{" + work + "}"})  # fmt: skip
    operator = container(objects, f"{release}-cartridges-operator")
    assert f"--namespace={work}" in operator["args"]
    crds = find(objects, "CustomResourceDefinition")
    for obj in objects:
        if obj["kind"] in {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                           "RoleBinding", "Secret"}:  # fmt: skip
            apply(dynamic, obj, dry_run=False)
    wait_established(dynamic, crds)
    (account,) = find(objects, "ServiceAccount")
    kubeconfig = token_kubeconfig(k8s_cluster, release_ns, account["metadata"]["name"], tmp_path / "sa.kubeconfig")

    fake_trainer = [sys.executable, str(REPO / "tests" / "reconcilers" / "fake_trainer.py")]
    settings = {
        "CARTRIDGES_STORE_ROOT": f"file://{tmp_path}/store",
        "CARTRIDGES_TRAINER_COMMAND": json.dumps(fake_trainer),
        "CARTRIDGES_SERVING_PRIORITY_CLASS": "no-such-priority",  # serving pods are refused: replicasets list
    }
    process = start_operator(kubeconfig, work, tmp_path, settings)
    custom = client.CustomObjectsApi(dynamic.client)
    core = client.CoreV1Api(dynamic.client)
    try:
        core.create_namespaced_config_map(work, {"metadata": {"name": "notes"}, "data": {"a.md": "Alpha facts."}})

        def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
            body = {"apiVersion": api.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
            custom.create_namespaced_custom_object(api.GROUP, api.VERSION, work, plural, body)

        def condition(plural: str, name: str, type_: str) -> dict[str, Any] | None:
            found = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, work, plural, name)
            return next((c for c in (found.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)

        def reaches(plural: str, name: str, type_: str, status: str) -> dict[str, Any]:
            def probe() -> dict[str, Any] | None:
                found = condition(plural, name, type_)
                return found if found and found["status"] == status else None

            try:
                return wait_for(f"{plural}/{name} {type_}={status}", probe, 90)
            except AssertionError as err:
                raise AssertionError(f"{err}\noperator log:\n{process.log_path.read_text()[-4000:]}") from err

        base = {"baseModel": {"name": "tiny", "uri": "file:///models/tiny"}, "size": 16, "resources": {"gpus": 0}}
        from_configmap = {"configMap": {"name": "notes", "key": "a.md"}}
        create("corpora", "Corpus", "notes", {"description": "d", "sources": [from_configmap]})
        create("corpora", "Corpus", "broken", {"description": "d", "sources": [{"inline": "PERMANENT-FAILURE"}]})
        # retention Delete: deletion stops its training Jobs first (jobs get/delete, pods list).
        create("cartridges", "Cartridge", "notes", {"corpusRefs": [{"name": "notes"}], "retention": "Delete", **base})
        create("cartridges", "Cartridge", "broken", {"corpusRefs": [{"name": "broken"}], **base})
        # Corpus (configmaps, status), Job (secrets, jobs), promotion and serving objects (deployments, services);
        # a serving ReplicaSet that cannot create pods says why from its FailedCreate Events (replicasets list).
        serving = wait_for("the serving ReplicaSet's FailedCreate", lambda: (c := condition(
            "cartridges", "notes", "Serving")) and c["reason"] == "ServingPodsNotStarting" and c, 90)  # fmt: skip
        assert "no-such-priority" in serving["message"], serving
        apps = client.AppsV1Api(dynamic.client)
        assert apps.read_namespaced_deployment("triton-tiny", work).metadata.owner_references[0].name == "notes"
        # A permanent trainer failure is read from the failed pod (pods list).
        stalled = reaches("cartridges", "broken", "Stalled", "True")
        assert "65" in stalled["message"] or "PERMANENT" in stalled["message"], stalled
        # A Job that cannot create its pod says why from its FailedCreate Events (events list).
        unplaced = {**base, "resources": {"gpus": 0, "priorityClassName": "does-not-exist"}}
        create("cartridges", "Cartridge", "unplaced", {"corpusRefs": [{"name": "notes"}], **unplaced})
        stalled = reaches("cartridges", "unplaced", "Stalled", "True")
        assert stalled["reason"] == "TrainingPodsNotStarting" and "does-not-exist" in stalled["message"], stalled

        # A changed ConfigMap re-reads its Corpus (configmaps watch).
        def digest() -> str:
            corpus = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, work, "corpora", "notes")
            return str(corpus["status"]["digest"])

        before = digest()
        core.patch_namespaced_config_map("notes", work, {"data": {"a.md": "Beta facts."}})
        wait_for("a new corpus digest", lambda: digest() != before, 60)
        # Deleting the last Cartridge of a model removes the serving objects (deployments/services delete).
        for name in ("notes", "broken", "unplaced"):
            custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, work, "cartridges", name)
        wait_for("serving Deployment removed", lambda: not apps.list_namespaced_deployment(work).items, 60)
    finally:
        process.stop()
        for obj in objects:
            if obj["kind"] in {"ClusterRole", "ClusterRoleBinding"}:
                delete(dynamic, obj)
    log = process.log_path.read_text()
    assert "403" not in log and "Forbidden" not in log and "forbidden" not in log, log[-4000:]


def install_notes(helm: Path, k8s_cluster: Cluster, tmp_path: Path, values: str) -> str:
    """NOTES.txt as ``helm install --dry-run`` prints it against the test cluster (helm asks it for its version).
    The CRDs are left out: earlier tests applied them, and helm would refuse to take them over."""
    chart = installable_chart(tmp_path)
    kubeconfig = str(k8s_cluster.kubeconfig)
    proc = run_helm(helm, "install", "demo", str(chart), "--dry-run=client", "--kubeconfig", kubeconfig, "-n", "demo",
                    "-f", str(CI_VALUES / values), "--set", "crds.install=false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("NOTES:", 1)[1]


def test_notes_tell_what_to_apply_next(helm: Path, k8s_cluster: Cluster, tmp_path: Path) -> None:
    notes = install_notes(helm, k8s_cluster, tmp_path, "quickstart-values.yaml")
    assert 'kubectl -n "$NS" apply -f examples/corpus.yaml' in notes
    cartridges = [d for d in yaml.safe_load_all((REPO / "examples" / "cartridge.yaml").read_text()) if d]
    assert all(c["spec"]["baseModel"]["uri"] in notes for c in cartridges)  # the model to upload before applying
    assert "kubectl label namespace <client-namespace> cartridges.dev/client=true" in notes
    assert "set networkPolicy.servingNamespaces" in notes  # cluster-wide: no serving namespaces known
    assert "kubectl -n demo get secret cartridges-store -o json" in notes  # the chart-made Secret, to copy


def test_notes_with_an_existing_secret_ask_for_a_scoped_one(helm: Path, k8s_cluster: Cluster, tmp_path: Path) -> None:
    """With store.credentials.existingSecret the operator's Secret holds whole-bucket keys: NOTES must not tell
    anyone to copy it into team namespaces, but to create one limited to that namespace's prefixes."""
    notes = install_notes(helm, k8s_cluster, tmp_path, "production-values.yaml")
    assert "get secret" not in notes, notes
    assert 'kubectl -n "$NS" create secret generic cartridges-store' in notes, notes
    assert "cartridges/$NS/, corpora/$NS/ and sources/$NS/ read-write, models/ read-only" in notes, notes


NEW_RULE = "frozenTokens must be smaller than size"
NEW_FIELD = "keepGenerations"
CARTRIDGE = {"corpusRefs": [{"name": "c"}], "baseModel": {"name": "tiny", "uri": "file:///models/tiny"}, "size": 16}


def make_older_release(chart: Path) -> list[dict[str, Any]]:
    """Turn a copy of the chart into an older release, whose Cartridge CRD lacks a CEL rule and a spec field."""
    path = chart / "files" / "crds" / f"{api.GROUP}_cartridges.yaml"
    crd = yaml.safe_load(path.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = spec["x-kubernetes-validations"]
    spec["x-kubernetes-validations"] = [r for r in rules if r["message"] != NEW_RULE]
    assert len(spec["x-kubernetes-validations"]) == len(rules) - 1
    del spec["properties"][NEW_FIELD]
    path.write_text(yaml.safe_dump(crd))
    return [yaml.safe_load(p.read_text()) for p in sorted(path.parent.glob("*.yaml"))]


def replace_crds(dynamic: DynamicClient, crds: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
    """Leave exactly these CRDs, with this extra metadata, whatever earlier tests applied (an apply, or helm taking
    them over, would keep fields these lack)."""
    extensions = client.ApiextensionsV1Api(dynamic.client)
    for crd in crds:
        name = crd["metadata"]["name"]
        live = extensions.list_custom_resource_definition(field_selector=f"metadata.name={name}").items
        body = {**crd, "metadata": {**crd["metadata"], **metadata}}
        if live:
            body["metadata"]["resourceVersion"] = live[0].metadata.resource_version
            extensions.replace_custom_resource_definition(name, body)
        else:
            extensions.create_custom_resource_definition(body)
    wait_established(dynamic, crds)


def try_cartridge(dynamic: DynamicClient, namespace: str, spec: dict[str, Any]) -> dict[str, Any] | str:
    """What a dry-run create of a Cartridge gives: the object as stored (unknown fields pruned), or the refusal."""
    body = {"apiVersion": api.API_VERSION, "kind": "Cartridge", "metadata": {"name": "try"}, "spec": spec}
    custom = client.CustomObjectsApi(dynamic.client)
    try:
        created: dict[str, Any] = custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, "cartridges", body, dry_run="All"
        )
    except ApiException as err:
        assert err.status == 422, err.body
        return str(err.body)
    return created


@pytest.mark.parametrize("owned", [True, False], ids=["from-templates", "from-crds-folder"])
def test_helm_upgrade_upgrades_the_crds_and_uninstall_keeps_them(
    helm: Path, dynamic: DynamicClient, namespaces: Any, k8s_cluster: Cluster, tmp_path: Path, owned: bool
) -> None:
    """A release installed with older CRDs, upgraded with helm: the new CEL rule refuses, the new field is kept
    (not pruned); `helm uninstall` then leaves the CRDs and the Cartridges. CRDs that no release owns (chart 0.1.0
    installed them from Helm's crds/ folder; or `kubectl apply -f crds/`) need `--take-ownership` once (README)."""
    release_ns, work, release = namespaces("rel"), namespaces("work"), f"u{uuid.uuid4().hex[:6]}"
    old, new = installable_chart(tmp_path / "old"), installable_chart(tmp_path / "new")
    old_crds = make_older_release(old)
    owner = {"annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": release_ns},
             "labels": {"app.kubernetes.io/managed-by": "Helm"}}  # fmt: skip
    replace_crds(dynamic, old_crds, owner if owned else {})
    kubeconfig = ["--kubeconfig", str(k8s_cluster.kubeconfig), "-n", release_ns]
    values = ["-f", str(CI_VALUES / "production-values.yaml"), "--set", "operator.watchNamespaces={" + work + "}"]
    spec = {**CARTRIDGE, "frozenTokens": 16, NEW_FIELD: 3}

    def older_in_effect() -> dict[str, Any] | None:
        found = try_cartridge(dynamic, work, spec)
        return found if isinstance(found, dict) and NEW_FIELD not in found["spec"] else None

    def newer_in_effect() -> str | None:
        found = try_cartridge(dynamic, work, spec)
        return found if isinstance(found, str) else None

    installed = run_helm(helm, "install", release, str(old), *kubeconfig, *values, "--set", f"crds.install={owned}")
    assert installed.returncode == 0, installed.stderr
    wait_for("the older CRDs in effect", older_in_effect)
    if not owned:
        refused = run_helm(helm, "upgrade", release, str(new), *kubeconfig, *values)
        assert "exists and cannot be imported into the current release" in refused.stderr, refused.stderr
    take = [] if owned else ["--take-ownership"]
    upgraded = run_helm(helm, "upgrade", release, str(new), *kubeconfig, *values, *take)
    assert upgraded.returncode == 0, upgraded.stderr
    assert NEW_RULE in wait_for("the new CEL rule in effect", newer_in_effect)
    stored = try_cartridge(dynamic, work, {**CARTRIDGE, NEW_FIELD: 3})
    assert isinstance(stored, dict) and stored["spec"][NEW_FIELD] == 3, stored

    custom = client.CustomObjectsApi(dynamic.client)
    body = {"apiVersion": api.API_VERSION, "kind": "Cartridge", "metadata": {"name": "kept"}, "spec": CARTRIDGE}
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, work, "cartridges", body)
    uninstalled = run_helm(helm, "uninstall", release, *kubeconfig)
    assert uninstalled.returncode == 0, uninstalled.stderr
    assert "kept due to the resource policy" in uninstalled.stdout, uninstalled.stdout
    extensions = client.ApiextensionsV1Api(dynamic.client)
    for crd in old_crds:
        assert extensions.read_custom_resource_definition(crd["metadata"]["name"]).metadata.deletion_timestamp is None
    assert custom.get_namespaced_custom_object(api.GROUP, api.VERSION, work, "cartridges", "kept")
