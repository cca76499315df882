"""Cartridges by id from the object store: tenancy check, pointer resolution, sha256 + base-model check, LRU.

An id is a cartridge name inside the server's namespace; it resolves through
``cartridges/<namespace>/<id>/current.json`` to a promoted generation. A resolved pointer is reused for
``pointer_ttl_s`` (a store round trip per request would cost more than a decode step), so a newly promoted
generation is served within that time; the loaded tensors are cached by (id, generation, sha256) and evicted
least-recently-used once their bytes exceed the budget.

Locking: one lock guards the pointers, the entries, the loads in flight and the counters, and is held only to
look up and to update them, never across a store round trip or a load. A miss marks its key as loading (a
``Future``) and loads without the lock; other misses on that key wait on the future, so a cartridge is loaded
once and a failed load raises in every waiter and is not cached. ``stats()`` and hits therefore never wait on
a load.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from cartridges import layout
from cartridges.artifact import (
    ArtifactError,
    ModelFingerprint,
    StoredCartridge,
    download_artifact,
    load_stored_cartridge,
)
from cartridges.store import ObjectNotFound, Store, StoreError
from cartridges_serving.errors import CartridgeInvalid, CartridgeNotFound, CartridgeRefused, EngineUnavailable

log = logging.getLogger(__name__)

# A Kubernetes resource name (RFC 1123 subdomain): no "/", no "..", nothing that leaves the namespace prefix.
CARTRIDGE_ID = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_ID_LENGTH = 253
DEFAULT_POINTER_TTL_S = 2.0


@dataclass(frozen=True)
class LoadedCartridge:
    id: str
    generation: int
    sha256: str
    cartridge: StoredCartridge

    @property
    def nbytes(self) -> int:
        return self.cartridge.nbytes


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    bytes: int
    entries: int
    capacity_bytes: int


def check_cartridge_id(cartridge_id: str, namespace: str) -> None:
    """Refuse ids that are not plain resource names: they could address another namespace's prefix."""
    if len(cartridge_id) > MAX_ID_LENGTH or not CARTRIDGE_ID.match(cartridge_id):
        raise CartridgeRefused(
            f"cartridge id {cartridge_id!r} is not a cartridge name in namespace {namespace!r} "
            "(lowercase letters, digits, '-' and '.'; no '/' or '..')"
        )


class CartridgeCache:
    """Loads cartridges for one (store root, namespace, base model) and keeps at most ``capacity_bytes`` of them."""

    def __init__(
        self,
        store: Store,
        root: str,
        namespace: str,
        model: ModelFingerprint,
        capacity_bytes: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pointer_ttl_s: float = DEFAULT_POINTER_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.root, self.namespace, self.model = store, root, namespace, model
        self.capacity_bytes, self.device, self.dtype = capacity_bytes, device, dtype
        self.pointer_ttl_s, self._clock = pointer_ttl_s, clock
        self._pointers: dict[str, tuple[float, layout.Pointer]] = {}
        self._entries: OrderedDict[tuple[str, int, str], LoadedCartridge] = OrderedDict()
        self._loading: dict[tuple[str, int, str], Future[LoadedCartridge]] = {}
        self._lock = threading.Lock()
        self._hits = self._misses = self._bytes = 0

    def get(self, cartridge_id: str) -> LoadedCartridge:
        """The cartridge's promoted generation, from the cache or loaded (once, however many threads ask)."""
        check_cartridge_id(cartridge_id, self.namespace)
        pointer = self._pointer(cartridge_id)
        key = (cartridge_id, pointer.generation, pointer.sha256)
        with self._lock:
            if key in self._entries:
                self._hits += 1
                self._entries.move_to_end(key)
                return self._entries[key]
            loading = self._loading.get(key)
            if loading is not None:
                self._hits += 1  # another thread's load serves this one: the store is read once
            else:
                self._misses += 1
                owned: Future[LoadedCartridge] = Future()
                self._loading[key] = owned
        if loading is not None:
            return loading.result()  # raises the load's error
        try:
            loaded = self._load(cartridge_id, pointer)
        except BaseException as err:  # every waiter gets the error; nothing is cached
            with self._lock:
                del self._loading[key]
            owned.set_exception(err)
            raise
        with self._lock:
            del self._loading[key]
            self._insert(key, loaded)
        owned.set_result(loaded)
        return loaded

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._bytes, len(self._entries), self.capacity_bytes)

    def _pointer(self, cartridge_id: str) -> layout.Pointer:
        """The resolved pointer, from the store at most once per ``pointer_ttl_s``; failures are never cached."""
        now = self._clock()
        with self._lock:
            cached = self._pointers.get(cartridge_id)
        if cached is not None and now - cached[0] < self.pointer_ttl_s:
            return cached[1]
        pointer = self._resolve(cartridge_id)
        with self._lock:
            self._pointers[cartridge_id] = (now, pointer)
        return pointer

    def _resolve(self, cartridge_id: str) -> layout.Pointer:
        uri = layout.current_pointer(self.root, self.namespace, cartridge_id)
        try:
            pointer = layout.Pointer.model_validate(self.store.get_json(uri))
        except ObjectNotFound as err:
            raise CartridgeNotFound(
                f"cartridge {cartridge_id!r} not found in namespace {self.namespace!r} (no promoted generation)"
            ) from err
        except (ValidationError, ValueError) as err:
            raise CartridgeInvalid(f"cartridge {cartridge_id!r}: unreadable {layout.CURRENT_POINTER}: {err}") from err
        except StoreError as err:
            raise EngineUnavailable(f"cartridge {cartridge_id!r}: object store error: {err}") from err
        own_prefix = layout.cartridge_prefix(self.root, self.namespace, cartridge_id) + "/"
        prefix = pointer.prefix if "://" in pointer.prefix else own_prefix + pointer.prefix.strip("/")
        if not prefix.startswith(own_prefix) or ".." in prefix[len(own_prefix) :].split("/"):
            raise CartridgeRefused(f"cartridge {cartridge_id!r}: pointer leaves the cartridge's prefix: {prefix}")
        return pointer.model_copy(update={"prefix": prefix})

    def _load(self, cartridge_id: str, pointer: layout.Pointer) -> LoadedCartridge:
        with tempfile.TemporaryDirectory(prefix="cartridge-") as tmp:
            try:
                manifest = download_artifact(self.store, pointer.prefix, Path(tmp))
                if manifest.file_sha256 != pointer.sha256:
                    raise ArtifactError(
                        f"tensors sha256 {manifest.file_sha256} does not match the promoted {pointer.sha256}"
                    )
                cartridge, _ = load_stored_cartridge(
                    Path(tmp), expected_model=self.model, device=self.device, dtype=self.dtype
                )
            except ObjectNotFound as err:
                raise CartridgeNotFound(f"cartridge {cartridge_id!r} g{pointer.generation}: {err}") from err
            except ArtifactError as err:
                raise CartridgeInvalid(f"cartridge {cartridge_id!r} g{pointer.generation}: {err}") from err
            except StoreError as err:
                raise EngineUnavailable(f"cartridge {cartridge_id!r}: object store error: {err}") from err
        log.info(
            "loaded cartridge %s g%d (p=%d, %d bytes)", cartridge_id, pointer.generation, cartridge.p, cartridge.nbytes
        )
        return LoadedCartridge(cartridge_id, pointer.generation, pointer.sha256, cartridge)

    def _insert(self, key: tuple[str, int, str], loaded: LoadedCartridge) -> None:
        """Keep the newest entry unless it alone exceeds the budget; evict least-recently-used ones until it fits."""
        if loaded.nbytes > self.capacity_bytes:
            return
        self._entries[key] = loaded
        self._bytes += loaded.nbytes
        while self._bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            log.info("evicted cartridge %s g%d (%d bytes)", evicted.id, evicted.generation, evicted.nbytes)
