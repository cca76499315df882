"""Which corpus version a Cartridge trains on (DESIGN.md §3): the Corpus's current one, or the one it pins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cartridges import api, layout
from cartridges.corpus import NormalizedCorpus, publish
from cartridges.store import Store
from cartridges_operator import kube
from cartridges_operator.cartridge import Pass, _ready_corpora
from cartridges_operator.config import OperatorConfig

NAMESPACE = "team-a"


def stalled_corpus(digest: str) -> dict[str, Any]:
    """A Corpus whose sources broke after ``digest`` was stored: not Ready, the last good digest kept."""
    conditions = [
        {"type": "Ready", "status": "False", "reason": "InvalidSource"},
        {"type": "Stalled", "status": "True", "reason": "InvalidSource"},
    ]
    return {"spec": {"description": "edited since"}, "status": {"digest": digest, "conditions": conditions}}


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Store, str, str]:
    """A file store holding one version of Corpus ``handbook``: (store, root, its digest)."""
    store, root = Store(), f"file://{tmp_path}/store"
    corpus = NormalizedCorpus.of([layout.Document(id="a", text="The sky is green here.\n")])
    publish(corpus, "the handbook as stored", store, layout.corpus_prefix(root, NAMESPACE, "handbook", corpus.digest))
    return store, root, corpus.digest


def run_pass(store: Store, root: str, ref: dict[str, str]) -> Pass:
    spec = api.CartridgeSpec.model_validate({"corpusRefs": [ref], "baseModel": {"name": "m", "uri": "s3://b/m"}})
    body = {"metadata": {"name": "c", "generation": 1}, "spec": spec.model_dump()}
    return Pass(body, spec, {}, NAMESPACE, "c", 1, OperatorConfig(store_root=root), store, lambda model: [])


def condition(run: Pass, type_: str) -> dict[str, Any]:
    return next(c for c in run.status["conditions"] if c["type"] == type_)


@pytest.mark.parametrize("corpus", ["stalled", "deleted"])
def test_a_pinned_version_in_the_store_needs_no_ready_corpus(
    monkeypatch: pytest.MonkeyPatch, stored: tuple[Store, str, str], corpus: str
) -> None:
    store, root, digest = stored
    monkeypatch.setattr(kube, "get_corpus", lambda ns, name: stalled_corpus(digest) if corpus == "stalled" else None)
    run = run_pass(store, root, {"name": "handbook", "digest": digest})
    assert _ready_corpora(run) == [("handbook", digest, "the handbook as stored")]
    assert condition(run, "CorpusReady")["status"] == "True"


def test_a_pinned_version_not_in_the_store_is_waited_for(
    monkeypatch: pytest.MonkeyPatch, stored: tuple[Store, str, str]
) -> None:
    store, root, digest = stored
    monkeypatch.setattr(kube, "get_corpus", lambda ns, name: stalled_corpus(digest))
    run = run_pass(store, root, {"name": "handbook", "digest": "0" * 64})
    assert _ready_corpora(run) is None
    waiting = condition(run, "CorpusReady")
    assert waiting["status"] == "False" and waiting["reason"] == "CorpusDigestNotFound"
    assert "0" * 64 in waiting["message"] and condition(run, "Ready")["reason"] == "CorpusDigestNotFound"


def test_an_unpinned_ref_waits_for_its_corpus_to_be_ready(
    monkeypatch: pytest.MonkeyPatch, stored: tuple[Store, str, str]
) -> None:
    store, root, digest = stored
    monkeypatch.setattr(kube, "get_corpus", lambda ns, name: stalled_corpus(digest))
    run = run_pass(store, root, {"name": "handbook"})
    assert _ready_corpora(run) is None
    assert condition(run, "CorpusReady")["reason"] == "WaitingForCorpus"
