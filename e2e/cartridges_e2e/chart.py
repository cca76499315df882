"""The Helm chart against the test control plane: render it with the real helm, apply what it renders, and act as
its ServiceAccount. Shared by the chart tests and the end-to-end lifecycle test."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.dynamic import DynamicClient

from cartridges_e2e.cluster import Cluster
from cartridges_e2e.operator_env import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cartridges"
CI_VALUES = CHART / "ci"
FIELD_MANAGER = "chart-tests"
Json = dict[str, Any]


SECRET_SETTINGS = frozenset({"store.credentials.secretKey"})
"""Settings (``--set`` keys) whose values a failure must not show: the store's per-run secret key."""


class HelmError(RuntimeError):
    """helm failed to render the chart; the message carries its output, without the secret settings' values."""


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def template_args(values: str, namespace: str, release: str, sets: dict[str, str] | None) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace, "-f", str(CI_VALUES / values)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def render(helm: Path, values: str, namespace: str, release: str, sets: dict[str, str] | None = None) -> list[Json]:
    """The chart's objects for a CI values file plus ``--set`` overrides, CRDs included.

    A failure is a :class:`HelmError` that names no secret. pytest's traceback would show this frame's arguments
    (``sets``), and an assertion on the process would show its command line, so neither is left to show."""
    __tracebackhide__ = True
    try:
        proc = run_helm(helm, *template_args(values, namespace, release, sets), "--include-crds")
    except subprocess.TimeoutExpired as err:
        raise HelmError(f"helm template with {values} timed out after {err.timeout}s") from None
    if proc.returncode != 0:
        output = _redacted(proc.stderr, sets or {})
        raise HelmError(f"helm template with {values} failed ({proc.returncode}):\n{output}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _redacted(text: str, sets: dict[str, str]) -> str:
    for key in SECRET_SETTINGS & sets.keys():
        if sets[key]:
            text = text.replace(sets[key], f"<{key}>")
    return text


def find(objects: list[Json], kind: str, name: str | None = None) -> list[Json]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def apply(dynamic: DynamicClient, obj: Json, dry_run: bool = False) -> None:
    """Server-side apply (optionally dry-run): admission, schema and CEL validation all run on the server."""
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    namespace = obj["metadata"].get("namespace") if resource.namespaced else None
    extra = {"dry_run": "All"} if dry_run else {}
    dynamic.server_side_apply(resource, body=obj, name=obj["metadata"]["name"], namespace=namespace,
                              field_manager=FIELD_MANAGER, force_conflicts=True, **extra)  # fmt: skip


def delete(dynamic: DynamicClient, obj: Json) -> None:
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    namespace = obj["metadata"].get("namespace") if resource.namespaced else None
    dynamic.delete(resource, name=obj["metadata"]["name"], namespace=namespace)


def wait_established(dynamic: DynamicClient, crds: list[Json]) -> None:
    extensions = client.ApiextensionsV1Api(dynamic.client)
    for crd in crds:
        name = crd["metadata"]["name"]

        def established(name: str = name) -> bool:
            found = extensions.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True" for c in found.status.conditions or [])

        wait_for(f"CRD {name} established", established, 30)
    dynamic.resources.invalidate_cache()


def token_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount itself (a bound token), so RBAC judges every call."""
    token = client.CoreV1Api(cluster.api_client()).create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    admin = yaml.safe_load(cluster.kubeconfig.read_text(encoding="utf-8"))
    ca = admin["clusters"][0]["cluster"]["certificate-authority-data"]
    base64.b64decode(ca)  # fail early on a malformed admin kubeconfig
    document = {
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "test", "cluster": {"server": cluster.server, "certificate-authority-data": ca}}],
        "users": [{"name": "sa", "user": {"token": token.status.token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": "sa"}}],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path
