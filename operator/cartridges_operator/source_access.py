"""Which object and tokenizer URIs a Corpus may make the operator read, and how many bytes, alone and with others.

The operator reads with its own, bucket-wide store credentials and from its own filesystem, so a Corpus must not
name what its namespace could not read itself: another namespace's stored corpora or cartridges, the rest of the
store's bucket, or (in a cluster) any local file such as ``/proc/self/environ`` or the service-account token. And it
serves every namespace from one process, so the bytes it holds are capped per Corpus and the Corpora it reads at
once in all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from cartridges import layout
from cartridges.corpus import SourceError
from cartridges.store import StoreURI
from cartridges_operator.config import CorpusLimits


@dataclass(frozen=True)
class SourceAccess:
    """What a Corpus in ``namespace`` may read, for an operator whose store is ``store_root``."""

    store_root: str
    namespace: str
    limits: CorpusLimits = field(default_factory=CorpusLimits)

    @property
    def local(self) -> bool:
        """A ``file://`` store means the operator runs on a developer's machine (tests, demo), not in a cluster:
        its files and loopback servers are the user's own."""
        return StoreURI.parse(self.store_root).scheme == "file"

    def check_object(self, uri: str) -> None:
        """Refuse an object source outside what the Corpus's namespace may read (SourceError says why and what to
        use instead)."""
        self._check(
            uri,
            "object sources",
            (),
            "upload its documents there, or to a bucket that corpus.sourceBuckets allows for the namespace",
        )

    def check_tokenizer(self, uri: str) -> None:
        """Refuse a ``tokenizer.json`` where an object source would be refused, except under the store's shared base
        models: every namespace may read those itself (README, "Deploy"), and they hold the tokenizers that
        Cartridges train with. Any other shared tokenizer can be uploaded to the namespace's own sources area."""
        advice = (
            "upload tokenizer.json to the first or to a bucket that corpus.sourceBuckets allows for the namespace, or "
            "name a base model's directory"
        )
        self._check(uri, "spec.tokenizer", (layout.models_prefix(self.store_root),), advice)

    def _check(self, uri: str, what: str, shared: tuple[str, ...], advice: str) -> None:
        """Refuse ``uri`` (``what`` names it) outside the namespace's sources area and the ``shared`` prefixes of
        the store, in a bucket that corpus.sourceBuckets leaves out for the namespace, or local when the operator
        is not."""
        parsed = _parse(uri, what)
        if parsed.scheme == "file":
            self._check_local_file(uri, what)
        if self._in_store(parsed):
            allowed = [
                _normalized(StoreURI.parse(prefix))
                for prefix in (layout.sources_prefix(self.store_root, self.namespace), *shared)
            ]
            if not any(_within(parsed.key, prefix.key) for prefix in allowed):
                raise SourceError(
                    f"{uri} is inside the operator's store ({self.store_root}), where a Corpus in namespace "
                    f"{self.namespace} may read only {' or '.join(f'{p}/' for p in allowed)} for its {what} "
                    f"({advice})"
                )
        elif parsed.scheme == "s3":
            self._check_bucket(uri, parsed.bucket, what)

    def _check_bucket(self, uri: str, bucket: str, what: str) -> None:
        """Refuse a bucket that corpus.sourceBuckets leaves out for this namespace: the operator's keys may reach
        buckets other namespaces' Corpora name, and what it reads lands where this namespace can read it."""
        buckets = self.limits.buckets_for(self.namespace)
        if bucket in buckets:
            return
        which = f"only from the buckets {', '.join(buckets)}" if buckets else "from no bucket but the store's"
        raise SourceError(
            f"{uri}: for namespace {self.namespace} the operator reads {what} {which} (chart value "
            f"corpus.sourceBuckets); ask your cluster admin to add {self.namespace}/{bucket}, or copy the files to "
            f"{layout.sources_prefix(self.store_root, self.namespace)}/"
        )

    def _in_store(self, uri: StoreURI) -> bool:
        """Under the store's directory, or anywhere in its bucket: the operator's credentials cover all of it."""
        root = _normalized(StoreURI.parse(self.store_root))
        if uri.scheme != root.scheme:
            return False
        return uri.bucket == root.bucket if uri.scheme == "s3" else _within(uri.key, root.key)

    def _check_local_file(self, uri: str, what: str) -> None:
        if not self.local:
            raise SourceError(
                f"{uri}: {what} may not name file:// URIs: the operator would read its own pod's files. Upload "
                "the file to a bucket and name its s3:// URI (file:// works only for an operator run locally with a "
                "file:// store)"
            )


def _parse(uri: str, what: str) -> StoreURI:
    """A URI whose path has no empty, ``.`` or ``..`` segments, so a prefix comparison means what it says."""
    try:
        parsed = StoreURI.parse(uri)
    except ValueError as err:
        raise SourceError(f"{what}: {err}") from err
    path = parsed.key.strip("/")
    if path and any(segment in ("", ".", "..") for segment in path.split("/")):
        raise SourceError(f"{what} {uri}: the path may not contain empty, '.' or '..' segments")
    return _normalized(parsed)


def _normalized(uri: StoreURI) -> StoreURI:
    """The same path without repeated or trailing slashes, for comparing prefixes."""
    key = "/".join(part for part in uri.key.split("/") if part)
    return StoreURI(uri.scheme, uri.bucket, f"/{key}" if uri.scheme == "file" else key)


def _within(key: str, prefix: str) -> bool:
    """``key`` is ``prefix`` or below it (``a/bc`` is not below ``a/b``)."""
    key, prefix = key.rstrip("/"), prefix.rstrip("/")
    return not prefix or key == prefix or key.startswith(prefix + "/")


SOURCES_TOO_LARGE = (
    "the sources of this Corpus are larger than {limit} in all (reading {where}), the operator's limit for one "
    "Corpus: split it into several Corpora, or have the cluster admin raise the chart value corpus.maxBytes "
    "(CARTRIDGES_CORPUS_MAX_BYTES) together with the operator's memory limit"
)
TOKENIZER_TOO_LARGE = (
    "spec.tokenizer: {where} is larger than {limit}, the operator's limit for a tokenizer.json (real ones are a few "
    "MiB): name a tokenizer's JSON file, or the model directory that holds it"
)


class ByteBudget:
    """The bytes a Corpus's sources (or its tokenizer) may still add: readers ask for at most ``left + 1`` and then
    ``take`` what they got, so nothing past the limit is ever held. ``refusal`` says what was too large, with
    ``{limit}`` and ``{where}`` to fill in."""

    def __init__(self, limit: int, refusal: str) -> None:
        self.limit = limit
        self.left = limit
        self.refusal = refusal

    def take(self, size: int, where: str) -> None:
        if size > self.left:
            raise SourceError(self.refusal.format(limit=_mib(self.limit), where=where))
        self.left -= size


class ReadsBusy(Exception):
    """No read slot came free in time: nothing is wrong with the Corpus, it is read on a later pass."""


class ReadSlots:
    """How many Corpora the operator reads at once (chart value corpus.concurrentReads).

    ``ByteBudget`` bounds one Corpus, but kopf runs handlers on up to 16 threads and each Corpus peaks at about six
    times its bytes while it is normalized, so 16 at once would need 16 times the memory. Reading takes a slot; a
    Corpus that finds none free within ``wait_s`` raises :class:`ReadsBusy` rather than hold its worker thread
    (which other Corpora and the Cartridges' passes need) until one is."""

    def __init__(self, slots: int, wait_s: float = 5.0) -> None:
        self.slots = slots
        self.wait_s = wait_s
        self._free = threading.BoundedSemaphore(slots)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """A slot for the reads in the ``with`` block, given back however it ends."""
        if not self._free.acquire(timeout=self.wait_s):
            raise ReadsBusy(
                f"waiting to be read: the operator reads at most {self.slots} Corpora at once (chart value "
                f"corpus.concurrentReads) and none finished within {self.wait_s:g} s; it retries shortly"
            )
        try:
            yield
        finally:
            self._free.release()


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB" if size >= 2**20 else f"{size} bytes"
