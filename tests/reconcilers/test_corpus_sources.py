"""Corpus source reading and normalization, without a cluster: objects with globs, HTTP limits, a store that is down,
and what a Corpus may not make the operator read (its pod's files, other namespaces' data, internal addresses)."""

from __future__ import annotations

import errno
import http.server
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from _web_page import WebPage

import cartridges.cli
import cartridges.corpus
from cartridges import api, layout
from cartridges.corpus import NormalizedCorpus, SourceError, count_tokens, normalize_text, pieces_at_newlines
from cartridges.models import LoadedModel, tiny_llama
from cartridges.process import free_port
from cartridges.store import S3Config, Store, StoreURI
from cartridges_e2e.minio import MinioServer
from cartridges_operator import kube
from cartridges_operator.config import CorpusLimits
from cartridges_operator.corpus import reconcile_corpus, stored_version_damaged
from cartridges_operator.corpus_sources import read_sources
from cartridges_operator.http_fetch import SourceUnavailable, _may_pass
from cartridges_operator.redaction import redacted
from cartridges_operator.source_access import ReadsBusy, ReadSlots, SourceAccess

LOCAL = SourceAccess("file:///var/empty/store", "ns")
"""An operator run on a developer's machine (file:// store): its files and loopback servers are the user's."""
CLUSTER = SourceAccess("s3://cartridges", "ns")
"""An operator in a cluster (s3:// store)."""


def cluster_reading(s3_prefix: str) -> SourceAccess:
    """An operator in a cluster whose corpus.sourceBuckets lists the bucket of ``s3_prefix`` for namespace ns."""
    return SourceAccess(
        "s3://cartridges", "ns", CorpusLimits(source_buckets=(f"ns/{StoreURI.parse(s3_prefix).bucket}",))
    )


def no_configmaps(name: str, key: str) -> str:
    raise SourceError(f"ConfigMap {name} does not exist")


def spec(*sources: dict[str, object]) -> api.CorpusSpec:
    return api.CorpusSpec.model_validate({"description": "d", "sources": list(sources)})


def test_normalization_makes_the_digest_depend_on_text_only() -> None:
    assert normalize_text("\ufeffa\r\nb  \r\n\n", "x") == normalize_text(b"a\nb\n", "x") == "a\nb\n"
    assert normalize_text("e\u0301", "x") == "\u00e9\n"  # NFC
    with pytest.raises(SourceError, match="not UTF-8"):
        normalize_text(b"\xff\xfe\x00", "doc")
    first = read_sources(spec({"inline": "Same text.\r\n"}), Store(), no_configmaps, LOCAL)
    second = read_sources(spec({"inline": "Same text.  "}), Store(), no_configmaps, LOCAL)
    assert first.digest == second.digest


@pytest.mark.minio
def test_object_prefix_with_globs_in_key_order(minio_server: MinioServer, s3_prefix: str) -> None:
    store = minio_server.store()
    docs = [("docs/b.md", "B"), ("docs/a.md", "A"), ("docs/skip.txt", "no"), ("docs/draft.md", "no"), ("docs/c.md", "")]
    for key, text in docs:
        store.put_bytes(f"{s3_prefix}{key}", text.encode())
    source: dict[str, object] = {"object": {"uri": f"{s3_prefix}docs/", "include": ["*.md"], "exclude": ["draft*"]}}
    corpus = read_sources(spec(source), store, no_configmaps, cluster_reading(s3_prefix))
    assert [(d.id, d.text) for d in corpus.documents] == [("a.md", "A\n"), ("b.md", "B\n"), ("c.md", "\n")]
    with pytest.raises(SourceError, match="no objects under"):
        read_sources(spec({"object": {"uri": f"{s3_prefix}empty/"}}), store, no_configmaps, cluster_reading(s3_prefix))


@pytest.mark.minio
def test_objects_whose_keys_hold_hash_or_question_marks_are_read_by_their_whole_key(
    minio_server: MinioServer, s3_prefix: str
) -> None:
    """``kb/faq#2024.md`` is read, not ``kb/faq`` beside it (nor a missing ``kb/c``, failing the Corpus)."""
    store = minio_server.store()
    for key, text in [("kb/faq", "Old FAQ."), ("kb/faq#2024.md", "The 2024 FAQ."), ("kb/c#-guide?.md", "C# guide.")]:
        store.put_bytes(f"{s3_prefix}{key}", text.encode())
    corpus = read_sources(spec({"object": {"uri": f"{s3_prefix}kb/", "include": ["*.md"]}}), store, no_configmaps,
                          cluster_reading(s3_prefix))  # fmt: skip
    assert [(d.id, d.text) for d in corpus.documents] == [("c#-guide?.md", "C# guide.\n"), ("faq#2024.md",
                                                          "The 2024 FAQ.\n")]  # fmt: skip


def test_objects_are_named_relative_to_their_prefix_however_it_is_spelled(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "handbook.md").write_text("hello")
    for uri in (f"file://{tmp_path}/docs/", f"file://localhost{tmp_path}/docs/"):
        corpus = read_sources(spec({"object": {"uri": uri, "include": ["*.md"]}}), Store(), no_configmaps, LOCAL)
        assert [d.id for d in corpus.documents] == ["handbook.md"], uri

    class Hostile(Store):  # S3 takes keys like these; they are no document name below the prefix
        def names(self, prefix: str) -> list[str]:
            return ["handbook.md", "../../corpora/other/corpus.jsonl"]

    with pytest.raises(SourceError, match="'../../corpora/other/corpus.jsonl' under .* is not a plain relative path"):
        read_sources(spec({"object": {"uri": f"file://{tmp_path}/docs/"}}), Hostile(), no_configmaps, LOCAL)


@pytest.fixture
def web_page(web_server: WebPage) -> str:
    return web_server.url


def test_http_source_respects_its_size_limit(web_page: str) -> None:
    corpus = read_sources(spec({"http": {"url": web_page}}), Store(), no_configmaps, LOCAL)
    assert corpus.documents[0].text.startswith("Fetched over HTTP.")
    with pytest.raises(SourceError, match="larger than maxBytes=50"):
        read_sources(spec({"http": {"url": web_page, "maxBytes": 50}}), Store(), no_configmaps, LOCAL)
    closed = f"http://127.0.0.1:{free_port()}/x"
    with pytest.raises(SourceUnavailable, match="cannot fetch"):
        read_sources(spec({"http": {"url": closed, "timeoutSeconds": 2}}), Store(), no_configmaps, LOCAL)


@pytest.mark.parametrize(("status", "may_pass"), [(503, True), (502, True), (429, True), (408, True), (404, False),
                                                  (403, False), (410, False)])  # fmt: skip
def test_an_http_answer_tells_a_source_that_may_come_back_from_one_to_fix(
    web_server: WebPage, status: int, may_pass: bool
) -> None:
    """The server down or overloaded may pass by itself (the Corpus keeps its stored version and is retried); a page
    that is not there or not allowed needs a fix (its Corpus is not Ready)."""
    web_server.status = status
    with pytest.raises(SourceError, match=f"cannot fetch \\(HTTP Error {status}") as failed:
        read_sources(spec({"http": {"url": web_server.url}}), Store(), no_configmaps, LOCAL)
    assert isinstance(failed.value, SourceUnavailable) == may_pass


@pytest.mark.parametrize("code", [errno.EHOSTUNREACH, errno.ENETUNREACH])
def test_a_route_lost_for_now_may_pass(code: int) -> None:
    """A node or network blip answers "no route": not a source to fix (urllib raises these as plain OSError)."""
    assert _may_pass(urllib.error.URLError(OSError(code, os.strerror(code))))


def test_an_object_source_that_is_not_there_is_a_source_to_fix(tmp_path: Path) -> None:
    """Not StoreUnavailable (which may pass and keeps a Ready Corpus Ready): the spec names an object to correct."""
    root = f"file://{tmp_path}/store"
    missing = {"description": "d", "sources": [{"object": {"uri": f"{root}/sources/ns/typo.txt"}}]}
    status = reconcile_corpus(missing, {}, "ns", "c", 1, Store(), root)
    assert stalled(status)["status"] == "True"
    assert condition(status, "Ready")["reason"] == condition(status, "SourcesRead")["reason"] == "InvalidSource"


@pytest.mark.minio
def test_a_store_without_its_bucket_is_a_store_to_fix_not_a_source(minio_server: MinioServer, s3_prefix: str) -> None:
    """The operator's own bucket missing: neither InvalidSource (nothing in the Corpus to fix) nor StoreUnavailable
    (which waits it out as if it may pass)."""
    root = f"{s3_prefix.rstrip('/')}-missing"
    status = reconcile_corpus({"description": "d", "sources": [{"inline": "text"}]}, {}, "ns", "c", 1,
                              minio_server.store(), root)  # fmt: skip
    assert stalled(status)["status"] == "True" and condition(status, "Ready")["reason"] == "StoreError"


def test_store_down_is_a_clear_condition_and_keeps_the_last_digest() -> None:
    down = Store(S3Config(f"127.0.0.1:{free_port()}", "k", "s", timeout_s=1.0, retries=0))
    previous = {"digest": "abc", "artifact": "s3://bucket/corpora/ns/c/abc"}
    status = reconcile_corpus(
        {"description": "d", "sources": [{"inline": "text"}]}, previous, "ns", "c", 2, down, "s3://bucket"
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "StoreUnavailable" and "unreachable" in ready["message"]
    assert status["digest"] == "abc" and status["artifact"] == previous["artifact"]
    assert layout.corpus_prefix("s3://bucket", "ns", "c", "abc") == previous["artifact"]


def test_a_read_that_may_pass_keeps_a_ready_corpus_and_leaves_a_new_one_waiting(
    web_server: WebPage, tmp_path: Path
) -> None:
    """A source or the store unavailable: a Corpus never stored is not Ready (its Cartridges wait) but not Stalled
    either, as the retry may read it; a stored one stays Ready with its digest. Both say why in SourcesRead."""
    root, corpus = f"file://{tmp_path}/store", {"description": "d", "sources": [{"http": {"url": web_server.url}}]}
    down = Store(S3Config(f"127.0.0.1:{free_port()}", "k", "s", timeout_s=1.0, retries=0))
    web_server.status = 503
    new = reconcile_corpus(corpus, {}, "ns", "c", 1, Store(), root)
    assert condition(new, "Ready")["status"] == stalled(new)["status"] == "False"
    assert condition(new, "Ready")["reason"] == condition(new, "SourcesRead")["reason"] == "SourceUnavailable"
    web_server.status = 200
    stored = reconcile_corpus(corpus, new, "ns", "c", 1, Store(), root)
    web_server.status = 503
    inline = {"description": "d", "sources": [{"inline": "text"}]}  # read, then not stored
    for status in (reconcile_corpus(corpus, stored, "ns", "c", 1, Store(), root),
                   reconcile_corpus(inline, stored, "ns", "c", 1, down, "s3://bucket")):  # fmt: skip
        assert condition(status, "Ready") == condition(stored, "Ready") and status["digest"] == stored["digest"]
        assert stalled(status)["status"] == condition(status, "SourcesRead")["status"] == "False"
    assert condition(status, "SourcesRead")["reason"] == stalled(status)["reason"] == "StoreUnavailable"


def long_unread(status: dict[str, Any]) -> dict[str, Any]:
    """``status`` as if its sources had been unreadable since long ago."""
    since = {"lastTransitionTime": "2000-01-01T00:00:00Z"}
    conditions = [{**c, **since} if c["type"] == "SourcesRead" else c for c in status["conditions"]]
    return {**status, "conditions": conditions}


def test_sources_unavailable_for_longer_than_stall_after_stall_what_they_hold_back(
    web_server: WebPage, tmp_path: Path
) -> None:
    """A source that stays unavailable (down, or always slower than timeoutSeconds) is no blip: after
    ``stall_after_s`` a Corpus never stored, or one whose spec changed, is Stalled (Argo CD shows it Degraded, not
    Progressing for ever), and still retried. A stored Corpus whose spec is unchanged stays Ready: it holds nothing
    back. A read that succeeds ends it."""
    root = f"file://{tmp_path}/store"
    corpus = {"description": "d", "sources": [{"http": {"url": web_server.url}}]}

    def read(spec: dict[str, Any], status: dict[str, Any], generation: int = 1) -> dict[str, Any]:
        return reconcile_corpus(spec, status, "ns", "c", generation, Store(), root, CorpusLimits(stall_after_s=600))

    web_server.status = 503
    new = read(corpus, {})
    assert stalled(new)["status"] == "False"
    lasting = read(corpus, long_unread(new))
    assert stalled(lasting)["status"] == "True" and condition(lasting, "Ready")["status"] == "False"
    assert stalled(lasting)["reason"] == "SourceUnavailable"
    assert "unreadable since 2000-01-01T00:00:00Z" in stalled(lasting)["message"]
    assert "still retried" in stalled(lasting)["message"]
    web_server.status = 200
    stored = read(corpus, lasting)
    assert stalled(stored)["status"] == "False" and condition(stored, "Ready")["status"] == "True"
    web_server.status = 503
    unchanged = read(corpus, long_unread(read(corpus, stored)))
    assert condition(unchanged, "Ready") == condition(stored, "Ready") and stalled(unchanged)["status"] == "False"
    changed = {**corpus, "description": "new"}
    held = read(changed, long_unread(read(changed, stored, 2)), 2)
    assert stalled(held)["status"] == "True" and condition(held, "Ready")["status"] == "False"
    assert held["digest"] == stored["digest"] and held["observedGeneration"] == 2


@pytest.mark.parametrize(
    "before",
    [
        {"reason": "InvalidSource", "observedGeneration": 2},  # a source to fix for hours, then one 503
        {"reason": "SourceUnavailable", "observedGeneration": 1},  # down for long under the spec before this one
        {"reason": "SourceUnavailable", "observedGeneration": 2, "lastTransitionTime": None},  # hand-edited
        {"reason": "SourceUnavailable", "observedGeneration": 2, "lastTransitionTime": "yesterday"},
    ],
)
def test_the_stall_clock_starts_with_the_first_failure_that_may_pass_of_this_spec(
    web_server: WebPage, tmp_path: Path, before: dict[str, Any]
) -> None:
    """The time counted towards ``stall_after_s`` is that of this spec's sources being unavailable, not of
    SourcesRead being False: a Corpus fixed after a long InvalidSource, or whose spec changed while its old source
    was down, is not stalled by the first 503 of its new spec; a time that does not parse starts the clock anew."""
    web_server.status = 503
    corpus = {"description": "d", "sources": [{"http": {"url": web_server.url}}]}
    unread = {"type": "SourcesRead", "status": "False", "message": "m", "lastTransitionTime": "2000-01-01T00:00:00Z"}
    status = {"observedGeneration": 1, "conditions": [{**unread, **before}]}
    read = reconcile_corpus(corpus, status, "ns", "c", 2, Store(), f"file://{tmp_path}/store", CorpusLimits())
    assert stalled(read)["status"] == "False", stalled(read)["message"]
    assert condition(read, "SourcesRead")["reason"] == "SourceUnavailable"
    assert condition(read, "SourcesRead")["lastTransitionTime"].startswith(str(time.gmtime().tm_year))


def test_tokens_are_counted_with_the_named_tokenizer(tmp_path: Path) -> None:
    tokenizer = tiny_llama().tokenizer  # byte-level: one token per UTF-8 byte
    tokenizer.save_pretrained(tmp_path / "model")
    status = reconcile_corpus(
        {"description": "d", "sources": [{"inline": "abc"}], "tokenizer": f"file://{tmp_path}/model"},
        {}, "ns", "c", 1, Store(), f"file://{tmp_path}/store",
    )  # fmt: skip
    assert status["tokens"] == 4  # "abc\n"
    missing = reconcile_corpus(
        {"description": "d", "sources": [{"inline": "abc"}], "tokenizer": f"file://{tmp_path}/nothing"},
        {}, "ns", "c", 1, Store(), f"file://{tmp_path}/store",
    )  # fmt: skip
    stalled = next(c for c in missing["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "InvalidSource" and "no tokenizer.json" in stalled["message"]


def test_tokens_are_counted_piece_by_piece(smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large document is encoded in pieces cut after newlines (encoding 33 MB at once peaked at 4.7 GB): the pieces
    join back to the text, and the count stays within a token per cut of encoding it whole."""
    text = (Path(cartridges.cli.__file__).parent / "data" / "kestrel-rock.md").read_text()
    for size in (1, 7, 300, len(text)):
        pieces = list(pieces_at_newlines(text, size))
        assert "".join(pieces) == text and all(0 < len(piece) <= size for piece in pieces)
        assert all(piece.endswith("\n") or "\n" not in piece for piece in pieces[:-1])
    tokenizer_json = smollm2.tokenizer.backend_tokenizer.to_str().encode()
    whole = len(smollm2.tokenizer.backend_tokenizer.encode(text).ids)
    corpus = NormalizedCorpus.of([layout.Document(id="handbook.md", text=text)])
    assert count_tokens(corpus, "handbook", tokenizer_json) == whole
    monkeypatch.setattr(cartridges.corpus, "TOKEN_COUNT_PIECE_CHARS", 1000)
    cuts = len(list(pieces_at_newlines(text, 1000))) - 1
    assert cuts >= 5 and abs(count_tokens(corpus, "handbook", tokenizer_json) - whole) <= cuts


def test_tokens_follow_a_tokenizer_added_to_a_stored_corpus(tmp_path: Path) -> None:
    """The text (and so the digest) is unchanged when spec.tokenizer is added or dropped: the corpus is stored
    already, but the status counts with the tokenizer the spec names now."""
    tiny_llama().tokenizer.save_pretrained(tmp_path / "model")
    root, sources = f"file://{tmp_path}/store", [{"inline": "abc"}]
    first = reconcile_corpus({"description": "d", "sources": sources}, {}, "ns", "c", 1, Store(), root)
    assert first["tokens"] is None
    spec = {"description": "d", "sources": sources, "tokenizer": f"file://{tmp_path}/model"}
    counted = reconcile_corpus(spec, first, "ns", "c", 2, Store(), root)
    assert counted["digest"] == first["digest"] and counted["tokens"] == 4
    dropped = reconcile_corpus({"description": "d", "sources": sources}, counted, "ns", "c", 3, Store(), root)
    assert dropped["tokens"] is None


class HeadReads(Store):
    """A local store that records the lengths asked of ``get_head`` and refuses whole reads of a tokenizer (the
    corpus's own records are read whole, to find whether its version is stored)."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []

    def get_head(self, uri: str, length: int) -> bytes:
        self.lengths.append(length)
        return super().get_head(uri, length)

    def get_bytes(self, uri: str, expected_sha256: str | None = None) -> bytes:
        if uri.endswith("/tokenizer.json"):
            raise AssertionError(f"{uri} read whole")
        return super().get_bytes(uri, expected_sha256)


def test_a_tokenizer_is_read_only_up_to_its_limit(tmp_path: Path) -> None:
    """Reading stops one byte past the limit, so a huge object named as a tokenizer never fills the operator."""
    tiny_llama().tokenizer.save_pretrained(tmp_path / "model")
    size = (tmp_path / "model" / "tokenizer.json").stat().st_size
    corpus = {"description": "d", "sources": [{"inline": "abc"}], "tokenizer": f"file://{tmp_path}/model"}
    root, store = f"file://{tmp_path}/store", HeadReads()
    counted = reconcile_corpus(corpus, {}, "ns", "c", 1, store, root, CorpusLimits(tokenizer_max_bytes=size))
    assert counted["tokens"] == 4 and store.lengths[-1] == size + 1
    refused = stalled(reconcile_corpus(corpus, {}, "ns", "c", 1, store, root, CorpusLimits(tokenizer_max_bytes=1000)))
    assert refused["reason"] == "InvalidSource" and store.lengths[-1] == 1001
    assert refused["message"] == (
        f"spec.tokenizer: file://{tmp_path}/model/tokenizer.json is larger than 1000 bytes, the operator's limit for "
        "a tokenizer.json (real ones are a few MiB): name a tokenizer's JSON file, or the model directory that holds it"
    )


def test_a_file_that_is_no_tokenizer_is_not_quoted_back(tmp_path: Path) -> None:
    """The parse error reaches the Corpus's status and Events: it says where the file stops parsing, never what
    the file holds (the parser quotes the values it trips on)."""
    secret = "AKIA-not-for-status-0123456789"
    files = {
        "environ.json": f"CARTRIDGES_S3_SECRET_KEY={secret}\n",
        "value.json": f'{{"model": {{"type": "BPE", "vocab": {{"a": "{secret}"}}}}}}',
        "variant.json": f'{{"version": "1.0", "model": {{"type": "{secret}"}}}}',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        corpus = {"description": "d", "sources": [{"inline": "a"}], "tokenizer": f"file://{tmp_path}/{name}"}
        refused = stalled(reconcile_corpus(corpus, {}, "ns", "c", 1, Store(), f"file://{tmp_path}/store"))
        assert refused["reason"] == "InvalidSource" and "is not a tokenizers JSON file" in refused["message"]
        assert secret[:4] not in refused["message"] and " at line 1 column " in refused["message"], name


@pytest.mark.minio
def test_tokenizers_in_the_stores_bucket_only_in_their_namespaces_area_or_the_base_models(
    minio_server: MinioServer, s3_prefix: str, tmp_path: Path
) -> None:
    """A tokenizer is read with the operator's bucket-wide keys as object sources are, and confined alike: not
    another namespace's cartridges, nor the bucket outside the store. The base models, which every namespace
    reads, are allowed too; other buckets only as corpus.sourceBuckets says."""
    store, root = minio_server.store(), f"{s3_prefix}store"
    bucket = s3_prefix.removeprefix("s3://").rstrip("/")
    tiny_llama().tokenizer.save_pretrained(tmp_path)
    tokenizer = (tmp_path / "tokenizer.json").read_bytes()
    for place in ("cartridges/tenant-a/c/g1/", "models/m/", "sources/tenant-b/tok/"):
        store.put_bytes(f"{root}/{place}tokenizer.json", tokenizer)
    store.put_bytes(f"{s3_prefix}elsewhere/tokenizer.json", tokenizer)

    def count(uri: str, limits: CorpusLimits | None = None) -> dict[str, object]:
        corpus = {"description": "d", "sources": [{"inline": "abc"}], "tokenizer": uri}
        return reconcile_corpus(corpus, {}, "tenant-b", "c", 1, store, root, limits)

    for uri in (f"{root}/cartridges/tenant-a/c/g1", f"{s3_prefix}elsewhere/", f"{root}/sources/tenant-bb/x.json"):
        refused = stalled(count(uri))
        assert refused["reason"] == "InvalidSource", uri
        assert f"may read only {root}/sources/tenant-b/ or {root}/models/ for its spec.tokenizer" in refused["message"]
    assert count(f"{root}/models/m")["tokens"] == count(f"{root}/sources/tenant-b/tok/tokenizer.json")["tokens"] == 4
    other_root = f"s3://{bucket}-store"
    store.ensure_bucket(other_root)
    corpus = {"description": "d", "sources": [{"inline": "abc"}], "tokenizer": f"{s3_prefix}elsewhere"}
    allowed = reconcile_corpus(corpus, {}, "ns", "c", 1, store, other_root, CorpusLimits(source_buckets=(bucket,)))
    assert allowed["tokens"] == 4
    refused = stalled(
        reconcile_corpus(corpus, {}, "ns", "c", 1, store, other_root, CorpusLimits(source_buckets=("docs",)))
    )
    assert "reads spec.tokenizer only from the buckets docs" in refused["message"]


def test_read_slots_bound_the_corpora_read_at_once() -> None:
    """A reader that finds every slot taken gives up after ``wait_s``; a slot is free again after its reader ends,
    also when reading failed."""
    slots = ReadSlots(1, wait_s=0.1)
    with slots.hold():
        started = time.monotonic()
        busy = r"at most 1 Corpora at once \(chart value corpus\.concurrentReads\)"
        with pytest.raises(ReadsBusy, match=busy), slots.hold():
            pass
        assert 0.1 <= time.monotonic() - started < 10  # gave up after wait_s (loose: a loaded machine)
    with pytest.raises(SourceError), slots.hold():
        raise SourceError("a broken source")
    with slots.hold():
        pass


def test_a_corpus_waiting_for_a_read_slot_says_so_and_is_read_later(tmp_path: Path) -> None:
    """Not Stalled, with the reason; a new Corpus is not Ready yet, a stored one keeps its Ready condition and
    digest (its Cartridges must not flip to WaitingForCorpus) and its new generation stays unobserved."""
    root, corpus = f"file://{tmp_path}/store", {"description": "d", "sources": [{"inline": "abc"}]}
    slots = ReadSlots(1, wait_s=0.05)
    with slots.hold():
        new = reconcile_corpus(corpus, {}, "ns", "c", 1, Store(), root, None, slots)
    assert condition(new, "Ready")["status"] == "False" and condition(new, "Ready")["reason"] == "WaitingForReadSlot"
    assert "corpus.concurrentReads" in condition(new, "Ready")["message"]
    first = reconcile_corpus(corpus, new, "ns", "c", 1, Store(), root, None, slots)
    assert condition(first, "Ready")["status"] == "True"
    with slots.hold():
        waiting = reconcile_corpus(corpus, first, "ns", "c", 2, Store(), root, None, slots)
    assert stalled(waiting)["status"] == "False" and stalled(waiting)["reason"] == "WaitingForReadSlot"
    assert condition(waiting, "Ready") == condition(first, "Ready") and waiting["digest"] == first["digest"]
    assert waiting["observedGeneration"] == 1
    read = reconcile_corpus(corpus, waiting, "ns", "c", 2, Store(), root, None, slots)
    assert read["observedGeneration"] == 2 and stalled(read)["reason"] == "Stored"


def condition(status: dict[str, object], type_: str) -> dict[str, str]:
    conditions: list[dict[str, str]] = status["conditions"]  # type: ignore[assignment]
    return next(c for c in conditions if c["type"] == type_)


def stalled(status: dict[str, object]) -> dict[str, str]:
    return condition(status, "Stalled")


def test_an_operator_in_a_cluster_reads_no_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """file:// object sources and tokenizers would read the operator pod's own files (its environment holds the
    store's secret key): only an operator whose own store is file:// (a local run) reads them."""
    monkeypatch.setenv("CARTRIDGES_S3_SECRET_KEY", "operator-secret")
    (tmp_path / "doc.md").write_text("a local document")
    for source in ({"object": {"uri": "file:///proc/self/environ"}}, {"object": {"uri": "file:///etc/"}}):
        status = reconcile_corpus(
            {"description": "d", "sources": [source]}, {}, "ns", "c", 1, Store(), "s3://cartridges"
        )
        refused = stalled(status)
        assert refused["status"] == "True" and refused["reason"] == "InvalidSource"
        assert "may not name file:// URIs" in refused["message"] and "s3://" in refused["message"]
        assert "artifact" not in status
    tokenizer = {"description": "d", "sources": [{"inline": "a"}], "tokenizer": "file:///var/run/secrets/token"}
    assert (
        "spec.tokenizer may not name file://"
        in stalled(reconcile_corpus(tokenizer, {}, "ns", "c", 1, Store(), "s3://cartridges"))["message"]
    )
    local = reconcile_corpus(
        {"description": "d", "sources": [{"object": {"uri": f"file://{tmp_path}/doc.md"}}]},
        {}, "ns", "c", 1, Store(), f"file://{tmp_path}/store",
    )  # fmt: skip
    assert local["documents"] == 1, "a local run reads local files"


def test_object_sources_stay_in_their_namespaces_area_of_a_local_store(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/store"
    secret = {"description": "a", "sources": [{"inline": "tenant-a confidential"}]}
    assert reconcile_corpus(secret, {}, "tenant-a", "private", 1, Store(), root)["documents"] == 1
    for uri in (f"{root}/corpora/tenant-a/", f"{root}/", f"{root}/sources/tenant-b/../../corpora/tenant-a/"):
        steal = {"description": "b", "sources": [{"object": {"uri": uri, "include": ["*/*/corpus.jsonl"]}}]}
        refused = stalled(reconcile_corpus(steal, {}, "tenant-b", "stolen", 1, Store(), root))
        assert refused["reason"] == "InvalidSource", uri
        assert f"{root}/sources/tenant-b/" in refused["message"] or "'..'" in refused["message"]


@pytest.mark.minio
def test_object_sources_in_the_stores_bucket_only_under_their_namespaces_area(
    minio_server: MinioServer, s3_prefix: str
) -> None:
    """The operator's credentials cover the whole bucket, so a Corpus reads there only its namespace's sources/
    area: not another namespace's corpora or cartridges, nor the bucket outside the store's prefix."""
    store, root = minio_server.store(), f"{s3_prefix}store"
    reconcile_corpus({"description": "a", "sources": [{"inline": "secret"}]}, {}, "tenant-a", "c", 1, store, root)
    store.put_bytes(f"{s3_prefix}elsewhere/notes.md", b"not the operator's")
    store.put_bytes(f"{root}/sources/tenant-b/handbook.md", b"tenant-b's handbook")
    store.put_bytes(f"{root}/sources/tenant-bb/other.md", b"another namespace's")
    for uri in (f"{root}/corpora/tenant-a/", f"{root}/", s3_prefix, f"{s3_prefix}elsewhere/notes.md",
                f"{root}/sources/tenant-bb/"):  # fmt: skip
        status = reconcile_corpus({"description": "b", "sources": [{"object": {"uri": uri}}]}, {}, "tenant-b", "c",
                                  1, store, root)  # fmt: skip
        assert stalled(status)["reason"] == "InvalidSource" and "may read only" in stalled(status)["message"], uri
    own = {"description": "b", "sources": [{"object": {"uri": f"{root}/sources/tenant-b/"}}]}
    status = reconcile_corpus(own, {}, "tenant-b", "c", 1, store, root)
    assert status["documents"] == 1 and store.get_bytes(f"{status['artifact']}/corpus.jsonl").count(b"handbook") == 2


@pytest.mark.minio
def test_a_spec_stored_before_the_crds_patterns_is_a_source_to_fix(
    minio_server: MinioServer, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server checks a spec only when it is written: one stored before the CRD asked for a ConfigMap's name
    and key as Kubernetes spells them, and for a key in an object URI, is refused when read (InvalidSource), neither
    sent to the API server (which answers a name like "." with another object) nor failed with the client's error."""
    monkeypatch.setattr(kube, "configmap_reader", lambda namespace: no_configmaps)
    for source in ({"configMap": {"name": "..", "key": "k"}}, {"configMap": {"name": "docs", "key": "a/b"}},
                   {"object": {"uri": s3_prefix.rstrip("/")}}):  # fmt: skip
        status = reconcile_corpus({"description": "d", "sources": [source]}, {}, "ns", "c", 1, minio_server.store(),
                                  f"{s3_prefix}store")  # fmt: skip
        assert stalled(status)["reason"] == "InvalidSource" and "should match pattern" in stalled(status)["message"]


@pytest.mark.minio
def test_an_object_name_the_store_takes_no_object_of_is_a_source_to_fix(
    minio_server: MinioServer, s3_prefix: str
) -> None:
    """A key longer than S3 takes, for an object source or a tokenizer: the spec is what to fix (InvalidSource), not
    the store (StoreError)."""
    root = f"{s3_prefix}store"
    too_long = f"{root}/sources/ns/{'k' * 1100}"
    for spec_ in ({"description": "d", "sources": [{"object": {"uri": too_long}}]},
                  {"description": "d", "sources": [{"inline": "x"}], "tokenizer": f"{too_long}.json"}):  # fmt: skip
        status = reconcile_corpus(spec_, {}, "ns", "c", 1, minio_server.store(), root)
        assert stalled(status)["reason"] == "InvalidSource" and "takes no object of this name" in stalled(status)[
            "message"], spec_  # fmt: skip


@pytest.mark.minio
def test_source_buckets_limit_which_buckets_object_sources_read(minio_server: MinioServer, s3_prefix: str) -> None:
    store, bucket = minio_server.store(), s3_prefix.removeprefix("s3://").rstrip("/")
    root = f"s3://{bucket}-store"
    store.ensure_bucket(root)
    store.put_bytes(f"{s3_prefix}doc.md", b"allowed")
    allowed, only_docs = CorpusLimits(source_buckets=(bucket,)), CorpusLimits(source_buckets=("docs",))
    source = {"description": "d", "sources": [{"object": {"uri": f"{s3_prefix}doc.md"}}]}
    assert reconcile_corpus(source, {}, "ns", "c", 1, store, root, allowed)["documents"] == 1
    refused = stalled(reconcile_corpus(source, {}, "ns", "c", 1, store, root, only_docs))
    assert refused["reason"] == "InvalidSource" and "only from the buckets docs" in refused["message"]
    assert "corpus.sourceBuckets" in refused["message"]


def test_a_bucket_listed_for_one_namespace_is_refused_to_the_others() -> None:
    """The operator reads other buckets with its own keys and stores what it read under corpora/<namespace>/, which
    that namespace's keys read: a bucket listed as team-a/private must stay unreadable to team-b's Corpora, for
    object sources and spec.tokenizer alike, while an unscoped entry is for every namespace."""
    limits = CorpusLimits(source_buckets=("team-a/private", "shared"))
    team_a, team_b = (SourceAccess("s3://cartridges", ns, limits) for ns in ("team-a", "team-b"))
    for uri in ("s3://private/contracts/a.md", "s3://shared/a.md"):
        team_a.check_object(uri)
        team_a.check_tokenizer(uri)
    team_b.check_object("s3://shared/a.md")
    refusal = (
        r"for namespace team-b the operator reads (object sources|spec.tokenizer) only from the buckets shared "
        r"\(chart value corpus.sourceBuckets\); ask your cluster admin to add team-b/private, or copy the files to "
        r"s3://cartridges/sources/team-b/"
    )
    for check in (team_b.check_object, team_b.check_tokenizer):
        with pytest.raises(SourceError, match=refusal):
            check("s3://private/contracts/a.md")
    only_a = SourceAccess("s3://cartridges", "team-b", CorpusLimits(source_buckets=("team-a/private",)))
    with pytest.raises(SourceError, match="reads object sources from no bucket but the store's"):
        only_a.check_object("s3://shared/a.md")
    with pytest.raises(SourceError, match="reads object sources from no bucket but the store's"):
        CLUSTER.check_object("s3://any-bucket/a.md")  # nothing listed: no bucket but the store's


@pytest.fixture
def endless_server() -> Iterator[str]:
    """/fast streams bytes without end; /drip sends one byte every 0.2 s without end; /to-metadata redirects to the
    cloud metadata address, /redirect?to=URL to URL (quoted)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/to-metadata" or self.path.startswith("/redirect?to="):
                self.send_response(302)
                target = urllib.parse.unquote(self.path.partition("=")[2]) or "http://169.254.169.254/latest/meta-data/"
                self.send_header("Location", target)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"x" * (1 << 16) if self.path == "/fast" else b"x")
                    self.wfile.flush()
                    if self.path != "/fast":
                        time.sleep(0.2)
            except OSError:
                pass  # the reader hung up

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_corpus_larger_than_the_operators_limit_is_refused_while_reading(endless_server: str, tmp_path: Path) -> None:
    """All sources together count against the limit, and reading stops there: an endless download ends."""
    access = SourceAccess(LOCAL.store_root, "ns", CorpusLimits(max_bytes=1 << 20))
    endless: dict[str, object] = {"http": {"url": f"{endless_server}/fast", "maxBytes": 1 << 30}}
    with pytest.raises(SourceError, match=r"larger than 1 MiB in all .*corpus\.maxBytes"):
        read_sources(spec(endless), Store(), no_configmaps, access)
    (tmp_path / "big.txt").write_bytes(b"y" * (1 << 20) + b"y")
    with pytest.raises(SourceError, match=r"larger than 1 MiB in all \(reading file://.*big\.txt\)"):
        read_sources(spec({"object": {"uri": f"file://{tmp_path}/big.txt"}}), Store(), no_configmaps, access)
    half = "z" * (600 * 1024)
    with pytest.raises(SourceError, match="larger than 1 MiB in all"):
        read_sources(spec({"inline": half}, {"inline": half}), Store(), no_configmaps, access)
    assert len(read_sources(spec({"inline": half}), Store(), no_configmaps, access).documents) == 1


@pytest.mark.timeout(30)  # without the deadline, the dripping download never ends
def test_a_slow_http_source_times_out_as_a_whole(endless_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="did not finish within timeoutSeconds=1"):
        read_sources(spec({"http": {"url": f"{endless_server}/drip", "timeoutSeconds": 1}}), Store(), no_configmaps,
                     LOCAL)  # fmt: skip
    assert time.monotonic() - started < 20  # the 1 s deadline, not the endless body (loose: a loaded machine)


def test_http_sources_on_internal_addresses_are_refused(web_page: str, endless_server: str) -> None:
    """The operator's own pod (loopback) is refused in a cluster; cloud metadata (link-local) always, also when a
    redirect leads there."""
    with pytest.raises(SourceError, match="127.0.0.1 a loopback address"):
        read_sources(spec({"http": {"url": web_page}}), Store(), no_configmaps, CLUSTER)
    with pytest.raises(SourceError, match="localhost resolves to 127.0.0.1, a loopback address"):
        read_sources(spec({"http": {"url": "http://localhost/x"}}), Store(), no_configmaps, CLUSTER)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/", "http://[fe80::1]/",
                f"{endless_server}/to-metadata"):  # fmt: skip
        with pytest.raises(SourceError, match="link-local address"):
            read_sources(spec({"http": {"url": url, "timeoutSeconds": 2}}), Store(), no_configmaps, LOCAL)


def test_http_sources_on_private_addresses_are_read_only_within_the_admins_allowed_blocks() -> None:
    """corpus.httpAllowedCidrs reaches the fetch: a Service address in it is tried (nothing answers here)."""
    source = spec({"http": {"url": "http://10.96.0.1:8080/doc", "timeoutSeconds": 1}})
    with pytest.raises(SourceError, match="10.96.0.1 a private, shared or reserved address"):
        read_sources(source, Store(), no_configmaps, CLUSTER)
    allowed = SourceAccess("s3://cartridges", "ns", CorpusLimits(http_allowed_cidrs=(ip_network("10.96.0.0/12"),)))
    with pytest.raises(SourceError) as tried:
        read_sources(source, Store(), no_configmaps, allowed)
    assert "private" not in str(tried.value) and "10.96.0.1:8080/doc: " in str(tried.value)


def test_http_sources_are_fetched_over_http_only(endless_server: str) -> None:
    """A redirect to ftp:// would connect outside the address checks (and the spec allows http(s) only)."""
    with socket.create_server(("127.0.0.1", 0)) as ftp:
        target = urllib.parse.quote(f"ftp://127.0.0.1:{ftp.getsockname()[1]}/doc")
        with pytest.raises(SourceError, match="redirects to ftp://, but the operator fetches only http"):
            read_sources(spec({"http": {"url": f"{endless_server}/redirect?to={target}", "timeoutSeconds": 2}}),
                         Store(), no_configmaps, LOCAL)  # fmt: skip
        ftp.setblocking(False)
        with pytest.raises(BlockingIOError):
            ftp.accept()  # nobody connected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://no-such-host.invalid/doc", "Name or service not known"),
        ("http://127.0.0.1:99999/doc", "Port out of range"),
        ("http://127.0.0.1:abc/doc", "Port could not be cast to integer"),
        ("http://[::1/doc", "Invalid IPv6 URL"),
    ],
)
def test_an_http_source_on_an_unknown_host_or_a_malformed_url_is_a_clear_source_error(url: str, problem: str) -> None:
    status = reconcile_corpus(
        {"description": "d", "sources": [{"http": {"url": url}}]}, {}, "ns", "c", 1, Store(), LOCAL.store_root
    )
    assert stalled(status)["reason"] == "InvalidSource"
    assert stalled(status)["message"].startswith(f"{url}: cannot fetch (") and problem in stalled(status)["message"]


def test_credentials_in_http_source_urls_stay_out_of_status_and_stored_documents(
    web_page: str, endless_server: str, tmp_path: Path
) -> None:
    """A presigned URL's query or a URL's user:password is a credential: status messages (posted as Events too) and
    the stored corpus.jsonl name the URL without them, and a fresh signature changes no digest."""
    secret = "X-Amz-Signature=f00d&token=s3cret"
    root = f"file://{tmp_path}/store"

    def read(http: dict[str, object]) -> dict[str, object]:
        return reconcile_corpus({"description": "d", "sources": [{"http": http}]}, {}, "ns", "c", 1, Store(), root)

    stored = read({"url": f"{web_page}?{secret}"})
    assert stored["digest"] == read({"url": f"{web_page}?X-Amz-Signature=beef"})["digest"]
    jsonl = (Path(str(stored["artifact"]).removeprefix("file://")) / "corpus.jsonl").read_text()
    assert "s3cret" not in jsonl and f'"id": "{web_page}?<redacted>"' in jsonl
    refused = {
        f"http://127.0.0.1:{free_port()}/doc?{secret}": "cannot fetch",
        f"{web_page}?{secret}": "larger than maxBytes=5",
        f"http://user:s3cret@127.0.0.1:{free_port()}/doc?{secret}": "cannot fetch",
        f"{endless_server}/redirect?to={urllib.parse.quote(f'gopher://127.0.0.1/doc?{secret}')}": "not allowed",
    }
    for url, problem in refused.items():
        message = stalled(read({"url": url, "maxBytes": 5, "timeoutSeconds": 2}))["message"]
        assert problem in message and "?<redacted>" in message and "s3cret" not in message and "f00d" not in message


@pytest.mark.parametrize("password", ["s3cr'et", 's3cr"et', "s3cr et"])
def test_a_password_with_quotes_or_a_space_stays_out_of_status_logs_and_stored_documents(
    password: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 3986 allows ' in a URL's user information and the CRD takes any character: a pattern that ended the
    password at a quote named it in the status (and so its Events) of a body that is no UTF-8 text, and in the
    stored document id once the body was fixed."""
    caplog.set_level(logging.DEBUG)
    bodies = {"/handbook.txt": b"\xff\xfe not UTF-8"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://reader:{password}@127.0.0.1:{server.server_port}/handbook.txt"
    corpus = {"description": "d", "sources": [{"http": {"url": url}}]}
    root = f"file://{tmp_path}/store"
    try:
        broken = reconcile_corpus(corpus, {}, "ns", "c", 1, Store(), root)
        bodies["/handbook.txt"] = b"The handbook.\n"
        stored = reconcile_corpus(corpus, broken, "ns", "c", 2, Store(), root)
    finally:
        server.shutdown()
    shown = f"http://127.0.0.1:{server.server_port}/handbook.txt"
    assert stalled(broken)["message"].startswith(f"{shown}: not UTF-8 text")
    jsonl = (Path(str(stored["artifact"]).removeprefix("file://")) / "corpus.jsonl").read_text()
    assert f'"id": "{shown}"' in jsonl
    said = [c["message"] for c in [*broken["conditions"], *stored["conditions"]]]  # c.f. handlers._post_transitions
    said += [record.getMessage() for record in caplog.records]
    assert not any("s3cr" in text for text in [*said, jsonl]), said


def test_redaction_keeps_store_keys_whole() -> None:
    text = "https://u:p@ss@host/a?t=1#f and s3://bucket/what?.md, file:///a#b, 'gopher://h/x#frag'"
    assert redacted(text) == "https://host/a?<redacted> and s3://bucket/what?.md, file:///a#b, 'gopher://h/x?<redacted>"


def test_redaction_takes_a_quote_for_part_of_a_password_or_query() -> None:
    """A quote may be in a password or a query as well as around the URL: only whitespace ends them."""
    text = "'http://u:p'w@host/a?sig=x'y' and \"https://u:p\"w@host/b\""
    assert redacted(text) == '\'http://host/a?<redacted> and "https://host/b"'


def test_corpus_limits_from_the_environment() -> None:
    env = {
        "CARTRIDGES_CORPUS_MAX_BYTES": "1048576",
        "CARTRIDGES_CORPUS_SOURCE_BUCKETS": "docs, wiki,",
        "CARTRIDGES_CORPUS_CONCURRENT_READS": "4",
        "CARTRIDGES_CORPUS_STALL_AFTER_SECONDS": "1800",
    }
    assert CorpusLimits.from_env(env) == CorpusLimits(
        max_bytes=1 << 20, source_buckets=("docs", "wiki"), concurrent_reads=4, stall_after_s=1800
    )
    assert CorpusLimits.from_env({}) == CorpusLimits(
        max_bytes=32 << 20, source_buckets=(), concurrent_reads=2, stall_after_s=600
    )
    with pytest.raises(ValueError, match="CARTRIDGES_CORPUS_MAX_BYTES must be an integer >= 1, got '32Mi'"):
        CorpusLimits.from_env({"CARTRIDGES_CORPUS_MAX_BYTES": "32Mi"})
    with pytest.raises(ValueError, match="CARTRIDGES_CORPUS_CONCURRENT_READS must be an integer >= 1, got '0'"):
        CorpusLimits.from_env({"CARTRIDGES_CORPUS_CONCURRENT_READS": "0"})
    allowed = CorpusLimits.from_env({"CARTRIDGES_CORPUS_HTTP_ALLOWED_CIDRS": "10.20.0.0/16, fd00:1::/64,"})
    assert allowed.http_allowed_cidrs == (ip_network("10.20.0.0/16"), ip_network("fd00:1::/64"))
    for typo in ("10.20.0.1/16", "10.20.0.0/33", "wiki.internal"):  # host bits set, no such prefix, no address
        with pytest.raises(ValueError, match="CARTRIDGES_CORPUS_HTTP_ALLOWED_CIDRS must be comma-separated"):
            CorpusLimits.from_env({"CARTRIDGES_CORPUS_HTTP_ALLOWED_CIDRS": typo})
    scoped = CorpusLimits.from_env({"CARTRIDGES_CORPUS_SOURCE_BUCKETS": "docs,team-a/private"})
    assert scoped.buckets_for("team-a") == ("docs", "private") and scoped.buckets_for("team-b") == ("docs",)
    for entry in ("Team-A/private", "team-a/Private", "a/b/c", "/docs", "team-a/"):
        with pytest.raises(ValueError, match=f"corpus.sourceBuckets\\): '{entry}' is neither a bucket name"):
            CorpusLimits.from_env({"CARTRIDGES_CORPUS_SOURCE_BUCKETS": f"docs,{entry}"})


@pytest.mark.parametrize(
    ("damaged", "content"),
    [
        (layout.CORPUS_FILE, None),
        (layout.CORPUS_FILE, b'{"id": "0", "text": "Sound fa'),
        (layout.MANIFEST_FILE, b"{truncated"),
        (layout.MANIFEST_FILE, b"{}"),
    ],
)
def test_a_stored_version_lost_or_damaged_is_stored_again_when_read(
    tmp_path: Path, damaged: str, content: bytes | None
) -> None:
    """Its corpus.jsonl lost or altered, or its manifest unreadable, the version is not taken as stored: the read
    stores it again from the text it read, under the same digest (every Cartridge trained on it would fail for good
    otherwise). The retry timer's check finds such a version of a Ready Corpus, so that it is read."""
    root, store = f"file://{tmp_path}/store", Store()
    corpus = {"description": "d", "sources": [{"inline": "Sound facts."}]}
    first = reconcile_corpus(corpus, {}, "ns", "c", 1, store, root)
    assert not stored_version_damaged(first, "ns", "c", store, root)
    path = Path(StoreURI.parse(f"{first['artifact']}/{damaged}").key)
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    assert stored_version_damaged(first, "ns", "c", store, root)
    again = reconcile_corpus(corpus, first, "ns", "c", 1, store, root)
    assert condition(again, "Ready")["status"] == "True" and again["digest"] == first["digest"]
    assert [doc.text for doc in layout.read_documents(store, first["artifact"])] == ["Sound facts.\n"]
    assert not stored_version_damaged(again, "ns", "c", store, root)
