"""Per-request errors of the engine; each carries the status a protocol front end should answer with."""

from __future__ import annotations

from typing import Literal

Status = Literal["invalid_argument", "not_found", "unavailable", "internal"]


class EngineError(Exception):
    """A request failed; the message is meant for the client, ``status`` picks the HTTP/gRPC status."""

    status: Status = "internal"


class InvalidRequest(EngineError):
    """Bad input: empty prompt, negative max_tokens, bad sampling values, or too long for the context window."""

    status: Status = "invalid_argument"


class CartridgeRefused(InvalidRequest):
    """The id names something outside this server's namespace (a path, ``..``, or not a resource name)."""


class CartridgeNotFound(EngineError):
    status: Status = "not_found"


class CartridgeInvalid(InvalidRequest):
    """The artifact is corrupt, inconsistent, or trained for another base model."""


class EngineUnavailable(EngineError):
    """The engine is shutting down or the object store cannot be reached."""

    status: Status = "unavailable"
