"""Session-wide real services for the tests: each starts on free loopback ports and stops afterwards.

Start-up times are collected and printed at the end of the run, so CI shows what each service cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cartridges.models import LoadedModel, load_base_model, tiny_llama

SERVICE_TIMINGS: dict[str, float] = {}


def record_timing(name: str, seconds: float) -> None:
    SERVICE_TIMINGS[name] = seconds


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SERVICE_TIMINGS:
        terminalreporter.section("service start-up")
        for name, seconds in SERVICE_TIMINGS.items():
            terminalreporter.write_line(f"{name:<32} {seconds:7.1f}s")


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from cartridges_e2e.minio import start_minio

    started = time.monotonic()
    server = start_minio(tmp_path_factory.mktemp("minio"))
    record_timing("minio (build if needed + start)", time.monotonic() - started)
    yield server
    server.stop()


@pytest.fixture
def s3_prefix(minio_server: object, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for one test, as an ``s3://`` prefix."""
    from cartridges_e2e.minio import MinioServer

    assert isinstance(minio_server, MinioServer)
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{time.monotonic_ns() % 10**6}"
    uri = f"s3://{name}/"
    minio_server.store().ensure_bucket(uri)
    return uri


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    from cartridges.embedded import smollm2_gguf

    started = time.monotonic()
    model = load_base_model(smollm2_gguf())
    record_timing("SmolLM2-135M-Instruct load", time.monotonic() - started)
    return model


@pytest.fixture
def file_store_root(tmp_path: Path) -> str:
    return f"file://{tmp_path}/store"


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """etcd + kube-apiserver + kube-controller-manager; ``.kubeconfig`` and ``.api_client()`` reach it."""
    from cartridges_e2e.cluster import start_cluster

    started = time.monotonic()
    cluster = start_cluster(tmp_path_factory.mktemp("k8s"))
    record_timing("kubernetes control plane (build if needed + start)", time.monotonic() - started)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def node_harness(k8s_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The node that binds and runs every pod of the session; ``.script()`` gives pods canned outcomes."""
    from cartridges_e2e.cluster import Cluster
    from cartridges_e2e.node import NodeHarness

    assert isinstance(k8s_cluster, Cluster)
    harness = NodeHarness(k8s_cluster.api_client(), tmp_path_factory.mktemp("node")).start()
    yield harness
    harness.stop()
