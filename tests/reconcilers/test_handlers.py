"""The kopf handlers called in this process against the real API server: what one handler call leaves for the
next one, where kopf itself calls nothing again."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import kopf
import pytest

from cartridges import api
from cartridges.store import Store
from cartridges_operator import handlers, kube
from cartridges_operator.conditions import is_true
from cartridges_operator.source_access import ReadSlots

pytestmark = pytest.mark.cluster
LOG = logging.getLogger(__name__)


@pytest.fixture
def corpus_handlers(namespace: str, crds_installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handlers with a file:// store and one read slot, which a test can hold."""
    monkeypatch.setattr(handlers, "CONFIG", dataclasses.replace(handlers.CONFIG, store_root=f"file://{tmp_path}"))
    monkeypatch.setattr(handlers, "STORE", Store())
    monkeypatch.setattr(handlers, "READS", ReadSlots(1, wait_s=0.05))
    monkeypatch.setattr(handlers, "_post_transitions", lambda *_: None)  # kopf posts Events from its own loop only


def call(handler: object, **kwargs: Any) -> None:
    """A handler called as kopf calls it, with the arguments ours use (kopf types them with all it passes)."""
    cast(Callable[..., None], handler)(**kwargs)


def corpus(namespace: str) -> kopf.Body:
    found = kube.custom().get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "corpora", "c")
    return kopf.Body(cast(kopf.RawBody, found))


def create_corpus(namespace: str, source: dict[str, Any]) -> None:
    body = {"apiVersion": api.API_VERSION, "kind": "Corpus", "metadata": {"name": "c"},
            "spec": {"description": "d", "sources": [source]}}  # fmt: skip
    kube.custom().create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "corpora", body)


def test_a_corpus_changed_while_no_read_slot_was_free_is_read_by_the_retry_timer(
    namespace: str, corpus_handlers: None
) -> None:
    """A change that found every read slot taken (an operator restarted after Corpora changed reads them all at
    once) keeps the stored digest Ready and the new generation unobserved. kopf counts the change as handled and
    calls no handler again, so the retry timer must read it: else the Cartridges never train on the new text."""
    create_corpus(namespace, {"inline": "Before."})
    call(handlers.corpus_changed, body=corpus(namespace))
    before = dict(corpus(namespace).status)["digest"]
    change = {"spec": {"sources": [{"inline": "After."}]}}
    kube.custom().patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "corpora", "c", change)
    with handlers.READS.hold():
        call(handlers.corpus_changed, body=corpus(namespace))
    waiting = dict(corpus(namespace).status)
    assert is_true(waiting["conditions"], "Ready") and waiting["observedGeneration"] == 1

    call(handlers.corpus_retry, body=corpus(namespace))
    read = dict(corpus(namespace).status)
    assert read["observedGeneration"] == 2 and read["digest"] != before


def test_a_configmap_changed_while_no_read_slot_was_free_is_read_by_the_retry_timer(
    namespace: str, corpus_handlers: None
) -> None:
    """The same for a change of a ConfigMap the Corpus reads (the Corpus's generation stays the same): kopf calls
    the ConfigMap's event handler once, and every ConfigMap at once after a restart."""
    core = kube.core()
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "docs"}, "data": {"text": "Before."}})
    create_corpus(namespace, {"configMap": {"name": "docs", "key": "text"}})
    call(handlers.corpus_changed, body=corpus(namespace))
    before = dict(corpus(namespace).status)["digest"]
    core.patch_namespaced_config_map("docs", namespace, {"data": {"text": "After."}})
    with handlers.READS.hold():
        call(handlers.configmap_changed, event={"type": "MODIFIED"}, namespace=namespace, name="docs", logger=LOG)
    assert dict(corpus(namespace).status)["digest"] == before

    call(handlers.corpus_retry, body=corpus(namespace))
    assert dict(corpus(namespace).status)["digest"] != before
