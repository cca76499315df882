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
from cartridges_e2e.node import NodeHarness
from cartridges_e2e.operator_env import OperatorEnv, install_crds, store_secret


@pytest.fixture(scope="session")
def crds_installed(k8s_cluster: Cluster) -> None:
    install_crds(k8s_cluster.api_client())


@pytest.fixture(scope="module")
def operator_env(
    k8s_cluster: Cluster, node_harness: NodeHarness, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorEnv]:
    api_client = k8s_cluster.api_client()
    namespace = f"op-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(namespace, store_secret())
    workdir = tmp_path_factory.mktemp("operator")
    store_root = f"file://{workdir}/store"
    fake_trainer = [sys.executable, str(Path(__file__).parent / "fake_trainer.py")]
    settings = {"CARTRIDGES_STORE_ROOT": store_root, "CARTRIDGES_TRAINER_COMMAND": json.dumps(fake_trainer)}
    env = OperatorEnv.start(k8s_cluster.kubeconfig, namespace, api_client, node_harness, workdir, settings)
    yield env
    env.operator.stop()
    core.delete_namespace(namespace)
