"""Drive the operator as a real process against the test control plane, and read what it did."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cartridges import api
from cartridges.contract import STORE_CA_KEY
from cartridges.process import Service, free_port, http_ok
from cartridges.store import S3Config, Store
from cartridges_e2e.node import NodeHarness

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0) -> T:
    """Poll until ``probe`` returns something truthy; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def store_secret(config: S3Config | None = None, name: str = "cartridges-store") -> dict[str, Any]:
    """The Secret with the object-store credentials the operator's pods read (dummy keys for a file:// store),
    and the store's private CA when it has one."""
    keys = (
        {"accessKey": config.access_key, "secretKey": config.secret_key}
        if config
        else {"accessKey": "-", "secretKey": "-"}
    )
    if config and config.ca_pem:
        keys[STORE_CA_KEY] = config.ca_pem
    return {"metadata": {"name": name}, "stringData": keys}


def install_crds(api_client: client.ApiClient) -> None:
    """Create the generated CRDs (the chart tests may have applied the same ones already) and wait until served."""
    extensions = client.ApiextensionsV1Api(api_client)
    for path in sorted((REPO / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
        try:
            extensions.create_custom_resource_definition(body)
        except ApiException as err:
            if err.status != 409:
                raise
        name = body["metadata"]["name"]

        def established(name: str = name) -> bool:
            crd = extensions.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

        wait_for(f"CRD {name} established", established, 30)


def start_operator(kubeconfig: Path, namespace: str, workdir: Path, env: dict[str, str]) -> Service:
    """``python -m cartridges_operator`` watching one namespace, ready once its liveness endpoint answers.

    Free ports for liveness and metrics: the defaults would collide with any other operator on the machine."""
    port = free_port()
    operator = Service(
        "operator",
        [sys.executable, "-m", "cartridges_operator", "--namespace", namespace,
         "--liveness", f"http://127.0.0.1:{port}/healthz", "--metrics-port", str(free_port())],
        workdir / "operator.log",
        env={"KUBECONFIG": str(kubeconfig), **env},
    )  # fmt: skip
    operator.wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout_s=60)
    return operator


@dataclass
class OperatorEnv:
    namespace: str
    store_root: str
    api: client.ApiClient
    harness: NodeHarness
    operator: Service
    store: Store
    kubeconfig: Path
    workdir: Path
    settings: dict[str, str]

    @classmethod
    def start(
        cls,
        kubeconfig: Path,
        namespace: str,
        api_client: client.ApiClient,
        harness: NodeHarness,
        store: Store,
        workdir: Path,
        settings: dict[str, str],
    ) -> OperatorEnv:
        operator = start_operator(kubeconfig, namespace, workdir, settings)
        root = settings["CARTRIDGES_STORE_ROOT"]
        return cls(namespace, root, api_client, harness, operator, store, kubeconfig, workdir, settings)

    def restart(self) -> None:
        """Stop the operator process and start a new one, as a pod restart would."""
        with self.stopped():
            pass

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The operator down for the ``with`` block, then a new process: what the block does to the cluster or the
        store is what a restarted operator finds (a node drain, an OOM kill, an upgrade in between)."""
        self.operator.stop()
        try:
            yield
        finally:
            self.operator = start_operator(self.kubeconfig, self.namespace, self.workdir, self.settings)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def create(self, plural: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        kind = {"corpora": "Corpus", "cartridges": "Cartridge"}[plural]
        body = {"apiVersion": api.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, plural, body
        )
        return created

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, self.namespace, plural, name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return found

    def patch_spec(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, self.namespace, plural, name, {"spec": spec})

    def condition(self, plural: str, name: str, type_: str) -> dict[str, Any] | None:
        body = self.get(plural, name) or {}
        return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)

    def wait_condition(self, plural: str, name: str, type_: str, status: str, timeout_s: float = 60) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            found = self.condition(plural, name, type_)
            return found if found and found["status"] == status else None

        try:
            return wait_for(f"{plural}/{name} {type_}={status}", probe, timeout_s)
        except AssertionError as err:
            raise AssertionError(
                f"{err}; status: {json.dumps((self.get(plural, name) or {}).get('status'))}\n"
                f"operator log:\n{self.operator.log_path.read_text(encoding='utf-8', errors='replace')[-3000:]}"
            ) from err
