"""The Corpus reconciler: sources → normalized documents → stored under their digest → status."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cartridges import api, layout
from cartridges.corpus import SourceError, count_tokens, publish
from cartridges.store import Store, StoreError
from cartridges_operator import kube
from cartridges_operator.conditions import set_condition
from cartridges_operator.config import CorpusLimits
from cartridges_operator.corpus_sources import read_sources
from cartridges_operator.source_access import SourceAccess


def reconcile_corpus(
    spec: dict[str, Any],
    status: dict[str, Any],
    namespace: str,
    name: str,
    generation: int,
    store: Store,
    root: str,
    limits: CorpusLimits | None = None,
) -> dict[str, Any]:
    """The new status. Unchanged text keeps its digest, so Cartridges see no change and retrain nothing."""
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
    access = SourceAccess(root, namespace, limits or CorpusLimits())
    try:
        corpus_spec = api.CorpusSpec.model_validate(spec)
        if corpus_spec.tokenizer:
            access.check_tokenizer(corpus_spec.tokenizer)
        corpus = read_sources(corpus_spec, store, kube.configmap_reader(namespace), access)
        prefix = layout.corpus_prefix(root, namespace, name, corpus.digest)
        tokens = count_tokens(corpus, corpus_spec.tokenizer, store) if corpus_spec.tokenizer else None
        manifest = publish(corpus, corpus_spec.description, store, prefix, tokens, corpus_spec.tokenizer)
    except (SourceError, ValidationError) as err:
        return _failed(status, conditions, "InvalidSource", str(err), generation)
    except StoreError as err:
        return _failed(status, conditions, "StoreUnavailable", str(err), generation)
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


def _failed(
    status: dict[str, Any], conditions: list[dict[str, Any]], reason: str, message: str, generation: int
) -> dict[str, Any]:
    """Keep the last good digest and artifact (Cartridges keep using them); flag the problem."""
    conditions = set_condition(conditions, "Stalled", True, reason, message, generation)
    conditions = set_condition(conditions, "Ready", False, reason, message, generation)
    return {**status, "observedGeneration": generation, "conditions": conditions}
