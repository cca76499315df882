"""Per-request errors of the engine; each carries the status a protocol front end should answer with and the kind
the router puts in its message (:mod:`cartridges.error_kind`), which tells clients what went wrong."""

from __future__ import annotations

from typing import Literal

from cartridges.error_kind import ErrorKind

Status = Literal["invalid_argument", "not_found", "unavailable", "internal"]


class EngineError(Exception):
    """A request failed; the message is meant for the client, ``status`` picks the HTTP/gRPC status and ``kind``
    the marker at the start of the message that clients act on."""

    status: Status = "internal"
    kind: ErrorKind = "internal"


class InvalidRequest(EngineError):
    """Bad input: empty prompt, negative max_tokens, bad sampling values, or too long for the context window."""

    status: Status = "invalid_argument"
    kind: ErrorKind = "invalid_argument"


class CartridgeRefused(InvalidRequest):
    """The id names something outside this server's namespace (a path, ``..``, or not a resource name)."""


class CartridgeNotFound(EngineError):
    status: Status = "not_found"
    kind: ErrorKind = "not_found"


class CartridgeInvalid(InvalidRequest):
    """The artifact is corrupt, inconsistent, or trained for another base model: an invalid argument to the
    protocol, but its own kind, since asking again with the same id cannot help until the cartridge is retrained."""

    kind: ErrorKind = "unusable_cartridge"


class EngineUnavailable(EngineError):
    """The engine is shutting down or the object store cannot be reached."""

    status: Status = "unavailable"
    kind: ErrorKind = "unavailable"
