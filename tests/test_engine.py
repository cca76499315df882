"""The serving engine on the tiny model: exactness against transformers, batching, composition, errors, cache."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from _cartridge_store import GatedStore, publish, random_cartridge, truncate_in_minio
from transformers import DynamicCache

from cartridges import layout
from cartridges.artifact import MANIFEST_FILE, TENSORS_FILE, Cartridge, QuantizedCartridge, quantize_cartridge
from cartridges.chat import render
from cartridges.models import LoadedModel, tiny_llama
from cartridges.quantize import QuantFormat
from cartridges.store import ObjectInfo, Store, StoreError
from cartridges_serving import (
    CartridgeCache,
    CartridgeInvalid,
    CartridgeNotFound,
    CartridgeRefused,
    Engine,
    EngineError,
    EngineUnavailable,
    InvalidRequest,
    KVStats,
    RequestHandle,
    SamplingParams,
    StreamEvent,
)
from cartridges_serving import cache as cache_module
from cartridges_serving.engine import RATE_WINDOW_S, TokenRate
from cartridges_serving.protocol import MAX_CARTRIDGES, RouterRequest, parse_request

if TYPE_CHECKING:
    from cartridges_e2e.minio import MinioServer

NAMESPACE = "team-a"
SIZES = {"alpha": 6, "beta": 4, "gamma": 9}
QUANTIZED: dict[str, tuple[str, QuantFormat]] = {"alpha-int8": ("alpha", "int8"), "gamma-fp8": ("gamma", "fp8")}
GREEDY = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory, tiny_model: LoadedModel) -> str:
    """alpha/beta/gamma in team-a; "secret" only in team-b; bad artifacts for the error tests."""
    root, store = f"file://{tmp_path_factory.mktemp('store')}", Store()
    dense = {name: random_cartridge(tiny_model.fingerprint, p, seed) for seed, (name, p) in enumerate(SIZES.items())}
    for name, cartridge in dense.items():
        publish(store, root, NAMESPACE, name, cartridge, tiny_model.fingerprint)
    for name, (source, fmt) in QUANTIZED.items():
        publish(store, root, NAMESPACE, name, quantize_cartridge(dense[source], fmt), tiny_model.fingerprint)
    publish(store, root, "team-b", "secret", random_cartridge(tiny_model.fingerprint, 4, 7), tiny_model.fingerprint)
    other = tiny_llama(seed=1).fingerprint
    publish(store, root, NAMESPACE, "other-model", random_cartridge(other, 4, 8), other)
    corrupt = publish(
        store, root, NAMESPACE, "corrupt", random_cartridge(tiny_model.fingerprint, 4, 9), tiny_model.fingerprint
    )
    tensors = Path(corrupt.removeprefix("file://")) / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[-8:] = bytes(8)
    tensors.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def engine(tiny_model: LoadedModel, store_root: str) -> Iterator[Engine]:
    cache = CartridgeCache(Store(), store_root, NAMESPACE, tiny_model.fingerprint, capacity_bytes=1 << 20)
    engine = Engine(tiny_model, cache, max_batch_size=8)
    yield engine
    engine.close()


def cartridges_of(engine: Engine, names: Sequence[str]) -> list[Cartridge]:
    """The cartridges the engine serves, as dense tensors (a quantized one as the kernels dequantize it)."""
    assert engine.cartridges is not None
    served = [engine.cartridges.get(n).cartridge for n in names]
    return [
        c if isinstance(c, Cartridge) else c.dequantize(next(engine.loaded.model.parameters()).dtype) for c in served
    ]


def hf_greedy(model: LoadedModel, cartridges: Sequence[Cartridge], prompt_ids: list[int], max_tokens: int) -> list[int]:
    """transformers' generate with the concatenated cartridges as past_key_values (positions after them)."""
    p = sum(c.p for c in cartridges)
    cache = DynamicCache(config=model.model.config)
    for layer in range(model.fingerprint.num_layers):
        if cartridges:
            keys = torch.cat([c.keys[layer] for c in cartridges], dim=1)[None]
            values = torch.cat([c.values[layer] for c in cartridges], dim=1)[None]
            cache.update(keys, values, layer)
    # Placeholder ids stand for the cartridge positions; generate only runs the tokens after the cached length.
    input_ids = torch.tensor([[0] * p + prompt_ids])
    out = model.model.generate(  # type: ignore[operator]
        input_ids,
        past_key_values=cache if cartridges else None,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return [int(t) for t in out[0, input_ids.shape[1] :]]


def assert_matches_reference(engine: Engine, names: Sequence[str], prompt: str) -> list[int]:
    completion = engine.generate(prompt, names, GREEDY, chat=False)
    prompt_ids = list(engine.tokenizer(prompt)["input_ids"])
    reference = hf_greedy(engine.loaded, cartridges_of(engine, names), prompt_ids, GREEDY.max_tokens)
    assert completion.token_ids == reference[: len(completion.token_ids)]
    assert completion.finish_reason == "length" or completion.token_ids[-1] in engine.eos_ids
    assert completion.cartridge_tokens == sum(SIZES[QUANTIZED.get(n, (n,))[0]] for n in names)
    return completion.token_ids


def test_greedy_matches_transformers_with_zero_one_two_cartridges(engine: Engine) -> None:
    plain = assert_matches_reference(engine, [], "The handbook says")
    one = assert_matches_reference(engine, ["alpha"], "The handbook says")
    two = assert_matches_reference(engine, ["alpha", "beta"], "The handbook says")
    swapped = assert_matches_reference(engine, ["beta", "alpha"], "The handbook says")
    assert plain != one != two
    # Keys keep the RoPE of their own training positions 0..p-1 (DESIGN.md §5), so composition is a set of keys:
    # the order changes no attention score, and the request's positions depend only on the summed lengths.
    assert two == swapped
    twice = assert_matches_reference(engine, ["alpha", "alpha"], "The handbook says")  # alpha's keys count twice
    assert twice != one


def test_a_repetition_penalty_breaks_a_greedy_loop(engine: Engine) -> None:
    """The random tiny model loops under greedy decoding; a penalty on seen tokens makes it repeat itself less."""
    plain = engine.generate("The handbook says", ["alpha"], GREEDY, chat=False).token_ids
    penalized = engine.generate("The handbook says", ["alpha"], replace(GREEDY, repetition_penalty=3.0), chat=False)
    assert len(set(penalized.token_ids)) > len(set(plain))


def test_a_question_after_a_cartridge_reads_as_the_trainer_rendered_it(smollm2: LoadedModel, tmp_path: Path) -> None:
    """SmolLM2's template gives a conversation without a system turn its default one. After a cartridge (which
    stands in for a system turn) the server sends the user turn the trainer's student read, and answers as
    transformers does on exactly those ids; without cartridges, the model's own template with its default."""
    root = f"file://{tmp_path}/store"
    publish(Store(), root, NAMESPACE, "handbook", random_cartridge(smollm2.fingerprint, 16, 0), smollm2.fingerprint)
    engine = Engine(smollm2, CartridgeCache(Store(), root, NAMESPACE, smollm2.fingerprint, 1 << 26))
    question, short = "What is the refund window?", SamplingParams(max_tokens=4)
    try:
        _, turn = render(smollm2.tokenizer, "You are answering about the handbook.", question)
        served = engine.generate(question, ["handbook"], short)
        assert served.prompt_tokens == len(turn)
        assert served.token_ids == hf_greedy(smollm2, cartridges_of(engine, ["handbook"]), turn, 4)
        default = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False)
        assert "You are a helpful AI assistant" in str(default)  # the default system turn the cartridge replaces
        assert engine.generate(question, [], short).prompt_tokens > len(turn)
    finally:
        engine.close()


def test_quantized_cartridges_are_served_quantized_and_compose_with_dense_ones(engine: Engine) -> None:
    """An int8 or fp8 artifact stays one byte per element in the cache (the kernels dequantize on load) and
    answers as transformers does on its dequantized values, alone and composed with a dense cartridge."""
    assert engine.cartridges is not None
    int8, dense = engine.cartridges.get("alpha-int8"), engine.cartridges.get("alpha")
    assert isinstance(int8.cartridge, QuantizedCartridge) and int8.cartridge.format == "int8"
    assert int8.nbytes < dense.nbytes / 2  # a quarter of float32, plus scales (which weigh on the tiny model)
    quantized = assert_matches_reference(engine, ["alpha-int8"], "The handbook says")
    assert_matches_reference(engine, ["gamma-fp8", "beta"], "The handbook says")
    assert quantized == assert_matches_reference(engine, ["alpha"], "The handbook says")  # int8 is close enough


def test_an_fp8_cartridge_on_a_gpu_without_fp8_is_refused_alone(
    tiny_model: LoadedModel, store_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU older than sm_89 (an A10 is sm_86) the kernels cannot read fp8: the request naming an fp8 cartridge
    is refused when the cartridge loads, saying to store it as int8, and the requests batched beside it go on (a
    refusal at the attention step would fail every request of the batch). The capability is the seam: no GPU here."""
    monkeypatch.setattr(cache_module, "gpu_capability", lambda device: (8, 6))
    cache = CartridgeCache(Store(), store_root, NAMESPACE, tiny_model.fingerprint, capacity_bytes=1 << 20)
    engine = Engine(tiny_model, cache)
    try:
        expected = engine.generate("keep going", ["alpha"], GREEDY).token_ids
        fp8 = engine.submit("keep going", ["gamma-fp8"], GREEDY)
        dense = engine.submit("keep going", ["alpha-int8", "beta"], GREEDY)
        with pytest.raises(
            CartridgeInvalid, match=r"compute capability 8\.9 or newer, this one is 8\.6; store them as int8"
        ):
            fp8.result(WAIT_S)
        assert dense.result(WAIT_S).token_ids and engine.generate("keep going", ["alpha"], GREEDY).token_ids == expected
    finally:
        engine.close()


def test_concurrent_requests_equal_their_sequential_results(engine: Engine) -> None:
    """Greedy and seeded sampled requests batched together give what each gives alone."""
    jobs = [
        (f"question {i}", names, SamplingParams(max_tokens=6 + i % 5, temperature=0.8 * (i % 3 == 2), seed=i))
        for i, names in enumerate([[], ["alpha"], ["beta", "gamma"], ["gamma"], ["alpha", "alpha"], ["beta"]] * 2)
    ]
    sequential = [engine.generate(prompt, names, params).token_ids for prompt, names, params in jobs]
    batch_sizes: list[int] = []
    all_submitted = threading.Event()

    def batch_size(_: StreamEvent) -> None:
        if not batch_sizes:  # hold the first step until every request queued (else each may end before the next)
            assert all_submitted.wait(WAIT_S)
            until(lambda: not engine.metrics().preparing, "the requests never left the loader threads")
        batch_sizes.append(engine.metrics().running)

    handles = [engine.submit(prompt, names, params, on_event=batch_size) for prompt, names, params in jobs]
    all_submitted.set()
    assert [h.result(timeout=60).token_ids for h in handles] == sequential
    assert max(batch_sizes) > 1, "requests should have shared decode steps"


def test_chunked_prefill_gives_the_same_tokens(engine: Engine, tiny_model: LoadedModel) -> None:
    """Prompts read 5 tokens per step, interleaved with other requests' decoding, answer as in one chunk."""
    assert engine.cartridges is not None
    chunked = Engine(tiny_model, engine.cartridges, max_prefill_tokens=5)
    try:
        jobs = [(f"a somewhat longer question number {i}", names) for i, names in enumerate([[], ["alpha"], ["beta"]])]
        handles = [chunked.submit(prompt, names, GREEDY) for prompt, names in jobs]
        assert [h.result(timeout=60).token_ids for h in handles] == [
            engine.generate(prompt, names, GREEDY).token_ids for prompt, names in jobs
        ]
    finally:
        chunked.close()


def test_a_failing_metrics_collection_does_not_stop_the_engine(
    engine: Engine, tiny_model: LoadedModel, store_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cartridges_serving.engine as engine_module

    cache = CartridgeCache(Store(), store_root, NAMESPACE, tiny_model.fingerprint, 1 << 20)
    monkeypatch.setattr(cache, "stats", lambda: 1 / 0)
    monkeypatch.setattr(engine_module, "METRICS_LOG_INTERVAL_S", 0.0)  # collect after every step
    failing = Engine(tiny_model, cache)
    try:
        for prompt, names in (("still serving", ["alpha"]), ("and again", [])):
            assert failing.generate(prompt, names, GREEDY).token_ids == engine.generate(prompt, names, GREEDY).token_ids
    finally:
        failing.close()


def test_a_completion_names_the_generation_of_each_cartridge(tiny_model: LoadedModel, tmp_path: Path) -> None:
    root, fingerprint = f"file://{tmp_path}", tiny_model.fingerprint
    for seed, (name, generation) in enumerate((("old", 2), ("new", 5))):
        publish(Store(), root, NAMESPACE, name, random_cartridge(fingerprint, 4, seed), fingerprint, generation)
    engine = Engine(tiny_model, CartridgeCache(Store(), root, NAMESPACE, fingerprint, 1 << 20))
    try:
        short = SamplingParams(max_tokens=2)
        assert engine.generate("hi", ["new", "old", "new"], short).generations == (5, 2, 5)
        assert engine.generate("hi", [], short).generations == ()
    finally:
        engine.close()


def test_streaming_chunks_join_to_the_final_text(engine: Engine) -> None:
    handle = engine.submit("stream me", ["gamma"], SamplingParams(max_tokens=16))
    chunks = list(handle)
    assert len(chunks) > 1
    assert "".join(chunks) == handle.result().text


def test_stop_string_ends_the_answer(engine: Engine) -> None:
    full = engine.generate("stop here", ["beta"], SamplingParams(max_tokens=16)).text
    stop = full[5:7]
    cut = engine.generate("stop here", ["beta"], SamplingParams(max_tokens=16, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]


def test_seeded_sampling_repeats_and_seeds_differ(engine: Engine) -> None:
    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return engine.generate("sample", ["alpha"], params).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_cancel_stops_generation(engine: Engine) -> None:
    started, cancelled = threading.Event(), threading.Event()

    def hold_first_event(_: StreamEvent) -> None:  # until the test cancelled: the 500 tokens cannot run out first
        if not started.is_set():
            started.set()
            assert cancelled.wait(WAIT_S)

    handle = engine.submit("cancel me", [], SamplingParams(max_tokens=500), on_event=hold_first_event)
    assert started.wait(WAIT_S)
    handle.cancel()
    cancelled.set()
    completion = handle.result(timeout=WAIT_S)
    assert completion.finish_reason == "cancelled"
    assert len(completion.token_ids) < 500


@pytest.mark.parametrize(
    ("names", "params", "prompt", "error", "message"),
    [
        (["missing"], GREEDY, "hi", CartridgeNotFound, "not found in namespace 'team-a'"),
        (["../team-b/secret"], GREEDY, "hi", CartridgeRefused, "not a cartridge name"),
        (["team-b/secret"], GREEDY, "hi", CartridgeRefused, "no '/' or '..'"),
        (["alpha\n"], GREEDY, "hi", CartridgeRefused, "not a cartridge name"),
        (["secret"], GREEDY, "hi", CartridgeNotFound, "not found"),
        (["other-model"], GREEDY, "hi", CartridgeInvalid, "trained for tiny-llama-seed1"),
        (["corrupt"], GREEDY, "hi", CartridgeInvalid, "sha256"),
        (["gamma"] * 460, GREEDY, "hi", InvalidRequest, "context window is 4096"),
        ([], GREEDY, "", InvalidRequest, "prompt is empty"),
        ([], SamplingParams(max_tokens=-1), "hi", InvalidRequest, "max_tokens must be >= 0"),
        ([], SamplingParams(top_p=0.0), "hi", InvalidRequest, "top_p"),
    ],
)
def test_bad_requests_fail_alone(
    engine: Engine, names: list[str], params: SamplingParams, prompt: str, error: type[EngineError], message: str
) -> None:
    """A refused request ends with its error (submit never raises) and is counted by its status."""
    expected = engine.generate("keep going", ["alpha"], GREEDY).token_ids
    refused = engine.metrics().requests_refused.get(error.status, 0)
    running = engine.submit("keep going", ["alpha"], GREEDY)
    with pytest.raises(error, match=message):
        engine.submit(prompt, names, params).result(WAIT_S)
    assert running.result(timeout=60).token_ids == expected
    assert engine.metrics().requests_refused[error.status] == refused + 1


def test_a_request_that_cannot_fit_stops_loading_its_cartridges(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """The context window is checked before the cartridges load and after each one: a request that cannot fit
    loads no more of them (it used to load every one first, however many)."""
    root, store, fp = f"file://{tmp_path}", Store(), tiny_model.fingerprint
    names = [f"c{i}" for i in range(8)]
    for seed, name in enumerate(names):
        publish(store, root, NAMESPACE, name, random_cartridge(fp, 1000, seed), fp)
    cache = CartridgeCache(store, root, NAMESPACE, fp, 1 << 20)
    engine = Engine(tiny_model, cache)
    try:
        with pytest.raises(InvalidRequest, match=r"at least \d+ positions \(0 of its 8 cartridges"):
            engine.generate("hi", names, SamplingParams(max_tokens=5000))
        assert cache.stats().misses == 0
        with pytest.raises(InvalidRequest, match=r"at least \d+ positions \(5 of its 8 cartridges: 5000 tokens"):
            engine.generate("hi", names, SamplingParams(max_tokens=4))  # 4 of them fit the window of 4096
        assert cache.stats().misses == 5
    finally:
        engine.close()


def test_a_request_whose_kv_does_not_fit_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = engine.generate("keep going", ["alpha"], GREEDY).token_ids
    allocate = engine.runner.new_own_kv
    huge = SamplingParams(max_tokens=999)

    def out_of_memory_for_huge(capacity: int) -> Any:
        if capacity >= huge.max_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return allocate(capacity)

    monkeypatch.setattr(engine.runner, "new_own_kv", out_of_memory_for_huge)
    running = engine.submit("keep going", ["alpha"], GREEDY)
    doomed = engine.submit("a long answer please", [], huge)
    with pytest.raises(EngineUnavailable, match=r"no memory for this request's KV \(\d+ tokens; the KV pool holds \d+"):
        doomed.result(timeout=60)
    assert running.result(timeout=60).token_ids == expected


def test_a_request_whose_kv_does_not_fit_yet_waits_for_running_ones(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = engine.generate("keep going", ["alpha"], GREEDY).token_ids
    pool, allocate = engine.runner.own_kv_pool, engine.runner.new_own_kv

    def out_of_memory_beside_another(capacity: int) -> Any:
        if pool.free_rows < pool.rows:  # another request holds rows: there is no memory for a second one
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return allocate(capacity)

    monkeypatch.setattr(engine.runner, "new_own_kv", out_of_memory_beside_another)
    order = EventOrder()
    first = queued(engine, engine.submit("keep going", ["alpha"], GREEDY, on_event=order.of("1st")))
    second = engine.submit("keep going", ["alpha"], GREEDY, on_event=order.of("2nd"))
    assert first.result(timeout=60).token_ids == second.result(timeout=60).token_ids == expected
    order.assert_ran_one_after_the_other("1st", "2nd")


def until(condition: Callable[[], bool], failure: str) -> None:
    """Until ``condition`` holds (``WAIT_S`` is a failure guard only: the test then fails with ``failure``)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


def queued(engine: Engine, handle: RequestHandle) -> RequestHandle:
    """``handle`` once no request is being prepared: a request submitted next queues behind it (requests
    queue in the order they are ready, and two loader threads may finish in either order)."""
    until(lambda: not engine.metrics().preparing, "the request never left the loader threads")
    return handle


class EventOrder:
    """The order in which the scheduler emitted events, over several requests."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool]] = []  # (request, final)

    def of(self, request: str) -> Callable[[StreamEvent], None]:
        return lambda event: self.events.append((request, event.final))

    def assert_ran_one_after_the_other(self, first: str, second: str) -> None:
        assert self.events.index((first, True)) < min(i for i, (r, _) in enumerate(self.events) if r == second)


def test_reserved_kv_queues_requests_until_rows_come_back(tiny_model: LoadedModel, store_root: str) -> None:
    cache = CartridgeCache(Store(), store_root, NAMESPACE, tiny_model.fingerprint, capacity_bytes=1 << 20)
    probe = Engine(tiny_model, cache)
    tokens = len(probe._encode("keep going", chat=True, after_cartridges=True)) + GREEDY.max_tokens
    expected = probe.generate("keep going", ["alpha"], GREEDY).token_ids
    probe.close()
    row_bytes = probe.runner.own_kv_pool.row_bytes
    engine = Engine(tiny_model, cache, kv_bytes=row_bytes * (tokens + tokens // 2))  # room for one request
    try:
        keys = engine.runner.own_kv_pool.keys
        order, seen = EventOrder(), list[KVStats]()

        def first_event(event: StreamEvent) -> None:
            order.of("1st")(event)
            if not seen:  # hold the first step until the second request queues, so it cannot finish first
                until(lambda: bool(engine.metrics().queued), "the second request never queued")
            seen.append(engine.metrics().kv)  # what the metrics port shows while the first request runs

        first = queued(engine, engine.submit("keep going", ["alpha"], GREEDY, on_event=first_event))
        second = engine.submit("keep going", ["alpha"], GREEDY, on_event=order.of("2nd"))
        assert first.result(timeout=60).token_ids == second.result(timeout=60).token_ids == expected
        order.assert_ran_one_after_the_other("1st", "2nd")
        assert any(kv.waiting for kv in seen), "the second request should have waited for rows"
        assert {kv.pool_bytes for kv in seen} == {row_bytes * (tokens + tokens // 2)}
        assert max(kv.used_bytes for kv in seen) == row_bytes * tokens
        assert engine.runner.own_kv_pool.keys is keys  # reserved at start, never reallocated
        with pytest.raises(InvalidRequest, match=r"KV for \d+ tokens .* reserves \d+ for all requests"):
            engine.submit("keep going", [], SamplingParams(max_tokens=2 * tokens)).result(WAIT_S)
    finally:
        engine.close()


def test_a_request_cancelled_behind_a_waiting_head_leaves_at_once(tiny_model: LoadedModel) -> None:
    long = SamplingParams(max_tokens=200)
    probe = Engine(tiny_model)
    tokens = len(probe._encode("keep going", chat=True, after_cartridges=False)) + long.max_tokens
    probe.close()
    engine = Engine(tiny_model, kv_bytes=probe.runner.own_kv_pool.row_bytes * tokens)  # room for one request
    try:
        order, submitted, behind = EventOrder(), threading.Event(), list[RequestHandle]()

        def cancel_behind_once_queued(event: StreamEvent) -> None:
            """The running request's first step is held until the head and the one behind it are queued (else
            it could end first, or the one behind be cancelled before it queued), then cancels the one behind."""
            order.of("running")(event)
            if submitted.wait(WAIT_S) and not behind[0].cancelled:
                until(lambda: engine.metrics().queued == 2, "the head and the request behind it never queued")
                behind[0].cancel()

        running = engine.submit("keep going", [], long, on_event=cancel_behind_once_queued)
        engine.submit("keep going", [], long, on_event=order.of("head"))  # waits for the running one's rows
        behind.append(engine.submit("keep going", [], long, on_event=order.of("behind")))
        submitted.set()
        assert behind[0].result(timeout=60).finish_reason == "cancelled"
        running.result(timeout=60)
        assert order.events.index(("behind", True)) < order.events.index(("running", True))
    finally:
        engine.close()


def test_reserved_kv_must_hold_a_token_and_a_batch_a_request(tiny_model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="hold no token"):
        Engine(tiny_model, kv_bytes=1)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        Engine(tiny_model, max_batch_size=0)


def test_a_tiny_temperature_samples_greedily(engine: Engine) -> None:
    greedy = engine.generate("keep going", ["alpha"], GREEDY).token_ids
    tiny = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=1e-45, seed=3)  # FP32's smallest, via Triton
    assert engine.generate("keep going", ["alpha"], tiny).token_ids == greedy


def test_a_failure_choosing_tokens_fails_its_batch_not_the_engine(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cartridges_serving.engine as engine_module

    expected = engine.generate("keep going", ["alpha"], GREEDY).token_ids
    real, calls = engine_module.next_tokens, []

    def fails_once(*args: Any) -> list[int]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("sampling broke (simulated)")
        return real(*args)

    monkeypatch.setattr(engine_module, "next_tokens", fails_once)
    with pytest.raises(EngineError, match="inference failed: RuntimeError: sampling broke"):
        engine.generate("doomed", [], GREEDY)
    assert engine.generate("keep going", ["alpha"], GREEDY).token_ids == expected


def test_cache_evicts_least_recently_used_by_bytes(tiny_model: LoadedModel, store_root: str) -> None:
    nbytes = {n: random_cartridge(tiny_model.fingerprint, p, 0).nbytes for n, p in SIZES.items()}
    cache = CartridgeCache(Store(), store_root, NAMESPACE, tiny_model.fingerprint, nbytes["alpha"] + nbytes["gamma"])
    cache.get("alpha")
    cache.get("beta")
    cache.get("alpha")  # alpha is now more recent than beta
    cache.get("gamma")  # alpha + beta + gamma do not fit: beta goes
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 3, 2)
    assert stats.bytes == nbytes["alpha"] + nbytes["gamma"] <= stats.capacity_bytes
    cache.get("alpha")
    cache.get("beta")
    assert (cache.stats().hits, cache.stats().misses) == (2, 4)


class CountingLoads(Store):
    """Counts downloads of cartridge tensors: each is a load."""

    loads = 0

    def download(self, uri: str, path: Path, expected_sha256: str | None = None) -> Any:
        self.loads += uri.endswith(TENSORS_FILE)
        return super().download(uri, path, expected_sha256)


def test_a_cartridge_in_use_is_not_evicted_nor_loaded_twice(tiny_model: LoadedModel, store_root: str) -> None:
    store = CountingLoads()
    one = random_cartridge(tiny_model.fingerprint, SIZES["alpha"], 0).nbytes  # room for one cartridge
    cache = CartridgeCache(store, store_root, NAMESPACE, tiny_model.fingerprint, one)
    first = cache.acquire("alpha")  # request A runs with alpha
    cache.acquire("beta")  # request B loads beta: over the budget, but alpha is in use
    stats = cache.stats()
    assert (stats.entries, stats.in_use_entries, stats.bytes) == (2, 2, stats.in_use_bytes)
    assert stats.bytes > stats.capacity_bytes
    again = cache.acquire("alpha")  # request C shares A's copy
    assert again is first and store.loads == 2
    cache.release(first)
    cache.release(again)  # alpha is unused now and the least recently used: evicted
    stats = cache.stats()
    assert (stats.entries, stats.in_use_entries, stats.misses) == (1, 1, 2) and stats.bytes == stats.in_use_bytes
    assert cache.get("beta").id == "beta" and store.loads == 2


def test_a_cartridge_larger_than_the_budget_is_said_once(
    tiny_model: LoadedModel, store_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It is loaded again by each request that finds no other holding it; the log says so, once, not per load."""
    store = CountingLoads()
    cache = CartridgeCache(store, store_root, NAMESPACE, tiny_model.fingerprint, 1)
    with caplog.at_level(logging.WARNING, logger="cartridges_serving.cache"):
        for _ in range(3):
            cache.get("alpha")
    warnings = [r.getMessage() for r in caplog.records if "more than the cache budget" in r.getMessage()]
    assert store.loads == 3 and len(warnings) == 1
    assert warnings[0].startswith("cartridge alpha g1 is ") and "CARTRIDGES_CACHE_BYTES" in warnings[0]


def test_requests_hold_their_cartridges_until_they_end(tiny_model: LoadedModel, store_root: str) -> None:
    store = CountingLoads()
    one = random_cartridge(tiny_model.fingerprint, SIZES["alpha"], 0).nbytes
    cache = CartridgeCache(store, store_root, NAMESPACE, tiny_model.fingerprint, one)
    engine = Engine(tiny_model, cache, max_batch_size=4)
    try:
        while_running: list[Any] = []

        def midway(event: StreamEvent) -> None:  # the scheduler thread calls this while the request is live
            if not event.final and not while_running:
                while_running.extend([cache.get("beta"), cache.get("alpha"), cache.stats()])

        handle = engine.submit("keep going", ["alpha"], SamplingParams(max_tokens=24), on_event=midway)
        handle.result(WAIT_S)
        assert while_running, "the request produced no text before its end"
        _, alpha, stats = while_running
        # beta, used by no request, does not fit beside alpha; alpha, in use, stays and is not loaded again
        assert (stats.entries, stats.in_use_entries, store.loads) == (1, 1, 2) and alpha.id == "alpha"
        assert cache.stats().in_use_entries == 0  # given back at the end
        with pytest.raises(CartridgeNotFound):
            engine.submit("x", ["alpha", "missing"], GREEDY).result(WAIT_S)
        with pytest.raises(InvalidRequest, match="positions"):
            engine.submit("x", ["alpha"], SamplingParams(max_tokens=1 << 20)).result(WAIT_S)
        cancelled = engine.submit("x", ["alpha", "beta"], SamplingParams(max_tokens=1 << 10))
        cancelled.cancel()
        assert cancelled.result(WAIT_S).finish_reason == "cancelled"
        stats = cache.stats()
        assert (stats.in_use_entries, stats.entries) == (0, 1) and stats.bytes <= stats.capacity_bytes
    finally:
        engine.close()


class CountingStore(Store):
    """Counts ``current.json`` reads, to see which lookups reach the store."""

    pointer_reads = 0

    def get_json(self, uri: str) -> Any:
        self.pointer_reads += uri.endswith(layout.CURRENT_POINTER)
        return super().get_json(uri)


WAIT_S = 60.0  # a failure guard only: every wait below ends on an event long before


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Runs ``target`` in a daemon thread; the list gets its result or the exception it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(target())
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_loading_cartridge_blocks_neither_hits_nor_stats(tiny_model: LoadedModel, store_root: str) -> None:
    store = GatedStore("beta")
    cache = CartridgeCache(store, store_root, NAMESPACE, tiny_model.fingerprint, 1 << 20)
    alpha = cache.get("alpha")
    loader, loaded = in_thread(lambda: cache.get("beta"))
    assert store.started.wait(WAIT_S)
    try:
        reader, read = in_thread(lambda: (cache.get("alpha"), cache.stats()))
        reader.join(WAIT_S)
        assert read, "a hit and stats() waited for another cartridge's load"
        assert read[0][0] is alpha and read[0][1].entries == 1
    finally:
        store.release.set()
    loader.join(WAIT_S)
    assert loaded[0].id == "beta" and cache.stats().entries == 2


def wait_for_hits(cache: CartridgeCache, hits: int) -> None:
    """Until ``hits`` lookups have been counted (a waiter on a load in flight is counted before it waits)."""
    until(lambda: cache.stats().hits >= hits, "the second lookup never came")


@pytest.mark.parametrize("fail", [False, True])
def test_concurrent_misses_share_one_load(tiny_model: LoadedModel, store_root: str, fail: bool) -> None:
    store = GatedStore("beta")
    store.fail = fail
    cache = CartridgeCache(store, store_root, NAMESPACE, tiny_model.fingerprint, 1 << 20)
    first, first_out = in_thread(lambda: cache.get("beta"))
    assert store.started.wait(WAIT_S)
    second, second_out = in_thread(lambda: cache.get("beta"))
    try:
        wait_for_hits(cache, 1)
    finally:
        store.release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert store.downloads == 1 and cache.stats().misses == 1
    if fail:  # every waiter sees the load's error, and the failure is not cached
        assert all(isinstance(out[0], EngineUnavailable) for out in (first_out, second_out))
        assert cache.stats().entries == 0
        store.fail = False
        assert cache.get("beta").id == "beta" and store.downloads == 2
    else:
        assert first_out[0] is second_out[0]


def cache_on_clock(
    store: Store, root: str, model: LoadedModel, now: list[float], capacity_bytes: int = 1 << 20
) -> CartridgeCache:
    """A cache (1 MiB unless told) whose 2 s pointer TTL runs on ``now[0]``, which the test moves."""
    return CartridgeCache(
        store, root, NAMESPACE, model.fingerprint, capacity_bytes, pointer_ttl_s=2, clock=lambda: now[0]
    )


def test_promoted_generation_is_served_once_the_pointer_expires(tiny_model: LoadedModel, tmp_path: Path) -> None:
    root, store, now = f"file://{tmp_path}", CountingStore(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now)
    with pytest.raises(CartridgeNotFound):
        cache.get("doc")
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    assert cache.get("doc").generation == 1  # a miss is not cached: found as soon as it is published
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 5, 1), tiny_model.fingerprint, 2)
    reads = store.pointer_reads
    now[0] = 1.9
    assert cache.get("doc").generation == 1
    assert store.pointer_reads == reads  # within the TTL: no store round trip
    now[0] = 2.0
    assert (cache.get("doc").generation, cache.get("doc").cartridge.p) == (2, 5)
    assert store.pointer_reads == reads + 1


class SlowPointerRead(CountingStore):
    """The next ``current.json`` read while ``slow`` is set (the first, unless a test clears it) returns what it read
    only once ``release`` is set: a slow round trip (that then fails if ``fail`` is set: a store timing out). Other
    reads are counted and answered at once."""

    fail = False

    def __init__(self) -> None:
        super().__init__()
        self.read, self.release, self.slow = threading.Event(), threading.Event(), True

    def get_json(self, uri: str) -> Any:
        data = super().get_json(uri)
        if uri.endswith(layout.CURRENT_POINTER) and self.slow:
            self.slow = False
            self.read.set()
            self.release.wait(WAIT_S)
            if self.fail:
                raise StoreError("read timed out (simulated)", uri)
        return data


def test_a_slow_pointer_read_never_replaces_a_newer_one(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """Two refreshes cross a promotion: the one that started first read g1 and is still out after a TTL, so the next
    request reads again, g2, and finishes first. The older answer must not overwrite the newer one (g1 would be
    served, and loaded again, for another TTL)."""
    root, store, now = f"file://{tmp_path}", SlowPointerRead(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now)
    fingerprint = tiny_model.fingerprint
    publish(store, root, NAMESPACE, "doc", random_cartridge(fingerprint, 4, 0), fingerprint)
    slow, outcome = in_thread(lambda: cache.get("doc"))
    assert store.read.wait(WAIT_S)  # it read g1 and is still on its way back
    publish(store, root, NAMESPACE, "doc", random_cartridge(fingerprint, 5, 1), fingerprint, 2)
    now[0] = 2.5  # a read that started a TTL ago is as stale as a pointer read then: not waited for
    assert cache.get("doc").generation == 2
    store.release.set()
    slow.join(WAIT_S)
    assert outcome[0].generation == 1  # the slow request itself is served what it read
    now[0] = 3.0
    assert cache.get("doc").generation == 2 and store.pointer_reads == 2


def requests_during_a_slow_pointer_read(
    cache: CartridgeCache, store: SlowPointerRead
) -> list[tuple[threading.Thread, list[Any]]]:
    """A request for ``doc`` whose pointer read the store holds, then 7 more while it is held (nothing released)."""
    first = in_thread(lambda: cache.get("doc"))
    assert store.read.wait(WAIT_S)
    return [first, *(in_thread(lambda: cache.get("doc")) for _ in range(7))]


def outcomes(requests: list[tuple[threading.Thread, list[Any]]]) -> list[Any]:
    """What each request returned or raised, once all of them ended."""
    for thread, _ in requests:
        thread.join(WAIT_S)
    assert all(outcome for _, outcome in requests), "a request never ended"
    return [outcome[0] for _, outcome in requests]


@pytest.mark.parametrize("fail", [False, True])
def test_concurrent_first_lookups_share_one_pointer_read(tiny_model: LoadedModel, tmp_path: Path, fail: bool) -> None:
    """With no pointer resolved yet, requests wait for the read in flight rather than each reading the store (in an
    outage each would wait for its own timeout); its error reaches every one of them and is not kept."""
    root, store, now = f"file://{tmp_path}", SlowPointerRead(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now)
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    store.fail = fail
    requests = requests_during_a_slow_pointer_read(cache, store)
    store.release.set()
    served = outcomes(requests)
    assert store.pointer_reads == 1
    if fail:
        assert all(isinstance(out, EngineUnavailable) and "object store error" in str(out) for out in served)
        assert cache.get("doc").generation == 1 and store.pointer_reads == 2  # the next request reads again
    else:
        assert served[0].generation == 1 and all(out is served[0] for out in served)


def test_requests_during_a_pointer_refresh_keep_the_loaded_generation(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """Once the TTL is over one request reads the pointer again; meanwhile the others are served the generation
    resolved before, still loaded (as through an outage), rather than each reading the store or waiting."""
    root, store, now = f"file://{tmp_path}", SlowPointerRead(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now)
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    store.slow = False
    before = cache.get("doc")
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 5, 1), tiny_model.fingerprint, 2)
    store.slow, now[0] = True, 2.0
    refresh, *during = requests_during_a_slow_pointer_read(cache, store)
    assert all(out is before for out in outcomes(during)) and store.pointer_reads == 2  # the refresh is still held
    store.release.set()
    assert outcomes([refresh])[0].generation == 2
    assert cache.get("doc").generation == 2 and store.pointer_reads == 2


def test_requests_during_a_pointer_refresh_wait_for_it_when_nothing_is_loaded(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    """The generation resolved before is no longer loaded: loading it would take a store round trip (and may load a
    generation the refresh replaces), so requests wait for the one read in flight."""
    root, store, now = f"file://{tmp_path}", SlowPointerRead(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now, capacity_bytes=1)  # evicted as soon as unused
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    store.slow = False
    assert cache.get("doc").generation == 1 and cache.stats().entries == 0
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 5, 1), tiny_model.fingerprint, 2)
    store.slow, now[0] = True, 2.0
    requests = requests_during_a_slow_pointer_read(cache, store)
    store.release.set()
    assert [out.generation for out in outcomes(requests)] == [2] * 8 and store.pointer_reads == 2


class FlakyStore(CountingStore):
    """A store whose ``current.json`` reads fail while ``down`` is set (an outage or a network partition)."""

    down = False

    def get_json(self, uri: str) -> Any:
        if self.down:
            self.pointer_reads += uri.endswith(layout.CURRENT_POINTER)
            raise StoreError("connection refused (simulated)", uri)
        return super().get_json(uri)


def test_cached_cartridges_are_served_while_the_store_is_down(tiny_model: LoadedModel, tmp_path: Path) -> None:
    root, store, now = f"file://{tmp_path}", FlakyStore(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now)
    for name in ("doc", "other"):
        publish(store, root, NAMESPACE, name, random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    served = cache.get("doc")
    store.down, now[0] = True, 5.0
    assert cache.get("doc") is served  # the pointer expired, but the store cannot tell us anything newer
    reads = store.pointer_reads
    now[0] = 6.0
    assert cache.get("doc") is served and store.pointer_reads == reads  # asked again one TTL later, not per request
    with pytest.raises(EngineUnavailable, match="object store error"):
        cache.get("other")  # never resolved: nothing to serve
    store.down, now[0] = False, 7.5
    assert cache.get("doc") is served and store.pointer_reads == reads + 2  # back: revalidated


def test_an_unusable_promotion_is_tried_once_and_the_last_good_generation_stays_served(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    root, store, now = f"file://{tmp_path}", CountingLoads(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now)
    other = tiny_llama(seed=1).fingerprint
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    publish(store, root, NAMESPACE, "fresh", random_cartridge(other, 4, 1), other)
    good = cache.get("doc")
    publish(store, root, NAMESPACE, "doc", random_cartridge(other, 4, 2), other, 2)  # for another base model
    now[0] = 5.0
    assert cache.get("doc") is good and cache.get("doc") is good
    assert store.loads == 2  # g2 was downloaded and hashed once, not once per request
    for _ in range(2):  # no good generation to fall back on: each request is told, from what the one load found
        with pytest.raises(CartridgeInvalid, match="trained for tiny-llama-seed1") as raised:
            cache.get("fresh")
        assert raised.value.kind == "unusable_cartridge"
        # named by the cartridge, not by its download directory, which is gone by the time a client reads it
        assert str(raised.value).startswith("cartridge 'fresh' g1: cartridge was trained for")
    assert store.loads == 3
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 5, 3), tiny_model.fingerprint, 3)
    now[0] = 10.0
    assert cache.get("doc").generation == 3 and store.loads == 4  # a good promotion is served as usual


def test_a_replaced_or_deleted_generation_is_freed_once_no_request_uses_it(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    root, store, now = f"file://{tmp_path}", Store(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now)
    first = random_cartridge(tiny_model.fingerprint, 4, 0)
    publish(store, root, NAMESPACE, "doc", first, tiny_model.fingerprint)
    running = cache.acquire("doc")  # a request runs on g1 ...
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 5, 1), tiny_model.fingerprint, 2)
    now[0] = 5.0
    promoted = cache.get("doc")  # ... while g2 is promoted
    assert (promoted.generation, running.generation) == (2, 1)
    assert isinstance(running.cartridge, Cartridge)
    assert torch.equal(running.cartridge.keys[0], first.keys[0]) and running.cartridge.p == 4  # g1 whole
    assert cache.stats().entries == 2
    cache.release(running)
    stats = cache.stats()  # well under the budget, but no request can ask for g1 again
    assert (stats.entries, stats.bytes) == (1, promoted.nbytes)
    store.delete_prefix(layout.cartridge_prefix(root, NAMESPACE, "doc"))  # the Cartridge is deleted
    now[0] = 10.0
    with pytest.raises(CartridgeNotFound):
        cache.get("doc")
    assert (cache.stats().entries, cache.stats().bytes) == (0, 0)


def test_a_request_running_through_a_promotion_finishes_on_its_generation(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    root, store, now = f"file://{tmp_path}", Store(), [0.0]
    cache = cache_on_clock(store, root, tiny_model, now)
    engine = Engine(tiny_model, cache, max_batch_size=4)
    try:
        publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 6, 0), tiny_model.fingerprint)
        params = SamplingParams(max_tokens=24)
        before = engine.generate("keep going", ["doc"], params)
        after: list[RequestHandle] = []

        def promote_midway(event: StreamEvent) -> None:  # the scheduler thread, while the request runs
            if not event.final and not after:
                new = random_cartridge(tiny_model.fingerprint, 4, 1)
                publish(store, root, NAMESPACE, "doc", new, tiny_model.fingerprint, 2)
                now[0] = 5.0
                after.append(engine.submit("keep going", ["doc"], params))

        during = engine.submit("keep going", ["doc"], params, on_event=promote_midway).result(WAIT_S)
        assert after, "the request produced no text before its end"
        assert (during.token_ids, during.cartridge_tokens) == (before.token_ids, 6)  # all of it on g1
        assert after[0].result(WAIT_S).cartridge_tokens == 4  # a request submitted after the promotion gets g2
        assert (cache.stats().entries, cache.stats().in_use_entries) == (1, 0)  # g1 freed once its request ended
    finally:
        engine.close()


@pytest.mark.parametrize(
    "prefix",
    [
        "{stolen}",
        "../../team-b/secret/g1",
        "g1/../../../team-b/secret/g1",
        ".\t./.\t./team-b/secret/g1",  # the store's URL parsing drops tabs and newlines: this reads as ../..
        "..\n/..\r/team-b/secret/g1",
        "{own}/.\t./.\t./team-b/secret/g1",
        "",
        "g1?../../../team-b/secret/g1",
    ],
)
def test_pointer_outside_the_cartridge_prefix_is_refused(tiny_model: LoadedModel, tmp_path: Path, prefix: str) -> None:
    root, store = f"file://{tmp_path}", Store()
    stolen = publish(
        store, root, "team-b", "secret", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint
    )
    sha = store.get_json(layout.current_pointer(root, "team-b", "secret"))["sha256"]
    own = layout.cartridge_prefix(root, NAMESPACE, "thief")
    pointer = layout.Pointer(generation=1, prefix=prefix.format(stolen=stolen, own=own), sha256=sha)
    store.put_json(layout.current_pointer(root, NAMESPACE, "thief"), pointer.model_dump())
    cache = CartridgeCache(store, root, NAMESPACE, tiny_model.fingerprint, 1 << 20)
    with pytest.raises(CartridgeInvalid, match="leaves the cartridge's prefix"):  # the store is at fault
        cache.get("thief")


@pytest.mark.minio
def test_pointer_leaving_the_cartridge_prefix_in_minio_is_refused(
    tiny_model: LoadedModel, minio_server: MinioServer, s3_prefix: str
) -> None:
    """On S3 the escape is refused as on files, as an unusable cartridge (the S3 client's own check of '..' is no
    store error)."""
    store, root, fp = minio_server.store(), s3_prefix.rstrip("/"), tiny_model.fingerprint
    publish(store, root, "team-b", "secret", random_cartridge(fp, 4, 0), fp)
    sha = store.get_json(layout.current_pointer(root, "team-b", "secret"))["sha256"]
    pointer = layout.Pointer(generation=1, prefix=".\t./.\t./team-b/secret/g1", sha256=sha)
    store.put_json(layout.current_pointer(root, NAMESPACE, "thief"), pointer.model_dump())
    engine = Engine(tiny_model, CartridgeCache(store, root, NAMESPACE, fp, 1 << 20))
    try:
        with pytest.raises(CartridgeInvalid, match="leaves the cartridge's prefix"):
            engine.generate("hi", ["thief"], GREEDY)
    finally:
        engine.close()


def test_tensors_other_than_the_promoted_ones_are_refused_without_naming_them(
    tiny_model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stored sha256 is not told to the client (a pointer led astray would have it describe what is stored
    elsewhere); the log has it."""
    root, store = f"file://{tmp_path}", Store()
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    uri = layout.current_pointer(root, NAMESPACE, "doc")
    stored_sha = store.get_json(uri)["sha256"]
    store.put_json(uri, {**store.get_json(uri), "sha256": "0" * 64})
    caplog.set_level(logging.WARNING, logger="cartridges_serving.cache")
    with pytest.raises(CartridgeInvalid, match="do not match the promoted sha256 0{64}") as refused:
        CartridgeCache(store, root, NAMESPACE, tiny_model.fingerprint, 1 << 20).get("doc")
    assert stored_sha not in str(refused.value)
    assert any(stored_sha in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_an_object_name_the_store_refuses_makes_the_cartridge_unusable(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """A store client's check of a name (minio's ValueError for a '..' segment) is the cartridge's fault, not an
    internal error."""

    class RefusingNames(Store):
        def download(self, uri: str, path: Path, expected_sha256: str | None = None) -> ObjectInfo:
            raise ValueError("object name with '.' or '..' path segment is not supported")

    root = f"file://{tmp_path}"
    publish(Store(), root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    cache = CartridgeCache(RefusingNames(), root, NAMESPACE, tiny_model.fingerprint, 1 << 20)
    with pytest.raises(CartridgeInvalid, match="path segment is not supported") as refused:
        cache.get("doc")
    assert refused.value.kind == "unusable_cartridge"


@pytest.mark.minio
def test_cartridge_from_minio_matches_file_store(
    engine: Engine, tiny_model: LoadedModel, minio_server: MinioServer, s3_prefix: str
) -> None:
    store, root = minio_server.store(), s3_prefix.rstrip("/")
    publish(store, root, NAMESPACE, "alpha", cartridges_of(engine, ["alpha"])[0], tiny_model.fingerprint)
    s3_engine = Engine(tiny_model, CartridgeCache(store, root, NAMESPACE, tiny_model.fingerprint, 1 << 20))
    try:
        assert s3_engine.generate("from s3", ["alpha"], GREEDY) == engine.generate("from s3", ["alpha"], GREEDY)
    finally:
        s3_engine.close()


@pytest.mark.minio
@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (f"g1/{TENSORS_FILE}", "corrupt cartridge tensors"),
        (f"g1/{MANIFEST_FILE}", "corrupt cartridge manifest"),
        (layout.CURRENT_POINTER, f"corrupt {layout.CURRENT_POINTER}"),
    ],
)
def test_corrupt_objects_in_minio_make_the_cartridge_unusable(
    tiny_model: LoadedModel, minio_server: MinioServer, s3_prefix: str, corrupt: str, message: str
) -> None:
    """Any object of a cartridge failing its sha256 is the cartridge's fault, not the store's: retrying cannot help."""
    store, root = minio_server.store(), s3_prefix.rstrip("/")
    publish(store, root, NAMESPACE, "doc", random_cartridge(tiny_model.fingerprint, 4, 0), tiny_model.fingerprint)
    truncate_in_minio(store, f"{layout.cartridge_prefix(root, NAMESPACE, 'doc')}/{corrupt}")
    cache = CartridgeCache(store, root, NAMESPACE, tiny_model.fingerprint, 1 << 20)
    with pytest.raises(CartridgeInvalid, match=message) as raised:
        cache.get("doc")
    assert raised.value.kind == "unusable_cartridge"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"max_tokens": np.array([1.5], dtype=np.float32)}, "'max_tokens' has type float32, expected an integer"),
        ({"temperature": np.array([b"hot"], dtype=np.object_)}, "'temperature' has type object, expected a float"),
        ({"stream": np.array([True, False])}, "exactly one value"),
        ({"text_input": np.array([b"\xff"], dtype=np.object_)}, "not valid UTF-8"),
        ({"text_input": None}, "text_input is required"),
    ],
)
def test_router_inputs_of_the_wrong_type_are_refused(inputs: dict[str, np.ndarray | None], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_request({"text_input": np.array([b"hi"], dtype=np.object_), **inputs})


def test_a_request_composes_at_most_max_cartridges() -> None:
    def request(cartridges: int) -> RouterRequest:
        ids = np.array([b"alpha"] * cartridges, dtype=np.object_)
        return parse_request({"text_input": np.array([b"hi"], dtype=np.object_), "cartridges": ids})

    assert len(request(MAX_CARTRIDGES).cartridges) == MAX_CARTRIDGES == 16
    with pytest.raises(InvalidRequest, match="a request composes at most 16 cartridges, got 17"):
        request(MAX_CARTRIDGES + 1)


def test_router_inputs_become_an_engine_request() -> None:
    parsed = parse_request(
        {
            "text_input": np.array([b"hi"], dtype=np.object_),
            "max_tokens": np.array([7], dtype=np.int32),
            "temperature": np.array([0.5], dtype=np.float32),
            "seed": np.array([3], dtype=np.int64),
            "repetition_penalty": np.array([1.25], dtype=np.float32),
            "stream": np.array([True]),
            "stop": np.array([b"\n\n"], dtype=np.object_),
            "cartridges": np.array([b"beta", b"alpha"], dtype=np.object_),
        }
    )
    assert parsed.prompt == "hi" and parsed.stream and parsed.cartridges == ("beta", "alpha")
    assert parsed.params == SamplingParams(
        max_tokens=7, temperature=0.5, seed=3, stop=("\n\n",), repetition_penalty=1.25
    )


def test_a_slow_cartridge_load_holds_up_no_other_request(
    engine: Engine, tiny_model: LoadedModel, store_root: str
) -> None:
    """``submit`` returns while a cartridge downloads; requests without cartridges or with cached ones are
    answered meanwhile (a front end submitting from one thread serves them), and the slow one answers right."""
    wanted = {
        name: engine.generate("keep going", [name] if name else [], GREEDY).token_ids for name in ("", "alpha", "beta")
    }
    store = GatedStore("beta")
    cache = CartridgeCache(store, store_root, NAMESPACE, tiny_model.fingerprint, 1 << 20)
    gated = Engine(tiny_model, cache)
    try:
        cache.get("alpha")
        try:
            slow = gated.submit("keep going", ["beta"], GREEDY)
            assert store.started.wait(WAIT_S)
            assert gated.metrics().preparing == 1
            assert gated.generate("keep going", [], GREEDY).token_ids == wanted[""]
            assert gated.generate("keep going", ["alpha"], GREEDY).token_ids == wanted["alpha"]
            with pytest.raises(TimeoutError):
                slow.result(timeout=0)  # still held
        finally:
            store.release.set()
        assert slow.result(WAIT_S).token_ids == wanted["beta"]
        assert gated.metrics().preparing == 0
    finally:
        gated.close()


def test_a_request_cancelled_while_its_cartridges_load_gives_them_back(
    tiny_model: LoadedModel, store_root: str
) -> None:
    store = GatedStore("beta")
    cache = CartridgeCache(store, store_root, NAMESPACE, tiny_model.fingerprint, 1 << 20)
    gated = Engine(tiny_model, cache)
    try:
        handle = gated.submit("never read", ["alpha", "beta", "gamma"], GREEDY)
        assert store.started.wait(WAIT_S)
        handle.cancel()
        store.release.set()
        completion = handle.result(WAIT_S)
        assert (completion.finish_reason, completion.token_ids) == ("cancelled", [])
        assert completion.cartridge_tokens == SIZES["alpha"] + SIZES["beta"]
        stats = cache.stats()
        assert (stats.in_use_entries, stats.misses) == (0, 2)  # alpha and beta given back; gamma never loaded
        assert gated.metrics().preparing == 0
    finally:
        store.release.set()
        gated.close()


def test_a_closed_engine_refuses_requests(tiny_model: LoadedModel) -> None:
    closed = Engine(tiny_model)
    closed.close()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        closed.submit("anyone there?").result(WAIT_S)
    assert closed.metrics().requests_refused == {"unavailable": 1}


def test_tokens_per_s_counts_recent_steps_only() -> None:
    now = [100.0]
    rate = TokenRate(window_s=10.0, clock=lambda: now[0])
    for _ in range(5):  # 8 tokens every half second, the last step at 102
        rate.add(8)
        now[0] += 0.5
    assert rate.per_s() == pytest.approx(4 * 8 / 2.5)  # the tokens after the oldest step, over the time since
    now[0] = 107.0
    assert rate.per_s() == pytest.approx(4 * 8 / 7.0)  # falls while nothing is generated
    now[0] = 112.5
    assert rate.per_s() == 0.0  # no step in the last 10 s (it used to keep the last busy value)


def test_tokens_per_s_is_zero_once_the_engine_is_idle(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.generate("count me", [], GREEDY)
    assert engine.metrics().tokens_per_s > 0
    later = time.monotonic() + RATE_WINDOW_S + 1
    monkeypatch.setattr(engine._rate, "_clock", lambda: later)
    assert engine.metrics().tokens_per_s == 0.0
