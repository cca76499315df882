"""The Corpus reconciler: sources → normalized documents → stored under their digest → status."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from pydantic import ValidationError

from cartridges import api, layout
from cartridges.corpus import SourceError, count_tokens, publish
from cartridges.store import Store, StoreError
from cartridges_operator import kube
from cartridges_operator.conditions import set_condition
from cartridges_operator.config import CorpusLimits
from cartridges_operator.corpus_sources import read_sources, read_tokenizer
from cartridges_operator.redaction import redacted
from cartridges_operator.source_access import ReadsBusy, ReadSlots, SourceAccess

WAITING_FOR_READ_SLOT = "WaitingForReadSlot"


def read_skipped(status: dict[str, Any]) -> bool:
    """Whether the last read of a Corpus found no read slot free: what its status says is from before that change
    (of its spec, or of a ConfigMap it reads), and only a later read takes it in."""
    stalled: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Stalled"), {})
    return bool(stalled.get("reason") == WAITING_FOR_READ_SLOT)


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

    ``reads`` is the operator's bound on Corpora read at once (the handlers share one; None: no bound). While no
    slot is free the Corpus is not Stalled, the retry timer reads it later, and one stored before stays as Ready as
    it was (its Cartridges keep their corpus; a new generation shows as not yet observed)."""
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
    access = SourceAccess(root, namespace, limits or CorpusLimits())
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
        if status.get("digest"):
            waiting = set_condition(conditions, "Stalled", False, WAITING_FOR_READ_SLOT, str(err))
            return {**status, "conditions": waiting}
        return _not_ready(status, conditions, WAITING_FOR_READ_SLOT, str(err), generation, stalled=False)
    except (SourceError, ValidationError) as err:
        return _not_ready(status, conditions, "InvalidSource", str(err), generation)
    except StoreError as err:
        return _not_ready(status, conditions, "StoreUnavailable", str(err), generation)
    conditions = set_condition(conditions, "Stalled", False, "Stored", "", generation)
    conditions = set_condition(conditions, "Ready", True, "Stored", f"{manifest.documents} documents", generation)
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
