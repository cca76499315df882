"""Session-wide real services for the tests: each starts on free loopback ports and stops afterwards.

Start-up times are collected and printed at the end of the run, so CI shows what each service cost.
"""

from __future__ import annotations

import os

# Kernel tests run through the Triton interpreter, which triton reads once at import; transformers imports triton
# (via torch) as soon as a model module loads, so switch it on before anything below is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cartridges.models import LoadedModel, load_base_model, tiny_llama
from cartridges.process import interrupt_on_sigterm

if TYPE_CHECKING:
    from cartridges_e2e.cluster import Cluster
    from cartridges_e2e.minio import MinioServer
    from cartridges_e2e.node import NodeHarness
    from cartridges_e2e.triton import TritonFactory

SERVICE_TIMINGS: dict[str, float] = {}


def record_timing(name: str, seconds: float) -> None:
    SERVICE_TIMINGS[name] = seconds


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM to the test run (a CI job's timeout, ``kill``) stops it as Ctrl-C does, tearing the fixtures down:
    otherwise the run dies at once and every service it started, each in a session of its own, runs on."""
    interrupt_on_sigterm()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SERVICE_TIMINGS:
        terminalreporter.section("service start-up")
        for name, seconds in SERVICE_TIMINGS.items():
            terminalreporter.write_line(f"{name:<32} {seconds:7.1f}s")


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    from cartridges_e2e.minio import start_minio

    started = time.monotonic()
    server = start_minio(tmp_path_factory.mktemp("minio"))
    record_timing("minio (build if needed + start)", time.monotonic() - started)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def minio_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """A second MinIO, serving TLS with a certificate of a private CA (its PEM in ``config.ca_pem``)."""
    from cartridges_e2e.minio import start_minio
    from cartridges_e2e.pki import Pki

    workdir = tmp_path_factory.mktemp("minio-tls")
    started = time.monotonic()
    server = start_minio(workdir, Pki(workdir / "pki"))
    record_timing("minio with TLS (start)", time.monotonic() - started)
    yield server
    server.stop()


@pytest.fixture
def s3_prefix(minio_server: MinioServer, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for one test, as an ``s3://`` prefix."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{slug}-{time.monotonic_ns() % 10**6}"
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
def triton_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonFactory]:
    """Starts Triton once per model repository (and env) for the whole session; stops them all at the end."""
    from cartridges.tritonserver import TritonServer, start_triton

    servers: dict[tuple[str, str], TritonServer] = {}

    def start(model_repository: Path, env: dict[str, str] | None = None) -> TritonServer:
        key = (str(model_repository.resolve()), repr(sorted((env or {}).items())))
        if key not in servers:
            started = time.monotonic()
            servers[key] = start_triton(model_repository.resolve(), tmp_path_factory.mktemp("triton"), env)
            record_timing(f"triton ({model_repository.name}, start)", time.monotonic() - started)
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd + kube-apiserver + kube-controller-manager; ``.kubeconfig`` and ``.api_client()`` reach it."""
    from cartridges_e2e.cluster import start_cluster

    started = time.monotonic()
    cluster = start_cluster(tmp_path_factory.mktemp("k8s"))
    record_timing("kubernetes control plane (build if needed + start)", time.monotonic() - started)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def node_harness(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHarness]:
    """The node that binds and runs every pod of the session; ``.script()`` gives pods canned outcomes."""
    from cartridges_e2e.node import NodeHarness

    harness = NodeHarness(k8s_cluster.api_client(), tmp_path_factory.mktemp("node")).start()
    yield harness
    harness.stop()
