"""Kubernetes-convention status conditions: set one, keep the others, move lastTransitionTime only on change."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def now() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


def seconds_since(timestamp: str) -> float:
    """Seconds from ``timestamp`` (as ``now`` writes it) until now."""
    return (datetime.now(UTC) - datetime.strptime(timestamp, TIME_FORMAT).replace(tzinfo=UTC)).total_seconds()


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new list with condition ``type_`` set (``None`` means Unknown)."""
    value = "Unknown" if status is None else ("True" if status else "False")
    previous = next((c for c in conditions if c.get("type") == type_), None)
    changed = previous is None or previous.get("status") != value
    updated = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now() if changed else previous.get("lastTransitionTime") if previous else now(),
        "observedGeneration": generation,
    }
    return [c for c in conditions if c.get("type") != type_] + [updated]


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conditions or [])
