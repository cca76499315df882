"""Corpus source reading and normalization, without a cluster: objects with globs, HTTP limits, a store that is down."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cartridges import api, layout
from cartridges.corpus import SourceError, normalize_text
from cartridges.models import tiny_llama
from cartridges.process import free_port
from cartridges.store import S3Config, Store
from cartridges_e2e.minio import MinioServer
from cartridges_operator.corpus import reconcile_corpus
from cartridges_operator.corpus_sources import read_sources


def no_configmaps(name: str, key: str) -> str:
    raise SourceError(f"ConfigMap {name} does not exist")


def spec(*sources: dict[str, object]) -> api.CorpusSpec:
    return api.CorpusSpec.model_validate({"description": "d", "sources": list(sources)})


def test_normalization_makes_the_digest_depend_on_text_only() -> None:
    assert normalize_text("\ufeffa\r\nb  \r\n\n", "x") == normalize_text(b"a\nb\n", "x") == "a\nb\n"
    assert normalize_text("e\u0301", "x") == "\u00e9\n"  # NFC
    with pytest.raises(SourceError, match="not UTF-8"):
        normalize_text(b"\xff\xfe\x00", "doc")
    first = read_sources(spec({"inline": "Same text.\r\n"}), Store(), no_configmaps)
    second = read_sources(spec({"inline": "Same text.  "}), Store(), no_configmaps)
    assert first.digest == second.digest


@pytest.mark.minio
def test_object_prefix_with_globs_in_key_order(minio_server: MinioServer, s3_prefix: str) -> None:
    store = minio_server.store()
    for key, text in [("docs/b.md", "B"), ("docs/a.md", "A"), ("docs/skip.txt", "no"), ("docs/draft.md", "no")]:
        store.put_bytes(f"{s3_prefix}{key}", text.encode())
    source: dict[str, object] = {"object": {"uri": f"{s3_prefix}docs/", "include": ["*.md"], "exclude": ["draft*"]}}
    corpus = read_sources(spec(source), store, no_configmaps)
    assert [(d.id, d.text) for d in corpus.documents] == [("a.md", "A\n"), ("b.md", "B\n")]
    with pytest.raises(SourceError, match="no objects under"):
        read_sources(spec({"object": {"uri": f"{s3_prefix}empty/"}}), store, no_configmaps)


@pytest.fixture
def web_page() -> Iterator[str]:
    body = b"Fetched over HTTP. " * 10

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/page"
    server.shutdown()


def test_http_source_respects_its_size_limit(web_page: str) -> None:
    corpus = read_sources(spec({"http": {"url": web_page}}), Store(), no_configmaps)
    assert corpus.documents[0].text.startswith("Fetched over HTTP.")
    with pytest.raises(SourceError, match="larger than maxBytes=50"):
        read_sources(spec({"http": {"url": web_page, "maxBytes": 50}}), Store(), no_configmaps)
    closed = f"http://127.0.0.1:{free_port()}/x"
    with pytest.raises(SourceError, match="cannot fetch"):
        read_sources(spec({"http": {"url": closed, "timeoutSeconds": 2}}), Store(), no_configmaps)


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
