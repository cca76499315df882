"""Where things live in the object store (DESIGN.md §4), and the small documents stored beside them.

``root`` is the store URI of the product's bucket or directory, e.g. ``s3://cartridges`` or ``file:///data/store``.
Every component builds paths through these functions, so the layout is written down exactly once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cartridges.store import Store, StoreURI, sha256_once

CORPUS_FILE = "corpus.jsonl"
MANIFEST_FILE = "manifest.json"
EVAL_FILE = "eval.json"
PROGRESS_FILE = "progress.json"
CURRENT_POINTER = "current.json"
TRAINING_INPUTS_FILE = "inputs.json"
"""Beside a generation's outputs, written by the trainer as it starts: what it trains on (and the sha256 ``key`` its
checkpoints record), so a later run under the same prefix can tell whether that state is its own."""


# Kubernetes object names (DNS-1123 subdomain): what a Cartridge or Corpus may be called, so what a cartridge in
# the store may be called, and what the router takes as a cartridge id.
RESOURCE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_RESOURCE_NAME = 253
# Kubernetes namespace names (DNS-1123 label).
NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAMESPACE_NAME = 63


def is_resource_name(name: str) -> bool:
    return len(name) <= MAX_RESOURCE_NAME and RESOURCE_NAME.fullmatch(name) is not None


def is_namespace_name(name: str) -> bool:
    return len(name) <= MAX_NAMESPACE_NAME and NAMESPACE_NAME.fullmatch(name) is not None


class UnsafePathSegment(ValueError):
    """A name that would not stay one path segment of the store (empty, ``.``, ``..`` or holding ``/``)."""


def _join(root: str, *parts: str) -> str:
    """``root/part/...``; each part must be exactly one segment, so no name can climb out of its prefix or land in
    another's (``namespace=".."`` would write beside the store, ``""`` into the parent directory)."""
    for part in parts:
        if part in ("", ".", "..") or "/" in part:
            raise UnsafePathSegment(f"{part!r} is not a usable name in the store (one path segment, not . or ..)")
    return "/".join([root.rstrip("/"), *parts])


def objects_under(store: Store, prefix: str) -> list[tuple[str, str]]:
    """(name relative to the directory ``prefix``, URI) of every object under it, in name order.

    The names come from :meth:`Store.names`, so they do not depend on how ``prefix`` is spelled. Callers make local
    paths and document ids of them, so each must be a relative path of plain segments: S3 takes any key, and one
    like ``m/../../x`` or ``m//etc/x`` would be written outside the directory it is copied to. Such a name raises
    :class:`UnsafePathSegment`."""
    objects = []
    for name in sorted(store.names(prefix)):
        try:
            objects.append((name, _join(prefix, *name.split("/"))))
        except UnsafePathSegment:
            raise UnsafePathSegment(f"object {name!r} under {prefix} is not a plain relative path") from None
    return objects


def corpus_prefix(root: str, namespace: str, corpus: str, digest: str) -> str:
    return _join(root, "corpora", namespace, corpus, digest)


def sources_prefix(root: str, namespace: str) -> str:
    """Where documents for the Corpora of ``namespace`` may be uploaded inside the store (the only place in the
    store's bucket that a Corpus's object sources may read)."""
    return _join(root, "sources", namespace)


def models_prefix(root: str) -> str:
    """Where the base models live, shared by every namespace (each one's store keys may read them: README,
    "Deploy")."""
    return _join(root, "models")


def model_prefix(root: str, model: str) -> str:
    return _join(models_prefix(root), model)


def cartridges_prefix(root: str, namespace: str) -> str:
    """Where the cartridges of ``namespace`` live, one directory each."""
    return _join(root, "cartridges", namespace)


def cartridge_prefix(root: str, namespace: str, cartridge: str) -> str:
    return _join(cartridges_prefix(root, namespace), cartridge)


def generation_prefix(root: str, namespace: str, cartridge: str, generation: int) -> str:
    return _join(cartridge_prefix(root, namespace, cartridge), _generation_folder(generation))


def _generation_folder(generation: int) -> str:
    return f"g{generation}"


def current_pointer(root: str, namespace: str, cartridge: str) -> str:
    return _join(cartridge_prefix(root, namespace, cartridge), CURRENT_POINTER)


def stored_generations(store: Store, root: str, namespace: str, cartridge: str) -> list[int]:
    """The generations with anything stored under ``g<N>/``, ascending (one listing, however large they are)."""
    names = store.children(cartridge_prefix(root, namespace, cartridge))
    return sorted(int(m[1]) for name in names if (m := re.fullmatch(r"g(\d+)", name)))


def prune_generations(
    store: Store,
    root: str,
    namespace: str,
    cartridge: str,
    promoted: int,
    keep: int,
    stored: Sequence[int] | None = None,
) -> list[int]:
    """Keep the promoted generation and the newest ``keep - 1`` trained ones before it (those with a manifest);
    delete every other generation older than the promoted one, failed ones included. Returns those deleted.
    ``stored`` is the caller's :func:`stored_generations` listing, if it has one (listed here otherwise).

    Generations newer than ``promoted`` (one training now, or one the quality gate held back) are never touched.
    """
    if stored is None:
        stored = stored_generations(store, root, namespace, cartridge)
    older = [g for g in stored if g < promoted]
    trained = [g for g in older if store.exists(f"{generation_prefix(root, namespace, cartridge, g)}/{MANIFEST_FILE}")]
    kept = set(trained[-(keep - 1) :]) if keep > 1 else set()
    doomed = [g for g in older if g not in kept]
    for generation in doomed:
        store.delete_prefix(generation_prefix(root, namespace, cartridge, generation))
    return doomed


class Document(BaseModel):
    """One line of ``corpus.jsonl``: a normalized UTF-8 document."""

    id: str
    text: str


class CorpusManifest(BaseModel):
    digest: str = Field(description="sha256 of corpus.jsonl")
    documents: int
    bytes: int
    description: str
    tokens: int | None = None
    tokenizer: str | None = None


class CorpusUnusable(ValueError):
    """A stored corpus version that is not what its prefix names: its manifest unreadable or of another digest, or
    its corpus.jsonl not the bytes the digest names. The message names the object and what is wrong with it."""


def corpus_manifest(store: Store, prefix: str) -> CorpusManifest:
    """The manifest of the corpus version under ``prefix``, which must describe the digest the prefix names: that
    digest is what a Cartridge pins and its training hash records, so data stored there under another digest is
    never trained on. Raises :class:`CorpusUnusable`, or the store's error (ObjectNotFound, IntegrityError, ...)."""
    uri = _join(prefix, MANIFEST_FILE)
    try:
        manifest = CorpusManifest.model_validate(store.get_json(uri))
    except ValueError as err:  # not JSON, or not a manifest (ValidationError is a ValueError)
        raise CorpusUnusable(f"{uri} is not a corpus manifest ({' '.join(str(err).split())[:300]})") from err
    named = prefix.rstrip("/").rsplit("/", 1)[-1]
    if manifest.digest != named:
        raise CorpusUnusable(f"{uri} describes corpus digest {manifest.digest}, not {named}, which its prefix names")
    return manifest


def verified_corpus(store: Store, prefix: str) -> CorpusManifest:
    """:func:`corpus_manifest`, once corpus.jsonl's sha256 is checked to be the digest (the one recorded with it: a
    HEAD on S3; a file store hashes the file): a version whose data was lost or altered is not taken as stored.
    Raises as :func:`corpus_manifest`, :class:`CorpusUnusable` for other bytes."""
    manifest = corpus_manifest(store, prefix)
    data = store.stat(_join(prefix, CORPUS_FILE))
    actual = data.sha256 or sha256_once(store, data)  # another S3 client's copy (a restored backup) records none
    if actual != manifest.digest:
        raise CorpusUnusable(f"{data.uri} has sha256 {actual}, not the corpus digest {manifest.digest}")
    return manifest


def read_documents(store: Store, prefix: str) -> Iterator[Document]:
    """The documents of a stored corpus, verified against the digest its prefix names."""
    manifest = corpus_manifest(store, prefix)
    data = store.get_bytes(_join(prefix, CORPUS_FILE), expected_sha256=manifest.digest)
    for line in data.decode().splitlines():
        if line.strip():
            yield Document.model_validate(json.loads(line))


class Progress(BaseModel):
    """``progress.json`` of one training generation, rewritten by the trainer as it goes; read by the operator.

    NaN and infinity are refused: JSON has no such numbers, so the API server would refuse a status holding one."""

    model_config = ConfigDict(allow_inf_nan=False)

    phase: Literal["starting", "synthesizing", "training", "evaluating", "uploading", "done", "failed"]
    step: int = 0
    total: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""


class Pointer(BaseModel):
    """``current.json``: the promoted generation of a cartridge; written by the operator in a cluster's store (its
    prefix absolute) and by the ``cartridges`` command in a local one (relative, see :func:`promoted_pointer`)."""

    generation: int
    prefix: str
    sha256: str


def promoted_pointer(generation: int, sha256: str) -> Pointer:
    """The pointer that promotes ``generation``: its prefix relative to the cartridge's, so a local store still reads
    it when moved, copied or named by another spelling of its root (:func:`confined_pointer` resolves it, as it
    reads absolute prefixes). The operator writes it resolved: operators before relative prefixes read only those."""
    return Pointer(generation=generation, prefix=_generation_folder(generation), sha256=sha256)


class PointerOutsideCartridge(ValueError):
    """A pointer names a prefix outside its own cartridge's."""


def confined_pointer(root: str, namespace: str, cartridge: str, pointer: Pointer) -> Pointer:
    """``pointer`` with its prefix resolved under the cartridge's own prefix (a relative prefix is taken from there).
    A pointer is data anyone with write access to the store can change: one that led to another cartridge or
    namespace (or ``..``) would load what this cartridge never trained, so it is refused."""
    own = cartridge_prefix(root, namespace, cartridge)
    prefix = pointer.prefix if "://" in pointer.prefix else f"{own}/{pointer.prefix.strip('/')}"
    if not _lies_under(prefix, own):
        raise PointerOutsideCartridge(f"cartridge {cartridge!r}: pointer leaves the cartridge's prefix: {prefix!r}")
    return pointer.model_copy(update={"prefix": prefix})


def _lies_under(uri: str, directory: str) -> bool:
    """Whether ``uri`` names a path below ``directory`` both as written and as the store reads it. As written, only
    plain segments follow the directory (no whitespace or control character: URL parsers drop tabs and newlines, so
    ``.\t.`` would read as ``..`` to one); as read, the parsed URI is the directory's plus those same segments (a
    ``?`` or ``#`` is part of the key, so it names an object below the directory like any other character)."""
    head = f"{directory.rstrip('/')}/"
    if not uri.startswith(head):
        return False
    rest = uri[len(head) :]
    if not all(map(_is_plain_segment, rest.split("/"))):
        return False
    try:
        parsed, parent = StoreURI.parse(uri), StoreURI.parse(directory)
    except ValueError:
        return False
    return parsed == parent.join(rest)


def _is_plain_segment(segment: str) -> bool:
    """Not empty, ``.`` or ``..``, and no whitespace or control character (which URL parsing may drop)."""
    return segment not in ("", ".", "..") and segment.isprintable() and not any(c.isspace() for c in segment)
