"""Triton from the nvidia-pytriton wheel on CPU: its protocols and the stub environment the router needs."""

from __future__ import annotations

import json
import queue
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import cartridges
from cartridges.contract import ADMIN_HEADER
from cartridges.process import ServiceError, http_ok, stop_group
from cartridges.tritonserver import (
    SHM_DIR,
    SHM_PREFIX_FLAG,
    TritonServer,
    first_error,
    remove_shm_regions,
    start_triton,
)
from cartridges_e2e.triton import TritonFactory

pytestmark = pytest.mark.triton

MODELS = Path(__file__).parent / "triton_models"


@pytest.fixture(scope="module")
def triton(triton_server_factory: TritonFactory) -> TritonServer:
    return triton_server_factory(MODELS)


def post_json(url: str, body: dict[str, Any]) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return bytes(response.read())


def test_health_and_metrics(triton: TritonServer) -> None:
    assert http_ok(f"{triton.http_url}/v2/health/live")
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()


def test_http_infer(triton: TritonServer) -> None:
    client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    text = httpclient.InferInput("text_input", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"hello", b"cartridges"], dtype=np.object_))
    result = client.infer("echo", [text])
    assert result.as_numpy("text_output").tolist() == [b"HELLO", b"CARTRIDGES"]


def test_grpc_stream_from_decoupled_model(triton: TritonServer) -> None:
    """Several responses for one request, ended by an empty final one, as token streaming will work."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"one two three"], dtype=np.object_))
        client.async_stream_infer("echo_stream", [text], enable_empty_final_response=True)
        words = []
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            words.extend(result.as_numpy("text_output").tolist())
    finally:
        client.stop_stream()
        client.close()
    assert words == [b"ONE", b"TWO", b"THREE"]


def test_generate_endpoint(triton: TritonServer) -> None:
    body = json.loads(post_json(f"{triton.http_url}/v2/models/echo/generate", {"text_input": "hello world"}))
    assert body["text_output"] == "HELLO WORLD"


def test_generate_stream_endpoint(triton: TritonServer) -> None:
    events = post_json(f"{triton.http_url}/v2/models/echo_stream/generate_stream", {"text_input": "one two"})
    chunks = [json.loads(line[len(b"data: ") :]) for line in events.splitlines() if line.startswith(b"data: ")]
    assert [chunk["text_output"] for chunk in chunks] == ["ONE", "TWO"]


def test_stub_runs_in_project_environment(triton: TritonServer) -> None:
    """The stub imports numpy < 2, torch and the checkout under test, with this interpreter's libpython."""
    body = json.loads(post_json(f"{triton.http_url}/v2/models/env_probe/generate", {"text_input": ""}))
    report = json.loads(body["text_output"])
    assert report["numpy"] == np.__version__
    assert report["numpy"].startswith("1.")
    assert report["torch"] == torch.__version__
    assert report["cartridges"] == cartridges.__version__
    assert report["cartridges_file"] == cartridges.__file__
    assert report["python"] == sys.version


# A region named like the Python backend's own IPC region: registering it is the first step of CVE-2025-23319.
SHM_REGISTER = {"key": "/triton_python_backend_shm_region_1", "offset": 0, "byte_size": 64}
ADMIN_REQUESTS = [
    ("POST", "v2/systemsharedmemory/region/x/register", SHM_REGISTER),
    ("POST", "v2/cudasharedmemory/region/x/register", {"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 64}),
    ("POST", "v2/logging", {"log_verbose_level": 3}),
    ("POST", "v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
    ("POST", "v2/repository/index", {}),
    ("GET", "v2/models/stats", None),
    ("GET", "v2/models/echo/config", None),
]


def http_status(url: str, method: str, body: dict[str, Any] | None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_REQUESTS, ids=[path for _, path, _ in ADMIN_REQUESTS])
def test_admin_apis_are_refused_over_http(triton: TritonServer, method: str, path: str, body: Any) -> None:
    assert http_status(f"{triton.http_url}/{path}", method, body) == 403
    assert http_ok(f"{triton.http_url}/v2/health/ready")
    answer = json.loads(post_json(f"{triton.http_url}/v2/models/echo/generate", {"text_input": "still served"}))
    assert answer["text_output"] == "STILL SERVED"


def test_admin_protocols_are_refused_over_grpc(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.register_system_shared_memory("x", SHM_REGISTER["key"], 64)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.update_log_settings({"log_verbose_level": 3})
        assert client.is_server_live() and client.is_model_ready("echo")
    finally:
        client.close()


def test_no_header_opens_the_admin_apis(triton: TritonServer) -> None:
    """The header the restriction names cannot be sent: its name would end at its first colon."""
    name, rest = ADMIN_HEADER.split(":", 1)
    for header in (f"{ADMIN_HEADER}: never", f"{name}: {rest}=never", f"{name}:{rest}:never"):
        body = b'{"log_verbose_level": 3}'
        request = f"POST /v2/logging HTTP/1.1\r\nHost: x\r\n{header}\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", triton.http_port), timeout=30) as connection:
            connection.sendall(request.encode() + body)
            assert connection.recv(64).startswith(b"HTTP/1.1 403 "), header


def test_load_failure_reports_model_error(tmp_path: Path) -> None:
    model = tmp_path / "models" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text((MODELS / "echo" / "config.pbtxt").read_text())
    (model / "1" / "model.py").write_text("raise RuntimeError('broken on purpose')\n")
    with pytest.raises(ServiceError, match="broken on purpose") as raised:
        start_triton(tmp_path / "models", tmp_path / "work", log_path=tmp_path / "logs" / "triton.log")
    message = str(raised.value)
    assert "\n" not in message and "At:" not in message  # the first error, not the log's tables and tracebacks
    assert f"(log: {tmp_path / 'logs' / 'triton.log'})" in message
    assert "broken on purpose" in (tmp_path / "logs" / "triton.log").read_text()


def test_the_shared_memory_a_killed_server_leaves_is_removed_and_only_its_own(tmp_path: Path) -> None:
    """Killed at once (the node harness's zero grace period), Triton leaves its Python backend's regions in
    /dev/shm; another server's regions stay."""
    server = start_triton(MODELS, tmp_path / "work")
    stop_group(server.service.proc, 0.0)
    argv = cast("list[str]", server.service.proc.args)  # the list Service gave Popen
    prefix = next(arg.removeprefix(SHM_PREFIX_FLAG) for arg in argv if arg.startswith(SHM_PREFIX_FLAG))
    assert list(SHM_DIR.glob(f"{prefix}*")), "nothing to remove: the server removed its regions itself"
    other = SHM_DIR / f"{prefix[:-1]}-not-its-own"  # another server's prefix, the same but for its last character
    other.touch()
    try:
        remove_shm_regions(argv)
        assert list(SHM_DIR.glob(f"{prefix}*")) == [] and other.exists()
    finally:
        other.unlink()


def test_first_error_prefers_a_model_load_failure_and_skips_cpu_noise(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    log.write_text(
        'I1206 22:17:03.700000 1 server.cc:100] "starting"\n'
        'E1206 22:17:03.766504 1 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        'E1206 22:17:17.860147 1 backend_model.cc:692] "ERROR: Failed to create instance: boom\\n\\nAt:\\n x.py"\n'
        "E1206 22:17:17.860358 1 lifecycle.cc:642] \"failed to load 'router' version 1: Internal: boom\\n\\nAt:\"\n"
        "error: creating server: Internal - failed to load all models\n"
    )
    assert first_error(log) == "failed to load 'router' version 1: Internal: boom"
    log.write_text('E1206 22:17:03.766504 1 server.cc:241] "CudaDriverHelper has not been initialized."\n')
    assert first_error(log) is None
