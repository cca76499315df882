"""Triton Python-backend router (decoupled): parses the LLM-convention tensors and hands requests to the engine.

``execute`` only parses a request and submits it: the engine loads cartridges and tokenizes on its own loader
threads, so a slow cartridge load never holds up the requests after it. The engine answers on its threads through
a per-request callback (a refused request's error included); streaming requests get one response per
text chunk, others one response with the whole text; the last response also carries ``cartridge_generations``.
Sending a response and asking whether the client went away are round trips to the server process, so the callback
only queues the event and one outbox thread does the talking: the engine's decode steps never wait on IPC. The same
thread asks every live request, every ``CANCEL_CHECK_INTERVAL_S``, whether its client went away, whether or not the
request produces anything: a queued request or one reading a long prompt is cancelled too (the engine retires it
before its next step). Every failure is that request's error response; the model and the other requests carry on.
Configuration comes from the environment (see ``EngineConfig.from_env``).
"""

import json
import logging
import queue
import threading
import time
from typing import get_args

import numpy as np
import triton_python_backend_utils as pb_utils

from cartridges.error_kind import mark
from cartridges_serving import Engine, EngineConfig, EngineError, EngineMetrics, StreamEvent
from cartridges_serving.errors import Status
from cartridges_serving.protocol import INPUT_KINDS, parse_request

log = logging.getLogger("cartridges.router")
# Names of pb_utils.TritonError codes; the stub fills in pb_utils.TritonError only after this module is imported.
ERROR_CODES = {"invalid_argument": "INVALID_ARG", "not_found": "NOT_FOUND", "unavailable": "UNAVAILABLE"}
METRICS_INTERVAL_S = 1.0
CANCEL_CHECK_INTERVAL_S = 0.5  # how often the outbox asks the server whether each live request's client is there
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
GAUGES = {
    "running": "requests in the running batch",
    "queued": "requests waiting to join the batch",
    "preparing": "requests whose cartridges are loading or whose prompt is being tokenized",
    "tokens_per_s": "generated tokens per second, recent window",
    "cache_bytes": "bytes of cartridges held in the cache",
    "cache_entries": "cartridges held in the cache",
    "cache_in_use_bytes": "bytes of cached cartridges that requests use (kept even over the cache's budget)",
    "kv_pool_bytes": "bytes of the requests' own-KV pool",
    "kv_used_bytes": "bytes of the own-KV pool given to requests",
    "kv_waiting": "1 while the oldest queued request waits for own-KV memory",
    "cuda_graphs_off": "1 once CUDA graphs (serving.engine.cudaGraphs) were turned off after a failed capture",
}
COUNTERS = {
    "tokens_generated": "tokens generated",
    "requests_finished": "requests finished",
    "requests_failed": "requests failed inside the engine",
    "requests_refused": "requests refused before they ran (bad input, unknown cartridge, store unreachable), by status",
    "cache_hits": "cartridge cache hits",
    "cache_misses": "cartridge cache misses (loads from the object store)",
    "cuda_graph_replays": "decode steps replayed from CUDA graphs",
    "cuda_graph_captures": "decode steps captured into CUDA graphs",
}


def error_response(error: EngineError) -> "pb_utils.InferenceResponse":
    """The request's error, its kind marked in the message: Triton answers HTTP 400 whatever the code, and on a gRPC
    stream sends only the message, so the marker is what tells a client which kind of error it was."""
    code = getattr(pb_utils.TritonError, ERROR_CODES.get(error.status, "INTERNAL"))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(mark(error.kind, str(error)), code))


def text_response(text: str) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse([text_tensor(text)])


def final_response(text: str, generations: tuple[int, ...]) -> "pb_utils.InferenceResponse":
    """A request's last response: its remaining text (possibly empty) and which generation of each cartridge
    answered, so a client can tell whether a promotion reached it."""
    generations_tensor = pb_utils.Tensor("cartridge_generations", np.array(generations, dtype=np.int64))
    return pb_utils.InferenceResponse([text_tensor(text), generations_tensor])


def text_tensor(text: str) -> "pb_utils.Tensor":
    return pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))


class Outbox:
    """One thread that delivers every request's events to Triton, in order, off the engine's scheduler thread, and
    cancels the live requests whose clients went away.

    All calls into Triton (send, is_cancelled) happen on this thread. ``live`` is shared with the threads that
    call :meth:`track` (Triton's ``execute``), so it is guarded by ``lock``; a responder's ``done`` is set under it
    too, so a request that ended before it was tracked is never tracked.
    """

    def __init__(self, cancel_check_s: float = CANCEL_CHECK_INTERVAL_S) -> None:
        self.cancel_check_s = cancel_check_s
        self.queue: queue.Queue[tuple[Responder, StreamEvent] | None] = queue.Queue()
        self.live: set[Responder] = set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="cartridges-outbox", daemon=True)
        self.thread.start()

    def track(self, responder: "Responder") -> None:
        """Watch a submitted request for its client going away until its last event is delivered."""
        with self.lock:
            if not responder.done:
                self.live.add(responder)

    def finished(self, responder: "Responder") -> None:
        with self.lock:
            responder.done = True
            self.live.discard(responder)

    def run(self) -> None:
        next_check = time.monotonic() + self.cancel_check_s
        while True:
            try:
                item = self.queue.get(timeout=max(0.0, next_check - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                return
            if item:
                self.deliver(*item)
            if time.monotonic() >= next_check:
                self.cancel_gone_clients()
                next_check = time.monotonic() + self.cancel_check_s

    def deliver(self, responder: "Responder", event: StreamEvent) -> None:
        if event.final:
            self.finished(responder)
        try:
            responder.deliver(event)
        except Exception:  # one request's failed send must not stop the others' responses
            log.exception("delivering a response failed; cancelling the request")
            self.cancel(responder)

    def cancel_gone_clients(self) -> None:
        with self.lock:
            live = list(self.live)
        for responder in live:
            try:
                gone = responder.request.is_cancelled()
            except Exception:  # asking failed: ask again next time
                log.exception("asking whether a request was cancelled failed")
                continue
            if gone:
                self.cancel(responder)

    def cancel(self, responder: "Responder") -> None:
        """Ask the engine to retire the request; its final event still comes (and ends the tracking)."""
        if responder.handle is not None:
            responder.handle.cancel()
        with self.lock:
            self.live.discard(responder)

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(5)


class Responder:
    """Turns one request's engine events into Triton responses."""

    def __init__(
        self,
        request: "pb_utils.InferenceRequest",
        sender: "pb_utils.InferenceResponseSender",
        stream: bool,
        outbox: Outbox,
    ):
        self.request, self.sender, self.stream, self.outbox = request, sender, stream, outbox
        self.parts: list[str] = []
        self.handle = None
        self.done = False  # the last event was handed to the outbox's thread (set under the outbox's lock)

    def __call__(self, event: StreamEvent) -> None:
        """The engine's callback (scheduler thread): hand the event to the outbox."""
        self.outbox.queue.put((self, event))

    def deliver(self, event: StreamEvent) -> None:
        if event.error is not None:
            self.sender.send(error_response(event.error), flags=FINAL)
        elif event.completion is not None:
            text = event.text if self.stream else "".join([*self.parts, event.text])
            self.sender.send(final_response(text, event.completion.generations), flags=FINAL)
        elif self.stream:
            if event.text:
                self.sender.send(text_response(event.text))
        else:
            self.parts.append(event.text)


class Metrics:
    """Engine metrics as Triton custom metrics on the server's metrics port (:8002 by default)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        labels = {"model": model_name}
        self.engine = engine
        self.families = []  # a Metric only works while its MetricFamily object is alive
        self.metrics = {}
        for names, kind in ((GAUGES, pb_utils.MetricFamily.GAUGE), (COUNTERS, pb_utils.MetricFamily.COUNTER)):
            for name, description in names.items():
                family = pb_utils.MetricFamily(name=f"cartridges_{name}", description=description, kind=kind)
                self.families.append(family)
                if name == "requests_refused":  # one series per status
                    for status in get_args(Status):
                        self.metrics[f"{name}:{status}"] = family.Metric(labels={**labels, "status": status})
                else:
                    self.metrics[name] = family.Metric(labels=labels)
        self.last = dict.fromkeys(self.metrics, 0)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="cartridges-metrics", daemon=True)
        self.thread.start()

    def values(self, m: EngineMetrics) -> dict:
        cache = m.cache
        return {
            "running": m.running,
            "queued": m.queued,
            "preparing": m.preparing,
            "tokens_per_s": m.tokens_per_s,
            "cache_bytes": cache.bytes if cache else 0,
            "cache_entries": cache.entries if cache else 0,
            "cache_in_use_bytes": cache.in_use_bytes if cache else 0,
            "kv_pool_bytes": m.kv.pool_bytes,
            "kv_used_bytes": m.kv.used_bytes,
            "kv_waiting": int(m.kv.waiting),
            "cuda_graphs_off": int(bool(m.graphs and m.graphs.disabled)),
            "tokens_generated": m.tokens_generated,
            "requests_finished": m.requests_finished,
            "requests_failed": m.requests_failed,
            **{f"requests_refused:{status}": m.requests_refused.get(status, 0) for status in get_args(Status)},
            "cache_hits": cache.hits if cache else 0,
            "cache_misses": cache.misses if cache else 0,
            "cuda_graph_replays": m.graphs.replays if m.graphs else 0,
            "cuda_graph_captures": m.graphs.captures if m.graphs else 0,
        }

    def run(self) -> None:
        """Refresh until stopped; a failed refresh is logged and retried, so metrics never silently freeze."""
        while not self.stopped.wait(METRICS_INTERVAL_S):
            try:
                self.refresh()
            except Exception:
                log.exception("refreshing engine metrics failed; retrying in %.0fs", METRICS_INTERVAL_S)

    def refresh(self) -> None:
        for name, value in self.values(self.engine.metrics()).items():
            if name in GAUGES:  # counters are the rest
                self.metrics[name].set(float(value))
            else:
                self.metrics[name].increment(float(value - self.last[name]))
                self.last[name] = value

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        config = EngineConfig.from_env()
        self.engine = Engine.from_config(config)
        self.outbox = Outbox()
        self.metrics = Metrics(self.engine, json.loads(args["model_config"])["name"])
        log.info(
            "router ready: model %s, store %s, namespace %s", config.model_uri, config.store_root, config.namespace
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {name: self._input(request, name) for name in INPUT_KINDS}
                parsed = parse_request(inputs)
                responder = Responder(request, sender, parsed.stream, self.outbox)
                responder.handle = self.engine.submit(
                    parsed.prompt, parsed.cartridges, parsed.params, on_event=responder
                )
                self.outbox.track(responder)
            except EngineError as error:  # malformed inputs
                self._refuse(sender, error)
            except Exception as error:  # anything unexpected is still only this request's failure
                log.exception("request failed")
                self._refuse(sender, EngineError(f"{type(error).__name__}: {error}"))

    def _refuse(self, sender: "pb_utils.InferenceResponseSender", error: EngineError) -> None:
        """Answer a request the router could not submit with its error, counted with the engine's refusals."""
        self.engine.count_refused(error)
        sender.send(error_response(error), flags=FINAL)

    @staticmethod
    def _input(request: "pb_utils.InferenceRequest", name: str) -> "np.ndarray | None":
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def finalize(self) -> None:
        self.metrics.stop()
        self.engine.close()
        self.outbox.stop()
