"""One object-store API for the whole product: ``s3://bucket/key`` (MinIO or any S3) and ``file:///path``.

Every S3 write records the object's sha256 (user metadata) and every read checks it: ``get_bytes``/``get_json``
against the sha256 that came with the bytes, ``download`` against the recorded or the expected one. A local file
records nothing beside its bytes, so there only an expected sha256 (one object naming another's) is checked.
``sha256`` hashes the bytes as stored now. Pointers (``current.json``) are replaced atomically.
Prefixes are always listed as directories, so ``cart-1`` never matches ``cart-10``. Failures become
:class:`StoreError` subclasses that name the URI.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name

from cartridges.hashing import sha256_bytes, sha256_chunks, sha256_file

log = logging.getLogger(__name__)

SHA256_META = "sha256"
PART_SIZE = 16 * 1024 * 1024
HASH_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """An object-store operation failed; ``uri`` says where."""

    def __init__(self, message: str, uri: str) -> None:
        super().__init__(f"{message}: {uri}")
        self.uri = uri


class ObjectNotFound(StoreError):
    pass


class BucketNotFound(StoreError):
    pass


class AccessDenied(StoreError):
    pass


class InvalidObjectName(StoreError):
    """The store takes no object of this name (too long, or a character it refuses): the name is what to fix."""


class StoreUnavailable(StoreError):
    pass


class StoreNotConfigured(StoreError):
    """An ``s3://`` URI with no S3 endpoint in the environment: a setting to add, not a store to retry."""


class IntegrityError(StoreError):
    """The bytes read do not have the sha256 they were recorded with (corrupt or truncated object)."""


@dataclass(frozen=True)
class StoreURI:
    """A parsed ``s3://bucket/key`` or ``file:///abs/path`` (``bucket`` is empty for files)."""

    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> StoreURI:
        """Everything after the bucket (``file://``: after the optional ``localhost``) is the key, as written: ``?``,
        ``#`` and ``;`` are characters of a key like any other (S3 takes them, and listed keys come back as URIs
        that are parsed again), not a URL's query, fragment or parameters, and nothing is dropped from it."""
        scheme, sep, rest = uri.partition("://")
        netloc = rest.split("/", 1)[0]
        key = rest[len(netloc) :]
        if sep and scheme.lower() == "s3":
            if not netloc:
                raise ValueError(f"s3 URI needs a bucket, like s3://bucket/key: {uri!r}")
            try:  # minio's own check, here so a bad name is an input error, not a failure of the first request
                check_bucket_name(netloc)
            except ValueError:
                raise ValueError(
                    f"invalid S3 bucket name {netloc!r} in {uri!r}: use 3-63 lowercase letters, digits, '.' and '-'"
                ) from None
            return cls("s3", netloc, key.lstrip("/"))
        if sep and scheme.lower() == "file":
            if netloc not in ("", "localhost"):
                raise ValueError(f"file URI must be absolute, like file:///data/store: {uri!r}")
            return cls("file", "", key)
        raise ValueError(f"unsupported store URI {uri!r}: use s3://bucket/key or file:///absolute/path")

    def join(self, *parts: str) -> StoreURI:
        key = "/".join([self.key.rstrip("/"), *(p.strip("/") for p in parts)]) if self.key else "/".join(parts)
        return StoreURI(self.scheme, self.bucket, key)

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"file://{self.key}"


@dataclass(frozen=True)
class ObjectInfo:
    """``sha256`` is the one recorded at upload (None for an object another tool wrote to S3); ``revision``
    names this version of the object as the backend knows it without reading it (S3: ETag, size and
    modification time), so an object without a recorded sha256 can still be told from its replacement."""

    uri: str
    size: int
    sha256: str | None
    revision: str | None = None


@dataclass(frozen=True)
class S3Config:
    """Where and how to reach S3. Credentials come from the environment (a Kubernetes Secret), never from args."""

    endpoint: str
    access_key: str
    secret_key: str
    secure: bool = False
    region: str | None = None
    ca_bundle: str | None = None  # CA certificates to trust instead of the system's (a store with a private CA)
    ca_pem: str | None = None  # the same as PEM text: what a pod gets from the ``ca.crt`` key of the store Secret
    timeout_s: float = 10.0
    retries: int = 2

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Config:
        env = dict(os.environ if env is None else env)
        endpoint = env.get("CARTRIDGES_S3_ENDPOINT", "")
        if not endpoint:
            raise StoreError("CARTRIDGES_S3_ENDPOINT is not set (host:port or http(s)://host:port)", "s3://")
        parsed = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
        secure = parsed.scheme == "https" or env.get("CARTRIDGES_S3_TLS", "").lower() in ("1", "true")
        return cls(
            endpoint=parsed.netloc,
            access_key=env.get("CARTRIDGES_S3_ACCESS_KEY", ""),
            secret_key=env.get("CARTRIDGES_S3_SECRET_KEY", ""),
            secure=secure,
            region=env.get("CARTRIDGES_S3_REGION") or None,
            ca_bundle=env.get("CARTRIDGES_S3_CA_BUNDLE") or None,
            ca_pem=env.get("CARTRIDGES_S3_CA_PEM") or None,
        )

    def __repr__(self) -> str:  # never print the secret
        return f"S3Config(endpoint={self.endpoint!r}, secure={self.secure}, access_key=***)"


def _write_hashing(chunks: Iterable[bytes], path: Path) -> str:
    """Write ``chunks`` to ``path`` and return their sha256: a download is read once, not written then re-read."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for chunk in chunks:
            digest.update(chunk)
            fh.write(chunk)
    return digest.hexdigest()


def _new_temp_file(directory: Path, prefix: str) -> Path:
    """Create an empty file in ``directory`` that no other writer shares (a random name, created exclusively),
    with the mode any new file gets (0o666 less the umask, and a default ACL if the directory has one): mkstemp's
    0o600 would keep the other UIDs that share a store or a model cache from reading what it becomes."""
    path = directory / f"{prefix}{secrets.token_hex(8)}"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path


class _Backend(Protocol):
    def put_file(self, uri: StoreURI, path: Path, sha256: str) -> None: ...
    def put_bytes(self, uri: StoreURI, data: bytes, sha256: str) -> None: ...
    def get_to_file(self, uri: StoreURI, path: Path) -> str: ...
    def get_bytes(self, uri: StoreURI) -> tuple[bytes, str | None]: ...
    def get_head(self, uri: StoreURI, length: int) -> bytes: ...
    def sha256(self, uri: StoreURI) -> str: ...
    def stat(self, uri: StoreURI) -> ObjectInfo: ...
    def list(self, prefix: StoreURI) -> Iterator[StoreURI]: ...
    def children(self, prefix: StoreURI) -> Iterator[str]: ...
    def copy(self, source: StoreURI, target: StoreURI) -> None: ...
    def delete(self, uri: StoreURI) -> None: ...
    def delete_folders(self, prefix: StoreURI) -> None: ...
    def ensure_bucket(self, uri: StoreURI) -> None: ...


class _FileBackend:
    def _path(self, uri: StoreURI) -> Path:
        return Path(uri.key)

    def put_file(self, uri: StoreURI, path: Path, sha256: str) -> None:
        def copy(fh: Any) -> None:
            with path.open("rb") as source:
                shutil.copyfileobj(source, fh, 8 << 20)

        self._atomic_write(uri, copy)

    def put_bytes(self, uri: StoreURI, data: bytes, sha256: str) -> None:
        self._atomic_write(uri, lambda fh: fh.write(data))

    def _atomic_write(self, uri: StoreURI, write: Any) -> None:
        """Write a ``.tmp-`` file beside the target and rename it into place. The temp file goes whatever
        happens (``list`` skips such names, so a leftover would stay forever), and an OS error becomes a
        :class:`StoreError` that says what to fix."""
        target = self._path(uri)
        temp: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = _new_temp_file(target.parent, ".tmp-")
            with temp.open("wb") as fh:
                write(fh)
            os.replace(temp, target)
        except PermissionError as err:
            raise AccessDenied(f"permission denied ({err.strerror})", str(uri)) from err
        except IsADirectoryError as err:
            raise StoreError(
                "a directory is in the way of the object (remove it or pick another name)", str(uri)
            ) from err
        except OSError as err:
            raise StoreError(
                f"cannot write the object ({err.strerror or err}; is the volume mounted, writable and not full?)",
                str(uri),
            ) from err
        finally:
            if temp is not None:
                temp.unlink(missing_ok=True)

    def get_to_file(self, uri: StoreURI, path: Path) -> str:
        with self._existing(uri).open("rb") as source:
            return _write_hashing(iter(lambda: source.read(HASH_CHUNK), b""), path)

    def get_bytes(self, uri: StoreURI) -> tuple[bytes, str | None]:
        return self._existing(uri).read_bytes(), None  # a local file records no sha256 apart from its bytes

    def sha256(self, uri: StoreURI) -> str:
        return sha256_file(self._existing(uri))

    def get_head(self, uri: StoreURI, length: int) -> bytes:
        with self._existing(uri).open("rb") as fh:
            return fh.read(length)

    def stat(self, uri: StoreURI) -> ObjectInfo:
        path = self._existing(uri)
        return ObjectInfo(str(uri), path.stat().st_size, sha256_file(path))

    def _existing(self, uri: StoreURI) -> Path:
        path = self._path(uri)
        if not path.is_file():
            raise ObjectNotFound("no such object", str(uri))
        return path

    def list(self, prefix: StoreURI) -> Iterator[StoreURI]:
        root = Path(prefix.key)
        if not root.is_dir():
            return
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield StoreURI("file", "", str(path))

    def children(self, prefix: StoreURI) -> Iterator[str]:
        root = Path(prefix.key)
        if not root.is_dir():
            return
        for path in sorted(root.iterdir()):  # a directory emptied by deletes is gone, as in S3
            stored = not path.name.startswith(".tmp-") if path.is_file() else any(p.is_file() for p in path.rglob("*"))
            if stored:
                yield path.name

    def copy(self, source: StoreURI, target: StoreURI) -> None:
        self.put_file(target, self._existing(source), "")

    def delete(self, uri: StoreURI) -> None:
        self._path(uri).unlink(missing_ok=True)

    def delete_folders(self, prefix: StoreURI) -> None:
        """Nothing to do: an emptied directory lists as nothing."""

    def ensure_bucket(self, uri: StoreURI) -> None:
        Path(uri.key).mkdir(parents=True, exist_ok=True)


# S3 error codes: the error raised and its message ("{bucket}" is the bucket of the URI, named where it helps).
_S3_ERRORS: dict[str, tuple[type[StoreError], str]] = {
    "NoSuchKey": (ObjectNotFound, "no such object"),
    "NoSuchBucket": (
        BucketNotFound,
        "bucket {bucket!r} does not exist (create it with an S3 client: `mc mb ALIAS/{bucket}`)",
    ),
    "KeyTooLongError": (InvalidObjectName, "object name too long (S3 takes up to 1024 bytes)"),
    "XMinioInvalidObjectName": (
        InvalidObjectName,
        "the store takes no object of this name (too long, or a character it refuses)",
    ),
    "AccessDenied": (AccessDenied, "access denied (check the credentials Secret and bucket policy)"),
    "InvalidAccessKeyId": (AccessDenied, "unknown access key (check the credentials Secret)"),
    "SignatureDoesNotMatch": (AccessDenied, "wrong secret key (check the credentials Secret)"),
}


def _directory(prefix: StoreURI) -> str:
    """The key prefix that lists ``prefix`` as a directory (``cart-1/``, never matching ``cart-10``); the bucket's
    root is the empty one."""
    return prefix.key.rstrip("/") + "/" if prefix.key else ""


class _S3Backend:
    def __init__(self, config: S3Config) -> None:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=config.timeout_s, read=max(config.timeout_s, 60.0)),
            retries=urllib3.Retry(total=config.retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            cert_reqs="CERT_REQUIRED" if config.secure else "CERT_NONE",
            ca_certs=config.ca_bundle,
            ca_cert_data=config.ca_pem,
        )
        self.client = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=config.secure,
            region=config.region,
            http_client=http,
        )
        self.endpoint = config.endpoint

    def put_file(self, uri: StoreURI, path: Path, sha256: str) -> None:
        self.client.fput_object(uri.bucket, uri.key, str(path), metadata={SHA256_META: sha256}, part_size=PART_SIZE)

    def put_bytes(self, uri: StoreURI, data: bytes, sha256: str) -> None:
        self.client.put_object(uri.bucket, uri.key, io.BytesIO(data), len(data), metadata={SHA256_META: sha256})

    def get_to_file(self, uri: StoreURI, path: Path) -> str:
        """Stream the body into ``path`` (minio's fget_object would leave a ``.part.minio`` file beside it when
        interrupted, which nothing cleans up)."""
        response = self.client.get_object(uri.bucket, uri.key)
        try:
            return _write_hashing(response.stream(HASH_CHUNK), path)
        finally:
            response.close()
            response.release_conn()

    def get_bytes(self, uri: StoreURI) -> tuple[bytes, str | None]:
        """The bytes and the sha256 recorded with them, from one response (so never another version's)."""
        response = self.client.get_object(uri.bucket, uri.key)
        return self._read(response), response.headers.get(f"x-amz-meta-{SHA256_META}")

    def get_head(self, uri: StoreURI, length: int) -> bytes:
        """A ranged GET: the store sends no more than ``length`` bytes (an empty object has no range to send)."""
        try:
            return self._read(self.client.get_object(uri.bucket, uri.key, offset=0, length=length))
        except S3Error as err:
            if err.code == "InvalidRange":
                return b""
            raise

    @staticmethod
    def _read(response: Any) -> bytes:
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def sha256(self, uri: StoreURI) -> str:
        """Hash the object as it streams by, in chunks: nothing is written, a large object is never all in memory."""
        response = self.client.get_object(uri.bucket, uri.key)
        try:
            return sha256_chunks(response.stream(HASH_CHUNK))
        finally:
            response.close()
            response.release_conn()

    def stat(self, uri: StoreURI) -> ObjectInfo:
        try:
            stat = self.client.stat_object(uri.bucket, uri.key)
        except S3Error:
            # An answer to HEAD has no body, so minio names its error by the status alone: any web server's 404
            # reads as NoSuchKey. A GET gets the error as the store words it, or fails as a non-S3 answer.
            self.get_head(uri, 1)
            raise
        metadata = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        modified = stat.last_modified.isoformat() if stat.last_modified else ""
        revision = f"{stat.etag} {stat.size} {modified}"
        return ObjectInfo(str(uri), int(stat.size or 0), metadata.get(f"x-amz-meta-{SHA256_META}"), revision)

    def list(self, prefix: StoreURI) -> Iterator[StoreURI]:
        directory = _directory(prefix)
        for obj in self.client.list_objects(prefix.bucket, prefix=directory, recursive=True):
            if obj.object_name and not obj.is_dir:
                yield StoreURI("s3", prefix.bucket, obj.object_name)

    def children(self, prefix: StoreURI) -> Iterator[str]:
        """Skips the directory's own folder marker (a zero-byte ``dir/`` object, as the AWS console's "Create
        folder" makes), listed with the empty name. A sub-directory holding only a marker is listed: telling it
        from one holding objects would take a request per sub-directory (see ``delete_folders``)."""
        directory = _directory(prefix)
        for obj in self.client.list_objects(prefix.bucket, prefix=directory, recursive=False):
            if name := (obj.object_name or "")[len(directory) :].rstrip("/"):
                yield name

    def copy(self, source: StoreURI, target: StoreURI) -> None:
        """Server-side: the bytes never leave the store, and the recorded sha256 (user metadata) goes along."""
        self.client.copy_object(target.bucket, target.key, CopySource(source.bucket, source.key))

    def delete(self, uri: StoreURI) -> None:
        self.client.remove_object(uri.bucket, uri.key)

    def delete_folders(self, prefix: StoreURI) -> None:
        """The folder markers under ``prefix`` (which ``list`` skips): left, the emptied directory would still be
        listed by ``children``, as a local one is not."""
        directory = _directory(prefix)
        for obj in self.client.list_objects(prefix.bucket, prefix=directory, recursive=True):
            if obj.object_name and obj.is_dir:
                self.client.remove_object(prefix.bucket, obj.object_name)

    def ensure_bucket(self, uri: StoreURI) -> None:
        """Check, then create: a process that started at the same time may create the bucket in between, which is
        as good (S3 says BucketAlreadyOwnedByYou; a store that says BucketAlreadyExists instead is believed once
        the bucket answers us, as one that someone else owns does not)."""
        if self.client.bucket_exists(uri.bucket):
            return
        try:
            self.client.make_bucket(uri.bucket)
        except S3Error as err:
            if err.code == "BucketAlreadyOwnedByYou":
                return
            if err.code == "BucketAlreadyExists":
                with contextlib.suppress(S3Error):
                    if self.client.bucket_exists(uri.bucket):
                        return
            raise


class Store:
    """The product's object store. Methods take full URIs; the scheme picks the backend."""

    def __init__(self, s3: S3Config | None = None) -> None:
        self._s3_config = s3
        self._s3: _S3Backend | None = None
        self._file = _FileBackend()

    @classmethod
    def from_env(cls) -> Store:
        """S3 settings from the environment when present; ``file://`` always works."""
        return cls(S3Config.from_env() if os.environ.get("CARTRIDGES_S3_ENDPOINT") else None)

    def _backend(self, uri: StoreURI) -> _Backend:
        if uri.scheme == "file":
            return self._file
        if self._s3_config is None:
            raise StoreNotConfigured(
                "no S3 endpoint configured: set CARTRIDGES_S3_ENDPOINT (host:port), CARTRIDGES_S3_ACCESS_KEY and "
                "CARTRIDGES_S3_SECRET_KEY for",
                str(uri),
            )
        if self._s3 is None:
            self._s3 = _S3Backend(self._s3_config)
        return self._s3

    def _call(self, uri: StoreURI, op: Any, *args: Any) -> Any:
        endpoint = self._s3_config.endpoint if self._s3_config else "?"
        try:
            return op(*args)
        except S3Error as err:
            if (known := _S3_ERRORS.get(err.code or "")) is None:
                raise StoreError(f"S3 error {err.code}: {err.message}", str(uri)) from err
            kind, message = known
            raise kind(message.format(bucket=uri.bucket), str(uri)) from err
        except MinioException as err:  # not S3's XML: an ingress's HTML page, a wrong port, a proxy's 502
            answer = textwrap.shorten(str(err), 160, placeholder=" ...")
            raise StoreUnavailable(f"object store at {endpoint} did not answer as S3 ({answer})", str(uri)) from err
        except urllib3.exceptions.HTTPError as err:
            if isinstance(getattr(err, "reason", err), urllib3.exceptions.SSLError):
                raise StoreUnavailable(
                    f"TLS to the object store at {endpoint} failed ({getattr(err, 'reason', err)}); for a private "
                    "CA set CARTRIDGES_S3_CA_PEM or CARTRIDGES_S3_CA_BUNDLE (in a cluster: key ca.crt of the store "
                    "Secret)",
                    str(uri),
                ) from err
            raise StoreUnavailable(
                f"object store at {endpoint} is unreachable ({type(err).__name__})", str(uri)
            ) from err

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket (or local directory) of ``uri`` if it does not exist yet."""
        parsed = StoreURI.parse(uri)
        self._call(parsed, self._backend(parsed).ensure_bucket, parsed)

    def put_file(self, uri: str, path: Path) -> ObjectInfo:
        """Upload a local file (multipart for large files), recording its sha256."""
        parsed = StoreURI.parse(uri)
        sha256 = sha256_file(path)
        self._call(parsed, self._backend(parsed).put_file, parsed, path, sha256)
        return ObjectInfo(uri, path.stat().st_size, sha256)

    def put_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        """Write a small object in one request; a reader sees the old or the new bytes, never a mix."""
        parsed = StoreURI.parse(uri)
        sha256 = sha256_bytes(data)
        self._call(parsed, self._backend(parsed).put_bytes, parsed, data, sha256)
        return ObjectInfo(uri, len(data), sha256)

    def put_json(self, uri: str, value: Any) -> ObjectInfo:
        return self.put_bytes(uri, json.dumps(value, indent=2, sort_keys=True).encode())

    def get_bytes(self, uri: str, expected_sha256: str | None = None) -> bytes:
        """The object's bytes, checked against ``expected_sha256``, else against the sha256 recorded when it was
        written (objects another tool wrote without one are returned unchecked). A mismatch is an
        :class:`IntegrityError`: a manifest, pointer or score file altered behind the store's back is never used."""
        parsed = StoreURI.parse(uri)
        data, recorded = self._call(parsed, self._backend(parsed).get_bytes, parsed)
        expected = expected_sha256 or recorded
        if expected is not None and (actual := sha256_bytes(data)) != expected:
            raise IntegrityError(f"sha256 mismatch (expected {expected}, read {actual})", uri)
        return bytes(data)

    def get_head(self, uri: str, length: int) -> bytes:
        """At most the first ``length`` (>= 1) bytes of an object, never more in memory: read ``limit + 1`` to tell
        whether an object is larger than ``limit`` without downloading it."""
        parsed = StoreURI.parse(uri)
        data: bytes = self._call(parsed, self._backend(parsed).get_head, parsed, length)
        return data

    def get_json(self, uri: str) -> Any:
        """A JSON object, verified as :meth:`get_bytes` verifies."""
        return json.loads(self.get_bytes(uri))

    def sha256(self, uri: str) -> str:
        """The sha256 of the object's bytes as stored now, hashed while streaming them (not the recorded one)."""
        parsed = StoreURI.parse(uri)
        digest: str = self._call(parsed, self._backend(parsed).sha256, parsed)
        return digest

    def download(self, uri: str, path: Path, expected_sha256: str | None = None) -> ObjectInfo:
        """Stream an object to ``path`` and check its sha256 against ``expected_sha256`` or the recorded one.

        The file appears at ``path`` only once verified; a corrupt download leaves nothing behind.
        """
        parsed = StoreURI.parse(uri)
        backend = self._backend(parsed)
        expected = expected_sha256 or self._call(parsed, backend.stat, parsed).sha256
        path.parent.mkdir(parents=True, exist_ok=True)
        # Each download its own temp file: ranks of one job fill one cache with the same object at the same time.
        partial = _new_temp_file(path.parent, f".{path.name}.partial-")
        try:
            actual: str = self._call(parsed, backend.get_to_file, parsed, partial)
            if expected is not None and actual != expected:
                raise IntegrityError(f"sha256 mismatch (expected {expected}, read {actual})", uri)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return ObjectInfo(uri, path.stat().st_size, actual)

    def stat(self, uri: str) -> ObjectInfo:
        parsed = StoreURI.parse(uri)
        info: ObjectInfo = self._call(parsed, self._backend(parsed).stat, parsed)
        return info

    def exists(self, uri: str) -> bool:
        try:
            self.stat(uri)
        except ObjectNotFound:
            return False
        return True

    def names(self, prefix: str) -> list[str]:
        """The paths relative to the directory ``prefix`` of every object under it, however ``prefix`` is spelled:
        ``list`` returns URIs in the store's normal form (``file://localhost/a/b``, ``file:///a//b`` and
        ``file:///a/./b`` all list as ``file:///a/b/...``), so cutting them at ``len(prefix)`` is wrong."""
        parsed = StoreURI.parse(prefix)
        backend = self._backend(parsed)
        listed: list[StoreURI] = self._call(parsed, lambda: list(backend.list(parsed)))
        if parsed.scheme == "file":
            return [Path(uri.key).relative_to(Path(parsed.key)).as_posix() for uri in listed]
        directory = parsed.key.rstrip("/") + "/" if parsed.key else ""
        return [uri.key[len(directory) :] for uri in listed]

    def children(self, prefix: str) -> list[str]:
        """The names directly under the directory ``prefix``: objects and sub-directories, one request on S3
        (a listing that stops at the next ``/``), however many objects the sub-directories hold."""
        parsed = StoreURI.parse(prefix)
        backend = self._backend(parsed)
        names: list[str] = self._call(parsed, lambda: list(backend.children(parsed)))
        return names

    def list(self, prefix: str) -> list[str]:
        """Every object under the directory ``prefix`` (``.../cart-1`` lists ``.../cart-1/*`` only)."""
        parsed = StoreURI.parse(prefix)
        backend = self._backend(parsed)
        listed: list[str] = self._call(parsed, lambda: [str(u) for u in backend.list(parsed)])
        return listed

    def copy(self, source: str, target: str) -> None:
        """Copy one object within the store (server-side on S3) with its recorded sha256."""
        source_uri, target_uri = StoreURI.parse(source), StoreURI.parse(target)
        if source_uri.scheme != target_uri.scheme:
            raise StoreError(f"cannot copy between stores of different kinds (to {target})", source)
        self._call(source_uri, self._backend(source_uri).copy, source_uri, target_uri)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the directory ``prefix``, then its folder markers (on S3), so ``children``
        no longer lists it; returns how many objects were deleted."""
        uris = self.list(prefix)
        for uri in uris:
            parsed = StoreURI.parse(uri)
            self._call(parsed, self._backend(parsed).delete, parsed)
        parsed = StoreURI.parse(prefix)
        self._call(parsed, self._backend(parsed).delete_folders, parsed)
        return len(uris)


@functools.lru_cache(maxsize=256)
def sha256_once(store: Store, version: ObjectInfo) -> str:
    """The sha256 of an object's bytes, hashed once per version: a caller that checks the same object every few
    seconds (an operator pass) streams it once, not each time (0.3 s at 268 MB). ``version`` tells versions apart
    without reading them: S3's revision (ETag, size, modification time), a file's sha256 (its stat hashes it); a
    re-upload is a new version, hashed again. In-process: a restarted process hashes each object once more. A
    failed read raises, so nothing is kept."""
    digest = store.sha256(version.uri)
    log.info("hashed %s (revision %s): sha256 %s", version.uri, version.revision, digest)
    return digest
