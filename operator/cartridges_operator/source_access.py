"""Which object and tokenizer URIs a Corpus may make the operator read, and how many bytes in all.

The operator reads with its own, bucket-wide store credentials and from its own filesystem, so a Corpus must not
name what its namespace could not read itself: another namespace's stored corpora or cartridges, the rest of the
store's bucket, or (in a cluster) any local file such as ``/proc/self/environ`` or the service-account token.
"""

from __future__ import annotations

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
        parsed = _parse(uri, "object source")
        if parsed.scheme == "file":
            self._check_local_file(uri, "object sources")
        if self._in_store(parsed):
            own = _normalized(StoreURI.parse(layout.sources_prefix(self.store_root, self.namespace)))
            if not _within(parsed.key, own.key):
                raise SourceError(
                    f"{uri} is inside the operator's store ({self.store_root}), where a Corpus in namespace "
                    f"{self.namespace} may read only {own}/ (upload its documents there, or keep them in a bucket "
                    "of your own)"
                )
        elif parsed.scheme == "s3" and self.limits.source_buckets and parsed.bucket not in self.limits.source_buckets:
            raise SourceError(
                f"{uri}: the operator reads Corpus sources only from the buckets "
                f"{', '.join(self.limits.source_buckets)} (chart value corpus.sourceBuckets); ask your cluster "
                "admin to add this bucket, or copy the documents to one of those"
            )

    def _in_store(self, uri: StoreURI) -> bool:
        """Under the store's directory, or anywhere in its bucket: the operator's credentials cover all of it."""
        root = _normalized(StoreURI.parse(self.store_root))
        if uri.scheme != root.scheme:
            return False
        return uri.bucket == root.bucket if uri.scheme == "s3" else _within(uri.key, root.key)

    def check_tokenizer(self, uri: str) -> None:
        """A tokenizer is read with the operator's access too: no local files in a cluster."""
        if _parse(uri, "spec.tokenizer").scheme == "file":
            self._check_local_file(uri, "spec.tokenizer")

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


class ByteBudget:
    """The bytes a Corpus's sources may still add: readers ask for at most ``left + 1`` and then ``take`` what
    they got, so nothing past the limit is ever held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, size: int, where: str) -> None:
        if size > self.left:
            raise SourceError(
                f"the sources of this Corpus are larger than {_mib(self.limit)} in all (reading {where}), the "
                "operator's limit for one Corpus: split it into several Corpora, or have the cluster admin raise "
                "the chart value corpus.maxBytes (CARTRIDGES_CORPUS_MAX_BYTES) together with the operator's memory "
                "limit"
            )
        self.left -= size


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB" if size >= 2**20 else f"{size} bytes"
