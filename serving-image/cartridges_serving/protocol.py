"""The router's tensors (Triton LLM conventions) to an engine request, kept apart from Triton so it is testable.

Inputs: ``text_input`` (BYTES, one element), optional ``max_tokens`` (INT32), ``temperature`` (FP32), ``top_p``
(FP32), ``repetition_penalty`` (FP32), ``seed`` (INT64), ``stream`` (BOOL), ``stop`` (BYTES list), ``cartridges``
(BYTES list, in composition order, at most ``MAX_CARTRIDGES``). Outputs: ``text_output`` (BYTES), and in the last
response ``cartridge_generations`` (INT64 list: the generation of each cartridge that answered, in composition
order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cartridges_serving.engine import SamplingParams
from cartridges_serving.errors import InvalidRequest

DEFAULT_MAX_TOKENS = 128
MAX_CARTRIDGES = 16
"""Cartridges one request may compose: each is loaded before the request runs, so a long list costs downloads and
cache space before the context window can refuse it."""
INPUT_KINDS = {
    "text_input": "S",
    "max_tokens": "i",
    "temperature": "f",
    "top_p": "f",
    "repetition_penalty": "f",
    "seed": "i",
    "stream": "b",
    "stop": "S",
    "cartridges": "S",
}
_KIND_NAMES = {"S": "BYTES", "i": "an integer", "f": "a float", "b": "BOOL"}


@dataclass(frozen=True)
class RouterRequest:
    prompt: str
    cartridges: tuple[str, ...]
    params: SamplingParams
    stream: bool


def parse_request(inputs: Mapping[str, np.ndarray | None]) -> RouterRequest:
    """Check kinds and sizes of the given tensors and build the request; raises :class:`InvalidRequest`."""
    for name, array in inputs.items():
        if array is not None:
            _check_kind(name, array)
    prompt = _scalar(inputs, "text_input")
    if prompt is None:
        raise InvalidRequest("text_input is required")
    defaults = SamplingParams(max_tokens=DEFAULT_MAX_TOKENS)
    max_tokens, temperature = _scalar(inputs, "max_tokens"), _scalar(inputs, "temperature")
    top_p, seed, stream = _scalar(inputs, "top_p"), _scalar(inputs, "seed"), _scalar(inputs, "stream")
    repetition_penalty = _scalar(inputs, "repetition_penalty")
    return RouterRequest(
        prompt=_text("text_input", prompt),
        cartridges=_cartridges(inputs),
        params=SamplingParams(
            max_tokens=defaults.max_tokens if max_tokens is None else int(max_tokens),
            temperature=defaults.temperature if temperature is None else float(temperature),
            top_p=defaults.top_p if top_p is None else float(top_p),
            seed=None if seed is None else int(seed),
            stop=_texts(inputs, "stop"),
            repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
        ),
        stream=bool(stream) if stream is not None else False,
    )


def _cartridges(inputs: Mapping[str, np.ndarray | None]) -> tuple[str, ...]:
    cartridges = _texts(inputs, "cartridges")
    if len(cartridges) > MAX_CARTRIDGES:
        raise InvalidRequest(f"a request composes at most {MAX_CARTRIDGES} cartridges, got {len(cartridges)}")
    return cartridges


def _check_kind(name: str, array: np.ndarray) -> None:
    expected = INPUT_KINDS.get(name)
    if expected is None:
        raise InvalidRequest(f"unknown input {name!r}; the router takes {', '.join(INPUT_KINDS)}")
    kind = "S" if array.dtype.kind in "OSU" else array.dtype.kind
    if kind == "u":
        kind = "i"
    if kind != expected:
        raise InvalidRequest(f"input {name!r} has type {array.dtype}, expected {_KIND_NAMES[expected]}")


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str) -> Any:
    array = inputs.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _text(name: str, value: object) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError as err:
            raise InvalidRequest(f"input {name!r} is not valid UTF-8") from err
    if isinstance(value, str):
        return value
    raise InvalidRequest(f"input {name!r} must be text, got {type(value).__name__}")


def _texts(inputs: Mapping[str, np.ndarray | None], name: str) -> tuple[str, ...]:
    array = inputs.get(name)
    return () if array is None else tuple(_text(name, v) for v in array.reshape(-1))
