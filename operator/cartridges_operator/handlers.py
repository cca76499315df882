"""kopf registrations: thin handlers that call the reconcilers and write their status back."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from cartridges import api, layout
from cartridges.store import Store, StoreError
from cartridges_operator import kube, manifests
from cartridges_operator.cartridge import reconcile_cartridge
from cartridges_operator.config import OperatorConfig
from cartridges_operator.corpus import reconcile_corpus

PREFIX = "cartridges.dev"
RESYNC_S = 5.0
DELETE_RETRIES = 3

CONFIG = OperatorConfig.from_env()
STORE = Store.from_env()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our own finalizer and annotation prefixes from day one, so other kopf operators never collide with us."""
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 60


@kopf.on.resume(api.GROUP, api.VERSION, "corpora")
@kopf.on.create(api.GROUP, api.VERSION, "corpora")
@kopf.on.update(api.GROUP, api.VERSION, "corpora", field="spec")
def corpus_changed(
    spec: kopf.Spec, status: kopf.Status, namespace: str | None, name: str, meta: kopf.Meta, patch: kopf.Patch, **_: Any
) -> None:
    assert namespace is not None  # both kinds are namespaced
    new = reconcile_corpus(dict(spec), dict(status), namespace, name, int(meta["generation"]), STORE, CONFIG.store_root)
    patch.status.update(new)


@kopf.timer(api.GROUP, api.VERSION, "cartridges", interval=RESYNC_S, initial_delay=0.5)
def cartridge_resync(body: kopf.Body, namespace: str | None, name: str, patch: kopf.Patch, **_: Any) -> None:
    """Level-triggered: every pass recomputes status from the world (Job, corpora, store, serving replicas)."""
    assert namespace is not None
    desired = reconcile_cartridge(_plain(body), namespace, name, CONFIG, STORE)
    current = dict(body.get("status") or {})
    changed = {k: v for k, v in desired.items() if current.get(k) != v}
    if changed:
        patch.status.update(changed)


@kopf.on.delete(api.GROUP, api.VERSION, "cartridges", retries=DELETE_RETRIES, backoff=2)
def cartridge_deleted(
    spec: kopf.Spec, namespace: str | None, name: str, meta: kopf.Meta, retry: int, logger: kopf.Logger, **_: Any
) -> None:
    """Leave serving, then delete or keep artifacts. A store that stays down never blocks deletion forever."""
    assert namespace is not None
    model = spec.get("baseModel", {}).get("name", "")
    for kind in ("Deployment", "Service"):
        kube.remove_owner(kind, namespace, manifests.serving_name(model), meta["uid"])
    if spec.get("retention", "Retain") != "Delete":
        return
    prefix = layout.cartridge_prefix(CONFIG.store_root, namespace, name)
    try:
        deleted = STORE.delete_prefix(prefix)
        logger.info(f"deleted {deleted} objects under {prefix}")
    except StoreError as err:
        if retry + 1 >= DELETE_RETRIES:
            logger.error(f"artifacts under {prefix} were NOT deleted after {retry + 1} tries ({err}); releasing")
            return
        raise kopf.TemporaryError(f"cannot delete artifacts yet: {err}", delay=2) from err


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {
        "kind": body.get("kind"),
        "metadata": dict(body.metadata),
        "spec": dict(body.spec),
        "status": dict(body.status),
    }
