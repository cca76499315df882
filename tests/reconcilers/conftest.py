"""A real operator process against the test control plane, with the node harness running its Jobs' pods."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from cartridges_e2e.cluster import Cluster
from cartridges_e2e.minio import MinioServer
from cartridges_e2e.node import NodeHarness
from cartridges_e2e.operator_env import OperatorEnv, install_crds, store_secret


@pytest.fixture(scope="session")
def crds_installed(k8s_cluster: Cluster) -> None:
    install_crds(k8s_cluster.api_client())


@pytest.fixture(scope="module")
def operator_env(
    k8s_cluster: Cluster,
    node_harness: NodeHarness,
    crds_installed: None,
    minio_server: MinioServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorEnv]:
    """The operator on a namespace of its own, storing into a fresh MinIO bucket with credentials from a Secret."""
    api_client = k8s_cluster.api_client()
    namespace = f"op-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(namespace, store_secret(minio_server.config))
    store = minio_server.store()
    store_root = f"s3://{namespace}"
    store.ensure_bucket(store_root)
    fake_trainer = [sys.executable, str(Path(__file__).parent / "fake_trainer.py")]
    settings = {
        **minio_server.env(),
        "CARTRIDGES_STORE_ROOT": store_root,
        "CARTRIDGES_TRAINER_COMMAND": json.dumps(fake_trainer),
    }
    workdir = tmp_path_factory.mktemp("operator")
    env = OperatorEnv.start(k8s_cluster.kubeconfig, namespace, api_client, node_harness, store, workdir, settings)
    yield env
    env.operator.stop()
    core.delete_namespace(namespace)
