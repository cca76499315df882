"""The kind of a serving error, sent as the first word of its message: ``[not_found] cartridge 'x' not found ...``.

Triton answers every model error with HTTP 400, and on a gRPC stream in-band with a message and no code, so
neither says what went wrong; only the message reaches every client. The router
(``cartridges_serving.errors``) therefore starts each error's message with its kind in brackets, and clients
(:class:`cartridges.client.GenerateError`) read the kind back instead of matching message text, which may change.
"""

from __future__ import annotations

from typing import Literal, get_args

ErrorKind = Literal["invalid_argument", "not_found", "unusable_cartridge", "unavailable", "internal"]
"""``invalid_argument``: the request is wrong (a bad value, too long for the context window, an id outside the
server's namespace); ``not_found``: no such cartridge; ``unusable_cartridge``: the cartridge exists but this server
cannot use it (corrupt, or trained for another base model); ``unavailable``: the server cannot answer now (shutting
down, object store unreachable, no KV memory), worth retrying; ``internal``: a failure inside the server."""

_MARKERS: dict[str, ErrorKind] = {f"[{kind}] ": kind for kind in get_args(ErrorKind)}


def mark(kind: ErrorKind, message: str) -> str:
    """``message`` as the router sends it: its kind first, in brackets."""
    return f"[{kind}] {message}"


def parse(text: str) -> tuple[ErrorKind | None, str]:
    """The kind and the message of an error's text; no kind (None) and the whole text when it does not start with a
    known kind's marker (an older server, an error from Triton itself, or a kind newer than this client)."""
    for marker, kind in _MARKERS.items():
        if text.startswith(marker):
            return kind, text.removeprefix(marker)
    return None, text
