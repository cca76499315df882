"""A real operator process against the test control plane, with the node harness running its Jobs' pods."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _web_page import WebPage, serve_page
from kubernetes import client

from cartridges_e2e.cluster import Cluster
from cartridges_e2e.minio import MinioServer
from cartridges_e2e.node import NodeHarness
from cartridges_e2e.operator_env import OperatorEnv, install_crds, store_secret
from cartridges_operator import kube


@pytest.fixture
def namespace(k8s_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh namespace, with the operator's API helpers (``kube``) in this process talking to the test cluster."""
    api_client = k8s_cluster.api_client()
    monkeypatch.setattr(kube, "api_client", lambda: api_client)
    core = client.CoreV1Api(api_client)
    name = f"kube-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def crds_installed(k8s_cluster: Cluster) -> None:
    install_crds(k8s_cluster.api_client())


def _operator_env(
    cluster: Cluster, harness: NodeHarness, minio: MinioServer, workdir: Path, prefix: str
) -> Iterator[OperatorEnv]:
    """The operator on a namespace of its own, storing into a fresh MinIO bucket with credentials from a Secret."""
    api_client = cluster.api_client()
    namespace = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(namespace, store_secret(minio.config))
    store = minio.store()
    store_root = f"s3://{namespace}"
    store.ensure_bucket(store_root)
    fake_trainer = [sys.executable, str(Path(__file__).parent / "fake_trainer.py")]
    settings = {
        **minio.env(),
        "CARTRIDGES_STORE_ROOT": store_root,
        "CARTRIDGES_TRAINER_COMMAND": json.dumps(fake_trainer),
    }
    env = OperatorEnv.start(cluster.kubeconfig, namespace, api_client, harness, store, workdir, settings)
    yield env
    env.operator.stop()
    core.delete_namespace(namespace)


@pytest.fixture(scope="module")
def operator_env(
    k8s_cluster: Cluster,
    node_harness: NodeHarness,
    crds_installed: None,
    minio_server: MinioServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorEnv]:
    yield from _operator_env(k8s_cluster, node_harness, minio_server, tmp_path_factory.mktemp("operator"), "op")


@pytest.fixture(scope="module")
def operator_env_tls(
    k8s_cluster: Cluster,
    node_harness: NodeHarness,
    crds_installed: None,
    minio_tls_server: MinioServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorEnv]:
    """The same against a store that serves TLS with a private CA: the CA's PEM is in the namespace's Secret."""
    workdir = tmp_path_factory.mktemp("operator-tls")
    yield from _operator_env(k8s_cluster, node_harness, minio_tls_server, workdir, "tls")


@pytest.fixture
def web_server() -> Iterator[WebPage]:
    with serve_page() as page:
        yield page
