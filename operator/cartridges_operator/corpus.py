"""The Corpus reconciler: sources → normalized documents → stored under their digest → status."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from pydantic import ValidationError

from cartridges import api, layout
from cartridges.corpus import SourceError, count_tokens, publish
from cartridges.store import IntegrityError, ObjectNotFound, Store, StoreError, StoreUnavailable
from cartridges_operator import kube
from cartridges_operator.conditions import is_true, seconds_since, set_condition
from cartridges_operator.config import CorpusLimits
from cartridges_operator.corpus_sources import read_sources, read_tokenizer
from cartridges_operator.http_fetch import SourceUnavailable
from cartridges_operator.redaction import redacted
from cartridges_operator.source_access import ReadsBusy, ReadSlots, SourceAccess

WAITING_FOR_READ_SLOT = "WaitingForReadSlot"
SOURCES_READ = "SourcesRead"
"""The condition that says whether the last read of the sources succeeded, and why not: apart from Ready, which says
whether Cartridges can use the Corpus (a read that failed for a reason that may pass leaves the stored version)."""


def read_skipped(status: dict[str, Any]) -> bool:
    """Whether the last read of a Corpus found no read slot free: what its status says is from before that change
    (of its spec, or of a ConfigMap it reads), and only a later read takes it in."""
    stalled: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Stalled"), {})
    return bool(stalled.get("reason") == WAITING_FOR_READ_SLOT)


def stored_version_damaged(status: dict[str, Any], namespace: str, name: str, store: Store, root: str) -> bool:
    """Whether the version a Corpus's status names is no longer intact in the store (its corpus.jsonl lost or
    altered, its manifest unreadable): reading the Corpus again stores it again, where every Cartridge training on
    it would fail for good. A GET and a HEAD on S3. A store that does not answer tells nothing: False."""
    if not status.get("digest"):
        return False
    try:
        layout.verified_corpus(store, layout.corpus_prefix(root, namespace, name, status["digest"]))
    except (ObjectNotFound, IntegrityError, ValueError):  # ValueError: layout.CorpusUnusable
        return True
    except StoreError:
        return False
    return False


def reconcile_corpus(
    spec: dict[str, Any],
    status: dict[str, Any],
    namespace: str,
    name: str,
    generation: int,
    store: Store,
    root: str,
    limits: CorpusLimits | None = None,
    reads: ReadSlots | None = None,
) -> dict[str, Any]:
    """The new status. Unchanged text keeps its digest, so Cartridges see no change and retrain nothing.

    ``reads`` is the operator's bound on Corpora read at once (the handlers share one; None: no bound). A read that
    finds no slot free, or fails for a reason that may pass (a source or the store unavailable), tells nothing about
    the text: see ``_not_read``. One that finds a source to fix makes the Corpus not Ready (``_not_ready``)."""
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
    limits = limits or CorpusLimits()
    access = SourceAccess(root, namespace, limits)
    tokens: int | None = None
    try:
        corpus_spec = api.CorpusSpec.model_validate(spec)
        with reads.hold() if reads else nullcontext():
            corpus = read_sources(corpus_spec, store, kube.configmap_reader(namespace), access)
            prefix = layout.corpus_prefix(root, namespace, name, corpus.digest)
            if corpus_spec.tokenizer:
                tokens = count_tokens(corpus, *read_tokenizer(corpus_spec.tokenizer, store, access))
            manifest = publish(corpus, corpus_spec.description, store, prefix, tokens, corpus_spec.tokenizer)
    except ReadsBusy as err:
        return _not_read(status, conditions, WAITING_FOR_READ_SLOT, str(err), generation)
    except (SourceError, ValidationError, StoreError) as err:
        return _read_failed(status, conditions, err, generation, limits.stall_after_s)
    summary = f"{manifest.documents} documents"
    conditions = set_condition(conditions, "Stalled", False, "Stored", "", generation)
    conditions = set_condition(conditions, SOURCES_READ, True, "Stored", summary, generation)
    conditions = set_condition(conditions, "Ready", True, "Stored", summary, generation)
    return {
        **status,
        "observedGeneration": generation,
        "digest": manifest.digest,
        "documents": manifest.documents,
        "bytes": manifest.bytes,
        "tokens": tokens,  # this spec's tokenizer: a stored manifest keeps the count of the one it was stored with
        "artifact": prefix,
        "conditions": conditions,
    }


def _read_failed(
    status: dict[str, Any], conditions: list[dict[str, Any]], err: Exception, generation: int, stall_after_s: int
) -> dict[str, Any]:
    """Say in SourcesRead why the read failed (its turning False is an Event), the URLs in the message without
    the credentials they may carry; then keep the stored version if the failure may pass, else stop being Ready.

    A failure that may pass but has lasted ``stall_after_s`` (a server down for good, a source always slower than
    its timeout) stalls a Corpus that it holds back, never stored or with a changed spec, so that it shows as a
    failure (Argo CD: Degraded) rather than waiting for ever; still retried. A stored Corpus whose spec is unchanged
    holds nothing back and stays Ready."""
    reason, may_pass = _failure(err)
    message = redacted(str(err))
    if not may_pass:
        conditions = set_condition(conditions, SOURCES_READ, False, reason, message, generation)
        return _not_ready(status, conditions, reason, message, generation)
    conditions = _unavailable(conditions, reason, message, generation)
    since = next(c["lastTransitionTime"] for c in conditions if c["type"] == SOURCES_READ)
    current = is_true(conditions, "Ready") and status.get("digest") and status.get("observedGeneration") == generation
    if current or seconds_since(since) < stall_after_s:
        return _not_read(status, conditions, reason, message, generation)
    return _not_ready(
        status, conditions, reason, f"{message}; sources unreadable since {since}, still retried", generation
    )


def _unavailable(conditions: list[dict[str, Any]], reason: str, message: str, generation: int) -> list[dict[str, Any]]:
    """SourcesRead=False for a failure that may pass, its lastTransitionTime the start of this spec's sources being
    unavailable: kept from a previous such failure of the same generation, else now (after a source to fix, under
    an earlier spec, or a time that does not parse), so the stall counts only what this spec has waited."""
    previous = next((c for c in conditions if c.get("type") == SOURCES_READ), {})
    ongoing = (
        previous.get("status") == "False"
        and previous.get("reason") in MAY_PASS
        and previous.get("observedGeneration") == generation
        and _parses(previous.get("lastTransitionTime"))
    )
    if not ongoing:
        conditions = [c for c in conditions if c.get("type") != SOURCES_READ]
    return set_condition(conditions, SOURCES_READ, False, reason, message, generation)


def _parses(timestamp: Any) -> bool:
    try:
        seconds_since(timestamp)
    except (TypeError, ValueError):
        return False
    return True


MAY_PASS = frozenset({"SourceUnavailable", "StoreUnavailable"})
"""The reasons ``_failure`` gives a read failure that may pass by itself."""


def _failure(err: Exception) -> tuple[str, bool]:
    """The reason a read failed, and whether it may pass by itself (retried; nothing in the spec to fix)."""
    if isinstance(err, SourceUnavailable):
        return "SourceUnavailable", True
    if isinstance(err, StoreUnavailable):
        return "StoreUnavailable", True
    if isinstance(err, StoreError):  # no bucket, refused credentials, an altered object: for whoever runs the store
        return "StoreError", False
    return "InvalidSource", False


def _not_read(
    status: dict[str, Any], conditions: list[dict[str, Any]], reason: str, message: str, generation: int
) -> dict[str, Any]:
    """The sources were not read, or not to the end, for a reason that passes by itself: nothing is known of the
    text. A Ready Corpus keeps its stored digest, Ready, and the generation they describe (a changed spec shows as not
    yet observed), so its Cartridges neither wait nor retrain; one never stored is not Ready yet. Neither is Stalled
    (Argo CD shows no failure for a blip): the reason is in Stalled's, and the retry timer reads it again."""
    if is_true(conditions, "Ready") and status.get("digest"):
        waiting = set_condition(conditions, "Stalled", False, reason, redacted(message), generation)
        return {**status, "conditions": waiting}
    return _not_ready(status, conditions, reason, message, generation, stalled=False)


def _not_ready(
    status: dict[str, Any],
    conditions: list[dict[str, Any]],
    reason: str,
    message: str,
    generation: int,
    stalled: bool = True,
) -> dict[str, Any]:
    """Keep the last good digest and artifact (what was trained and is served from them stays; Cartridges train
    nothing new until the Corpus is Ready again, and show this reason); say why (``stalled``: a problem to fix, else
    a wait that ends by itself), naming the URLs in ``message`` without the credentials they may carry."""
    message = redacted(message)
    conditions = set_condition(conditions, "Stalled", stalled, reason, message, generation)
    conditions = set_condition(conditions, "Ready", False, reason, message, generation)
    return {**status, "observedGeneration": generation, "conditions": conditions}
