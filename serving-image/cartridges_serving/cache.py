"""Cartridges by id from the object store: tenancy check, pointer resolution, sha256 + base-model check, LRU.

An id is a cartridge name inside the server's namespace; it resolves through
``cartridges/<namespace>/<id>/current.json`` to a promoted generation. A resolved pointer is reused for
``pointer_ttl_s`` (a store round trip per request would cost more than a decode step), so a newly promoted
generation is served within that time (and while the store cannot be reached, the pointer resolved before stays in
use: cached cartridges keep being served through an outage); the loaded tensors are cached by (id, generation,
sha256) and evicted least-recently-used once their bytes exceed the budget.

When the pointer moves on (a new generation, or the cartridge deleted), the entry served before is evicted as
soon as no request uses it: no request can ask for it again. A request keeps the entry it took whole until it ends,
so a promotion never mixes generations in a request. A promoted generation that cannot be used (corrupt, or for
another base model) is loaded once and remembered as unusable (nothing in the store is overwritten in place); until
a usable one is promoted, the generation served before it keeps answering, and an id with none answers
``unusable_cartridge``.

Entries in use are never evicted: :meth:`CartridgeCache.acquire` counts a use (the engine takes one per request
that composes the cartridge, from submission until the request ends) and :meth:`CartridgeCache.release` gives it
back. Evicting a cartridge a request still reads would free no memory, and the next request asking for it would
load a second copy (and the batch would read both). So the budget is a bound on unused bytes: ``bytes`` may exceed
``capacity_bytes`` while entries in use (``in_use_bytes``) hold it, and drops back when they are released.

Locking: one lock guards the pointers, the entries, the pointer reads and loads in flight and the counters, and is
held only to look up and to update them, never across a store round trip or a load. Both are single-flight (see
:class:`_Flights`): the first request to need a pointer read or a load marks it in flight (a ``Future``) and runs it
without the lock; concurrent ones for the same id (pointer) or generation (load) wait for its outcome, so the store
is read once, and a failure raises in every waiter and is not cached. ``stats()`` and hits therefore never wait on
a load. A pointer read is as fresh as the pointer it will return: requests join one that started less than
``pointer_ttl_s`` ago (a read stuck longer is not waited for: the next request reads again, and the older answer
never replaces the newer). While a pointer refresh is in flight, requests whose previous generation is still
loaded are served it, as through an outage, rather than wait for the store; the others wait for the refresh.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from pydantic import ValidationError

from cartridges import layout
from cartridges.artifact import (
    ArtifactError,
    ModelFingerprint,
    QuantizedCartridge,
    StoredCartridge,
    download_artifact,
    load_stored_cartridge,
    without_directory,
)
from cartridges.store import IntegrityError, ObjectNotFound, Store, StoreError
from cartridges_kernels.config import check_fp8_storage
from cartridges_serving.errors import (
    CartridgeInvalid,
    CartridgeNotFound,
    CartridgeRefused,
    EngineError,
    EngineUnavailable,
)

log = logging.getLogger(__name__)

DEFAULT_POINTER_TTL_S = 2.0

K = TypeVar("K")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class LoadedCartridge:
    id: str
    generation: int
    sha256: str
    cartridge: StoredCartridge

    @property
    def nbytes(self) -> int:
        return self.cartridge.nbytes

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.id, self.generation, self.sha256)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    bytes: int
    entries: int
    capacity_bytes: int
    in_use_entries: int = 0  # entries some request uses: kept even while ``bytes`` exceeds ``capacity_bytes``
    in_use_bytes: int = 0


def check_cartridge_id(cartridge_id: str, namespace: str) -> None:
    """Refuse ids that are not plain resource names: they could address another namespace's prefix."""
    if not layout.is_resource_name(cartridge_id):  # the names a Cartridge may have
        raise CartridgeRefused(
            f"cartridge id {cartridge_id!r} is not a cartridge name in namespace {namespace!r} "
            "(lowercase letters, digits, '-' and '.'; no '/' or '..')"
        )


class _Flights(Generic[K, T]):
    """Calls in flight by key, so that concurrent requests for one key share one call (one pointer read, one load):
    the first registers it and runs it, the others wait for its outcome. Guarded by the cache's ``lock``, which is
    held to register and to retire a call (and to record its outcome, in the same step), never while one runs."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._calls: dict[K, tuple[float, Future[T]]] = {}

    def find(self, key: K, started_after: float = -math.inf) -> Future[T] | None:
        """The call in flight for ``key``, if it started after ``started_after``. Lock held."""
        call = self._calls.get(key)
        return call[1] if call is not None and call[0] > started_after else None

    def start(self, key: K, started: float = 0.0) -> Future[T]:
        """Register the caller's call for ``key``, in place of any older one (whose outcome still reaches its own
        waiters). Lock held."""
        call: Future[T] = Future()
        self._calls[key] = (started, call)
        return call

    def run(
        self,
        key: K,
        call: Future[T],
        work: Callable[[], T],
        done: Callable[[T], R],
        failed: Callable[[BaseException], object] = lambda _: None,
    ) -> R:
        """Run ``work`` for the ``call`` :meth:`start` returned; then, with the lock held, retire it and let ``done``
        or ``failed`` record the outcome (one step: no request finds neither the call nor what it left), and hand
        the value or the error to every waiter. A failure is not kept: the next request calls again."""
        try:
            value = work()
        except BaseException as err:
            try:
                with self._lock:
                    self._retire(key, call)
                    failed(err)
            finally:
                call.set_exception(err)
            raise
        try:
            with self._lock:
                self._retire(key, call)
                kept = done(value)
        except BaseException as err:  # recording failed: the waiters must not wait for ever either
            call.set_exception(err)
            raise
        call.set_result(value)
        return kept

    def _retire(self, key: K, call: Future[T]) -> None:
        if key in self._calls and self._calls[key][1] is call:
            del self._calls[key]


class CartridgeCache:
    """Loads cartridges for one (store root, namespace, base model) and keeps at most ``capacity_bytes`` of them,
    plus those requests use (see the module's docstring). Thread-safe: the engine's submitters acquire, its
    scheduler thread releases, and neither ever waits on another cartridge's load."""

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
        self._lock = threading.Lock()
        self._reads: _Flights[str, layout.Pointer] = _Flights(self._lock)  # pointer reads by id
        self._loading: _Flights[tuple[str, int, str], LoadedCartridge] = _Flights(self._lock)  # loads by generation
        self._uses: dict[tuple[str, int, str], int] = {}  # entries in use: never evicted
        self._served: dict[str, layout.Pointer] = {}  # the generation each id was last served from
        self._unusable: dict[tuple[str, int, str], str] = {}  # generations that failed to load as invalid: why
        self._oversized: set[tuple[str, int, str]] = set()  # generations larger than the budget, said once
        self._hits = self._misses = self._bytes = 0

    def get(self, cartridge_id: str) -> LoadedCartridge:
        """The cartridge's promoted generation, from the cache or loaded (once, however many threads ask)."""
        return self._get(cartridge_id, use=False)

    def acquire(self, cartridge_id: str) -> LoadedCartridge:
        """:meth:`get`, and count a use: the entry is not evicted until :meth:`release` gives the use back."""
        return self._get(cartridge_id, use=True)

    def release(self, loaded: LoadedCartridge) -> None:
        """Give back a use taken by :meth:`acquire`; an entry no longer in use may be evicted now."""
        with self._lock:
            uses = self._uses.pop(loaded.key) - 1
            if uses:
                self._uses[loaded.key] = uses
            self._evict()

    def _get(self, cartridge_id: str, use: bool) -> LoadedCartridge:
        """The promoted generation; while it is unusable, the one served before it (see the module's docstring)."""
        check_cartridge_id(cartridge_id, self.namespace)
        try:
            return self._generation(cartridge_id, self._pointer(cartridge_id), use)
        except CartridgeNotFound:
            self._forget(cartridge_id)
            raise
        except CartridgeInvalid as unusable:
            with self._lock:
                last_good = self._served.get(cartridge_id)
            if last_good is None:
                raise
            try:
                return self._generation(cartridge_id, last_good, use)
            except EngineError:  # the promoted generation's problem is the one to fix
                raise unusable from None

    def _generation(self, cartridge_id: str, pointer: layout.Pointer, use: bool) -> LoadedCartridge:
        """The generation ``pointer`` names, from the cache or loaded once; one found unusable is never loaded
        again (nothing in the store is overwritten in place: it cannot become usable)."""
        key = _key(cartridge_id, pointer)
        with self._lock:
            if key in self._unusable:
                raise CartridgeInvalid(self._unusable[key])
            if key in self._entries:
                self._hits += 1
                return self._keep(pointer, self._entries[key], use)
            loading = self._loading.find(key)
            if loading is not None:
                self._hits += 1  # another thread's load serves this one: the store is read once
            else:
                self._misses += 1
                owned = self._loading.start(key)
        if loading is not None:
            loaded = loading.result()  # raises the load's error
            with self._lock:  # kept again if it was evicted meanwhile: the object is alive, never load a copy
                return self._keep(pointer, loaded, use)
        return self._loading.run(
            key,
            owned,
            lambda: self._load(cartridge_id, pointer),
            lambda loaded: self._keep_new(pointer, loaded, use),
            lambda err: self._remember_if_unusable(key, err),
        )

    def _keep_new(self, pointer: layout.Pointer, loaded: LoadedCartridge, use: bool) -> LoadedCartridge:
        """:meth:`_keep` for a generation just loaded. Lock held."""
        self._warn_if_oversized(loaded)
        return self._keep(pointer, loaded, use)

    def _remember_if_unusable(self, key: tuple[str, int, str], err: BaseException) -> None:
        """A load failed: only an unusable artifact is remembered (anything else may work next time). Lock held."""
        if isinstance(err, CartridgeInvalid):
            self._unusable[key] = str(err)
            log.warning("%s (serving the generation served before it, if any)", err)

    def _warn_if_oversized(self, loaded: LoadedCartridge) -> None:
        """Say once per generation that it exceeds the budget: it is evicted whenever no request holds it, so most
        requests download, hash and load it again (seconds each), which nothing else shows. Lock held."""
        if loaded.nbytes > self.capacity_bytes and loaded.key not in self._oversized:
            self._oversized.add(loaded.key)
            log.warning(
                "cartridge %s g%d is %d bytes, more than the cache budget of %d (CARTRIDGES_CACHE_BYTES): it is "
                "loaded again for requests that find no other request holding it; raise the budget",
                loaded.id, loaded.generation, loaded.nbytes, self.capacity_bytes,
            )  # fmt: skip

    def stats(self) -> CacheStats:
        with self._lock:
            in_use = [self._entries[key].nbytes for key in self._uses]
            return CacheStats(
                self._hits, self._misses, self._bytes, len(self._entries), self.capacity_bytes, len(in_use), sum(in_use)
            )

    def _pointer(self, cartridge_id: str) -> layout.Pointer:
        """The resolved pointer, from the store at most once per ``pointer_ttl_s`` (by one request: the others wait
        for it, or keep the generation they have loaded meanwhile; see the module's docstring); failures are never
        cached. While the store cannot be reached, a pointer resolved before is kept for another ``pointer_ttl_s``:
        its cartridge stays served through a brief outage, and the store is asked once per TTL, not per request."""
        now = self._clock()
        with self._lock:
            cached = self._pointers.get(cartridge_id)
            if cached is not None and now - cached[0] < self.pointer_ttl_s:
                return cached[1]
            reading = self._reads.find(cartridge_id, started_after=now - self.pointer_ttl_s)
            if reading is None:
                owned = self._reads.start(cartridge_id, now)
            elif cached is not None and _key(cartridge_id, cached[1]) in self._entries:
                return cached[1]  # a hit now beats a fresher answer after a store round trip (or its timeout)
        if reading is not None:
            return reading.result()  # raises the read's error
        return self._reads.run(
            cartridge_id,
            owned,
            lambda: self._refresh(cartridge_id, cached),
            lambda pointer: self._store_pointer(cartridge_id, now, pointer),
        )

    def _refresh(self, cartridge_id: str, cached: tuple[float, layout.Pointer] | None) -> layout.Pointer:
        """The pointer from the store; while the store cannot be reached, the one resolved before, if any."""
        try:
            return self._resolve(cartridge_id)
        except EngineUnavailable as err:
            if cached is None:
                raise
            log.warning("cartridge %s: keeping generation %d: %s", cartridge_id, cached[1].generation, err)
            return cached[1]

    def _store_pointer(self, cartridge_id: str, read_at: float, pointer: layout.Pointer) -> layout.Pointer:
        """Keep ``pointer``, read at ``read_at``, unless a read that started later finished first. Lock held."""
        stored = self._pointers.get(cartridge_id)
        if stored is None or stored[0] <= read_at:
            self._pointers[cartridge_id] = (read_at, pointer)
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
        except IntegrityError as err:  # altered since it was written: reading it again cannot help
            raise CartridgeInvalid(f"cartridge {cartridge_id!r}: corrupt {layout.CURRENT_POINTER}: {err}") from err
        except StoreError as err:
            raise EngineUnavailable(f"cartridge {cartridge_id!r}: object store error: {err}") from err
        try:
            return layout.confined_pointer(self.root, self.namespace, cartridge_id, pointer)
        except layout.PointerOutsideCartridge as err:  # the store is at fault, not the request
            raise CartridgeInvalid(str(err)) from err

    def _load(self, cartridge_id: str, pointer: layout.Pointer) -> LoadedCartridge:
        with tempfile.TemporaryDirectory(prefix="cartridge-") as tmp:
            try:
                manifest = download_artifact(self.store, pointer.prefix, Path(tmp))
                _check_promoted(cartridge_id, pointer, manifest.file_sha256)
                cartridge, _ = load_stored_cartridge(
                    Path(tmp), expected_model=self.model, device=self.device, dtype=self.dtype
                )
                if isinstance(cartridge, QuantizedCartridge):  # refused here, for its request alone, not mid-batch
                    stored = {kv.data.dtype for kv in (*cartridge.keys, *cartridge.values)}
                    check_fp8_storage(stored, gpu_capability(self.device))
            except ObjectNotFound as err:
                raise CartridgeNotFound(f"cartridge {cartridge_id!r} g{pointer.generation}: {err}") from err
            except ArtifactError as err:
                which = f"cartridge {cartridge_id!r} g{pointer.generation}"
                raise CartridgeInvalid(f"{which}: {without_directory(err, tmp)}") from err
            except StoreError as err:
                raise EngineUnavailable(f"cartridge {cartridge_id!r}: object store error: {err}") from err
            except ValueError as err:  # an object name the store refuses (S3: a '.' or '..' segment)
                raise CartridgeInvalid(f"cartridge {cartridge_id!r} g{pointer.generation}: {err}") from err
        log.info(
            "loaded cartridge %s g%d (p=%d, %d bytes)", cartridge_id, pointer.generation, cartridge.p, cartridge.nbytes
        )
        return LoadedCartridge(cartridge_id, pointer.generation, pointer.sha256, cartridge)

    def _forget(self, cartridge_id: str) -> None:
        """The cartridge is gone from the store: its entries go as soon as no request uses them."""
        with self._lock:
            self._served.pop(cartridge_id, None)
            self._evict()

    def _keep(self, pointer: layout.Pointer, loaded: LoadedCartridge, use: bool) -> LoadedCartridge:
        """The entry for ``pointer`` (``loaded`` unless one is cached), now the most recently used and the one its
        id is served from, with ``use`` counted; then evict. Called with the lock held."""
        key = loaded.key
        self._served[loaded.id] = pointer
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = entry = loaded
            self._bytes += loaded.nbytes
        self._entries.move_to_end(key)
        if use:
            self._uses[key] = self._uses.get(key, 0) + 1
        self._evict()
        return entry

    def _evict(self) -> None:
        """Evict the entries no request uses that no request can ask for again (another generation is served for
        their id, or none is), then least-recently-used ones until the bytes fit the budget (the newest goes last,
        so it stays unless it alone, with the entries in use, exceeds the budget). Called with the lock held."""
        unused = [key for key in self._entries if key not in self._uses]
        for key in unused:
            served = self._served.get(key[0])
            if served is None or _key(key[0], served) != key:
                self._drop(key)
        for key in unused:
            if self._bytes <= self.capacity_bytes:
                return
            if key in self._entries:
                self._drop(key)

    def _drop(self, key: tuple[str, int, str]) -> None:
        evicted = self._entries.pop(key)
        self._bytes -= evicted.nbytes
        log.info("evicted cartridge %s g%d (%d bytes)", evicted.id, evicted.generation, evicted.nbytes)


def gpu_capability(device: torch.device | str) -> tuple[int, int] | None:
    """The compute capability of ``device`` when it is a GPU (what decides which storage formats the kernels
    read), else None."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _check_promoted(cartridge_id: str, pointer: layout.Pointer, sha256: str) -> None:
    """Refuse tensors other than the promoted ones. The client is not told their sha256: a pointer altered to lead
    elsewhere would have it name what is stored there; the log has it."""
    if sha256 != pointer.sha256:
        log.warning(
            "cartridge %s g%d: tensors sha256 %s under %s do not match the promoted %s",
            cartridge_id,
            pointer.generation,
            sha256,
            pointer.prefix,
            pointer.sha256,
        )
        raise ArtifactError(f"the tensors do not match the promoted sha256 {pointer.sha256}")


def _key(cartridge_id: str, pointer: layout.Pointer) -> tuple[str, int, str]:
    return (cartridge_id, pointer.generation, pointer.sha256)
