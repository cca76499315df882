"""The object store against a real MinIO server and the local file backend: same API, same guarantees."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from unittest import mock

import pytest
import urllib3
from _http_stub import http_stub
from minio.error import S3Error

from cartridges import layout
from cartridges.process import free_port
from cartridges.store import (
    AccessDenied,
    BucketNotFound,
    IntegrityError,
    ObjectNotFound,
    S3Config,
    Store,
    StoreError,
    StoreUnavailable,
    StoreURI,
)
from cartridges_e2e.minio import MinioServer


@pytest.fixture(params=["file", "s3"])
def store_and_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, str]:
    if request.param == "file":
        return Store(), f"file://{tmp_path}/store"
    server: MinioServer = request.getfixturevalue("minio_server")
    return server.store(), request.getfixturevalue("s3_prefix").rstrip("/")


def test_round_trip_records_and_verifies_sha256(store_and_root: tuple[Store, str], tmp_path: Path) -> None:
    store, root = store_and_root
    info = store.put_bytes(f"{root}/a/b.txt", b"hello")
    assert store.get_bytes(f"{root}/a/b.txt", expected_sha256=info.sha256) == b"hello"
    assert store.stat(f"{root}/a/b.txt").sha256 == info.sha256
    out = store.download(f"{root}/a/b.txt", tmp_path / "out" / "b.txt")
    assert (tmp_path / "out" / "b.txt").read_bytes() == b"hello" and out.sha256 == info.sha256


def test_listing_a_prefix_does_not_match_longer_names(store_and_root: tuple[Store, str]) -> None:
    store, root = store_and_root
    for key in ("cart-1/g1/x", "cart-1/g2/y", "cart-10/g1/z"):
        store.put_bytes(f"{root}/{key}", b"x")
    listed = sorted(StoreURI.parse(u).key.split("/", 1)[-1] for u in store.list(f"{root}/cart-1"))
    assert all("cart-10" not in u for u in store.list(f"{root}/cart-1"))
    assert len(listed) == 2
    assert store.delete_prefix(f"{root}/cart-1") == 2
    assert store.list(f"{root}/cart-1") == [] and len(store.list(f"{root}/cart-10")) == 1


def test_children_are_the_names_one_level_down(store_and_root: tuple[Store, str]) -> None:
    store, root = store_and_root
    for key in ("cart/g1/synth/a", "cart/g1/x", "cart/g12/y", "cart/current.json", "cart-2/g1/z"):
        store.put_bytes(f"{root}/{key}", b"x")
    assert sorted(store.children(f"{root}/cart")) == ["current.json", "g1", "g12"]
    store.delete_prefix(f"{root}/cart/g1")
    assert sorted(store.children(f"{root}/cart")) == ["current.json", "g12"]  # an emptied directory is gone
    assert store.children(f"{root}/absent") == []


def _make_folder(store: Store, uri: str) -> None:
    """What "Create folder" leaves: an empty directory on files, a zero-byte ``dir/`` object (a folder marker) on S3
    (as the AWS console and s3fs make them)."""
    parsed = StoreURI.parse(uri)
    if parsed.scheme == "file":
        Path(parsed.key).mkdir(parents=True, exist_ok=True)
        return
    client = store._backend(parsed).client  # type: ignore[attr-defined]
    client.put_object(parsed.bucket, parsed.key.rstrip("/") + "/", io.BytesIO(b""), 0)


def test_folders_made_by_other_tools_list_as_on_a_file_store(store_and_root: tuple[Store, str]) -> None:
    """A folder marker is no object: the directory's own one adds no name (an empty name is no cartridge), and one
    left in a generation its objects were deleted from leaves nothing listed, as an emptied directory does."""
    store, root = store_and_root
    for folder in ("cart", "cart/g1", "cart/g2"):
        _make_folder(store, f"{root}/{folder}")
    for key in ("cart/current.json", "cart/g1/x", "cart/g2/y"):
        store.put_bytes(f"{root}/{key}", b"x")
    assert sorted(store.children(f"{root}/cart")) == ["current.json", "g1", "g2"]
    assert store.list(f"{root}/cart/g1") == [f"{root}/cart/g1/x"]
    assert store.delete_prefix(f"{root}/cart/g1") == 1
    assert sorted(store.children(f"{root}/cart")) == ["current.json", "g2"]


def test_copy_keeps_bytes_and_recorded_sha256(store_and_root: tuple[Store, str]) -> None:
    store, root = store_and_root
    info = store.put_bytes(f"{root}/g1/synth/shard", b"shard bytes")
    store.copy(f"{root}/g1/synth/shard", f"{root}/g2/synth/shard")
    assert store.get_bytes(f"{root}/g2/synth/shard", expected_sha256=info.sha256) == b"shard bytes"
    assert store.stat(f"{root}/g2/synth/shard").sha256 == info.sha256
    with pytest.raises(ObjectNotFound):
        store.copy(f"{root}/g1/absent", f"{root}/g2/absent")


def test_prune_keeps_the_promoted_and_the_newest_trained_generations_before_it(
    store_and_root: tuple[Store, str],
) -> None:
    store, root = store_and_root
    for generation in range(1, 8):  # 3 and 4 failed (no manifest); 6 failed the quality gate; 7 is training
        prefix = layout.generation_prefix(root, "ns", "c", generation)
        store.put_bytes(f"{prefix}/synth/shard-0", b"x")
        if generation not in (3, 4, 7):
            store.put_bytes(f"{prefix}/{layout.MANIFEST_FILE}", b"{}")
    assert layout.prune_generations(store, root, "ns", "c", promoted=5, keep=3) == [3, 4]  # failed ones go
    assert layout.stored_generations(store, root, "ns", "c") == [1, 2, 5, 6, 7]
    assert layout.prune_generations(store, root, "ns", "c", promoted=5, keep=3) == []  # idempotent
    assert layout.prune_generations(store, root, "ns", "c", promoted=5, keep=2) == [1]  # 2 is the newest trained
    assert layout.stored_generations(store, root, "ns", "c") == [2, 5, 6, 7]


def test_missing_object_names_the_uri(store_and_root: tuple[Store, str]) -> None:
    store, root = store_and_root
    with pytest.raises(ObjectNotFound, match="nope.json"):
        store.get_bytes(f"{root}/nope.json")
    assert not store.exists(f"{root}/nope.json")


def test_sha256_mismatch_is_detected_and_leaves_no_file(store_and_root: tuple[Store, str], tmp_path: Path) -> None:
    store, root = store_and_root
    store.put_bytes(f"{root}/obj", b"real bytes")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.download(f"{root}/obj", tmp_path / "obj", expected_sha256="0" * 64)
    assert not (tmp_path / "obj").exists()
    with pytest.raises(IntegrityError):
        store.get_bytes(f"{root}/obj", expected_sha256="0" * 64)


def test_pointer_write_replaces_whole_object(store_and_root: tuple[Store, str]) -> None:
    store, root = store_and_root
    store.put_json(f"{root}/current.json", {"generation": 1})
    store.put_json(f"{root}/current.json", {"generation": 2})
    assert store.get_json(f"{root}/current.json") == {"generation": 2}


@pytest.mark.minio
def test_large_object_multipart_round_trip(minio_server: MinioServer, s3_prefix: str, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    with source.open("wb") as fh:  # 70 MiB: more than four 16 MiB parts
        for _ in range(70):
            fh.write(os.urandom(1 << 20))
    store = minio_server.store()
    info = store.put_file(f"{s3_prefix}big.bin", source)
    assert store.stat(f"{s3_prefix}big.bin").size == 70 << 20
    back = store.download(f"{s3_prefix}big.bin", tmp_path / "back.bin")
    assert back.sha256 == info.sha256


@pytest.mark.minio
def test_corrupted_object_in_minio_is_detected(minio_server: MinioServer, s3_prefix: str, tmp_path: Path) -> None:
    """Bytes replaced behind the store's back (another writer, bit rot) fail the recorded sha256."""
    store = minio_server.store()
    uri = f"{s3_prefix}weights.bin"
    store.put_bytes(uri, b"A" * 1000)
    recorded = store.stat(uri).sha256
    parsed = StoreURI.parse(uri)
    backend = store._backend(parsed)
    backend.client.put_object(parsed.bucket, parsed.key, io.BytesIO(b"A" * 999), 999)  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError, match="weights.bin"):
        store.download(uri, tmp_path / "w.bin", expected_sha256=recorded)


@pytest.mark.minio
def test_interrupted_download_leaves_nothing_beside_the_target(
    minio_server: MinioServer, s3_prefix: str, tmp_path: Path
) -> None:
    """A connection cut mid-body is StoreUnavailable, and no partial file stays in the cache directory (minio's
    fget_object left ``<name>.<etag>.part.minio`` there)."""
    store = minio_server.store()
    store.put_bytes(f"{s3_prefix}cut.bin", os.urandom(3 << 20))
    real_stream = urllib3.response.HTTPResponse.stream

    def cut_after_first_chunk(self: urllib3.response.HTTPResponse, *args: object, **kwargs: object) -> Iterator[bytes]:
        chunks = real_stream(self, *args, **kwargs)  # type: ignore[arg-type]
        yield next(chunks)
        raise urllib3.exceptions.ProtocolError("connection reset by peer")

    cache = tmp_path / "cache"
    cut = mock.patch.object(urllib3.response.HTTPResponse, "stream", cut_after_first_chunk)
    with cut, pytest.raises(StoreUnavailable, match="unreachable"):
        store.download(f"{s3_prefix}cut.bin", cache / "cut.bin")
    assert list(cache.iterdir()) == []
    assert store.download(f"{s3_prefix}cut.bin", cache / "cut.bin").size == 3 << 20


def _replace_keeping_recorded_sha256(store: Store, uri: str, data: bytes) -> None:
    """Rewrite an object in MinIO behind the store's back, with the sha256 it recorded for the old bytes."""
    parsed = StoreURI.parse(uri)
    recorded = {"sha256": store.stat(uri).sha256 or ""}
    client = store._backend(parsed).client  # type: ignore[attr-defined]
    client.put_object(parsed.bucket, parsed.key, io.BytesIO(data), len(data), metadata=recorded)


@pytest.mark.minio
def test_json_read_checks_the_recorded_sha256(minio_server: MinioServer, s3_prefix: str) -> None:
    """Manifests, pointers and score files are read with get_json: altered bytes are refused, not trusted."""
    store = minio_server.store()
    uri = f"{s3_prefix}eval.json"
    store.put_json(uri, {"iclGainRecovered": 0.1})
    assert store.get_json(uri) == {"iclGainRecovered": 0.1}
    _replace_keeping_recorded_sha256(store, uri, b'{"iclGainRecovered": 0.99}')
    with pytest.raises(IntegrityError, match="eval.json"):
        store.get_json(uri)


@pytest.mark.minio
def test_objects_without_a_recorded_sha256_are_read_unchecked(minio_server: MinioServer, s3_prefix: str) -> None:
    store = minio_server.store()
    uri = f"{s3_prefix}foreign.json"
    parsed = StoreURI.parse(uri)
    client = store._backend(parsed).client  # type: ignore[attr-defined]
    client.put_object(parsed.bucket, parsed.key, io.BytesIO(b"[1]"), 3)
    assert store.stat(uri).sha256 is None and store.get_json(uri) == [1]


def test_sha256_hashes_the_stored_bytes_not_the_record(store_and_root: tuple[Store, str]) -> None:
    store, root = store_and_root
    uri = f"{root}/cartridge.safetensors"
    info = store.put_bytes(uri, b"T" * (3 << 20))
    assert store.sha256(uri) == info.sha256
    if uri.startswith("s3://"):
        _replace_keeping_recorded_sha256(store, uri, b"T" * (3 << 20) + b"!")
    else:
        Path(StoreURI.parse(uri).key).write_bytes(b"T" * (3 << 20) + b"!")
    assert store.sha256(uri) == hashlib.sha256(b"T" * (3 << 20) + b"!").hexdigest() != info.sha256
    with pytest.raises(ObjectNotFound):
        store.sha256(f"{root}/missing")


@pytest.mark.minio
def test_wrong_credentials_and_missing_bucket(minio_server: MinioServer) -> None:
    good = minio_server.config
    bad = Store(S3Config(good.endpoint, good.access_key, "not-the-secret"))
    with pytest.raises(AccessDenied, match="secret key"):
        bad.put_bytes("s3://whatever/x", b"x")
    with pytest.raises(BucketNotFound) as missing:
        minio_server.store().get_bytes("s3://no-such-bucket/x")
    assert str(missing.value) == (
        "bucket 'no-such-bucket' does not exist (create it with an S3 client: `mc mb ALIAS/no-such-bucket`): "
        "s3://no-such-bucket/x"
    )


@pytest.mark.minio
def test_tls_store_with_a_private_ca_is_trusted_only_with_that_ca(minio_tls_server: MinioServer) -> None:
    """The CA's PEM from the environment (a pod's comes from key ca.crt of the store Secret) is enough; without
    it the certificate is refused with an error that says what to set."""
    env = minio_tls_server.env()
    assert env["CARTRIDGES_S3_ENDPOINT"].startswith("https://") and "CARTRIDGES_S3_CA_PEM" in env
    store = Store(S3Config.from_env(env))
    store.ensure_bucket("s3://tls-bucket")
    store.put_bytes("s3://tls-bucket/x", b"over TLS")
    assert store.get_bytes("s3://tls-bucket/x") == b"over TLS"
    untrusting = Store(S3Config.from_env({k: v for k, v in env.items() if k != "CARTRIDGES_S3_CA_PEM"}))
    with pytest.raises(StoreUnavailable, match="TLS .* failed .*CERTIFICATE_VERIFY_FAILED.*CARTRIDGES_S3_CA_PEM"):
        untrusting.get_bytes("s3://tls-bucket/x")


def test_store_down_fails_fast_with_the_endpoint() -> None:
    store = Store(S3Config(f"127.0.0.1:{free_port()}", "k", "s", timeout_s=1.0, retries=0))
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.get_bytes("s3://bucket/key")


def test_uri_parsing_rejects_what_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        StoreURI.parse("gs://bucket/key")
    with pytest.raises(ValueError, match="bucket"):
        StoreURI.parse("s3:///key")
    with pytest.raises(ValueError, match="invalid S3 bucket name 'b'"):  # minio would refuse it at the first request
        StoreURI.parse("s3://b/key")
    with pytest.raises(ValueError, match="invalid S3 bucket name 'my..bucket'"):
        StoreURI.parse("s3://my..bucket/key")
    assert str(StoreURI.parse("s3://bkt/k/x").join("y", "z")) == "s3://bkt/k/x/y/z"


def test_a_key_keeps_what_a_url_would_read_as_query_fragment_or_parameters(store_and_root: tuple[Store, str]) -> None:
    """S3 takes any character in a key, and the objects listed under a prefix are read through their URIs: a ``#``,
    ``?`` or ``;`` there is part of the key, or ``kb/faq#2024.md`` would read (and write) ``kb/faq``."""
    store, root = store_and_root
    names = ["faq", "faq#2024.md", "faq?.md", "faq;v=1.md"]
    for name in names:
        store.put_bytes(f"{root}/kb/{name}", name.encode())
    objects = layout.objects_under(store, f"{root}/kb/")
    assert [(name, store.get_bytes(uri)) for name, uri in objects] == [(name, name.encode()) for name in sorted(names)]
    assert StoreURI.parse("s3://docs/a.txt?versionId=1").key == "a.txt?versionId=1"  # a key, not an S3 version
    assert StoreURI.parse("file://localhost/d/faq#1").key == "/d/faq#1"


def test_s3_config_from_env_never_shows_the_secret() -> None:
    config = S3Config.from_env(
        {
            "CARTRIDGES_S3_ENDPOINT": "https://s3.internal:9000",
            "CARTRIDGES_S3_ACCESS_KEY": "ak",
            "CARTRIDGES_S3_SECRET_KEY": "very-secret",
        }
    )
    assert config.secure and config.endpoint == "s3.internal:9000"
    assert "very-secret" not in repr(config)


def test_concurrent_downloads_of_one_object_each_get_the_whole_file(
    store_and_root: tuple[Store, str], tmp_path: Path
) -> None:
    """The ranks of one torchrun job fill one model cache with the same object at the same moment: each download
    has its own temp file, so none truncates, renames or deletes another's, and the cache path is never partial."""
    store, root = store_and_root
    data = os.urandom(4 << 20)
    expected = store.put_bytes(f"{root}/models/m/model.gguf", data).sha256
    target = tmp_path / "cache" / "model.gguf"
    workers = 8
    barrier = threading.Barrier(workers)

    def download(_: int) -> str | None:
        barrier.wait()
        return store.download(f"{root}/models/m/model.gguf", target, expected_sha256=expected).sha256

    with ThreadPoolExecutor(workers) as pool:
        assert list(pool.map(download, range(workers))) == [expected] * workers
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temp file left behind


@contextmanager
def _not_s3(status: int, body: bytes) -> Iterator[str]:
    """An HTTP server that answers every request with ``status`` and an HTML ``body``, as an ingress or a web
    server on the wrong port does; yields its host:port."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, send_body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(True)

        def do_HEAD(self) -> None:
            self._answer(False)

        def log_message(self, *args: object) -> None:
            pass

    with http_stub(Handler) as endpoint:
        yield endpoint


def test_an_answer_that_is_not_s3_is_store_unavailable_and_short() -> None:
    page = b"<html><body>403 Forbidden - nginx " + b"x" * 2000 + b"</body></html>"
    with _not_s3(403, page) as endpoint:
        store = Store(S3Config(endpoint, "AKIAEXAMPLE", "the-secret", retries=0))
        calls: list[Callable[[], object]] = [
            lambda: store.get_json("s3://bucket/c/current.json"),
            lambda: store.list("s3://bucket/c"),
            lambda: store.stat("s3://bucket/k"),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable, match=f"object store at {endpoint} did not answer as S3") as err:
                call()
            assert "403" in str(err.value) and len(str(err.value)) < 300 and "the-secret" not in str(err.value)


def test_exists_against_a_web_server_is_not_a_missing_object() -> None:
    """HEAD's 404 has no body, so any web server's reads as NoSuchKey: the store asks again with a GET."""
    with _not_s3(404, b"") as endpoint:
        store = Store(S3Config(endpoint, "k", "s", region="us-east-1", retries=0))  # a region: no location lookup
        with pytest.raises(StoreUnavailable, match="did not answer as S3"):
            store.exists("s3://bucket/c/current.json")


@pytest.mark.minio
def test_processes_creating_one_bucket_together_all_succeed(minio_server: MinioServer) -> None:
    workers = 8
    for attempt in range(3):
        bucket = f"s3://race-{attempt}-{os.getpid()}"
        stores = [minio_server.store() for _ in range(workers)]
        barrier = threading.Barrier(workers)

        def create(store: Store, bucket: str = bucket, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            store.ensure_bucket(bucket)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(create, stores))  # re-raises the first failure
        assert minio_server.store().children(bucket) == []


def test_a_bucket_name_taken_is_used_only_once_it_answers() -> None:
    """Some S3 stores say BucketAlreadyExists where AWS says BucketAlreadyOwnedByYou; someone else's bucket with
    that name does not answer us."""
    store = Store(S3Config("127.0.0.1:1", "k", "s"))
    client = store._backend(StoreURI.parse("s3://taken")).client  # type: ignore[attr-defined]
    taken = S3Error(None, "BucketAlreadyExists", "the name is not available", None, None, None)  # type: ignore[arg-type]
    with mock.patch.object(client, "make_bucket", side_effect=taken):
        with mock.patch.object(client, "bucket_exists", side_effect=[False, True]):
            store.ensure_bucket("s3://taken")  # another process of ours created it in between
        with (
            mock.patch.object(client, "bucket_exists", side_effect=[False, False]),
            pytest.raises(StoreError, match="BucketAlreadyExists"),
        ):
            store.ensure_bucket("s3://taken")  # someone else's


def test_file_store_objects_get_the_mode_of_any_new_file(tmp_path: Path) -> None:
    """The trainer, operator and serving run as different UIDs sharing a file store in local setups: objects (and
    downloads into a shared cache) are readable as the umask allows, not 0o600."""
    store = Store()
    previous = os.umask(0o027)
    try:
        store.put_bytes(f"file://{tmp_path}/store/a.json", b"{}")
        store.put_file(f"file://{tmp_path}/store/b.bin", tmp_path / "store" / "a.json")
        store.download(f"file://{tmp_path}/store/b.bin", tmp_path / "cache" / "b.bin")
    finally:
        os.umask(previous)
    for path in (tmp_path / "store" / "a.json", tmp_path / "store" / "b.bin", tmp_path / "cache" / "b.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_a_failed_file_store_write_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    store = Store()
    (tmp_path / "store" / "g1").mkdir(parents=True)
    with pytest.raises(StoreError, match="a directory is in the way .*g1$"):
        store.put_bytes(f"file://{tmp_path}/store/g1", b"x" * 1000)
    (tmp_path / "store" / "full").mkdir()
    with (
        mock.patch("os.replace", side_effect=OSError(28, "No space left on device")),
        pytest.raises(StoreError, match="No space left on device; is the volume mounted"),
    ):
        store.put_bytes(f"file://{tmp_path}/store/full/x", b"x")
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == ["full", "g1"]  # no .tmp- leftovers
