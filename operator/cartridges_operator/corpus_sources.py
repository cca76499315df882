"""Read a Corpus's sources into normalized documents, and store them under their digest.

Normalization makes the digest a function of the text alone: UTF-8 (a BOM dropped), NFC, ``\\n`` line ends,
no trailing whitespace. The same text from any source gives the same digest, so an unchanged corpus triggers
nothing downstream.
"""

from __future__ import annotations

import fnmatch
import json
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cartridges import api, layout
from cartridges.hashing import sha256_bytes
from cartridges.store import ObjectNotFound, Store, StoreURI

ConfigMapReader = Callable[[str, str], str]
"""(configmap name, key) -> text, in the Corpus's namespace; raises SourceError when absent."""


class SourceError(ValueError):
    """A source cannot be read; the message names the source and says what to fix."""


@dataclass(frozen=True)
class NormalizedCorpus:
    documents: list[layout.Document]
    jsonl: bytes

    @property
    def digest(self) -> str:
        return sha256_bytes(self.jsonl)


def normalize_text(raw: bytes | str, where: str) -> str:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise SourceError(f"{where}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from err
    text = unicodedata.normalize("NFC", raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


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
    if not any(doc.text.strip() for doc in documents):
        raise SourceError("the corpus is empty: every source produced only whitespace")
    jsonl = "".join(json.dumps(doc.model_dump(), ensure_ascii=False, sort_keys=True) + "\n" for doc in documents)
    return NormalizedCorpus(documents, jsonl.encode())


def count_tokens(corpus: NormalizedCorpus, tokenizer_uri: str, store: Store) -> int:
    """Tokens of the whole corpus under a ``tokenizer.json`` (fast tokenizers only; no model weights needed)."""
    from tokenizers import Tokenizer

    uri = tokenizer_uri if tokenizer_uri.endswith(".json") else f"{tokenizer_uri.rstrip('/')}/tokenizer.json"
    try:
        tokenizer = Tokenizer.from_str(store.get_bytes(uri).decode())
    except ObjectNotFound as err:
        raise SourceError(f"spec.tokenizer: no tokenizer.json at {uri}") from err
    except Exception as err:  # the tokenizers library raises a bare Exception on bad JSON
        raise SourceError(f"spec.tokenizer: {uri} is not a tokenizers JSON file ({err})") from err
    return sum(len(encoding.ids) for encoding in tokenizer.encode_batch([d.text for d in corpus.documents]))


def publish(
    corpus: NormalizedCorpus, spec: api.CorpusSpec, store: Store, prefix: str, tokens: int | None = None
) -> layout.CorpusManifest:
    """Upload corpus.jsonl then manifest.json under the digest prefix; a no-op when that digest is stored."""
    manifest_uri = f"{prefix}/{layout.MANIFEST_FILE}"
    if store.exists(manifest_uri):
        return layout.CorpusManifest.model_validate(store.get_json(manifest_uri))
    manifest = layout.CorpusManifest(
        digest=corpus.digest,
        documents=len(corpus.documents),
        bytes=len(corpus.jsonl),
        description=spec.description,
        tokens=tokens,
        tokenizer=spec.tokenizer,
    )
    store.put_bytes(f"{prefix}/{layout.CORPUS_FILE}", corpus.jsonl)
    store.put_json(manifest_uri, manifest.model_dump())
    return manifest
