"""The Triton router's Outbox and Responder without a server: a stand-in ``triton_python_backend_utils`` records
what would be sent, so cancellation is checked deterministically (the real server runs them in test_serving)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

from cartridges_serving import MODEL_REPOSITORY, Completion, StreamEvent

WAIT_S = 60.0  # a failure guard only: every wait below ends on an event long before


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """router/1/model.py, imported against a stand-in for the module the Python backend's stub provides."""
    pb_utils = types.ModuleType("triton_python_backend_utils")
    pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    pb_utils.InferenceResponse = lambda *args, **kwargs: (args, kwargs)  # type: ignore[attr-defined]
    pb_utils.Tensor = lambda name, array: (name, array)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    spec = importlib.util.spec_from_file_location("router_model", MODEL_REPOSITORY / "router" / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Request:
    def __init__(self) -> None:
        self.gone = False
        self.asked = 0

    def is_cancelled(self) -> bool:
        self.asked += 1
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
    assert not other_handle.cancelled.is_set() and other_request.asked > 0
    responder(StreamEvent("", completion=Completion("", [], "cancelled", 1, 0)))  # the engine retires it
    assert sender.final.wait(WAIT_S)
    assert responder not in outbox.live


def test_an_ended_request_is_no_longer_watched(router: Any, outbox: Any) -> None:
    responder, _, sender, handle = submitted(router, outbox)
    responder(StreamEvent("partial "))
    responder(StreamEvent("text", completion=Completion("partial text", [1, 2], "length", 1, 0)))
    assert sender.final.wait(WAIT_S)
    assert responder not in outbox.live and responder.done
    outbox.track(responder)  # tracked only after its end (a request that finished at once): never watched
    assert responder not in outbox.live
    assert [flags for _, flags in sender.sent] == [1] and not handle.cancelled.is_set()
