"""Decode steps replayed from CUDA graphs: a GPU step issues ~300 launches from Python, one replay issues one.

On an H200 a batch-64 decode step's kernels took about 1.3 ms while the runner took 77 ms to issue them
(bench/results/serving-gpu.json): decode is bound by the host. A captured step replays every launch with the
arguments it was captured with, so only what lives in tensors may change between replays. The runner keeps
everything that changes from one decode step to the next in two tensors (``StepInputs``): the step's index
tensor (token ids, positions, pool rows) and the own-KV segment table of every layer (each request's rows and
length); a replay rewrites both, then runs. Everything else a step's launches read is fixed for a batch of
as many requests reading the same cartridges from the same pool: the graph key (requests are put in one order by
the cartridges they read, so a batch whose requests come in another order replays the same graph). The key also
holds the longest own KV to a power of two: the kernels chose their splits for the lengths at capture, and any
split stays correct (each walk's length comes from the table) but a graph captured at 50 own tokens would walk
8k with too few programs.

A batch is padded to its size bucket (``batch_bucket``) with filler requests that read the cartridges most of
it reads and write one scratch row, taken from the pool for the step and given back (no padding when no row is
free): a request leaving or joining then keeps the key. A key is captured once it has come ``capture_after``
steps in a row (a batch that changes every step would capture for nothing). Each capture is checked (the step
runs eagerly first and the replay must give its logits: it writes the same keys and values to the same rows),
and so is each graph's first replay with another step's inputs, which is what would show a value wrongly frozen
at capture. A capture that fails or disagrees turns graphs off for this runner, logged and counted in
``stats``, and steps run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cartridges_kernels.config import MIN_KEYS_PER_SPLIT
from cartridges_kernels.transfer import copy_into, retain_cached, to_device
from cartridges_serving.own_kv import OwnKV
from cartridges_serving.runner import BatchItem, LlamaRunner, StepInputs

log = logging.getLogger(__name__)

Replay = Callable[[], Tensor]
# Runs a step once eagerly (its logits: what the replay must give), then records it; the replay runs it again.
Capture = Callable[[Callable[[], Tensor]], tuple[Tensor, Replay]]
UNCAPTURABLE_ROPE = {"dynamic", "longrope"}  # transformers reads the largest position on the host each step


def cuda_capture(device: torch.device) -> Capture:
    """Captures into CUDA graphs on one side stream, sharing one memory pool (replays never overlap).

    The eager run goes on the capture stream too (the order PyTorch's docs give for a first capture). Errors are
    thread-local: a request thread loading a cartridge (device allocation, copy) during a capture neither breaks
    it nor fails. The stream is restored whatever the capture raises."""
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)

    def capture(step: Callable[[], Tensor]) -> tuple[Tensor, Replay]:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            expected = step()
            graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                out = step()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)

        def replay() -> Tensor:
            graph.replay()
            return out

        return expected, replay

    return capture


@dataclass
class _Graph:
    inputs: StepInputs  # as captured: its own-KV tables and ``indices`` are rewritten before each replay
    indices: Tensor  # the index tensor on the device
    replay: Replay
    kept: list[object] = field(default_factory=list)  # cached plans and tables the captured launches read
    verified: bool = False  # a replay with another step's inputs gave that step's eager logits


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_steps: int = 0
    capture_seconds: float = 0.0  # host time of every capture: its eager step, the capture, the checked replay
    disabled: str = ""  # why graphs were turned off ("" while on)


def batch_bucket(batch: int) -> int:
    """The batch size a decode graph is captured for: powers of two up to 32, then multiples of 32. A batch is
    padded up to it (at most twice the rows at small batches, where a step costs the same; at most 32 more
    above), so batches of a few sizes share a graph instead of each size capturing its own."""
    return 1 << (batch - 1).bit_length() if batch <= 32 else -(-batch // 32) * 32


def _fillers(
    items: Sequence[BatchItem], reads: Sequence[tuple[int, ...]], count: int, scratch: OwnKV | None
) -> list[BatchItem]:
    """``count`` requests that write one token to the scratch row and read the cartridges most of ``items``
    read (``reads``: each item's cartridge ids), so a batch whose requests all read one cartridge keeps one key
    whatever its size in the bucket; nothing without a scratch row."""
    if scratch is None:
        return []
    like = items[reads.index(Counter(reads).most_common(1)[0][0])]
    position = sum(c.p for c in like.cartridges)
    return [BatchItem([0], position, like.cartridges, scratch) for _ in range(count)]


class DecodeGraphs:
    """Runs a runner's decode steps from captured graphs (prefill and mixed steps run eagerly)."""

    def __init__(
        self,
        runner: LlamaRunner,
        capture: Capture | None = None,
        max_graphs: int = 8,
        capture_after: int = 2,
        verify: bool = True,
    ) -> None:
        """``capture`` None: CUDA graphs (the runner must be on a GPU). ``max_graphs`` bounds the graphs kept
        (least recently replayed dropped first); each holds its step's intermediates and its cartridges.
        ``verify=False`` keeps graphs without comparing replays with eager steps: only for stubbed kernels
        whose outputs are garbage (bench/decode_host.py)."""
        if capture is None and runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {runner.device}")
        rope = getattr(runner.decoder.rotary_emb, "rope_type", "default")
        if rope in UNCAPTURABLE_ROPE:
            raise ValueError(
                f"CUDA graphs cannot capture {rope!r} RoPE (it reads positions on the host); turn them off"
            )
        if max_graphs < 1 or capture_after < 1:
            raise ValueError(f"max_graphs and capture_after must be >= 1, got {max_graphs}, {capture_after}")
        self.runner = runner
        self.capture = capture or cuda_capture(runner.device)
        self.max_graphs, self.capture_after, self.verify = max_graphs, capture_after, verify
        self.stats = GraphStats()
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._last: tuple[Hashable, int] | None = None  # the last eager decode step's key and its run length
        self._pool: Tensor | None = None  # the own-KV pool tensor the graphs write to

    def step(self, items: Sequence[BatchItem]) -> Tensor:
        """``runner.step(items)``, from a graph where there is one (or one is due)."""
        if self._pool is not self.runner.own_kv_pool.keys:  # the pool grew: every graph writes to the old one
            self._graphs.clear()
            self._pool = self.runner.own_kv_pool.keys
        if self.stats.disabled or not items or any(len(item.token_ids) != 1 for item in items):
            return self._eager(items)
        scratch = self._scratch_row(len(items))
        try:
            # Requests in a canonical order (by the cartridges they read), so a batch that reads the same
            # cartridges in another order replays the same graph. The longest own KV (to a power of two) is part
            # of the key: the kernels' splits were chosen for the lengths at capture (and are alike below
            # MIN_KEYS_PER_SPLIT, where no own walk is split).
            reads = [tuple(map(id, item.cartridges)) for item in items]
            fillers = _fillers(items, reads, batch_bucket(len(items)) - len(items), scratch)
            padded = [*items, *fillers]
            reads += [tuple(map(id, filler.cartridges)) for filler in fillers]
            order = sorted(range(len(padded)), key=reads.__getitem__)
            longest = max(MIN_KEYS_PER_SPLIT, *(item.own.length + 1 for item in padded)).bit_length()
            logits = self._step((longest, *(reads[r] for r in order)), [padded[r] for r in order])
        finally:
            if scratch is not None:
                scratch.release()
        if order == list(range(len(items))):
            return logits
        rows = torch.tensor(order).argsort()[: len(items)]  # each item's row of the canonical order
        return logits.index_select(0, to_device(rows, logits.device))

    def _scratch_row(self, batch: int) -> OwnKV | None:
        """One pool row the filler requests of a padded batch all write (and nothing reads after the step); None
        when the batch needs no fillers or no row is free (taking one must not grow the pool)."""
        pool = self.runner.own_kv_pool
        if batch_bucket(batch) == batch or not pool.fits(1):
            return None
        return pool.allocate(1)

    def _step(self, key: Hashable, items: Sequence[BatchItem]) -> Tensor:
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return self._replay(graph, items)
        run = self._last[1] + 1 if self._last and self._last[0] == key else 1
        if run < self.capture_after:
            self._last = (key, run)
            return self._eager(items)
        self._last = None
        started = time.perf_counter()
        try:
            return self._capture(key, items)
        finally:
            self.stats.capture_seconds += time.perf_counter() - started

    def _eager(self, items: Sequence[BatchItem]) -> Tensor:
        self.stats.eager_steps += 1
        return self.runner.step(items)

    def _replay(self, graph: _Graph, items: Sequence[BatchItem]) -> Tensor:
        """Rewrite the graph's inputs with this step's and replay it. The first replay is also run eagerly and
        compared (both write the same keys and values): the check at capture cannot see a value wrongly frozen."""
        from cartridges_kernels.segment_kernel import pool_layer_tables  # imports triton: only where graphs run

        fresh = self.runner.prepare(items)  # checks the items and gives this step's values
        tables = graph.inputs.own.tables
        assert tables is not None
        expected = None
        if self.verify and not graph.verified:
            expected = self.runner.forward(fresh, to_device(fresh.indices, self.runner.device))
        copy_into(graph.indices, fresh.indices)
        copy_into(tables, pool_layer_tables(fresh.own))
        logits = graph.replay().clone()  # the graph's own output is rewritten by the next replay
        if expected is not None:
            if not self._agree(logits, expected):
                return self._turn_off("a replay disagreed with its eager step", items, expected)
            graph.verified = True
        self.runner.advance(items)
        self.stats.replays += 1
        return logits

    def _capture(self, key: Hashable, items: Sequence[BatchItem]) -> Tensor:
        """Capture the step (after running it eagerly) and keep the graph if its replay gives the eager logits."""
        from cartridges_kernels.segment_kernel import pool_layer_tables

        runner = self.runner
        inputs = runner.prepare(items)
        inputs.own.tables = to_device(pool_layer_tables(inputs.own), runner.device)
        indices = to_device(inputs.indices, runner.device)
        try:
            with retain_cached() as kept:
                expected, replay = self.capture(lambda: runner.forward(inputs, indices))
            logits = replay().clone()  # writes the same keys and values to the same rows again
        except Exception as err:  # a step that cannot be captured still runs, eagerly
            log.exception("capturing a decode step failed")
            return self._turn_off(f"capture failed: {type(err).__name__}: {err}", items)
        if self.verify and not self._agree(logits, expected):
            return self._turn_off("a captured step disagreed with its eager run", items, expected)
        self._graphs[key] = _Graph(inputs, indices, replay, kept)
        if len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        runner.advance(items)
        self.stats.captures += 1
        return logits

    @staticmethod
    def _agree(logits: Tensor, expected: Tensor) -> bool:
        """Within 1% of the logits' scale: the same launches on the same inputs (cuBLAS may pick another
        algorithm inside a graph); a wrongly frozen input gives other logits altogether."""
        difference = float((logits - expected).abs().max()) if logits.numel() else 0.0
        return difference <= 1e-2 * max(float(expected.abs().max()), 1.0)

    def _turn_off(self, reason: str, items: Sequence[BatchItem], logits: Tensor | None = None) -> Tensor:
        """Graphs off from now on; this step's answer is ``logits`` from its eager run, or (None) an eager step."""
        log.error("%s; CUDA graphs are off, decode steps run eagerly", reason)
        self.stats.disabled = reason
        self._graphs.clear()
        if logits is None:
            return self._eager(items)
        self.runner.advance(items)
        self.stats.eager_steps += 1
        return logits
