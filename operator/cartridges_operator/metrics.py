"""Prometheus metrics of the operator: what it reconciled, how long it took, what failed, where cartridges stand."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("cartridges_operator_reconciles_total", "Reconcile passes", ["kind"])
ERRORS = Counter("cartridges_operator_reconcile_errors_total", "Reconcile passes that raised", ["kind"])
DURATION = Histogram("cartridges_operator_reconcile_seconds", "Duration of one reconcile pass", ["kind"])
CARTRIDGES = Gauge("cartridges_operator_cartridges", "Cartridges by Ready condition reason", ["ready", "reason"])

_cartridge_states: dict[str, tuple[str, str]] = {}


@contextmanager
def reconciling(kind: str) -> Iterator[None]:
    started = time.perf_counter()
    RECONCILES.labels(kind).inc()
    try:
        yield
    except Exception:
        ERRORS.labels(kind).inc()
        raise
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - started)


def record_cartridge(key: str, ready: str, reason: str) -> None:
    """Track one cartridge's Ready state; the gauge counts cartridges per (ready, reason)."""
    _cartridge_states[key] = (ready, reason)
    _refresh()


def forget_cartridge(key: str) -> None:
    _cartridge_states.pop(key, None)
    _refresh()


def _refresh() -> None:
    CARTRIDGES.clear()
    for ready, reason in _cartridge_states.values():
        CARTRIDGES.labels(ready, reason).inc()


def serve(port: int) -> None:
    start_http_server(port)
