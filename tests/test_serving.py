"""The router model in a real Triton server: HTTP generate(_stream), gRPC streaming, errors, tenancy, metrics.

The server loads the tiny model from an HF directory in a ``file://`` store and cartridges from the same store;
answers are checked against an engine running in the test process on the same model and cartridges.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _cartridge_store import publish, random_cartridge

from cartridges import client
from cartridges.artifact import TENSORS_FILE
from cartridges.models import LoadedModel, load_base_model
from cartridges.process import free_port, http_ok
from cartridges.store import Store
from cartridges.tritonserver import TritonServer, start_triton
from cartridges_e2e.triton import TritonFactory
from cartridges_serving import MODEL_REPOSITORY, CartridgeCache, Engine, SamplingParams
from cartridges_serving.cache import DEFAULT_POINTER_TTL_S
from cartridges_serving.runner import LlamaRunner

pytestmark = pytest.mark.triton

REPOSITORY = MODEL_REPOSITORY
NAMESPACE = "team-a"
MAX_TOKENS = 8
KV_TOKENS = 128  # own KV reserved for all requests: a few at once, so 32 concurrent ones queue for it

WAIT_S = 60.0  # a failure guard only: what the tests wait for comes long before, even on a loaded machine


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"file://{tmp_path_factory.mktemp('serving-store')}"


@pytest.fixture(scope="module")
def served_model(store_root: str, tiny_model: LoadedModel) -> LoadedModel:
    """The tiny model saved as an HF directory in the store, loaded back the way the server loads it."""
    directory = Path(store_root.removeprefix("file://")) / "models" / "tiny"
    tiny_model.model.save_pretrained(directory)
    tiny_model.tokenizer.save_pretrained(directory)
    return load_base_model(f"{store_root}/models/tiny", store=Store())


@pytest.fixture(scope="module")
def cartridge_ids(store_root: str, served_model: LoadedModel, tiny_model: LoadedModel) -> None:
    """alpha, beta (good), other-model (trained for another model), corrupt; team-b/secret elsewhere."""
    store, fingerprint = Store(), served_model.fingerprint
    publish(store, store_root, NAMESPACE, "alpha", random_cartridge(fingerprint, 6, 0), fingerprint)
    publish(store, store_root, NAMESPACE, "beta", random_cartridge(fingerprint, 4, 1), fingerprint)
    publish(store, store_root, "team-b", "secret", random_cartridge(fingerprint, 4, 2), fingerprint)
    other = tiny_model.fingerprint  # same architecture, but not the served weights' hash
    publish(store, store_root, NAMESPACE, "other-model", random_cartridge(other, 4, 3), other)
    corrupt = publish(store, store_root, NAMESPACE, "corrupt", random_cartridge(fingerprint, 4, 4), fingerprint)
    tensors = Path(corrupt.removeprefix("file://")) / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-8] + bytes(8))


@pytest.fixture(scope="module")
def server(
    triton_server_factory: TritonFactory, store_root: str, served_model: LoadedModel, cartridge_ids: None
) -> TritonServer:
    return triton_server_factory(REPOSITORY, server_env(store_root, served_model))


def server_env(store_root: str, served_model: LoadedModel) -> dict[str, str]:
    return {
        "CARTRIDGES_MODEL_URI": f"{store_root}/models/tiny",
        "CARTRIDGES_STORE_ROOT": store_root,
        "CARTRIDGES_NAMESPACE": NAMESPACE,
        "CARTRIDGES_CACHE_BYTES": str(1 << 20),
        "CARTRIDGES_KV_BYTES": str(KV_TOKENS * LlamaRunner(served_model.model).own_kv_pool.row_bytes),
        "CARTRIDGES_DTYPE": "float32",  # the reference's dtype and KV row size, also where the server sees a GPU
    }


@pytest.fixture(scope="module")
def reference(served_model: LoadedModel, store_root: str, cartridge_ids: None) -> Iterator[Engine]:
    """The engine in this process on the same model and cartridges: what the server must answer."""
    cache = CartridgeCache(Store(), store_root, NAMESPACE, served_model.fingerprint, 1 << 20)
    engine = Engine(served_model, cache)
    yield engine
    engine.close()


def expected(reference: Engine, prompt: str, cartridges: list[str], max_tokens: int = MAX_TOKENS) -> str:
    return reference.generate(prompt, cartridges, SamplingParams(max_tokens=max_tokens)).text


def test_answers_equal_the_engine_with_zero_one_two_cartridges(server: TritonServer, reference: Engine) -> None:
    answers = {}
    for names in ([], ["alpha"], ["alpha", "beta"]):
        answer = client.generate(server.http_url, "What is in the handbook?", names, max_tokens=MAX_TOKENS)
        assert answer == expected(reference, "What is in the handbook?", names)
        answers[len(names)] = answer
    assert len(set(answers.values())) == 3, "each composition should change the answer"


def test_http_stream_yields_the_same_text(server: TritonServer, reference: Engine) -> None:
    chunks = list(client.generate(server.http_url, "Stream it", ["beta"], max_tokens=MAX_TOKENS, stream=True))
    assert len(chunks) > 1
    assert "".join(chunks) == expected(reference, "Stream it", ["beta"])


def test_grpc_streaming(server: TritonServer, reference: Engine) -> None:
    inputs = {
        "text_input": np.array([b"Over gRPC"], dtype=np.object_),
        "max_tokens": np.array([MAX_TOKENS], dtype=np.int32),
        "stream": np.array([True]),
        "cartridges": np.array([b"beta", b"alpha"], dtype=np.object_),
    }
    chunks = list(client.grpc_stream(server.grpc_url, inputs))
    assert len(chunks) > 1
    assert "".join(chunks) == expected(reference, "Over gRPC", ["beta", "alpha"])


@pytest.mark.parametrize("names", [[], ["alpha"], ["beta", "alpha"]])
def test_client_grpc_and_http_give_the_same_greedy_text(
    server: TritonServer, reference: Engine, names: list[str]
) -> None:
    grpc_url = f"grpc://{server.grpc_url}"
    http = client.generate(server.http_url, "Same answer?", names, max_tokens=MAX_TOKENS)
    assert client.generate(grpc_url, "Same answer?", names, max_tokens=MAX_TOKENS) == http
    assert "".join(client.generate(grpc_url, "Same answer?", names, max_tokens=MAX_TOKENS, stream=True)) == http
    assert http == expected(reference, "Same answer?", names)


def generations_by_transport(server: TritonServer, names: list[str]) -> dict[str, tuple[int, ...] | None]:
    """The generations each transport's answer names: HTTP generate, HTTP generate_stream and a gRPC stream."""
    grpc_url = f"grpc://{server.grpc_url}"
    http_stream = client.generate(server.http_url, "Which one?", names, max_tokens=MAX_TOKENS, stream=True)
    grpc = client.generate(grpc_url, "Which one?", names, max_tokens=MAX_TOKENS, stream=True)
    return {
        "HTTP": client.generate(server.http_url, "Which one?", names, max_tokens=MAX_TOKENS).generations,
        "HTTP stream": http_stream.answer().generations,
        "gRPC stream": grpc.answer().generations,
    }


def promote(store_root: str, served_model: LoadedModel, name: str, generation: int) -> str:
    fingerprint = served_model.fingerprint
    cartridge = random_cartridge(fingerprint, 4, generation)
    return publish(Store(), store_root, NAMESPACE, name, cartridge, fingerprint, generation=generation)


def test_answers_name_the_generation_of_each_cartridge(
    server: TritonServer, store_root: str, served_model: LoadedModel
) -> None:
    """Every transport names the generations that answered, in composition order; a promotion shows in the next
    answer after the pointer TTL, and an unusable one leaves the generation before it answering."""
    promote(store_root, served_model, "gen-a", 3)
    promote(store_root, served_model, "gen-b", 7)
    transports = ("HTTP", "HTTP stream", "gRPC stream")
    assert generations_by_transport(server, ["gen-b", "gen-a"]) == dict.fromkeys(transports, (7, 3))
    assert generations_by_transport(server, ["gen-a", "gen-b", "gen-a"]) == dict.fromkeys(transports, (3, 7, 3))
    assert generations_by_transport(server, []) == dict.fromkeys(transports, ())
    promote(store_root, served_model, "gen-a", 4)
    deadline = time.monotonic() + WAIT_S
    while client.generate(server.http_url, "hi", ["gen-a"], max_tokens=1).generations != (4,):
        assert time.monotonic() < deadline, "the promoted generation never answered"
        time.sleep(0.2)
    assert generations_by_transport(server, ["gen-b", "gen-a"]) == dict.fromkeys(transports, (7, 4))
    tensors = Path(promote(store_root, served_model, "gen-a", 5).removeprefix("file://")) / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-8] + bytes(8))
    time.sleep(DEFAULT_POINTER_TTL_S + 0.5)
    assert generations_by_transport(server, ["gen-a"]) == dict.fromkeys(transports, (4,))


def test_client_grpc_errors_are_clear(server: TritonServer) -> None:
    """The model's own message, not a transport error; Triton sends it in-band on the stream, without a code."""
    grpc_url = f"grpc://{server.grpc_url}"
    with pytest.raises(client.GenerateError, match="^cartridge 'missing' not found in namespace 'team-a'") as error:
        client.generate(grpc_url, "hi", ["missing"], max_tokens=2)
    assert error.value.kind == "not_found"
    with pytest.raises(client.GenerateError, match="^max_tokens must be >= 0, got -1") as error:
        list(client.generate(grpc_url, "hi", max_tokens=-1, stream=True))
    assert error.value.kind == "invalid_argument"
    with pytest.raises(client.GenerateError, match="cannot reach") as error:
        client.generate(f"grpc://127.0.0.1:{free_port()}", "anyone there?", timeout=5)
    assert error.value.kind is None and error.value.unreachable


UNUSABLE = [("missing", "not_found"), ("other-model", "unusable_cartridge"), ("corrupt", "unusable_cartridge"),
            ("../x", "invalid_argument")]  # fmt: skip


@pytest.mark.parametrize(("cartridge", "kind"), UNUSABLE)
def test_errors_carry_their_kind_over_http_and_grpc_streams(server: TritonServer, cartridge: str, kind: str) -> None:
    """The kind the router marks survives Triton's HTTP 400 body, its refused server-sent event stream and its
    in-band gRPC stream error: all a client has to tell a missing cartridge from one it cannot use."""
    grpc_url, names = f"grpc://{server.grpc_url}", [cartridge]
    asks: dict[str, Callable[[], object]] = {
        "HTTP": lambda: client.generate(server.http_url, "hi", names, max_tokens=2),
        "HTTP stream": lambda: list(client.generate(server.http_url, "hi", names, max_tokens=2, stream=True)),
        "gRPC stream": lambda: list(client.generate(grpc_url, "hi", names, max_tokens=2, stream=True)),
    }
    for transport, ask in asks.items():
        with pytest.raises(client.GenerateError) as error:
            ask()
        assert (transport, error.value.kind) == (transport, kind)
        assert error.value.message.startswith("cartridge "), error.value.message


def test_32_concurrent_mixed_requests(server: TritonServer, reference: Engine) -> None:
    compositions: list[list[str]] = [[], ["alpha"], ["beta"], ["alpha", "beta"]]
    jobs = [(f"Question {i}?", compositions[i % 4]) for i in range(32)]
    wanted = [expected(reference, prompt, names, 6) for prompt, names in jobs]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: client.generate(server.http_url, *job, max_tokens=6, timeout=120), jobs))
    assert answers == wanted


@pytest.mark.parametrize(
    ("body", "status", "kind", "message"),
    [
        ({"cartridges": ["missing"]}, 400, "not_found", "cartridge 'missing' not found in namespace 'team-a'"),
        ({"cartridges": ["../team-b/secret"]}, 400, "invalid_argument", "not a cartridge name in namespace 'team-a'"),
        ({"cartridges": ["team-b/secret"]}, 400, "invalid_argument", "no '/' or '..'"),
        ({"cartridges": ["secret"]}, 400, "not_found", "not found in namespace 'team-a'"),
        ({"cartridges": ["other-model"]}, 400, "unusable_cartridge", "was trained for"),
        ({"cartridges": ["corrupt"]}, 400, "unusable_cartridge", "sha256"),
        ({"cartridges": ["alpha"] * 17}, 400, "invalid_argument", "composes at most 16 cartridges, got 17"),
        ({"max_tokens": 4096}, 400, "invalid_argument", "context window is 4096"),
        ({"text_input": ""}, 400, "invalid_argument", "prompt is empty"),
        ({"max_tokens": -1}, 400, "invalid_argument", "max_tokens must be >= 0"),
        ({"max_tokens": 1000}, 400, "invalid_argument", f"this server reserves {KV_TOKENS} for all requests"),
        ({"max_tokens": "many"}, 500, None, "Unable to parse 'data'"),
        ({"temperature": -0.5}, 400, "invalid_argument", "temperature must be"),
    ],
)
def test_bad_request_gets_its_error_while_others_continue(
    server: TritonServer, reference: Engine, body: dict[str, Any], status: int, kind: str | None, message: str
) -> None:
    """Triton's generate endpoint answers every model error with HTTP 400 and the model's message, its kind
    marked; a JSON value of the wrong type never reaches the model (Triton's own parser answers 500, no kind)."""
    good: list[str] = []
    streaming = threading.Thread(
        target=lambda: good.extend(client.generate(server.http_url, "Meanwhile", ["alpha"], max_tokens=16, stream=True))
    )
    streaming.start()
    request = {"text_input": "Hello", "max_tokens": MAX_TOKENS, **body}
    with pytest.raises(client.GenerateError, match=message) as failure:
        client.generate(server.http_url, request.pop("text_input"), request.pop("cartridges", ()), **request)
    assert (failure.value.status, failure.value.kind) == (status, kind)
    streaming.join(60)
    assert "".join(good) == expected(reference, "Meanwhile", ["alpha"], 16)
    assert http_ok(f"{server.http_url}/v2/health/ready")


def test_grpc_stream_errors(server: TritonServer) -> None:
    """A stream reports the request's error (Triton refuses a wrong tensor type before the model sees it)."""
    missing = {
        "text_input": np.array([b"hi"], dtype=np.object_),
        "cartridges": np.array([b"missing"], dtype=np.object_),
        "max_tokens": np.array([4], dtype=np.int32),  # within the KV this server reserves, checked before loading
    }
    with pytest.raises(client.GenerateError, match="cartridge 'missing' not found") as error:
        list(client.grpc_stream(server.grpc_url, missing))
    assert error.value.kind == "not_found"
    typed = {"text_input": np.array([b"typed"], dtype=np.object_), "max_tokens": np.array([1.5], dtype=np.float32)}
    with pytest.raises(client.GenerateError, match="max_tokens.*FP32.*INT32|max_tokens.*INT32") as error:
        list(client.grpc_stream(server.grpc_url, typed))
    assert error.value.kind is None  # Triton's own refusal: no kind


def scrape(server: TritonServer) -> dict[str, float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("cartridges_")}


def scraped(server: TritonServer, done: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """The metrics once ``done`` holds for them, else as they are after ``WAIT_S`` (a failure guard: they are
    refreshed about once a second, later on a loaded machine) for the caller's assertion to show."""
    deadline = time.monotonic() + WAIT_S
    while not done(metrics := scrape(server)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return metrics


def test_engine_metrics_are_exported(server: TritonServer) -> None:
    """Custom metrics on Triton's metrics port, refreshed from the engine about once a second."""
    tokens = 'cartridges_tokens_generated{model="router"}'
    before = scrape(server).get(tokens, 0.0)
    client.generate(server.http_url, "count me", ["alpha"], max_tokens=2)
    metrics = scraped(server, lambda m: m.get(tokens, 0.0) >= before + 2)
    assert metrics[tokens] >= before + 2
    assert metrics['cartridges_cache_misses{model="router"}'] >= 1
    assert metrics['cartridges_cache_bytes{model="router"}'] > 0
    assert metrics['cartridges_kv_pool_bytes{model="router"}'] > 0  # reserved at start (CARTRIDGES_KV_BYTES)
    for name in ("running", "queued", "preparing", "tokens_per_s", "cache_hits", "cache_entries",
                 "cache_in_use_bytes", "requests_finished", "kv_used_bytes", "kv_waiting", "cuda_graphs_off",
                 "cuda_graph_replays"):  # fmt: skip
        assert f'cartridges_{name}{{model="router"}}' in metrics


def refused(metrics: dict[str, float]) -> dict[str, float]:
    """``cartridges_requests_refused`` by its status label."""
    series = {key: value for key, value in metrics.items() if key.startswith("cartridges_requests_refused{")}
    return {key.split('status="')[1].split('"')[0]: value for key, value in series.items()}


def test_refused_requests_are_counted_by_status(
    store_root: str, served_model: LoadedModel, cartridge_ids: None, tmp_path: Path
) -> None:
    """Requests refused before they run (Triton counts them as successes) show in ``cartridges_requests_refused``.
    On a server of its own, whose counts start at zero: on the shared one, an earlier test's refusal could still be
    on its way to the metrics (published about once a second) when the counts to add to are read."""
    server = start_triton(REPOSITORY.resolve(), tmp_path, server_env(store_root, served_model))
    try:
        zero = {"invalid_argument": 0.0, "not_found": 0.0, "unavailable": 0.0, "internal": 0.0}
        assert refused(scraped(server, lambda m: bool(refused(m)))) == zero
        for names, temperature in ((["missing"], 0.0), (["Bad/Id"], 0.0), ([], -1.0)):
            with pytest.raises(client.GenerateError):
                client.generate(server.http_url, "hi", names, max_tokens=2, temperature=temperature)
        wanted = {**zero, "not_found": 1.0, "invalid_argument": 2.0}
        assert refused(scraped(server, lambda m: refused(m) == wanted)) == wanted
    finally:
        server.stop()


def test_client_reports_an_unreachable_server() -> None:
    with pytest.raises(client.GenerateError, match="cannot reach") as failure:
        client.generate(f"http://127.0.0.1:{free_port()}", "anyone there?", timeout=5)
    assert failure.value.status is None
