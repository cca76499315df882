"""One pass at a time per object: a Cartridge's deletion waits for its pass in flight (which may create a Job or
write current.json from the body it read before the deletion) and no pass runs after it began; a Corpus being read
is not read again by its retry timer meanwhile; a ConfigMap changed while the watch was broken is still read."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, cast

import kopf
import pytest

from cartridges_operator import handlers

WAIT_S = 60.0  # a failure guard only


@contextlib.contextmanager
def pass_in_flight(passes: handlers.Passes, uid: str, done: list[str], name: str) -> Iterator[None]:
    """A pass over ``uid`` running in another thread for the block's duration; ``name`` goes to ``done`` as it ends."""
    entered, release = threading.Event(), threading.Event()

    def held() -> None:
        entered.set()
        release.wait(WAIT_S)
        done.append(name)

    running = threading.Thread(target=passes.run, args=(uid, held))
    running.start()
    assert entered.wait(WAIT_S)
    try:
        yield
    finally:
        release.set()
        running.join(WAIT_S)


def test_a_deletion_waits_for_the_pass_in_flight_and_no_pass_runs_after() -> None:
    passes, ran = handlers.Passes(), list[str]()

    def deletion() -> None:
        passes.begin_deletion("uid-c")
        ran.append("deletion")

    with pass_in_flight(passes, "uid-c", ran, "pass"):
        deleting = threading.Thread(target=deletion)
        deleting.start()
        deleting.join(0.2)
        assert deleting.is_alive() and ran == []  # held until the pass ends: it cannot get past the lock before
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
    with pass_in_flight(passes, "uid-c", reads, "handler"):
        cast(Any, handlers.corpus_retry)(body=body)
    cast(Any, handlers.corpus_retry)(body=body)  # the next tick, no read in flight: reads (this body is unobserved)
    assert reads == ["handler", "timer"]


def test_a_configmap_changed_while_the_watch_was_broken_is_read_from_the_listing_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kopf lists the ConfigMaps again after a broken watch (410 Gone, an API server restarting), as events of no
    type: one whose version moved meanwhile re-reads its Corpora (a Ready one would keep the old text for ever); the
    first listing (start-up: every Corpus is read anyway) and an unchanged one read nothing."""
    monkeypatch.setattr(handlers, "CONFIGMAP_VERSIONS", handlers.ConfigMapVersions())
    monkeypatch.setattr(handlers, "CORPUS_PASSES", handlers.Passes())
    corpus = {"metadata": {"name": "handbook", "uid": "uid-h"}, "spec": {}, "status": {}}
    monkeypatch.setattr(handlers.kube, "corpora_using_configmap", lambda namespace, name: [corpus])
    reads: list[str] = []

    def read(body: kopf.Body) -> bool:
        reads.append(body.metadata["name"])
        return True

    monkeypatch.setattr(handlers, "_read_corpus", read)
    configmap_changed = cast(Any, handlers.configmap_changed)
    logger = logging.getLogger(__name__)
    for kind, version, read_then in [
        (None, "1", False),  # the first listing
        ("MODIFIED", "2", True),
        (None, "2", False),  # listed again, unchanged
        (None, "3", True),  # listed again after a change the watch missed
        ("DELETED", "3", False),
        (None, "4", False),  # created again while the watch was broken: its Corpus is not Ready, the timer reads it
    ]:
        event = {"type": kind, "object": {"metadata": {"name": "docs", "resourceVersion": version}}}
        before = len(reads)
        configmap_changed(event=event, namespace="ns", name="docs", logger=logger)
        assert (len(reads) > before) == read_then, (kind, version)
