"""The kopf handlers called in this process against the real API server: what one handler call leaves for the
next one, where kopf itself calls nothing again."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
from _web_page import WebPage

from cartridges import api, layout
from cartridges.store import Store, StoreURI
from cartridges_operator import handlers, kube
from cartridges_operator.cartridge import reconcile_cartridge
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


def corpus(namespace: str, name: str = "c") -> kopf.Body:
    found = kube.custom().get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "corpora", name)
    return kopf.Body(cast(kopf.RawBody, found))


def create_corpus(namespace: str, source: dict[str, Any], name: str = "c") -> None:
    body = {"apiVersion": api.API_VERSION, "kind": "Corpus", "metadata": {"name": name},
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


def two_corpora_reading_one_configmap(namespace: str, binary_data: dict[str, str]) -> str:
    """Corpora ``a`` (key ``a.txt``) and ``b`` (key ``b.txt``) of ConfigMap docs, b read once: its digest."""
    docs = {"metadata": {"name": "docs"}, "data": {"b.txt": "Version 1."}, "binaryData": binary_data}
    kube.core().create_namespaced_config_map(namespace, docs)
    for name in ("a", "b"):
        create_corpus(namespace, {"configMap": {"name": "docs", "key": f"{name}.txt"}}, name=name)
    call(handlers.corpus_changed, body=corpus(namespace, "b"))
    return str(dict(corpus(namespace, "b").status)["digest"])


def change_configmap(namespace: str) -> None:
    kube.core().patch_namespaced_config_map("docs", namespace, {"data": {"b.txt": "Version 2."}})
    call(handlers.configmap_changed, event={"type": "MODIFIED"}, namespace=namespace, name="docs", logger=LOG)


def test_a_configmap_key_that_is_not_utf8_fails_its_corpus_and_the_others_read_the_change(
    namespace: str, corpus_handlers: None
) -> None:
    """A binaryData key in Latin-1 is a source to fix that names the key, for its Corpus only: the read neither
    fails with the decoding error nor keeps the next Corpus reading the ConfigMap on its old text."""
    before = two_corpora_reading_one_configmap(
        namespace, {"a.txt": base64.b64encode("café".encode("latin-1")).decode()}
    )
    change_configmap(namespace)
    assert dict(corpus(namespace, "b").status)["digest"] != before
    broken = dict(corpus(namespace, "a").status)
    assert condition(broken, "Ready")["reason"] == "InvalidSource" and is_true(broken["conditions"], "Stalled")
    message = condition(broken, "SourcesRead")["message"]
    assert message.startswith(f"ConfigMap {namespace}/docs key 'a.txt': not UTF-8 text")


def test_a_corpus_whose_read_fails_unexpectedly_keeps_no_other_from_reading_the_configmap_change(
    namespace: str, corpus_handlers: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """kopf calls the ConfigMap's handler once per change: a failure of one Corpus (a bug, the API server failing
    its status write) is logged, and the Corpora after it are still read."""
    before = two_corpora_reading_one_configmap(namespace, {"a.txt": base64.b64encode(b"Text.").decode()})
    read = handlers._reconcile_corpus

    def failing_for_a(body: kopf.Body) -> dict[str, Any]:
        if body.metadata["name"] == "a":
            raise RuntimeError("a failure nobody foresaw")
        return read(body)

    monkeypatch.setattr(handlers, "_reconcile_corpus", failing_for_a)
    caplog.set_level(logging.ERROR, logger=LOG.name)
    change_configmap(namespace)
    assert dict(corpus(namespace, "b").status)["digest"] != before
    assert "re-reading Corpus a failed" in caplog.text and "a failure nobody foresaw" in caplog.text


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def cartridge_pass(namespace: str, status: dict[str, Any]) -> dict[str, Any]:
    """A pass of a Cartridge that trains on Corpus c, from the ``status`` its last pass wrote. Its namespace has no
    store Secret: the pass ends there, after choosing the corpus version and generation, before starting a Job."""
    spec = {"corpusRefs": [{"name": "c"}], "baseModel": {"name": "m", "uri": "s3://b/m"}}
    body = {"metadata": {"name": "k", "generation": 1, "uid": "k-uid"}, "spec": spec, "status": status}
    return reconcile_cartridge(body, namespace, "k", handlers.CONFIG, handlers.STORE, lambda model: [])


def test_a_ready_corpus_whose_stored_text_was_lost_is_stored_again_by_the_retry_timer(
    namespace: str, corpus_handlers: None
) -> None:
    """corpus.jsonl lost under a Ready Corpus's digest: its Cartridges wait rather than start Jobs that would fail
    for good, and the retry timer, which reads no Ready Corpus otherwise, reads it so that it is stored again."""
    create_corpus(namespace, {"inline": "Kept facts."})
    call(handlers.corpus_changed, body=corpus(namespace))
    stored = dict(corpus(namespace).status)
    Path(StoreURI.parse(f"{stored['artifact']}/{layout.CORPUS_FILE}").key).unlink()
    waiting = cartridge_pass(namespace, {})
    assert condition(waiting, "CorpusReady")["reason"] == "CorpusDigestNotFound"

    call(handlers.corpus_retry, body=corpus(namespace))
    assert dict(corpus(namespace).status)["digest"] == stored["digest"]
    assert [doc.text for doc in layout.read_documents(handlers.STORE, stored["artifact"])] == ["Kept facts.\n"]
    assert condition(cartridge_pass(namespace, {}), "CorpusReady")["status"] == "True"


def test_a_stored_corpus_whose_source_fails_once_when_read_again_keeps_its_version_and_its_cartridges(
    namespace: str, corpus_handlers: None, web_server: WebPage
) -> None:
    """A restarted operator reads every Corpus again (kopf's resume handler). A source that fails then, for a reason
    that may pass (a 503), says nothing about the text stored: the Corpus stays Ready with its digest, so its
    Cartridges neither wait nor retrain. The failed read shows in SourcesRead (URL redacted), and is retried."""
    create_corpus(namespace, {"http": {"url": f"{web_server.url}?token=s3cret"}})
    call(handlers.corpus_changed, body=corpus(namespace))
    stored = dict(corpus(namespace).status)
    trained = cartridge_pass(namespace, {})
    assert condition(trained, "CorpusReady")["status"] == "True"

    web_server.status = 503
    call(handlers.corpus_changed, body=corpus(namespace))
    failed = dict(corpus(namespace).status)
    assert is_true(failed["conditions"], "Ready") and failed["digest"] == stored["digest"]
    assert not is_true(failed["conditions"], "Stalled")  # a wait that ends by itself: Argo CD shows it Healthy
    read = condition(failed, "SourcesRead")
    assert read["status"] == "False" and read["reason"] == "SourceUnavailable"
    assert "HTTP Error 503" in read["message"] and "?<redacted>" in read["message"]
    assert "s3cret" not in json.dumps(failed)
    again = cartridge_pass(namespace, trained)
    assert condition(again, "CorpusReady") == condition(trained, "CorpusReady")
    assert (again["generation"], again["trainingHash"]) == (trained["generation"], trained["trainingHash"])

    web_server.status = 200
    call(handlers.corpus_retry, body=corpus(namespace))
    assert is_true(dict(corpus(namespace).status)["conditions"], "SourcesRead")


def test_a_changed_corpus_whose_source_fails_once_keeps_its_version_until_the_retry_timer_reads_it(
    namespace: str, corpus_handlers: None, web_server: WebPage
) -> None:
    """A changed spec whose read fails for a reason that may pass is not taken in yet (its generation stays
    unobserved, as when no read slot is free): the stored version stays Ready, and the retry timer reads the new
    spec once the source answers."""
    create_corpus(namespace, {"inline": "Before."})
    call(handlers.corpus_changed, body=corpus(namespace))
    before = dict(corpus(namespace).status)["digest"]
    web_server.status = 503
    change = {"spec": {"sources": [{"http": {"url": web_server.url}}]}}
    kube.custom().patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "corpora", "c", change)
    call(handlers.corpus_changed, body=corpus(namespace))
    waiting = dict(corpus(namespace).status)
    assert is_true(waiting["conditions"], "Ready") and waiting["digest"] == before
    assert waiting["observedGeneration"] == 1 and condition(waiting, "SourcesRead")["reason"] == "SourceUnavailable"

    web_server.status = 200
    call(handlers.corpus_retry, body=corpus(namespace))
    read = dict(corpus(namespace).status)
    assert read["observedGeneration"] == 2 and read["digest"] != before and is_true(read["conditions"], "SourcesRead")


def test_a_changed_corpus_whose_source_is_gone_is_not_ready_and_its_cartridges_wait_on_their_version(
    namespace: str, corpus_handlers: None, web_server: WebPage
) -> None:
    """A source to fix (a 404) in a changed spec: the stored digest no longer describes the spec, so the Corpus is
    not Ready (Stalled, InvalidSource) and keeps it only as its last good version; its Cartridges wait and say why,
    and retrain nothing (their promoted generation keeps serving)."""
    create_corpus(namespace, {"inline": "Before."})
    call(handlers.corpus_changed, body=corpus(namespace))
    before = dict(corpus(namespace).status)["digest"]
    trained = cartridge_pass(namespace, {})
    web_server.status = 404
    change = {"spec": {"sources": [{"http": {"url": web_server.url}}]}}
    kube.custom().patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "corpora", "c", change)
    call(handlers.corpus_changed, body=corpus(namespace))
    broken = dict(corpus(namespace).status)
    assert broken["digest"] == before and broken["observedGeneration"] == 2
    assert condition(broken, "Ready")["reason"] == condition(broken, "Stalled")["reason"] == "InvalidSource"
    assert is_true(broken["conditions"], "Stalled") and not is_true(broken["conditions"], "Ready")
    assert "HTTP Error 404" in condition(broken, "SourcesRead")["message"]
    waiting = cartridge_pass(namespace, trained)
    assert condition(waiting, "CorpusReady")["reason"] == "WaitingForCorpus"
    assert waiting["generation"] == trained["generation"]


def test_a_failed_read_is_one_warning_event_and_a_recovered_one_an_event(monkeypatch: pytest.MonkeyPatch) -> None:
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "warn", lambda body, reason, message: posted.append(("Warning", message)))
    monkeypatch.setattr(kopf, "info", lambda body, reason, message: posted.append(("Normal", message)))
    failed = {"type": "SourcesRead", "status": "False", "reason": "SourceUnavailable", "message": "503"}
    read = {**failed, "status": "True", "reason": "Stored", "message": "1 documents"}
    handlers._post_transitions(kopf.Body(cast(kopf.RawBody, {})), [read], [failed])
    handlers._post_transitions(kopf.Body(cast(kopf.RawBody, {})), [failed], [read])
    assert posted == [("Warning", "SourcesRead=False: 503"), ("Normal", "SourcesRead=True: 1 documents")]
    posted.clear()  # a source to fix: Stalled's Warning says it, once
    broken = {**failed, "reason": "InvalidSource", "message": "404"}
    stalled = {"type": "Stalled", "status": "True", "reason": "InvalidSource", "message": "404"}
    handlers._post_transitions(kopf.Body(cast(kopf.RawBody, {})), [read], [broken, stalled])
    assert posted == [("Normal", "SourcesRead=False: 404"), ("Warning", "Stalled=True: 404")]


@pytest.fixture
def deletion_handler(
    corpus_handlers: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> list[tuple[str, str]]:
    """The deletion handler with no pause between its looks at the training Jobs; the Events it posts (a Warning's
    reason marked with a "!")."""
    monkeypatch.setattr(handlers, "JOB_POLL_S", 0.0)
    monkeypatch.setattr(handlers, "CARTRIDGE_PASSES", handlers.Passes())
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "info", lambda body, reason, message: posted.append((reason, message)))
    monkeypatch.setattr(kopf, "warn", lambda body, reason, message: posted.append((f"!{reason}", message)))
    caplog.set_level(logging.INFO, logger=LOG.name)
    return posted


def jobs_stopping(monkeypatch: pytest.MonkeyPatch, looks: int | None) -> list[int]:
    """Training Job c-g1 still there for ``looks`` looks (None: for ever); each look, counted."""
    counted: list[int] = []

    def stop(namespace: str, name: str, uid: str) -> list[str]:
        counted.append(1)
        return ["c-g1"] if looks is None or len(counted) <= looks else []

    monkeypatch.setattr(handlers, "_stop_training_jobs", stop)
    return counted


def delete_cartridge(namespace: str) -> str:
    """Cartridge c, with retention Delete and one artifact stored, deleted as kopf runs the handler: its prefix."""
    prefix = layout.cartridge_prefix(handlers.CONFIG.store_root, namespace, "c")
    handlers.STORE.put_json(f"{prefix}/g1/progress.json", {})
    meta = {"name": "c", "namespace": namespace, "uid": "uid-c"}
    spec = {"retention": "Delete", "baseModel": {"name": "m"}}
    body = kopf.Body(cast(kopf.RawBody, {"kind": "Cartridge", "metadata": meta, "spec": spec}))
    handler = cast(Callable[..., Any], handlers.cartridge_deleted)
    asyncio.run(handler(body=body, spec=body.spec, namespace=namespace, name="c", meta=body.metadata, retry=0,
                        memo=kopf.Memo(), logger=LOG))  # fmt: skip
    return prefix


def test_waiting_for_the_training_pods_to_stop_is_progress_not_an_error(
    namespace: str, deletion_handler: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A trainer checkpoints within its grace period before its pod goes: a normal wait, said once. A retry per look
    (a TemporaryError) was logged by kopf as an error each time, up to 60 per deletion."""
    looks = jobs_stopping(monkeypatch, 3)
    prefix = delete_cartridge(namespace)
    waiting = f"waiting for training Job(s) c-g1 to stop before deleting {prefix}"
    assert len(looks) == 4 and handlers.STORE.list(prefix) == []
    assert [(r.levelno, r.getMessage()) for r in caplog.records if "c-g1" in r.getMessage()] == [
        (logging.INFO, waiting)
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert deletion_handler == [("WaitingForTraining", waiting)]


def test_pods_that_never_stop_hold_the_deletion_for_a_bounded_time_then_are_an_error(
    namespace: str, deletion_handler: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A node gone with its pods (they stay Terminating): the artifacts go after JOB_STOP_POLLS looks, and that is
    an error (what the pods write later stays)."""
    monkeypatch.setattr(handlers, "JOB_STOP_POLLS", 3)
    looks = jobs_stopping(monkeypatch, None)
    prefix = delete_cartridge(namespace)
    assert len(looks) == 4 and handlers.STORE.list(prefix) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].startswith("training Job(s) c-g1 still have pods after 0 s")
    assert [event for event in deletion_handler if event[0].startswith("!")] == [("!TrainingNotStopped", errors[0])]
