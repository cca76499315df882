"""The inference engine: one base model, cartridges from the store, continuous batching on a scheduler thread.

``submit`` returns a handle at once: a loader thread validates the request, loads its cartridges and tokenizes
its prompt, then queues it (a bad request ends alone with its error). The scheduler thread admits queued requests
between steps, runs one step for the whole batch (prompt chunks of new requests and one token of every running
request together), samples, streams text, and retires requests that finished or were cancelled. Each request
attends over its own ordered cartridges followed by its own KV; its token positions start after the summed
cartridge lengths.

Threads: a caller's thread only creates the handle, so a front end that submits from one thread (Triton's
``execute``) never waits on a store. Requests with cartridges are prepared on ``LOADER_THREADS`` loader threads,
those without on a thread of their own, so they never wait behind a load. The cache is thread-safe, tokenizing
is serialized (a fast tokenizer is not safe to call from several threads), and a prepared request joins the
queue under ``_wakeup``. The scheduler thread alone touches the batch, the runner and the own-KV pool. A
request's events come from one thread at a time: its loader until it is queued (a refusal, or a cancel during
its load), the scheduler after. Counters and the token rate are updated under ``_wakeup``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch

from cartridges.artifact import StoredCartridge
from cartridges.chat import turn_after_cartridges
from cartridges.models import LoadedModel, load_base_model
from cartridges.store import Store
from cartridges_serving.cache import DEFAULT_POINTER_TTL_S, CacheStats, CartridgeCache, LoadedCartridge
from cartridges_serving.errors import EngineError, EngineUnavailable, InvalidRequest
from cartridges_serving.graphs import DecodeGraphs, GraphStats
from cartridges_serving.own_kv import OwnKV, OwnKVFull
from cartridges_serving.runner import BatchItem, LlamaRunner
from cartridges_serving.sampling import Pick, SamplingParams, next_tokens
from cartridges_serving.text import TextStream

log = logging.getLogger(__name__)

N = TypeVar("N", int, float)
FinishReason = Literal["stop", "length", "cancelled", "error"]
DEFAULT_CACHE_BYTES = 2 * 1024**3
DEFAULT_MAX_PREFILL_TOKENS = 1024
METRICS_LOG_INTERVAL_S = 10.0
LOADER_THREADS = 4  # cartridge loads in flight at once; more requests with cartridges wait for a loader
RATE_WINDOW_S = 10.0  # tokens_per_s counts the steps of this recent window only
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    cartridge_tokens: int
    # the generation of each requested cartridge that answered, in composition order: a promotion reaches serving
    # within the pointer TTL, and an unusable one leaves the generation before it answering
    generations: tuple[int, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """Text produced since the previous event; the last event has ``completion`` (success) or ``error`` set."""

    text: str
    completion: Completion | None = None
    error: EngineError | None = None

    @property
    def final(self) -> bool:
        return self.completion is not None or self.error is not None


@dataclass(frozen=True)
class KVStats:
    """The own-KV pool as the scheduler last saw it: bytes held, bytes given to requests, and whether the oldest
    queued request waits for rows (requests queue for memory, not only for batch slots)."""

    pool_bytes: int
    used_bytes: int
    waiting: bool


@dataclass(frozen=True)
class EngineMetrics:
    running: int
    queued: int
    tokens_generated: int
    tokens_per_s: float
    requests_finished: int
    requests_failed: int
    cache: CacheStats | None
    kv: KVStats
    graphs: GraphStats | None = None  # decode steps from CUDA graphs, when on
    requests_refused: Mapping[str, int] = field(default_factory=dict)  # by status: refused before they were queued
    preparing: int = 0  # requests whose cartridges are loading or whose prompt is being tokenized


@dataclass(frozen=True)
class EngineConfig:
    """Where the engine gets its model and cartridges; the router reads it from the environment."""

    model_uri: str
    store_root: str | None = None
    namespace: str = "default"
    cache_bytes: int = DEFAULT_CACHE_BYTES
    max_batch_size: int = 32
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS
    kv_bytes: int = 0  # memory reserved at start for requests' own KV; 0 grows it on demand
    cuda_graphs: bool = False  # replay decode steps from CUDA graphs (graphs.DecodeGraphs)
    pointer_ttl_s: float = DEFAULT_POINTER_TTL_S
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"  # of the model, own KV and cartridges: a DTYPES name, or auto (see model_dtype)

    def model_dtype(self) -> torch.dtype:
        """The dtype the model is loaded in on ``device`` (see engine_dtype)."""
        device = torch.device(self.device)
        bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        return engine_dtype(self.dtype, device.type, bf16)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineConfig:
        env = os.environ if env is None else env
        model_uri = env.get("CARTRIDGES_MODEL_URI", "")
        if not model_uri:
            raise ValueError("CARTRIDGES_MODEL_URI is not set (store URI or path of the base model)")
        defaults = cls(model_uri)
        return cls(
            model_uri=model_uri,
            store_root=env.get("CARTRIDGES_STORE_ROOT") or None,
            namespace=env.get("CARTRIDGES_NAMESPACE", defaults.namespace),
            cache_bytes=_env_number(env, "CARTRIDGES_CACHE_BYTES", defaults.cache_bytes, 1),
            max_batch_size=_env_number(env, "CARTRIDGES_MAX_BATCH_SIZE", defaults.max_batch_size, 1),
            max_prefill_tokens=_env_number(env, "CARTRIDGES_MAX_PREFILL_TOKENS", defaults.max_prefill_tokens, 1),
            kv_bytes=_env_number(env, "CARTRIDGES_KV_BYTES", defaults.kv_bytes, 0),
            cuda_graphs=_env_flag(env, "CARTRIDGES_CUDA_GRAPHS", defaults.cuda_graphs),
            pointer_ttl_s=_env_number(env, "CARTRIDGES_POINTER_TTL_S", defaults.pointer_ttl_s, 0.0),
            device=env.get("CARTRIDGES_DEVICE", defaults.device),
            dtype=_env_choice(env, "CARTRIDGES_DTYPE", defaults.dtype, ("auto", *DTYPES)),
        )


def engine_dtype(setting: str, device_type: str, bf16_supported: bool) -> torch.dtype:
    """The dtype of a ``CARTRIDGES_DTYPE`` setting. ``auto`` is 16-bit on a GPU, where attention is bound by the
    bytes it reads and fp32 dots would silently run as TF32 (bfloat16, or float16 before sm_80), and float32 on
    a CPU."""
    if setting != "auto":
        return DTYPES[setting]
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if bf16_supported else torch.float16


def _env_number(env: Mapping[str, str], name: str, default: N, minimum: N) -> N:
    """``env[name]`` as the type of ``default`` (``default`` when unset); a bad value fails naming the setting."""
    text = env.get(name)
    if text is None:
        return default
    try:
        value = type(default)(text)
    except ValueError:
        value = None
    if value is None or not value >= minimum:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"{name} must be {kind} >= {minimum}, got {text!r}")
    return value


def _env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """``env[name]`` as true/false (also 1/0, yes/no; ``default`` when unset); anything else names the setting."""
    text = env.get(name)
    if text is None:
        return default
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(f"{name} must be true or false, got {text!r}")
    return value


def _env_choice(env: Mapping[str, str], name: str, default: str, choices: Sequence[str]) -> str:
    """``env[name]``, one of ``choices`` (``default`` when unset); anything else names the setting."""
    text = env.get(name, default)
    if text not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return text


class RequestHandle:
    """A submitted request: iterate for text chunks, ``result()`` for the completion, ``cancel()`` to stop it."""

    def __init__(self, request_id: int, on_event: Callable[[StreamEvent], None] | None) -> None:
        self.id = request_id
        self._on_event = on_event
        self._events: queue.Queue[StreamEvent] = queue.Queue()
        self._final: StreamEvent | None = None
        self._done = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        """Retire this request before its next step (finish reason ``cancelled``); one still loading cartridges
        stops after the load in flight and gives back what it took."""
        self.cancelled = True

    def _emit(self, event: StreamEvent) -> None:
        if event.final:
            self._final = event
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken consumer must not take the scheduler down
                log.exception("request %d: event callback failed; cancelling it", self.id)
                self.cancel()
        self._events.put(event)
        if event.final:
            self._done.set()

    def __iter__(self) -> Iterator[str]:
        """Text chunks as they are produced; raises the request's error at the end if it failed."""
        while True:
            event = self._events.get()
            if event.text:
                yield event.text
            if event.error is not None:
                raise event.error
            if event.final:
                return

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout}s")
        assert self._final is not None
        if self._final.error is not None:
            raise self._final.error
        assert self._final.completion is not None
        return self._final.completion


class TokenRate:
    """Generated tokens per second over the last steps within ``window_s`` seconds, up to now: it falls as
    generation slows and is 0 once no step is that recent (it never keeps the last busy value). Not thread-safe."""

    def __init__(
        self, window_s: float = RATE_WINDOW_S, steps: int = 64, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s, self._clock = window_s, clock
        self._steps: deque[tuple[float, int]] = deque(maxlen=steps)

    def add(self, tokens: int) -> None:
        self._steps.append((self._clock(), tokens))

    def per_s(self) -> float:
        now = self._clock()
        recent = [(at, n) for at, n in self._steps if now - at <= self.window_s]
        if len(recent) < 2 or now <= recent[0][0]:
            return 0.0
        return sum(n for _, n in recent[1:]) / (now - recent[0][0])  # the oldest step's tokens came before it


def generations(uses: Sequence[LoadedCartridge]) -> tuple[int, ...]:
    return tuple(use.generation for use in uses)


@dataclass(frozen=True)
class _Submitted:
    """A request as submitted, before a loader thread validates it, loads its cartridges and tokenizes it."""

    handle: RequestHandle
    prompt: str
    cartridge_ids: tuple[str, ...]
    params: SamplingParams
    chat: bool


@dataclass
class _Active:
    handle: RequestHandle
    prompt_ids: list[int]
    cartridges: list[StoredCartridge]
    params: SamplingParams
    text: TextStream
    generator: torch.Generator | None
    own: OwnKV | None = None
    generated: list[int] = field(default_factory=list)
    uses: list[LoadedCartridge] = field(default_factory=list)  # the cache's entries it uses, given back at its end

    @property
    def cartridge_tokens(self) -> int:
        return sum(c.p for c in self.cartridges)

    @property
    def pending_prompt(self) -> int:
        """Prompt tokens not yet in the own KV (all of them before the first step)."""
        return max(0, len(self.prompt_ids) - (self.own.length if self.own is not None else 0))

    def next_item(self, budget: int) -> BatchItem:
        """The next chunk of at most ``budget`` prompt tokens while prefilling, then the last sampled token."""
        assert self.own is not None
        done = self.own.length
        tokens = self.prompt_ids[done : done + budget] if done < len(self.prompt_ids) else self.generated[-1:]
        return BatchItem(tokens, self.cartridge_tokens + done, self.cartridges, self.own)

    def seen_tokens(self) -> list[int]:
        """What the repetition penalty applies to: the prompt's and the answer's tokens (none without a penalty)."""
        return [*self.prompt_ids, *self.generated] if self.params.repetition_penalty != 1 else []

    def completion(self, reason: FinishReason) -> Completion:
        return Completion(
            self.text.text,
            list(self.generated),
            reason,
            len(self.prompt_ids),
            self.cartridge_tokens,
            generations(self.uses),
        )


class Engine:
    """Continuous-batching generation with per-request cartridge composition. ``submit`` is thread-safe and
    never waits (see the module's docstring for the threads)."""

    def __init__(
        self,
        loaded: LoadedModel,
        cartridges: CartridgeCache | None = None,
        *,
        max_batch_size: int = 32,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        kv_bytes: int = 0,
        cuda_graphs: bool = False,
    ) -> None:
        """``kv_bytes`` > 0 reserves memory for requests' own KV now: requests wait for room in it, first come
        first served. 0 grows it as requests come, and a request waits only when growing runs out of memory.
        ``cuda_graphs`` replays decode steps from CUDA graphs (the model must be on a GPU)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.cartridges = cartridges
        self.runner = LlamaRunner(loaded.model, own_kv_bytes=kv_bytes)  # after the checks: it may reserve memory
        self.graphs = DecodeGraphs(self.runner) if cuda_graphs else None
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        eos = loaded.model.generation_config.eos_token_id if loaded.model.generation_config else None
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in [*eos_ids, self.tokenizer.eos_token_id] if t is not None}
        self._ids = itertools.count(1)
        self._waiting: deque[_Active] = deque()
        self._running: list[_Active] = []
        self._head_waits = False  # the queue's head found no rows: try again once the pool has a free range for it
        self._kv_stats = KVStats(0, 0, False)  # written by the scheduler thread only (the pool is not thread-safe)
        self._wakeup = threading.Condition()
        self._closed = False
        self._tokens = self._finished = self._failed = self._preparing = 0
        self._refused: Counter[str] = Counter()
        self._rate = TokenRate()
        self._encoding = threading.Lock()
        self._loaders = ThreadPoolExecutor(LOADER_THREADS, thread_name_prefix="cartridges-loader")
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="cartridges-encoder")  # requests without cartridges
        self._thread = threading.Thread(target=self._loop, name="cartridges-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, store: Store | None = None) -> Engine:
        store = store or Store.from_env()
        dtype = config.model_dtype()
        log.info("loading %s on %s in %s (CARTRIDGES_DTYPE=%s)", config.model_uri, config.device, dtype, config.dtype)
        loaded = load_base_model(config.model_uri, store=store, dtype=dtype, device=config.device)
        cache = None
        if config.store_root:
            cache = CartridgeCache(
                store,
                config.store_root,
                config.namespace,
                loaded.fingerprint,
                config.cache_bytes,
                device=loaded.device,
                dtype=next(loaded.model.parameters()).dtype,
                pointer_ttl_s=config.pointer_ttl_s,
            )
        return cls(
            loaded,
            cache,
            max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens,
            kv_bytes=config.kv_bytes,
            cuda_graphs=config.cuda_graphs,
        )

    # -- submission (caller threads, then loader threads) --------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        cartridges: Sequence[str] = (),
        params: SamplingParams | None = None,
        *,
        on_event: Callable[[StreamEvent], None] | None = None,
        chat: bool = True,
    ) -> RequestHandle:
        """Hand the request to a loader thread and return its handle at once.

        A refused request (bad values, unknown or bad cartridge, too long for the context or the KV) ends with
        its :class:`EngineError`, which ``result()`` and iteration raise. ``chat=True`` wraps the prompt as one
        user turn with the tokenizer's chat template.
        """
        handle = RequestHandle(next(self._ids), on_event)
        request = _Submitted(handle, prompt, tuple(cartridges), params or SamplingParams(), chat)
        with self._wakeup:
            self._preparing += 1
        try:
            (self._loaders if request.cartridge_ids else self._encoder).submit(self._prepare, request)
        except RuntimeError:  # the loaders were shut down: the engine is closed
            self._refuse(handle, [], EngineUnavailable("the engine is shutting down"))
        return handle

    def count_refused(self, error: EngineError) -> None:
        """Count a request a front end refused before submitting it (a malformed input), with the engine's own
        refusals, so one metric counts every refused request."""
        with self._wakeup:
            self._refused[error.status] += 1

    def _prepare(self, request: _Submitted) -> None:
        """Loader thread: validate, take the cartridges, tokenize and queue; a refusal ends the request alone."""
        uses: list[LoadedCartridge] = []
        try:
            request.params.validate()
            if not request.prompt:
                raise InvalidRequest("the prompt is empty")
            with self._encoding:  # first: the window check then stops a request that cannot fit loading cartridges
                prompt_ids = self._encode(request.prompt, request.chat, after_cartridges=bool(request.cartridge_ids))
            self._check_window(prompt_ids, [], request)
            self._check_own_kv(prompt_ids, request.params)
            uses = self._acquire(request, prompt_ids)
            if request.handle.cancelled:
                self._cancel_unqueued(request.handle, uses)
            else:
                self._queue(request, prompt_ids, uses)
        except EngineError as error:
            self._refuse(request.handle, uses, error)
        except Exception as error:  # a bug fails this request alone, never a loader thread
            log.exception("preparing request %d failed", request.handle.id)
            self._refuse(request.handle, uses, EngineError(f"internal error: {type(error).__name__}: {error}"))

    def _queue(self, request: _Submitted, prompt_ids: list[int], uses: list[LoadedCartridge]) -> None:
        """Queue a request that fits with its cartridges (requests queue in the order they are ready: one whose
        cartridges load slowly lets later ones pass)."""
        params = request.params
        loaded = [use.cartridge for use in uses]
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator().manual_seed(params.seed)
        text = TextStream(self.tokenizer, params.stop)
        active = _Active(request.handle, prompt_ids, loaded, params, text, generator, uses=uses)
        with self._wakeup:
            if self._closed:
                raise EngineUnavailable("the engine is shutting down")
            self._preparing -= 1
            self._waiting.append(active)
            self._wakeup.notify()

    def _check_window(self, prompt_ids: list[int], uses: list[LoadedCartridge], request: _Submitted) -> None:
        """Refuse a request longer than the context window. Checked before its cartridges load and again after each
        one, so a request that cannot fit loads no more of them."""
        params, wanted = request.params, len(request.cartridge_ids)
        cartridge_tokens = sum(use.cartridge.p for use in uses)
        needed = cartridge_tokens + len(prompt_ids) + params.max_tokens
        if needed > self.runner.max_positions:
            whole = len(uses) == wanted
            counted = f"{wanted} cartridges" if whole else f"{len(uses)} of its {wanted} cartridges"
            raise InvalidRequest(
                f"request needs {'' if whole else 'at least '}{needed} positions ({counted}: {cartridge_tokens} "
                f"tokens, prompt: {len(prompt_ids)} tokens, max_tokens: {params.max_tokens}); the context window is "
                f"{self.runner.max_positions}"
            )

    def _check_own_kv(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse a request whose own KV exceeds what the server reserves."""
        own_tokens = len(prompt_ids) + params.max_tokens
        kv_rows = self.runner.own_kv_pool.max_rows
        if kv_rows is not None and own_tokens > kv_rows:
            raise InvalidRequest(
                f"request needs KV for {own_tokens} tokens (prompt: {len(prompt_ids)}, max_tokens: "
                f"{params.max_tokens}); this server reserves {kv_rows} for all requests (CARTRIDGES_KV_BYTES); "
                "ask for fewer max_tokens"
            )

    def _refuse(self, handle: RequestHandle, uses: list[LoadedCartridge], error: EngineError) -> None:
        """End a request that was never queued with its error, giving back the cartridges it took."""
        self._release(uses)
        with self._wakeup:
            self._preparing -= 1
            self._refused[error.status] += 1
        handle._emit(StreamEvent("", error=error))

    def _cancel_unqueued(self, handle: RequestHandle, uses: list[LoadedCartridge]) -> None:
        """End a request cancelled while its cartridges loaded, giving them back; it read no prompt."""
        self._release(uses)
        with self._wakeup:
            self._preparing -= 1
            self._finished += 1
        cartridge_tokens = sum(use.cartridge.p for use in uses)
        completion = Completion("", [], "cancelled", 0, cartridge_tokens, generations(uses))
        handle._emit(StreamEvent("", completion=completion))

    def generate(
        self, prompt: str, cartridges: Sequence[str] = (), params: SamplingParams | None = None, *, chat: bool = True
    ) -> Completion:
        return self.submit(prompt, cartridges, params, chat=chat).result()

    def metrics(self) -> EngineMetrics:
        cache = self.cartridges.stats() if self.cartridges else None  # outside our lock: the cache has its own
        with self._wakeup:
            return EngineMetrics(
                running=len(self._running),
                queued=len(self._waiting),
                tokens_generated=self._tokens,
                tokens_per_s=self._rate.per_s(),
                requests_finished=self._finished,
                requests_failed=self._failed,
                cache=cache,
                kv=self._kv_stats,
                graphs=dataclasses.replace(self.graphs.stats) if self.graphs else None,
                requests_refused=dict(self._refused),
                preparing=self._preparing,
            )

    def close(self, timeout: float = 10.0) -> None:
        """Stop admitting requests, fail the queued and running ones, and join the scheduler thread. Requests
        still loading end with :class:`EngineUnavailable` once their load returns."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._loaders.shutdown(wait=False)
        self._encoder.shutdown(wait=False)
        self._thread.join(timeout)

    def _acquire(self, request: _Submitted, prompt_ids: list[int]) -> list[LoadedCartridge]:
        """The request's cartridges, each with a use counted in the cache (so none is evicted while it runs);
        all or none: a failure gives back the ones already taken. A cancel stops before the next cartridge, and so
        does a request that no longer fits the context window."""
        if not request.cartridge_ids:
            return []
        if self.cartridges is None:
            raise InvalidRequest("this server has no cartridge store configured (CARTRIDGES_STORE_ROOT)")
        uses: list[LoadedCartridge] = []
        try:
            for cartridge_id in request.cartridge_ids:
                if request.handle.cancelled:
                    break
                uses.append(self.cartridges.acquire(cartridge_id))
                self._check_window(prompt_ids, uses, request)
        except BaseException:
            self._release(uses)
            raise
        return uses

    def _release(self, uses: list[LoadedCartridge]) -> None:
        if self.cartridges is not None:
            for use in uses:
                self.cartridges.release(use)

    def _encode(self, prompt: str, chat: bool, after_cartridges: bool) -> list[int]:
        """With ``chat``, one user turn in the chat template: after cartridges as the trainer rendered it (a
        template's default system turn would come between the cartridge and the question), else as the model's
        own template renders a conversation without a system turn."""
        if chat and self.tokenizer.chat_template:
            if after_cartridges:
                with contextlib.suppress(ValueError):  # a template with no system turn: as if without cartridges
                    return turn_after_cartridges(self.tokenizer, prompt)
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    # -- scheduler thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        last_log = time.monotonic()
        while True:
            with self._wakeup:
                while not self._closed and not self._running and not self._waiting:
                    self._wakeup.wait()
                if self._closed:
                    break
            try:
                self._admit()
                self._retire_cancelled_and_empty()
                if self._running:
                    self._step()
                self._kv_stats = self._snapshot_kv()
            except Exception as err:  # a bug here must not leave every caller waiting on a dead thread
                log.exception("engine scheduler failed; failing the running requests")
                for active in list(self._running):
                    self._fail(active, EngineError(f"internal error: {type(err).__name__}: {err}"))
            if time.monotonic() - last_log > METRICS_LOG_INTERVAL_S:
                last_log = time.monotonic()
                self._log_metrics()
        shutdown = EngineUnavailable("the engine shut down before this request finished")
        for active in [*self._running, *self._waiting]:
            self._end(active, StreamEvent("", error=shutdown))

    def _snapshot_kv(self) -> KVStats:
        pool = self.runner.own_kv_pool
        return KVStats(pool.rows * pool.row_bytes, (pool.rows - pool.free_rows) * pool.row_bytes, self._head_waits)

    def _log_metrics(self) -> None:
        """Metrics are best effort: a failure collecting them (say, in the cache's stats) must not stop serving."""
        try:
            log.info("engine metrics: %s", self.metrics())
        except Exception:
            log.exception("collecting engine metrics failed")

    def _admit(self) -> None:
        """Move queued requests into the batch, first come first served, while it has room and their KV fits.

        A request whose KV does not fit waits at the head of the queue while running requests will give rows
        back; one that cannot fit even then fails alone. Cancelled requests behind a waiting head leave at once.
        """
        while len(self._running) < self.max_batch_size:
            with self._wakeup:  # submitters only append: the head stays ours between the two locks
                if not self._waiting:
                    return
                active = self._waiting[0]
            try:
                if not self._reserve_own_kv(active):
                    self._finish_queued_without_work()
                    return
            except EngineError as err:
                with self._wakeup:
                    self._waiting.popleft()
                    self._failed += 1
                self._head_waits = False  # a new head has not tried yet
                self._end(active, StreamEvent("", error=err))
                continue
            with self._wakeup:
                self._running.append(self._waiting.popleft())
            self._head_waits = False

    def _reserve_own_kv(self, active: _Active) -> bool:
        """Rows for a request's own KV: True once it has them, False while it should wait for them.

        Finished requests give their rows back to the pool, not memory to the device (the pool keeps it), so
        after a failed try the head waits until a free range of the pool can hold it, and fails at once when
        the whole pool could not.
        """
        if active.handle.cancelled or active.params.max_tokens == 0:
            return True  # retired before its first step: needs no rows
        tokens = len(active.prompt_ids) + active.params.max_tokens
        pool = self.runner.own_kv_pool
        if self._head_waits and self._running and not pool.fits(tokens):
            return False  # trying would fail again (and a failed growth costs device allocations)
        try:
            active.own = self.runner.new_own_kv(tokens)
        except (OwnKVFull, torch.OutOfMemoryError) as err:
            self._head_waits = bool(self._running) and tokens <= pool.rows
            if self._head_waits:
                return False
            log.warning("no memory for a request's KV (%d tokens, the pool holds %d): %s", tokens, pool.rows, err)
            raise EngineUnavailable(f"no memory for this request's KV ({tokens} tokens; the KV pool holds "
                                    f"{pool.rows} and the device has no room to grow it); retry later or ask for "
                                    "fewer max_tokens") from err  # fmt: skip
        except Exception as err:  # fails this request, never the batch or the scheduler thread
            log.exception("allocating a request's KV failed")
            raise EngineError(f"inference failed: {type(err).__name__}: {err}") from err
        return True

    def _finish_queued_without_work(self) -> None:
        """Queued requests that were cancelled or ask for no tokens need no rows: they finish now, not after
        the head that waits for rows."""
        with self._wakeup:
            done = [a for a in self._waiting if a.handle.cancelled or a.params.max_tokens == 0]
            for active in done:
                self._waiting.remove(active)
        for active in done:
            self._complete(active, "cancelled" if active.handle.cancelled else "length")

    def _retire_cancelled_and_empty(self) -> None:
        for active in list(self._running):
            if active.handle.cancelled:
                self._finish(active, "cancelled")
            elif active.params.max_tokens == 0:
                self._finish(active, "length")

    def _schedule(self) -> list[tuple[_Active, int]]:
        """Every decoding request gets its one token; prefilling ones share ``max_prefill_tokens`` in arrival order.

        Chunked prefill bounds a step's work and memory (a 7k-token prompt never runs as one chunk), so decoding
        requests keep producing tokens while long prompts are read.
        """
        budget = self.max_prefill_tokens
        scheduled = []
        for active in self._running:
            pending = active.pending_prompt
            if pending == 0:
                scheduled.append((active, 1))
            elif budget > 0:
                scheduled.append((active, min(pending, budget)))
                budget -= min(pending, budget)
        return scheduled

    def _step(self) -> None:
        scheduled = self._schedule()
        batch = [active for active, _ in scheduled]
        if not batch:
            return
        try:
            logits = (self.graphs or self.runner).step([active.next_item(n) for active, n in scheduled])
            ready = [(row, active) for row, active in enumerate(batch) if active.pending_prompt == 0]
            tokens = next_tokens(logits, [Pick(row, a.params, a.generator, a.seen_tokens()) for row, a in ready])
        except Exception as err:  # one failed step fails its batch, never the engine
            log.exception("engine step failed for %d requests", len(batch))
            for active in batch:
                self._fail(active, EngineError(f"inference failed: {type(err).__name__}: {err}"))
            return
        self._count_tokens(len(ready))
        for (_, active), token in zip(ready, tokens, strict=True):
            active.generated.append(token)
            if token in self.eos_ids:
                self._finish(active, "stop")
                continue
            delta, stopped = active.text.push(token)
            if stopped:
                self._finish(active, "stop", delta)
            elif len(active.generated) >= active.params.max_tokens:
                self._finish(active, "length", delta)
            elif delta:
                active.handle._emit(StreamEvent(delta))

    def _retire(self, active: _Active) -> None:
        """Take a request out of the batch; its rows go back to the pool, so a waiting request may fit now."""
        self._running.remove(active)
        if active.own is not None:
            active.own.release()
            active.own = None

    def _finish(self, active: _Active, reason: FinishReason, delta: str = "") -> None:
        self._retire(active)
        self._complete(active, reason, delta)

    def _complete(self, active: _Active, reason: FinishReason, delta: str = "") -> None:
        tail = delta + active.text.flush()
        with self._wakeup:
            self._finished += 1
        self._end(active, StreamEvent(tail, completion=active.completion(reason)))

    def _fail(self, active: _Active, error: EngineError) -> None:
        self._retire(active)
        with self._wakeup:
            self._failed += 1
        self._end(active, StreamEvent("", error=error))

    def _end(self, active: _Active, final: StreamEvent) -> None:
        """A request's last event: its cartridges' uses go back to the cache first (a caller that sees the end
        sees them released), then the event."""
        uses, active.uses = active.uses, []
        self._release(uses)
        active.handle._emit(final)

    def _count_tokens(self, n: int) -> None:
        with self._wakeup:
            self._tokens += n
            self._rate.add(n)
