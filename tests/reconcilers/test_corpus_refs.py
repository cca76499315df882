"""Which corpus version a Cartridge trains on (DESIGN.md §3): the Corpus's current one, or the one it pins."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from cartridges import api, layout
from cartridges.corpus import NormalizedCorpus, publish
from cartridges.store import Store, StoreURI
from cartridges_e2e.minio import MinioServer
from cartridges_operator import kube
from cartridges_operator.cartridge import Pass, _ready_corpora, reconcile_cartridge
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


def ready_corpus(digest: str) -> dict[str, Any]:
    return {
        "spec": {"description": "d"},
        "status": {"digest": digest, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def damage(store: Store, uri: str, content: bytes | None) -> None:
    """Replace an object's bytes behind the store's back (as a disk, a torn copy or another tool does), or lose it."""
    path = Path(StoreURI.parse(uri).key)
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)


@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize(
    ("damaged", "content", "problem"),
    [
        (layout.MANIFEST_FILE, b"{truncated", "is not a corpus manifest (Expecting property name"),
        (layout.MANIFEST_FILE, b"{}", "is not a corpus manifest (4 validation errors"),
        (layout.CORPUS_FILE, b'{"id": "a", "te', "has sha256"),
    ],
)
def test_a_version_damaged_in_the_store_is_waited_for_naming_the_object_and_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch,
    stored: tuple[Store, str, str],
    pinned: bool,
    damaged: str,
    content: bytes,
    problem: str,
) -> None:
    """Every training Job started on it would fail for good (the trainer takes it as bad input); a reconcile pass
    that raised instead would write no status at all."""
    store, root, digest = stored
    monkeypatch.setattr(kube, "get_corpus", lambda ns, name: ready_corpus(digest))
    prefix = layout.corpus_prefix(root, NAMESPACE, "handbook", digest)
    damage(store, f"{prefix}/{damaged}", content)
    ref = {"name": "handbook", "digest": digest} if pinned else {"name": "handbook"}
    run = run_pass(store, root, ref)
    status = reconcile_cartridge(run.body, NAMESPACE, "c", run.config, store, lambda model: [])
    waiting = next(c for c in status["conditions"] if c["type"] == "CorpusReady")
    assert waiting["status"] == "False" and waiting["reason"] == "CorpusDigestUnusable"
    assert f"{prefix}/{damaged}" in waiting["message"] and problem in waiting["message"]
    assert "stores it again" in waiting["message"]
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["reason"] == "CorpusDigestUnusable"


@pytest.mark.minio
@pytest.mark.parametrize("usable", [True, False])
def test_a_version_restored_by_another_s3_client_is_checked_by_its_bytes(
    minio_server: MinioServer, s3_prefix: str, usable: bool
) -> None:
    """A backup copied back with another S3 client records no sha256: its bytes are hashed instead, so the same
    text is usable (as the trainer, which reads it, agrees) and other text is not."""
    store = minio_server.store()
    corpus = NormalizedCorpus.of([layout.Document(id="a", text="The sky is green here.\n")])
    restored = corpus.jsonl if usable else corpus.jsonl.replace(b"green", b"red")
    prefix = layout.corpus_prefix(s3_prefix, NAMESPACE, "handbook", corpus.digest)
    publish(corpus, "d", store, prefix)
    target = StoreURI.parse(f"{prefix}/{layout.CORPUS_FILE}")
    client = store._backend(target).client  # type: ignore[attr-defined]
    client.put_object(target.bucket, target.key, io.BytesIO(restored), len(restored))
    assert store.stat(str(target)).sha256 is None  # as another client leaves it
    run = run_pass(store, s3_prefix, {"name": "handbook", "digest": corpus.digest})
    assert (_ready_corpora(run) is not None) == usable, condition(run, "CorpusReady")


def test_a_pinned_digest_whose_manifest_names_other_data_is_not_trained_on(stored: tuple[Store, str, str]) -> None:
    """The digest pinned is what the training hash records: text stored under it with another digest's manifest
    (consistent in itself) would train a Cartridge on what its pin never named."""
    store, root, digest = stored
    other = "d" * 64
    for name in (layout.CORPUS_FILE, layout.MANIFEST_FILE):
        store.copy(f"{layout.corpus_prefix(root, NAMESPACE, 'handbook', digest)}/{name}",
                   f"{layout.corpus_prefix(root, NAMESPACE, 'handbook', other)}/{name}")  # fmt: skip
    run = run_pass(store, root, {"name": "handbook", "digest": other})
    assert _ready_corpora(run) is None
    waiting = condition(run, "CorpusReady")
    assert waiting["reason"] == "CorpusDigestUnusable"
    assert f"describes corpus digest {digest}, not {other}" in waiting["message"]
