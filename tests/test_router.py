"""The Triton router without a server: a stand-in ``triton_python_backend_utils`` records what would be sent, so
cancellation, refusals and a slow cartridge load are checked deterministically (the real server runs the router in
test_serving)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _cartridge_store import GatedStore, publish, random_cartridge

from cartridges.models import LoadedModel
from cartridges_serving import MODEL_REPOSITORY, CartridgeCache, Completion, Engine, SamplingParams, StreamEvent

WAIT_S = 60.0  # a failure guard only: every wait below ends on an event long before


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """router/1/model.py, imported against a stand-in for the module the Python backend's stub provides."""
    pb_utils = types.ModuleType("triton_python_backend_utils")
    pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    pb_utils.InferenceResponse = lambda *args, **kwargs: (args, kwargs)  # type: ignore[attr-defined]
    pb_utils.Tensor = lambda name, array: (name, array)  # type: ignore[attr-defined]
    pb_utils.TritonError = TritonError  # type: ignore[attr-defined]
    pb_utils.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    spec = importlib.util.spec_from_file_location("router_model", MODEL_REPOSITORY / "router" / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TritonError(Exception):
    INVALID_ARG, NOT_FOUND, UNAVAILABLE, INTERNAL = "INVALID_ARG", "NOT_FOUND", "UNAVAILABLE", "INTERNAL"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Request:
    def __init__(self) -> None:
        self.gone = False
        self.asked = threading.Event()

    def is_cancelled(self) -> bool:
        self.asked.set()
        return self.gone


class Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []
        self.final = threading.Event()

    def send(self, response: Any = None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags:
            self.final.set()


class Handle:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@pytest.fixture
def outbox(router: types.ModuleType) -> Iterator[Any]:
    outbox = router.Outbox(cancel_check_s=0.01)
    yield outbox
    outbox.stop()


def submitted(router: types.ModuleType, outbox: Any) -> tuple[Any, Request, Sender, Handle]:
    request, sender, handle = Request(), Sender(), Handle()
    responder = router.Responder(request, sender, False, outbox)
    responder.handle = handle
    outbox.track(responder)
    return responder, request, sender, handle


def test_a_client_that_goes_away_cancels_a_request_that_produces_nothing(router: Any, outbox: Any) -> None:
    """A queued request (or one reading a long prompt) has no events to deliver: it is still cancelled."""
    responder, request, sender, handle = submitted(router, outbox)
    _, other_request, _, other_handle = submitted(router, outbox)
    request.gone = True
    assert handle.cancelled.wait(WAIT_S), "the request of a client that went away was never cancelled"
    assert other_request.asked.wait(WAIT_S), "a live request was never asked"  # maybe after the other's cancel
    responder(StreamEvent("", completion=Completion("", [], "cancelled", 1, 0)))  # the engine retires it
    assert sender.final.wait(WAIT_S)
    assert responder not in outbox.live
    assert not other_handle.cancelled.is_set()  # the outbox ended that check before it delivered the final event


def test_an_ended_request_is_no_longer_watched(router: Any, outbox: Any) -> None:
    responder, _, sender, handle = submitted(router, outbox)
    responder(StreamEvent("partial "))
    responder(StreamEvent("text", completion=Completion("partial text", [1, 2], "length", 1, 0)))
    assert sender.final.wait(WAIT_S)
    assert responder not in outbox.live and responder.done
    outbox.track(responder)  # tracked only after its end (a request that finished at once): never watched
    assert responder not in outbox.live
    assert [flags for _, flags in sender.sent] == [1] and not handle.cancelled.is_set()


@pytest.mark.parametrize("stream", [False, True])
def test_the_last_response_names_the_generations(router: Any, outbox: Any, stream: bool) -> None:
    """Chunks carry text only; the last response carries the rest of the text (even none) and the generations, so
    a stream whose last event has no text still tells which generations answered."""
    responder, _, sender, _ = submitted(router, outbox)
    responder.stream = stream
    responder(StreamEvent("partial"))
    responder(StreamEvent("", completion=Completion("partial", [1], "length", 1, 8, generations=(7, 3))))
    assert sender.final.wait(WAIT_S)
    responses = [(dict(response[0][0]), flags) for response, flags in sender.sent]
    *chunks, (last, flags) = responses
    assert flags and last["cartridge_generations"].tolist() == [7, 3]
    assert last["cartridge_generations"].dtype == np.int64
    assert [chunk["text_output"][0] for chunk, _ in chunks] == ([b"partial"] if stream else [])
    assert last["text_output"][0] == (b"" if stream else b"partial")


MAX_TOKENS = 6


def texts(*values: str) -> np.ndarray:
    return np.array([value.encode() for value in values], dtype=np.object_)


class Tensor:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def as_numpy(self) -> np.ndarray:
        return self.array


class Inference(Request):
    """A request as ``execute`` gets it: input tensors and the sender of its responses."""

    def __init__(self, prompt: str, cartridges: tuple[str, ...] = (), **inputs: np.ndarray) -> None:
        super().__init__()
        arrays = {"text_input": texts(prompt), "max_tokens": np.array([MAX_TOKENS], dtype=np.int32), **inputs}
        if cartridges:
            arrays["cartridges"] = texts(*cartridges)
        self.tensors = {name: Tensor(array) for name, array in arrays.items()}
        self.sender = Sender()

    def get_response_sender(self) -> Sender:
        return self.sender

    def outputs(self) -> dict[str, np.ndarray]:
        """The one response's tensors by name (a request that is not streamed gets one)."""
        (response, flags), *rest = self.sender.sent
        assert not rest and flags, self.sender.sent
        args, kwargs = response
        assert "error" not in kwargs, kwargs["error"]
        return dict(args[0])

    def text(self) -> str:
        return str(self.outputs()["text_output"][0].decode())

    def error(self) -> TritonError:
        ((response, flags),) = self.sender.sent
        assert flags
        return response[1]["error"]


@pytest.fixture
def served(router: Any, tiny_model: LoadedModel, tmp_path: Path) -> Iterator[tuple[Any, GatedStore]]:
    """The router model on a real engine whose store holds the download of cartridge "slow" until released."""
    root, store = f"file://{tmp_path}", GatedStore("slow")
    for seed, name in enumerate(("slow", "quick")):
        publish(store, root, "team-a", name, random_cartridge(tiny_model.fingerprint, 4, seed), tiny_model.fingerprint)
    model = router.TritonPythonModel()
    model.engine = Engine(tiny_model, CartridgeCache(store, root, "team-a", tiny_model.fingerprint, 1 << 20))
    model.outbox = router.Outbox()
    try:
        yield model, store
    finally:
        store.release.set()
        model.outbox.stop()
        model.engine.close()


def test_a_slow_cartridge_load_holds_up_no_other_request(served: tuple[Any, GatedStore]) -> None:
    """``execute`` runs one call at a time: it must hand a request over, not wait for its cartridges' load."""
    model, store = served
    wanted = {
        names: model.engine.generate("hello", list(names), SamplingParams(max_tokens=MAX_TOKENS)).text
        for names in ((), ("quick",))
    }
    slow, plain, cached = Inference("hello", ("slow",)), Inference("hello"), Inference("hello", ("quick",))
    model.execute([slow])
    assert store.started.wait(WAIT_S)
    model.execute([plain, cached])
    assert plain.sender.final.wait(WAIT_S) and cached.sender.final.wait(WAIT_S)
    assert (plain.text(), cached.text()) == (wanted[()], wanted[("quick",)])
    assert not slow.sender.sent  # its download is still held
    store.release.set()
    assert slow.sender.final.wait(WAIT_S)
    assert slow.text() == model.engine.generate("hello", ["slow"], SamplingParams(max_tokens=MAX_TOKENS)).text


def test_refused_requests_get_their_error_and_are_counted(served: tuple[Any, GatedStore]) -> None:
    """Malformed inputs (refused by the router) and unknown cartridges (refused by the engine) both answer with
    their error and count in ``requests_refused`` by status."""
    model, _ = served
    typed = Inference("hi", max_tokens=np.array([1.5], dtype=np.float32))
    missing, empty = Inference("hi", ("missing",)), Inference("")
    model.execute([typed, missing, empty])
    for request in (typed, missing, empty):
        assert request.sender.final.wait(WAIT_S)
    assert (typed.error().code, str(typed.error())) == ("INVALID_ARG", "[invalid_argument] input 'max_tokens' has "
                                                        "type float32, expected an integer")  # fmt: skip
    assert missing.error().code == "NOT_FOUND"
    assert str(missing.error()).startswith("[not_found] cartridge 'missing' not found")
    assert (empty.error().code, str(empty.error())) == ("INVALID_ARG", "[invalid_argument] the prompt is empty")
    assert model.engine.metrics().requests_refused == {"invalid_argument": 2, "not_found": 1}
