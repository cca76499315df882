"""Read a Corpus's sources into normalized documents (``cartridges.corpus`` normalizes and stores them), and its
tokenizer.

Every read is checked against what the Corpus may read (``SourceAccess``) and counted against its byte limit as
it happens, so a source past the limit is never held in memory whole."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator

from cartridges import api, layout
from cartridges.corpus import NormalizedCorpus, SourceError, normalize_text
from cartridges.store import BucketNotFound, InvalidObjectName, ObjectNotFound, Store, StoreURI
from cartridges_operator.http_fetch import fetch
from cartridges_operator.redaction import redacted_url
from cartridges_operator.source_access import SOURCES_TOO_LARGE, TOKENIZER_TOO_LARGE, ByteBudget, SourceAccess

ConfigMapReader = Callable[[str, str], str]
"""(configmap name, key) -> text, in the Corpus's namespace; raises SourceError when absent."""


def _matches(relative: str, source: api.ObjectSource) -> bool:
    included = not source.include or any(fnmatch.fnmatch(relative, g) for g in source.include)
    return included and not any(fnmatch.fnmatch(relative, g) for g in source.exclude)


def _read_object(uri: str, store: Store, budget: ByteBudget) -> bytes:
    data = store.get_head(uri, budget.left + 1)
    budget.take(len(data), uri)
    return data


def _object_documents(source: api.ObjectSource, store: Store, budget: ByteBudget) -> Iterator[tuple[str, bytes]]:
    """The objects a source names; one that is not there (or its bucket), or that the store takes no name of, is a
    source to fix, not a store failing."""
    try:
        yield from _named_objects(source, store, budget)
    except (ObjectNotFound, BucketNotFound, InvalidObjectName) as err:
        raise SourceError(f"{source.uri}: {err}") from err


def _named_objects(source: api.ObjectSource, store: Store, budget: ByteBudget) -> Iterator[tuple[str, bytes]]:
    if not source.uri.endswith("/"):
        yield StoreURI.parse(source.uri).name, _read_object(source.uri, store, budget)
        return
    try:
        objects = layout.objects_under(store, source.uri)
    except layout.UnsafePathSegment as err:
        raise SourceError(str(err)) from err
    found = False
    for relative, uri in objects:
        if _matches(relative, source):
            found = True
            yield relative, _read_object(uri, store, budget)
    if not found:
        raise SourceError(f"no objects under {source.uri} match include={source.include} exclude={source.exclude}")


def _http_document(source: api.HttpSource, access: SourceAccess, budget: ByteBudget) -> bytes:
    limit, allowed = min(source.maxBytes, budget.left), access.limits.http_allowed_cidrs
    data = fetch(source.url, limit, source.timeoutSeconds, allow_loopback=access.local, allowed=allowed)
    shown = redacted_url(source.url)
    if len(data) > source.maxBytes:
        raise SourceError(f"{shown}: larger than maxBytes={source.maxBytes}; raise the limit or split it")
    budget.take(len(data), shown)
    return data


def _source_documents(
    index: int,
    source: api.CorpusSource,
    store: Store,
    read_configmap: ConfigMapReader,
    access: SourceAccess,
    budget: ByteBudget,
) -> list[tuple[str, bytes | str]]:
    """(document id, raw text) of one source."""
    label = source.name or f"source-{index}"
    if source.inline is not None:
        budget.take(len(source.inline.encode()), label)
        return [(label, source.inline)]
    if source.configMap is not None:
        ref = source.configMap
        text = read_configmap(ref.name, ref.key)
        budget.take(len(text.encode()), f"ConfigMap {ref.name} key {ref.key}")
        return [(source.name or f"{ref.name}/{ref.key}", text)]
    if source.object is not None:
        access.check_object(source.object.uri)
        return [
            (f"{label}/{name}" if source.name else name, data)
            for name, data in _object_documents(source.object, store, budget)
        ]
    if source.http is not None:
        return [(source.name or redacted_url(source.http.url), _http_document(source.http, access, budget))]
    raise SourceError(f"sources[{index}] sets no source kind")  # the CRD's CEL rule makes this unreachable


def read_sources(
    spec: api.CorpusSpec, store: Store, read_configmap: ConfigMapReader, access: SourceAccess
) -> NormalizedCorpus:
    """Every document of every source, in spec order (objects under a prefix in key order)."""
    budget = ByteBudget(access.limits.max_bytes, SOURCES_TOO_LARGE)
    documents: list[layout.Document] = []
    for index, source in enumerate(spec.sources):
        raw = _source_documents(index, source, store, read_configmap, access, budget)
        documents.extend(layout.Document(id=doc_id, text=normalize_text(data, doc_id)) for doc_id, data in raw)
    return NormalizedCorpus.of(documents)


def read_tokenizer(uri: str, store: Store, access: SourceAccess) -> tuple[str, bytes]:
    """(where, bytes) of the ``tokenizer.json`` that ``spec.tokenizer`` names, itself or in the directory it names:
    checked and read as an object source is, under its own byte limit."""
    where = uri if uri.endswith(".json") else f"{uri.rstrip('/')}/tokenizer.json"
    access.check_tokenizer(where)
    try:
        return where, _read_object(where, store, ByteBudget(access.limits.tokenizer_max_bytes, TOKENIZER_TOO_LARGE))
    except ObjectNotFound as err:
        raise SourceError(f"spec.tokenizer: no tokenizer.json at {where}") from err
    except InvalidObjectName as err:
        raise SourceError(f"spec.tokenizer: {err}") from err
