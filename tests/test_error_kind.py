"""The error-kind marker the router puts at the start of each error message, and its reading back."""

from __future__ import annotations

from typing import get_args

import pytest

from cartridges.error_kind import ErrorKind, mark, parse
from cartridges_serving.errors import (
    CartridgeInvalid,
    CartridgeNotFound,
    CartridgeRefused,
    EngineError,
    EngineUnavailable,
    InvalidRequest,
)


@pytest.mark.parametrize("kind", get_args(ErrorKind))
@pytest.mark.parametrize(
    "message",
    [
        "cartridge 'x' not found in namespace 'a'",
        "[not_found] a message that itself starts with a marker",
        "list [1, 2] and [internal] inside",
        "first line\nsecond line\n[unavailable] third",
        "",
    ],
)
def test_a_marked_message_parses_back_to_its_kind_and_message(kind: ErrorKind, message: str) -> None:
    assert mark(kind, message).startswith(f"[{kind}] ")
    assert parse(mark(kind, message)) == (kind, message)


@pytest.mark.parametrize(
    "text",
    [
        "cartridge 'x' not found",  # an older server
        "[not_found]no space after the marker",
        " [not_found] not at the start",
        "[NOT_FOUND] another case",
        "[cartridge_gone] a kind this client does not know",
        "line one\n[not_found] line two",
        "",
    ],
)
def test_text_without_a_known_marker_has_no_kind_and_stays_whole(text: str) -> None:
    assert parse(text) == (None, text)


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (EngineError("boom"), "internal", "internal"),
        (InvalidRequest("bad"), "invalid_argument", "invalid_argument"),
        (CartridgeRefused("../x"), "invalid_argument", "invalid_argument"),
        (CartridgeNotFound("gone"), "not_found", "not_found"),
        (CartridgeInvalid("trained for another model"), "invalid_argument", "unusable_cartridge"),
        (EngineUnavailable("shutting down"), "unavailable", "unavailable"),
    ],
)
def test_each_engine_error_has_its_status_and_kind(error: EngineError, status: str, kind: str) -> None:
    """An unusable cartridge is still an invalid argument to the protocol, but a kind of its own to clients."""
    assert (error.status, error.kind) == (status, kind)
