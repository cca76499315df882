"""Decode steps replayed from captured graphs give the logits of eager steps, through joins, leaves and reorders.

The captures here are CPU emulations of CUDA graphs (tests/_graph_replay.py): Python runs once at capture, and a
replay re-runs the recorded ops and interpreted Triton launches over the same tensors, so anything a step
decided in Python is frozen as on a GPU. The kernels run interpreted (conftest), as the graph would run them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from _graph_replay import emulated_capture
from test_runner_kernels import random_cartridge
from torch import Tensor

from cartridges.artifact import Cartridge
from cartridges.models import LoadedModel
from cartridges_kernels import BACKEND_ENV, config, decode_plan, dispatch, plan
from cartridges_kernels.decode_plan import DecodePlan, plan_decode
from cartridges_kernels.transfer import copy_into, retain_cached
from cartridges_serving import Engine, SamplingParams, engine
from cartridges_serving.graphs import DecodeGraphs, GraphStats, Replay, batch_bucket
from cartridges_serving.runner import BatchItem, LlamaRunner


@pytest.fixture(autouse=True)
def _kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "triton")


class Batch:
    """Requests on one runner, stepped together: ``join`` prefills a request, ``decode`` feeds each a token."""

    def __init__(self, step: Callable[[list[BatchItem]], Tensor], runner: LlamaRunner) -> None:
        self.step, self.runner = step, runner
        self.items: list[BatchItem] = []

    def join(self, prompt: list[int], cartridges: list[Cartridge]) -> Tensor:
        own = self.runner.new_own_kv(len(prompt) + 32)
        item = BatchItem(prompt, sum(c.p for c in cartridges), cartridges, own)
        for other in self.items:
            self._next(other, 3)
        self.items.append(item)
        return self.step(self.items)

    def decode(self, token: int) -> Tensor:
        for item in self.items:
            self._next(item, token)
        return self.step(self.items)

    def leave(self, index: int) -> None:
        self.items.pop(index).own.release()

    @staticmethod
    def _next(item: BatchItem, token: int) -> None:
        item.start_position += len(item.token_ids)
        item.token_ids = [token]


def scenario(batch: Batch, a: Cartridge, b: Cartridge) -> list[Tensor]:
    """Logits of every step: decode runs long enough to capture and replay, a request leaves, requests join
    (prefill beside decode), and the batch's order of cartridges changes."""
    logits = [batch.join([5, 9, 200, 31], [a]), batch.join([17, 3], [a, b]), batch.join([250, 1, 2], [a])]
    logits += [batch.decode(t) for t in (7, 8, 9, 10)]
    batch.leave(0)  # now [a, b], [a]: another key
    logits += [batch.decode(t) for t in (11, 12, 13)]
    logits.append(batch.join([40, 41], [b]))
    logits += [batch.decode(t) for t in (14, 15, 16, 17)]
    return logits


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "multi-launch"])
def test_replayed_steps_give_the_eager_logits(
    fused: bool, tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fused:  # decode takes the multi-launch path above this many (request, cartridge key) pairs
        monkeypatch.setattr(dispatch, "FUSED_DECODE_MAX_SHARED_ROWS", 0)
    eager_runner, graph_runner = LlamaRunner(tiny_model.model), LlamaRunner(tiny_model.model)
    a, b = random_cartridge(eager_runner, 24, 0), random_cartridge(eager_runner, 9, 1)
    expected = scenario(Batch(eager_runner.step, eager_runner), a, b)
    graphs = DecodeGraphs(graph_runner, emulated_capture(monkeypatch))
    got = scenario(Batch(graphs.step, graph_runner), a, b)
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert (g - e).abs().max() <= 2e-4, f"step {step}"
    assert graphs.stats.disabled == ""
    assert graphs.stats.captures == 3  # one per decode batch
    assert graphs.stats.replays == 2 + 1 + 2


def test_requests_in_another_order_replay_the_same_graph(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager_runner, runner = LlamaRunner(tiny_model.model), LlamaRunner(tiny_model.model)
    a, b = random_cartridge(runner, 24, 0), random_cartridge(runner, 9, 1)
    graphs = DecodeGraphs(runner, emulated_capture(monkeypatch))
    logits = []
    for batch in (Batch(eager_runner.step, eager_runner), Batch(graphs.step, runner)):
        for prompt, cartridges in (([5, 9], [a]), ([17, 3], [b]), ([8, 8], [a])):
            batch.join(prompt, cartridges)
        batch.decode(1)
        batch.decode(2)  # captured in the order [a], [a], [b]
        batch.items.reverse()  # [a], [b], [a]
        logits.append(batch.decode(3))
    assert graphs.stats.captures == 1 and graphs.stats.replays == 1
    torch.testing.assert_close(logits[1], logits[0], atol=2e-4, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "multi-launch"])
def test_replays_stay_right_when_walks_are_split(
    fused: bool, tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a GPU with idle SMs: cartridge and own walks cut into chunks, chosen for the lengths at capture."""
    for module in (config, decode_plan, plan):
        monkeypatch.setattr(module, "MIN_KEYS_PER_SPLIT", 16, raising=False)
    for module in (config, decode_plan):
        monkeypatch.setattr(module, "target_programs", lambda device: 256)
    monkeypatch.setattr(config, "OWN_BLOCK_BYTES", 0)  # own walks in 64-key blocks
    if not fused:
        monkeypatch.setattr(dispatch, "FUSED_DECODE_MAX_SHARED_ROWS", 0)
    eager_runner, runner = LlamaRunner(tiny_model.model), LlamaRunner(tiny_model.model)
    cartridge = random_cartridge(eager_runner, 100, 2)  # two 64-key blocks
    graphs = DecodeGraphs(runner, emulated_capture(monkeypatch))
    logits = []
    for batch in (Batch(eager_runner.step, eager_runner), Batch(graphs.step, runner)):
        batch.join([1 + i % 200 for i in range(70)], [cartridge])  # two 64-key own blocks
        batch.join([7, 3, 5], [cartridge])
        logits.append([batch.decode(t) for t in range(5)])
    plans = [k for graph in graphs._graphs.values() for k in graph.kept if isinstance(k, DecodePlan)]
    if fused:
        assert plans and plans[0].own_splits > 1 and plans[0].shared_splits > 1
    assert graphs.stats.captures == 1 and graphs.stats.replays == 3
    for got, expected in zip(*logits, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_batch_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 17, 32, 33, 64, 65, 250)] == [1, 2, 4, 8, 32, 32, 64, 64, 96, 256]


def decode_both(
    eager_runner: LlamaRunner, graphs: DecodeGraphs, prompts: list[list[int]], cartridge: Cartridge, leave: bool
) -> list[list[Tensor]]:
    """Logits of three decode steps (eager, capture, replay) on both runners, then (``leave``: after the second
    request left) three more."""
    logits = []
    for batch in (Batch(eager_runner.step, eager_runner), Batch(graphs.step, graphs.runner)):
        for prompt in prompts:
            batch.join(prompt, [cartridge])
        steps = [batch.decode(t) for t in (1, 2, 3)]
        if leave:
            batch.leave(1)
            steps += [batch.decode(t) for t in (4, 5, 6)]
        logits.append(steps)
    for got, expected in zip(*logits, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    return logits


def test_batches_of_one_bucket_share_a_graph(tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four requests lose one: the three are padded back to four with requests writing a scratch row, and the
    same graph replays."""
    eager_runner, runner = LlamaRunner(tiny_model.model), LlamaRunner(tiny_model.model)
    graphs = DecodeGraphs(runner, emulated_capture(monkeypatch))
    prompts = [[5, 9, 200], [17, 3], [8, 8, 8, 8], [250, 1]]
    decode_both(eager_runner, graphs, prompts, random_cartridge(runner, 24, 0), leave=True)
    assert graphs.stats.captures == 1 and graphs.stats.replays == 4


def test_a_full_pool_runs_its_batch_unpadded(tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """No free row for fillers: three requests are captured as three."""
    prompts = [[5, 9, 200], [17, 3], [8, 8, 8, 8]]
    eager_runner = LlamaRunner(tiny_model.model)
    rows = sum(len(prompt) + 32 for prompt in prompts)  # what Batch.join takes: nothing is left
    runner = LlamaRunner(tiny_model.model, own_kv_bytes=rows * eager_runner.own_kv_pool.row_bytes)
    graphs = DecodeGraphs(runner, emulated_capture(monkeypatch))
    decode_both(eager_runner, graphs, prompts, random_cartridge(runner, 24, 0), leave=False)
    assert graphs.stats.captures == 1 and graphs.stats.replays == 1
    keys = [key for key in graphs._graphs if isinstance(key, tuple)]
    assert [len(key) for key in keys] == [1 + 3]  # the longest own KV and three requests' cartridges


def test_a_capture_that_fails_turns_graphs_off(tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(step: Callable[[], Tensor]) -> tuple[Tensor, Replay]:
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = LlamaRunner(tiny_model.model)
    graphs = DecodeGraphs(runner, refuse)
    batch = Batch(graphs.step, runner)
    batch.join([5, 9, 1], [])
    logits = [batch.decode(t) for t in (1, 2, 3)]
    assert "capture failed: RuntimeError" in graphs.stats.disabled
    assert graphs.stats.eager_steps == 4 and graphs.stats.replays == 0
    assert [item.own.length for item in batch.items] == [6]  # the failed capture's step still counted once
    assert all(torch.isfinite(x).all() for x in logits)


@pytest.mark.parametrize("stale", [False, True], ids=["at-capture", "at-first-replay"])
def test_a_replay_that_disagrees_turns_graphs_off(
    stale: bool, tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off by one everywhere is caught at capture; a replay that never reads its new inputs (as a wrongly frozen
    value would) agrees at capture and is caught by the first replay's check. The answers stay the eager ones."""
    emulated = emulated_capture(monkeypatch)

    def wrong(step: Callable[[], Tensor]) -> tuple[Tensor, Replay]:
        expected, replay = emulated(step)
        captured = replay()
        return expected, (lambda: captured) if stale else (lambda: replay() + 1.0)

    eager_runner, runner = LlamaRunner(tiny_model.model), LlamaRunner(tiny_model.model)
    graphs = DecodeGraphs(runner, wrong)
    expected_batch, batch = Batch(eager_runner.step, eager_runner), Batch(graphs.step, runner)
    expected_batch.join([5, 9, 1], [])
    batch.join([5, 9, 1], [])
    for token in (1, 2, 3, 4):
        torch.testing.assert_close(batch.decode(token), expected_batch.decode(token), atol=2e-4, rtol=0)
    assert "disagreed" in graphs.stats.disabled
    assert graphs.stats.captures == int(stale) and graphs.stats.replays == 0


def test_a_step_that_copies_from_the_host_cannot_be_captured(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulation refuses what CUDA capture refuses: here, plans made during capture (not cached before)."""
    runner = LlamaRunner(tiny_model.model)
    graphs = DecodeGraphs(runner, emulated_capture(monkeypatch))
    batch = Batch(graphs.step, runner)
    batch.join([5, 9, 1], [])
    monkeypatch.setattr(runner, "forward", _clearing_plans(runner.forward))
    batch.decode(1)
    batch.decode(2)
    assert "host-to-device copy inside capture" in graphs.stats.disabled


def _clearing_plans(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(*args: object) -> Tensor:
        plan_decode.cache_clear()
        return forward(*args)

    return run


def test_graphs_are_bounded_and_dropped_when_the_pool_grows(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = LlamaRunner(tiny_model.model)
    graphs = DecodeGraphs(runner, emulated_capture(monkeypatch), max_graphs=1, capture_after=1)
    batch = Batch(graphs.step, runner)
    batch.join([5, 9, 1], [])
    batch.decode(1)
    batch.join([7, 7], [])
    batch.decode(2)  # a second key: the first graph goes
    assert graphs.stats.captures == 2 and len(graphs._graphs) == 1
    pool = runner.own_kv_pool.keys
    batch.join(list(range(1, 40)), [])  # needs rows the pool does not have yet: it grows
    assert runner.own_kv_pool.keys is not pool
    batch.decode(3)
    assert graphs.stats.captures == 3 and len(graphs._graphs) == 1


def test_capture_retains_the_cached_plans_it_read(tiny_model: LoadedModel) -> None:
    runner = LlamaRunner(tiny_model.model)
    item = BatchItem([1, 2], 0, [], runner.new_own_kv(8))
    runner.step([item])
    item.start_position, item.token_ids = 2, [3]
    inputs = runner.prepare([item])
    with retain_cached() as kept:
        runner.forward(inputs, inputs.indices)
    plans = [k for k in kept if type(k).__name__ == "DecodePlan"]
    assert len(plans) == 1  # looked up on the first layer, which every layer's launch reads


def test_graphs_need_a_gpu_or_a_capture(tiny_model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(LlamaRunner(tiny_model.model))
    with pytest.raises(ValueError, match="CUDA device"):
        Engine(tiny_model, cuda_graphs=True)


def test_models_whose_rope_reads_positions_on_the_host_are_refused(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = LlamaRunner(tiny_model.model)
    monkeypatch.setattr(runner.decoder.rotary_emb, "rope_type", "dynamic")
    with pytest.raises(ValueError, match="cannot capture 'dynamic' RoPE"):
        DecodeGraphs(runner, emulated_capture(monkeypatch))


def test_engine_answers_are_the_same_with_graphs(tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "DecodeGraphs", functools.partial(DecodeGraphs, capture=emulated_capture(monkeypatch)))
    prompts, params = ["hello", "what is a cartridge?", "x"], SamplingParams(max_tokens=16)

    def answers(cuda_graphs: bool) -> tuple[list[str], GraphStats | None]:
        served = Engine(tiny_model, cuda_graphs=cuda_graphs)
        try:
            handles = [served.submit(prompt, params=params) for prompt in prompts]
            texts = [handle.result(timeout=600).text for handle in handles]
            return texts, served.metrics().graphs
        finally:
            served.close()

    (eager, _), (replayed, stats) = answers(False), answers(True)
    assert replayed == eager
    assert stats is not None and stats.replays > 0 and not stats.disabled and stats.capture_seconds > 0


def test_an_input_buffer_is_only_overwritten_whole() -> None:
    with pytest.raises(ValueError, match=r"cannot overwrite \(2, 3\) with \(3,\)"):
        copy_into(torch.zeros(2, 3), torch.zeros(3))
