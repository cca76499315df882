"""Read a Corpus's sources into normalized documents (``cartridges.corpus`` normalizes and stores them)."""

from __future__ import annotations

import fnmatch
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

from cartridges import api, layout
from cartridges.corpus import NormalizedCorpus, SourceError, normalize_text
from cartridges.store import Store, StoreURI

ConfigMapReader = Callable[[str, str], str]
"""(configmap name, key) -> text, in the Corpus's namespace; raises SourceError when absent."""


def _matches(relative: str, source: api.ObjectSource) -> bool:
    included = not source.include or any(fnmatch.fnmatch(relative, g) for g in source.include)
    return included and not any(fnmatch.fnmatch(relative, g) for g in source.exclude)


def _object_documents(source: api.ObjectSource, store: Store) -> Iterator[tuple[str, bytes]]:
    if not source.uri.endswith("/"):
        yield StoreURI.parse(source.uri).name, store.get_bytes(source.uri)
        return
    found = False
    for uri in sorted(store.list(source.uri)):
        relative = uri[len(source.uri) :]
        if _matches(relative, source):
            found = True
            yield relative, store.get_bytes(uri)
    if not found:
        raise SourceError(f"no objects under {source.uri} match include={source.include} exclude={source.exclude}")


def _http_document(source: api.HttpSource) -> bytes:
    try:
        with urllib.request.urlopen(source.url, timeout=source.timeoutSeconds) as response:
            data: bytes = response.read(source.maxBytes + 1)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise SourceError(f"{source.url}: cannot fetch ({err})") from err
    if len(data) > source.maxBytes:
        raise SourceError(f"{source.url}: larger than maxBytes={source.maxBytes}; raise the limit or split it")
    return data


def read_sources(spec: api.CorpusSpec, store: Store, read_configmap: ConfigMapReader) -> NormalizedCorpus:
    """Every document of every source, in spec order (objects under a prefix in key order)."""
    documents: list[layout.Document] = []
    for index, source in enumerate(spec.sources):
        label = source.name or f"source-{index}"
        if source.inline is not None:
            raw: list[tuple[str, bytes | str]] = [(label, source.inline)]
        elif source.configMap is not None:
            ref = source.configMap
            raw = [(source.name or f"{ref.name}/{ref.key}", read_configmap(ref.name, ref.key))]
        elif source.object is not None:
            raw = [
                (f"{label}/{name}" if source.name else name, data)
                for name, data in _object_documents(source.object, store)
            ]
        elif source.http is not None:
            raw = [(source.name or source.http.url, _http_document(source.http))]
        else:  # the CRD's CEL rule makes this unreachable for admitted objects
            raise SourceError(f"sources[{index}] sets no source kind")
        documents.extend(layout.Document(id=doc_id, text=normalize_text(data, doc_id)) for doc_id, data in raw)
    return NormalizedCorpus.of(documents)
