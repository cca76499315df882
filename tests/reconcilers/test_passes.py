"""One pass at a time per object: a Cartridge's deletion waits for its pass in flight (which may create a Job or
write current.json from the body it read before the deletion) and no pass runs after it began; a Corpus being read
is not read again by its retry timer meanwhile."""

from __future__ import annotations

import threading
from typing import Any, cast

import kopf
import pytest

from cartridges_operator import handlers

WAIT_S = 60.0  # a failure guard only


def test_a_deletion_waits_for_the_pass_in_flight_and_no_pass_runs_after() -> None:
    passes = handlers.Passes()
    entered, release, ran = threading.Event(), threading.Event(), list[str]()

    def pass_in_flight() -> None:
        entered.set()
        release.wait(WAIT_S)
        ran.append("pass")

    running = threading.Thread(target=passes.run, args=("uid-c", pass_in_flight))
    running.start()
    assert entered.wait(WAIT_S)

    def deletion() -> None:
        passes.begin_deletion("uid-c")
        ran.append("deletion")

    deleting = threading.Thread(target=deletion)
    deleting.start()
    deleting.join(0.2)
    assert deleting.is_alive() and ran == []  # held until the pass ends: it cannot get past the lock before
    release.set()
    running.join(WAIT_S)
    deleting.join(WAIT_S)
    passes.run("uid-c", lambda: ran.append("late pass"))  # a timer call kopf had already started
    passes.run("uid-d", lambda: ran.append("another Cartridge's pass"))
    assert ran == ["pass", "deletion", "another Cartridge's pass"]


def test_the_resync_timer_skips_a_cartridge_whose_deletion_has_begun(monkeypatch: pytest.MonkeyPatch) -> None:
    passes = handlers.Passes()
    monkeypatch.setattr(handlers, "CARTRIDGE_PASSES", passes)
    reconciled: list[str] = []

    def reconcile(body: dict[str, Any], *_: object) -> dict[str, Any]:
        reconciled.append(body["metadata"]["uid"])
        return {"conditions": []}

    monkeypatch.setattr(handlers, "reconcile_cartridge", reconcile)
    monkeypatch.setattr(handlers, "write_status", lambda *_: True)
    body = kopf.Body(cast(kopf.RawBody, {"metadata": {"name": "c", "uid": "uid-c"}, "spec": {}, "status": {}}))
    resync = cast(Any, handlers.cartridge_resync)
    resync(body=body, namespace="ns", name="c", cartridges_by_base_model={})
    assert reconciled == ["uid-c"]
    passes.begin_deletion("uid-c")
    resync(body=body, namespace="ns", name="c", cartridges_by_base_model={})
    assert reconciled == ["uid-c"]


def test_the_corpus_retry_timer_skips_a_corpus_being_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read taking longer than the retry interval (a slow http: source) is not started again by the timer, whose
    body predates that read's status: once is enough, and the read slots stay free for other Corpora."""
    passes = handlers.Passes()
    monkeypatch.setattr(handlers, "CORPUS_PASSES", passes)
    reads: list[str] = []

    def timer_read(body: kopf.Body) -> bool:
        reads.append("timer")
        return True

    monkeypatch.setattr(handlers, "_read_corpus", timer_read)
    body = kopf.Body(cast(kopf.RawBody, {"metadata": {"name": "c", "uid": "uid-c", "generation": 2}, "spec": {},
                                         "status": {"observedGeneration": 1}}))  # fmt: skip
    entered, release = threading.Event(), threading.Event()

    def slow_read() -> None:
        entered.set()
        release.wait(WAIT_S)
        reads.append("handler")

    reading = threading.Thread(target=passes.run, args=("uid-c", slow_read))
    reading.start()
    assert entered.wait(WAIT_S)
    cast(Any, handlers.corpus_retry)(body=body)
    release.set()
    reading.join(WAIT_S)
    cast(Any, handlers.corpus_retry)(body=body)  # the next tick, no read in flight: reads (this body is unobserved)
    assert reads == ["handler", "timer"]
