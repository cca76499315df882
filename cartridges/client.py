"""Query a serving endpoint: Triton's HTTP generate extension or tritonclient gRPC streaming; text (or a stream) out.

``generate(url, prompt, cartridges=[...])`` returns the answer. With an ``http://`` URL it posts to
``/v2/models/<model>/generate`` (``stream=True``: ``generate_stream``, server-sent events); with a ``grpc://host:port``
URL it sends the same fields as tensors over tritonclient's gRPC stream (the router is decoupled, so gRPC always
streams; ``stream`` only decides whether the server sends chunks or one final text). Failures raise
:class:`GenerateError` with the HTTP status or gRPC status code, the router's error kind and its message.

The answer says which generation of each cartridge answered (a promotion reaches serving within the server's
pointer TTL, and an unusable one leaves the generation before it answering): ``generations`` of the :class:`Answer`
(a ``str``) or of the :class:`Stream` once it is read to the end.
"""

from __future__ import annotations

import http.client
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, overload

import numpy as np

from cartridges.error_kind import ErrorKind, mark, parse

DEFAULT_MODEL = "router"
GRPC_SCHEME = "grpc://"
GENERATIONS_OUTPUT = "cartridge_generations"
# The router's input tensors (cartridges_serving/model_repository/router/config.pbtxt) and their numpy types.
TENSOR_TYPES: dict[str, type] = {
    "text_input": np.object_,
    "max_tokens": np.int32,
    "temperature": np.float32,
    "top_p": np.float32,
    "repetition_penalty": np.float32,
    "seed": np.int64,
    "stream": np.bool_,
    "stop": np.object_,
    "cartridges": np.object_,
}


# A response's text and, in the last one, the generations that answered (None in the others, or from an older server).
Chunk = tuple[str, tuple[int, ...] | None]


class Answer(str):
    """The whole answer, a ``str`` as before; ``generations``: the generation of each requested cartridge that
    answered, in composition order (empty without cartridges; None from a server that does not send them)."""

    generations: tuple[int, ...] | None

    def __new__(cls, text: str, generations: tuple[int, ...] | None = None) -> Answer:
        answer = super().__new__(cls, text)
        answer.generations = generations
        return answer


class Stream(Iterator[str]):
    """The answer's text chunks as they arrive; ``generations`` (see :class:`Answer`) is set once the last response
    has arrived. ``close()`` (or dropping it) before the end cancels the request."""

    def __init__(self, chunks: Generator[Chunk, None, None]) -> None:
        self._chunks = chunks
        self.generations: tuple[int, ...] | None = None

    def __next__(self) -> str:
        while True:
            text, generations = next(self._chunks)
            if generations is not None:
                self.generations = generations
            if text:
                return text

    def close(self) -> None:
        self._chunks.close()

    def answer(self) -> Answer:
        """The rest of the text, joined, with the generations."""
        text = "".join(self)
        return Answer(text, self.generations)


class GenerateError(RuntimeError):
    """The request failed: ``kind`` is what went wrong, as the router marks it (:mod:`cartridges.error_kind`);
    ``status`` is the HTTP status, ``grpc_code`` the gRPC status name (``UNAVAILABLE``).

    ``kind`` is the one to act on: Triton answers every model error with HTTP 400, and a model's error on a gRPC
    stream in-band, without a status code. It is None for an error without a marker (an older server, or Triton's
    own refusal, such as a tensor of the wrong type); ``status`` and ``grpc_code`` are None when the server was not
    reached or timed out (``unreachable``). ``message`` is the text without the marker.
    """

    def __init__(
        self, text: str, status: int | None = None, grpc_code: str | None = None, *, unreachable: bool = False
    ) -> None:
        self.kind: ErrorKind | None
        self.kind, self.message = parse(text)
        prefix = f"HTTP {status}: " if status is not None else f"gRPC {grpc_code}: " if grpc_code else ""
        super().__init__(prefix + self.message)
        self.status = status
        self.grpc_code = grpc_code
        self.unreachable = unreachable


@overload
def generate(
    url: str,
    prompt: str,
    cartridges: Sequence[str] = ...,
    *,
    model: str = ...,
    max_tokens: int = ...,
    temperature: float = ...,
    top_p: float | None = ...,
    repetition_penalty: float | None = ...,
    seed: int | None = ...,
    stop: Sequence[str] = ...,
    stream: Literal[False] = ...,
    timeout: float = ...,
) -> Answer: ...


@overload
def generate(
    url: str,
    prompt: str,
    cartridges: Sequence[str] = ...,
    *,
    model: str = ...,
    max_tokens: int = ...,
    temperature: float = ...,
    top_p: float | None = ...,
    repetition_penalty: float | None = ...,
    seed: int | None = ...,
    stop: Sequence[str] = ...,
    stream: Literal[True],
    timeout: float = ...,
) -> Stream: ...


def generate(
    url: str,
    prompt: str,
    cartridges: Sequence[str] = (),
    *,
    model: str = DEFAULT_MODEL,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stream: bool = False,
    timeout: float = 60.0,
) -> Answer | Stream:
    """Ask ``model`` at ``url`` (``http://host:8000`` or ``grpc://host:8001``) to answer ``prompt`` with
    ``cartridges`` composed in order.

    ``timeout`` bounds connecting and each read (for a stream: the wait for each next chunk).
    """
    body: dict[str, Any] = {"text_input": prompt, "max_tokens": max_tokens, "temperature": temperature}
    if cartridges:
        body["cartridges"] = list(cartridges)
    if stop:
        body["stop"] = list(stop)
    if top_p is not None:
        body["top_p"] = top_p
    if repetition_penalty is not None:
        body["repetition_penalty"] = repetition_penalty
    if seed is not None:
        body["seed"] = seed
    _check_ranges(body)
    if url.startswith(GRPC_SCHEME):
        tensors = {name: _tensor(name, value) for name, value in {**body, "stream": stream}.items()}
        chunks = grpc_stream(url.removeprefix(GRPC_SCHEME).rstrip("/"), tensors, model=model, timeout=timeout)
        return chunks if stream else chunks.answer()
    endpoint = f"{url.rstrip('/')}/v2/models/{model}/generate"
    if stream:
        body["stream"] = True
        return Stream(_stream(f"{endpoint}_stream", body, timeout))
    with _post(endpoint, body, timeout) as response, _reading(endpoint, timeout):
        return Answer(*_chunk(_json(response.read())))


def _check_ranges(body: dict[str, Any]) -> None:
    """Refuse an integer the router's input type cannot hold: numpy's conversion (gRPC) and Triton's JSON parsing
    (HTTP) would wrap it silently, so ``max_tokens=4294967300`` would ask for 4 tokens."""
    for name, value in body.items():
        dtype: np.dtype[Any] = np.dtype(TENSOR_TYPES[name])
        if dtype.kind != "i" or not isinstance(value, int):
            continue
        limits = np.iinfo(dtype)
        if not limits.min <= value <= limits.max:
            raise ValueError(
                f"{name} {value} is out of range: the router takes {dtype.name} ({limits.min}..{limits.max})"
            )


def _tensor(name: str, value: Any) -> np.ndarray:
    """One request field as the router's input tensor: a 1-d array of the configured type (strings as bytes)."""
    return np.array([v.encode() if isinstance(v, str) else v for v in np.atleast_1d(value)]).astype(TENSOR_TYPES[name])


def grpc_stream(
    target: str, inputs: dict[str, np.ndarray], *, model: str = DEFAULT_MODEL, timeout: float = 60.0
) -> Stream:
    """Send ``inputs`` as they are on a tritonclient gRPC stream to ``target`` (``host:port``); the text chunks.

    The low-level half of :func:`generate`, also for callers that need exact tensors. ``timeout`` bounds the wait
    for each response; leaving early (the consumer stops iterating) cancels the request on the server.
    """
    return Stream(_grpc_chunks(target, inputs, model, timeout))


def _grpc_chunks(
    target: str, inputs: dict[str, np.ndarray], model: str, timeout: float
) -> Generator[Chunk, None, None]:
    import tritonclient.grpc as grpcclient  # the serve extra; HTTP callers never need it
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    responses: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
    client = grpcclient.InferenceServerClient(target)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        client.async_stream_infer(model, tensors, enable_empty_final_response=True)
        while True:
            try:
                result, error = responses.get(timeout=timeout)
            except queue.Empty:
                raise GenerateError(f"no response from {target} within {timeout}s", unreachable=True) from None
            if error is not None:
                raise _grpc_error(error, target)
            output, generations = result.as_numpy("text_output"), result.as_numpy(GENERATIONS_OUTPUT)
            text = "" if output is None else "".join(chunk.decode() for chunk in output.reshape(-1))
            yield text, None if generations is None else tuple(int(g) for g in generations.reshape(-1))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return
    except InferenceServerException as error:
        # A broken stream refuses the send with a generic message; its cause arrives through the callback.
        try:
            cause = responses.get_nowait()[1] or error
        except queue.Empty:
            cause = error
        raise _grpc_error(cause, target) from None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def _grpc_error(error: Any, target: str) -> GenerateError:
    """A server's refusal keeps its status code; an unreachable server reads like the HTTP client's."""
    code = str(error.status() or "").removeprefix("StatusCode.") or None
    if code == "UNAVAILABLE" and "failed to connect" in error.message().lower():
        return GenerateError(f"cannot reach {target}: {error.message()}", unreachable=True)
    return GenerateError(error.message(), grpc_code=code)


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        with _reading(url, timeout):
            message = _error_message(err.read())
        raise GenerateError(message, err.code) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise GenerateError(f"cannot reach {url}: {reason}", unreachable=True) from None


def _stream(url: str, body: dict[str, Any], timeout: float) -> Generator[Chunk, None, None]:
    """Yield each event's chunk; an ``error`` event (failure after the stream started) raises."""
    with _post(url, body, timeout) as response, _reading(url, timeout):
        for line in _lines(response):
            if line.startswith(b"data:"):
                yield _chunk(_json(line[len(b"data:") :]))


def _lines(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The body's lines as they arrive. Not ``for line in response``: http.client's ``readline`` ends a chunked body
    cut off mid-stream as if it were complete, where its ``read1`` raises."""
    rest = b""
    while data := response.read1():
        *lines, rest = (rest + data).split(b"\n")
        yield from lines
    yield rest


@contextmanager
def _reading(url: str, timeout: float) -> Iterator[None]:
    """Reading a reply: a server that stalls, or that breaks off mid-reply (it stopped or its connection dropped),
    cannot answer now, so the caller gets a :class:`GenerateError` marked ``unavailable``, not a socket error."""
    try:
        yield
    except TimeoutError as err:
        raise GenerateError(f"no data from {url} within {timeout}s", unreachable=True) from err
    except (http.client.HTTPException, OSError) as err:
        raise GenerateError(mark("unavailable", f"the reply from {url} broke off: {err!r}")) from err


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as err:
        raise GenerateError(f"server sent invalid JSON: {data[:200]!r}") from err
    if not isinstance(value, dict):
        raise GenerateError(f"server sent {type(value).__name__}, expected an object")
    return value


def _chunk(body: dict[str, Any]) -> Chunk:
    """One response's text and generations; Triton's generate endpoints write a one-element output as a scalar."""
    if "error" in body:
        raise GenerateError(str(body["error"]), 200)
    generations = body.get(GENERATIONS_OUTPUT)
    if generations is not None:
        generations = tuple(int(g) for g in np.atleast_1d(generations))
    return str(body.get("text_output", "")), generations


def _error_message(data: bytes) -> str:
    """The ``error`` of an error body; a refused stream sends it as a server-sent event (``data: {"error": ...}``)."""
    text = data.decode(errors="replace").strip()
    try:
        return str(json.loads(text.removeprefix("data:")).get("error", text))
    except (ValueError, AttributeError):
        return text
