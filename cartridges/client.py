"""Query a serving endpoint over Triton's HTTP generate extension: plain JSON in, text (or a text stream) out.

``generate(url, prompt, cartridges=[...])`` posts to ``/v2/models/<model>/generate`` and returns the answer;
``stream=True`` posts to ``generate_stream`` and yields text chunks as the server sends them (server-sent events).
Failures raise :class:`GenerateError` with the HTTP status and Triton's message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any, Literal, overload

DEFAULT_MODEL = "router"


class GenerateError(RuntimeError):
    """The request failed: ``status`` is the HTTP status (None when the server was not reached or timed out)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.status = status
        self.message = message


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
    seed: int | None = ...,
    stop: Sequence[str] = ...,
    stream: Literal[False] = ...,
    timeout: float = ...,
) -> str: ...


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
    seed: int | None = ...,
    stop: Sequence[str] = ...,
    stream: Literal[True],
    timeout: float = ...,
) -> Iterator[str]: ...


def generate(
    url: str,
    prompt: str,
    cartridges: Sequence[str] = (),
    *,
    model: str = DEFAULT_MODEL,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stream: bool = False,
    timeout: float = 60.0,
) -> str | Iterator[str]:
    """Ask ``model`` at ``url`` (``http://host:8000``) to answer ``prompt`` with ``cartridges`` composed in order.

    ``timeout`` bounds connecting and each read (for a stream: the wait for each next chunk).
    """
    body: dict[str, Any] = {"text_input": prompt, "max_tokens": max_tokens, "temperature": temperature}
    if cartridges:
        body["cartridges"] = list(cartridges)
    if stop:
        body["stop"] = list(stop)
    if top_p is not None:
        body["top_p"] = top_p
    if seed is not None:
        body["seed"] = seed
    endpoint = f"{url.rstrip('/')}/v2/models/{model}/generate"
    if stream:
        body["stream"] = True
        return _stream(f"{endpoint}_stream", body, timeout)
    with _post(endpoint, body, timeout) as response:
        return _text(_json(response.read()))


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise GenerateError(_error_message(err.read()), err.code) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise GenerateError(f"cannot reach {url}: {reason}") from None


def _stream(url: str, body: dict[str, Any], timeout: float) -> Iterator[str]:
    """Yield each event's text; an ``error`` event (failure after the stream started) raises."""
    with _post(url, body, timeout) as response:
        try:
            for line in response:
                if line.startswith(b"data:"):
                    text = _text(_json(line[len(b"data:") :]))
                    if text:
                        yield text
        except TimeoutError as err:
            raise GenerateError(f"no data from {url} within {timeout}s") from err


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as err:
        raise GenerateError(f"server sent invalid JSON: {data[:200]!r}") from err
    if not isinstance(value, dict):
        raise GenerateError(f"server sent {type(value).__name__}, expected an object")
    return value


def _text(body: dict[str, Any]) -> str:
    if "error" in body:
        raise GenerateError(str(body["error"]), 200)
    return str(body.get("text_output", ""))


def _error_message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", data.decode(errors="replace")))
    except (ValueError, AttributeError):
        return data.decode(errors="replace")
