"""GPU benchmark of cartridge decode attention: check correctness on the GPU, then time it.

Cases (Llama-3.1-8B-like: 8 KV heads, 32 query heads, head_dim 128, timed over 32 layers' worth of distinct
tensors so L2 cannot hold a step): one 2048-token cartridge shared by the whole batch (bf16 and int8), two
composed cartridges, and in-context-learning baselines with a 32k / 100k-token prompt per request. The kernel
is what decode_attention runs on CUDA: the fused decode kernel (one launch per layer, shared-cartridge and
own-KV programs side by side, plus a merge when a row has several slots) below
config.FUSED_DECODE_MAX_SHARED_ROWS, the multi-launch path (a fill, partials per segment kind, a merge) above;
both are also timed on their own (fused_ms, multi_launch_ms), to re-check that threshold. Each case is also
compared with PyTorch SDPA on the concatenated KV, and with the kernel reading every cartridge once per request.
Achieved bandwidth = bytes that must be read per step (each cartridge once) / (time x measured copy bandwidth).
At batch 64 the shared-cartridge case is re-run with shorter and longer own KV (own_lengths); at batch 64
and 256 the shared-cartridge step is also broken down (cartridge alone, own KV alone, each beside
torch's flash attention on the same half), profiled per kernel (torch.profiler), and swept over tile configs.

    PYTHONPATH=.:kernels python bench/kernels_gpu.py [--out DIR]   # on a CUDA machine
    python bench/kernels_gpu.py --smoke --out /tmp/x    # tiny shapes on CPU (Triton interpreter)
    python bench/kernels_gpu.py --one-step 64           # one layer's launches, for a profiler (bench/ncu_gpu.sh)
    python bench/kernels_gpu.py --probe '{"tma": true, "warp_specialize": true}'   # one config, checked apart

Writes DIR/kernels-gpu.json (and kernels-gpu.png when matplotlib is importable); DIR defaults to
bench/results.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jsonfile import write_json
from torch import Tensor

from cartridges.quantize import QuantFormat
from cartridges_kernels import (
    KernelConfig,
    KVSegment,
    SegmentTable,
    decode_attention,
    prefill_attention,
    quantize_kv,
)
from cartridges_kernels.config import SWEEP_CONFIGS, default_config
from cartridges_kernels.dispatch import kernel_path, segmented_attention_triton

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shapes:
    """Model and sweep sizes; ``layers`` is how many layers one reported step covers."""

    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    cartridge_len: int
    own_len: int  # tokens a request has generated so far (its own KV in the cartridge cases)
    other_own_lens: tuple[int, ...]  # the shared-cartridge case again at the first focus batch, longer or shorter
    icl_lens: tuple[int, ...]
    batches: tuple[int, ...]
    dtype: torch.dtype
    iters: int
    warmup: int
    memory_fraction: float  # of free device memory one measurement may allocate


MIN_ITERS = 5
MEASURE_BUDGET_MS = 2000.0
FULL = Shapes(32, 8, 32, 128, 2048, 128, (32, 512, 2048), (32_768, 100_000), (1, 2, 4, 8, 16, 32, 64, 128, 256),
              torch.bfloat16, 20, 3, 0.4)  # fmt: skip
SMOKE = Shapes(1, 2, 4, 16, 40, 5, (9,), (64,), (3,), torch.float32, 1, 0, 0.4)


@dataclass(frozen=True)
class Case:
    """A decode workload: ``cartridges`` cartridges composed and shared by all requests, plus own tokens."""

    name: str
    cartridges: int
    own_len: int
    quant: QuantFormat | None = None


def cases(shapes: Shapes) -> list[Case]:
    n = shapes.cartridge_len
    return [
        Case(f"shared-1x{n}", 1, shapes.own_len),
        Case(f"shared-1x{n}-int8", 1, shapes.own_len, "int8"),
        Case(f"composed-2x{n}", 2, shapes.own_len),
        *[Case(f"icl-{length}", 0, length + shapes.own_len) for length in shapes.icl_lens],
    ]


@dataclass
class Layer:
    """One layer's decode inputs."""

    q: Tensor
    table: SegmentTable
    own: list[KVSegment]

    def dense_kv(self) -> tuple[Tensor, Tensor]:
        """[batch, kv_heads, total, head_dim] keys and values, concatenated as a dense baseline holds them."""
        keys, values = [], []
        for r, own in enumerate(self.own):
            parts = [self.table.segments[i] for i in self.table.request_segments[r]] + [own]
            keys.append(torch.cat([p.dense(self.q.dtype)[0] for p in parts], dim=1))
            values.append(torch.cat([p.dense(self.q.dtype)[1] for p in parts], dim=1))
        return torch.stack(keys), torch.stack(values)


def make_layer(shapes: Shapes, case: Case, batch: int, device: torch.device) -> Layer:
    def rand(tokens: int) -> Tensor:
        shape = (shapes.kv_heads, tokens, shapes.head_dim)
        return torch.randn(shape, device=device, dtype=shapes.dtype)

    segments = []
    for _ in range(case.cartridges):
        keys, values = rand(shapes.cartridge_len), rand(shapes.cartridge_len)
        if case.quant is None:
            segments.append(KVSegment(keys, values))
        else:
            segments.append(
                KVSegment(quantize_kv(keys, case.quant, "channel"), quantize_kv(values, case.quant, "token"))
            )
    own_k = torch.randn(batch, shapes.kv_heads, case.own_len, shapes.head_dim, device=device, dtype=shapes.dtype)
    own_v = torch.randn_like(own_k)
    q = torch.randn(batch, shapes.q_heads, shapes.head_dim, device=device, dtype=shapes.dtype)
    table = SegmentTable(segments, [list(range(case.cartridges))] * batch)
    return Layer(q, table, [KVSegment(own_k[b], own_v[b]) for b in range(batch)])


def stored_bytes(segment: KVSegment) -> int:
    """Bytes a segment occupies (payload plus scales): what attention must read from it."""
    total = 0
    for x in (segment.keys, segment.values):
        tensors = [x] if isinstance(x, Tensor) else [x.data, x.scales]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def layer_bytes(shapes: Shapes, case: Case, batch: int, device: torch.device) -> tuple[int, int]:
    """(bytes one layer's decode step must read: each unique cartridge once plus each request's own KV, the
    issue's definition, which leaves out the queries read and the outputs written (2.4% more at batch 64);
    bytes of the dense concatenated KV a baseline holds), measured on a one-request layer and scaled to the
    batch."""
    probe = make_layer(shapes, case, 1, device)
    dense = sum(t.numel() * t.element_size() for t in probe.dense_kv())
    return sum(map(stored_bytes, probe.table.segments)) + batch * stored_bytes(probe.own[0]), batch * dense


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(iters: int, times: Sequence[float]) -> int:
    """Timed runs a measurement takes: ``iters``, or fewer (never under MIN_ITERS) once the slowest run so
    far says that many would take more than MEASURE_BUDGET_MS."""
    if not times:
        return iters
    return min(iters, max(MIN_ITERS, int(MEASURE_BUDGET_MS // max(times))))


def median_ms(step: Callable[[], object], shapes: Shapes, device: torch.device) -> float:
    """Median wall time of ``step`` in ms: CUDA events on a GPU, perf_counter elsewhere. ``shapes.iters``
    timed runs, fewer (never under MIN_ITERS) for steps so slow that they would take over MEASURE_BUDGET_MS:
    a 100k-token ICL step at batch 128 takes 0.4 s, and 20 of them per variant would use up the device run's
    time limit before the sweep."""
    for _ in range(shapes.warmup):
        step()
    sync(device)
    times: list[float] = []
    while len(times) < timed_runs(shapes.iters, times):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(shapes: Shapes, device: torch.device) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second): the practical ceiling for a read."""
    n = (1024 if device.type == "cuda" else 16) << 20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), replace(shapes, iters=10, warmup=2), device)
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops(shapes: Shapes, device: torch.device) -> float:
    """Dense matmul throughput in the benchmark's dtype (tera-FLOP/s): the practical ceiling for a walk whose
    dot products, not its bytes, bound it (a cartridge shared by a large batch)."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=shapes.dtype)
    b = torch.randn(n, n, device=device, dtype=shapes.dtype)
    ms = median_ms(lambda: a @ b, replace(shapes, iters=10, warmup=2), device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def attention_flops(shapes: Shapes, batch: int, keys: int) -> int:
    """FLOPs of one decode step's attention over ``keys`` keys per request, all layers: q.k and p.v, a
    multiply-add each per key, query head and channel."""
    return 4 * shapes.layers * batch * shapes.q_heads * keys * shapes.head_dim


def layers_fitting(bytes_per_layer: int, shapes: Shapes, device: torch.device) -> int:
    """How many distinct layers one measurement can hold (0: not even one fits)."""
    if device.type != "cuda":
        return shapes.layers
    free, _ = torch.cuda.mem_get_info(device)
    return min(shapes.layers, int(free * shapes.memory_fraction // max(bytes_per_layer, 1)))


def time_per_step(
    run: Callable[[Any], object], layers: list[Any], shapes: Shapes, device: torch.device, eager: bool = False
) -> tuple[float, float | None]:
    """(ms of one step replayed from a CUDA graph, ms of the same step launched eagerly from Python if
    ``eager``, else None), each the median over iterations and scaled to ``shapes.layers`` layers.

    The graph replay is the kernels' own device time, what an engine that captures its decode step gets; the
    eager time adds this process's per-launch host work. An eager median costs 3 warm-ups and up to 20 runs
    of 40-280 ms of host work each at batch 64-256, so only the table rows' kernel_eager_ms takes it; otherwise
    one eager step compiles the kernels and fills the plan and pointer-table caches before the capture.
    Without CUDA both are the eager time."""
    scale = shapes.layers / len(layers)

    def step() -> None:
        for layer in layers:
            run(layer)

    if device.type != "cuda":
        ms = median_ms(step, shapes, device) * scale
        return ms, ms
    eager_ms = median_ms(step, shapes, device) * scale if eager else None
    if eager_ms is None:
        step()
        sync(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as error:  # report eager time rather than lose the row
        check_device(device)  # a refused capture says "CUDA error" too, but leaves the device working
        print(f"CUDA graph capture failed ({error}); reporting eager time", file=sys.stderr)
        ms = median_ms(step, shapes, device) * scale if eager_ms is None else eager_ms
        return ms, ms
    graphed = median_ms(graph.replay, shapes, device) * scale
    del graph
    return graphed, eager_ms


class DeviceFault(RuntimeError):
    """A CUDA error (an illegal address, a failed launch): sticky, so every later launch of this process fails
    too, and a run that went on would catch each failure and end with empty tables that look like success."""


def is_device_fault(error: BaseException) -> bool:
    """Whether ``error`` is a CUDA error (torch's or Triton's launcher's)."""
    text = str(error)
    return (
        isinstance(error, DeviceFault)
        or type(error).__name__ == "AcceleratorError"
        or "CUDA error" in text
        or "[CUDA]" in text
    )


def check_device(device: torch.device) -> None:
    """Raise DeviceFault unless ``device`` still runs work: whether an error was a sticky fault or one the device
    recovers from (a refused graph capture) shows in the next launch, not in its message."""
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except RuntimeError as error:
        raise DeviceFault(f"the device no longer runs work: {error}") from error


def raise_if_device_fault(error: BaseException) -> None:
    """Re-raise ``error`` as a DeviceFault if it is one; a caller that leaves out a failing config goes on."""
    if is_device_fault(error):
        raise error if isinstance(error, DeviceFault) else DeviceFault(str(error)) from error


def measure(shapes: Shapes, case: Case, batch: int, device: torch.device, copy_gbps: float) -> dict[str, Any]:
    """One (case, batch) row; methods that do not fit in memory are reported as null."""
    kernel_bytes, dense_bytes = layer_bytes(shapes, case, batch, device)
    row: dict[str, Any] = {"case": case.name, "batch": batch, "bytes_per_step": kernel_bytes * shapes.layers}
    row.update(kernel_ms=None, kernel_eager_ms=None, fused_ms=None, multi_launch_ms=None, per_request_ms=None)
    row.update(reference_ms=None)
    row.update(bandwidth_fraction=None)
    n_layers = layers_fitting(kernel_bytes, shapes, device)
    if n_layers:
        layers = [make_layer(shapes, case, batch, device) for _ in range(n_layers)]
        row["kernel_ms"], row["kernel_eager_ms"] = time_per_step(
            lambda x: decode_attention(x.q, x.table, x.own, backend="triton"), layers, shapes, device, eager=True
        )
        row["fused_ms"], _ = time_per_step(Forced(True), layers, shapes, device)
        row["multi_launch_ms"], _ = time_per_step(Forced(False), layers, shapes, device)
        if case.cartridges:
            row["per_request_ms"], _ = time_per_step(
                lambda x: decode_attention(x.q, x.table, x.own, backend="triton", shared_reads=False),
                layers,
                shapes,
                device,
            )
        achieved = row["bytes_per_step"] / (row["kernel_ms"] * 1e-3) / 1e9
        row["bandwidth_fraction"] = achieved / copy_gbps
        del layers
    n_dense = layers_fitting(kernel_bytes + dense_bytes, shapes, device)
    if n_dense:
        dense = []
        for _ in range(n_dense):
            layer = make_layer(shapes, case, batch, device)
            dense.append((layer.q[:, :, None, :], *layer.dense_kv()))
        row["reference_ms"], _ = time_per_step(
            lambda x: F.scaled_dot_product_attention(x[0], x[1], x[2], enable_gqa=True), dense, shapes, device
        )
        del dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def tolerance(shapes: Shapes) -> float:
    """Max abs error vs the PyTorch reference a kernel output may have at the benchmark's dtype."""
    return 2e-2 if shapes.dtype in (torch.bfloat16, torch.float16) else 2e-4


def target_batches(shapes: Shapes, device: torch.device) -> tuple[int, ...]:
    """The batches the targets name (on CPU, the smoke shapes' own)."""
    return (64, 256) if device.type == "cuda" else shapes.batches


def check_correctness(shapes: Shapes, device: torch.device) -> list[str]:
    """Kernel vs the PyTorch reference on this device: every case at batch 3 (ICL prompts cut to 4k), with prefill;
    the cartridge cases also at the target batches, where shared reads put many requests' queries in one tile and
    the timed numbers come from."""
    failures = []
    for case in cases(shapes):
        small = Case(case.name, case.cartridges, min(case.own_len, 4096), case.quant)
        failures += check_case(shapes, small, 3, device)
        if case.cartridges:
            for batch in (b for b in target_batches(shapes, device) if b != 3):
                failures += check_case(shapes, case, batch, device, prefill=False)
    return failures


def check_case(shapes: Shapes, case: Case, batch: int, device: torch.device, prefill: bool = True) -> list[str]:
    """Every decode path (and, if ``prefill``, a prefill of three requests) of one layer of ``case`` at ``batch``."""
    failures = []
    tol = tolerance(shapes)
    layer = make_layer(shapes, case, batch, device)
    expected = decode_attention(layer.q, layer.table, layer.own, backend="torch").float()
    variants = {
        "default": decode_attention(layer.q, layer.table, layer.own, backend="triton"),
        "per-request": decode_attention(layer.q, layer.table, layer.own, backend="triton", shared_reads=False),
        "split": decode_attention(layer.q, layer.table, layer.own, backend="triton", num_splits=4),
        "fused": Forced(True)(layer),
        "multi-launch": Forced(False)(layer),
    }
    for label, got in variants.items():
        err = (got.float() - expected).abs().max().item()
        if not err <= tol:
            failures.append(f"{case.name} batch {batch} {label}: max error {err:.3g} > {tol}")
    if prefill:
        q = torch.randn(6, shapes.q_heads, shapes.head_dim, device=device, dtype=shapes.dtype)
        got = prefill_attention(q, [3, 2, 1], layer.table, layer.own, backend="triton").float()
        want = prefill_attention(q, [3, 2, 1], layer.table, layer.own, backend="torch").float()
        err = (got - want).abs().max().item()
        if not err <= tol:
            failures.append(f"{case.name} prefill: max error {err:.3g} > {tol}")
    return failures


@dataclass(frozen=True)
class Forced:
    """A decode of a layer through the fused kernel or the multi-launch path (``fused`` None: the one the
    dispatcher picks), over the cartridges and, if ``own``, the own KV; called with the layer."""

    fused: bool | None
    config: KernelConfig | None = None
    own: bool = True
    num_splits: int | None = None

    def __call__(self, layer: Layer) -> Tensor:
        q, batch, table, own_kv = self._inputs(layer)
        scale = q.shape[-1] ** -0.5
        return segmented_attention_triton(
            q, batch, table, own_kv, scale, self.num_splits, True, self.config, self.fused
        )[0]

    def path(self, layer: Layer) -> str:
        """Which path this decode of ``layer`` runs ("fused" or "multi-launch"), recorded beside each timing:
        the dispatcher takes the multi-launch path from config.FUSED_DECODE_MAX_SHARED_ROWS pairs on (one
        2048-token cartridge at batch 64 already), so a tile config timed there says nothing about the fused
        kernel."""
        return kernel_path(*self._inputs(layer), num_splits=self.num_splits, config=self.config, fused=self.fused)

    def _inputs(self, layer: Layer) -> tuple[Tensor, list[int], SegmentTable, list[KVSegment] | None]:
        return layer.q, [1] * layer.q.shape[0], layer.table, layer.own if self.own else None


def side_by_side(config: KernelConfig) -> KernelConfig:
    """``config`` with the multi-launch path's partial launches on streams of their own."""
    return replace(config, side_by_side=True)


def swept(config: KernelConfig, num_splits: int | None) -> Forced:
    """The decode a sweep times for a config: on the fused kernel for one that sets ``own_block_n`` (only the
    fused kernel's own walk reads it, so the dispatcher's multi-launch path at the target batches would time
    the default config again), else on the dispatcher's choice."""
    return Forced(True if config.own_block_n is not None else None, config, num_splits=num_splits)


def _decode_with(layer: Layer, config: KernelConfig, num_splits: int | None) -> Tensor:
    return swept(config, num_splits)(layer)


def correct_configs(layer: Layer, shapes: Shapes, configs: Sequence[KernelConfig]) -> list[KernelConfig]:
    """The configs whose decode of ``layer`` matches the PyTorch reference on this device: a sweep times only
    those (a config the launcher rejects, whose lowering fails here, or that computes wrong attention is
    reported and left out, without losing the rest of the run; a device fault stops the run)."""
    expected = decode_attention(layer.q, layer.table, layer.own, backend="torch").float()
    correct = []
    for config in configs:
        try:
            error = (_decode_with(layer, config, None).float() - expected).abs().max().item()
        except Exception as failure:  # anything a launch raises costs this config, not the GPU run
            raise_if_device_fault(failure)
            print(f"sweep {config}: {type(failure).__name__}: {failure}; not timed", file=sys.stderr)
            continue
        if error <= tolerance(shapes):
            correct.append(config)
        else:
            print(f"sweep {config}: max error {error:.3g} > {tolerance(shapes)}; not timed", file=sys.stderr)
    return correct


SWEEP_SPLITS = (None, 1, 2, 4, 8, 16)


def swept_configs(shapes: Shapes) -> tuple[KernelConfig, ...]:
    """The default config, then config.SWEEP_CONFIGS."""
    return (default_config(shapes.head_dim), *SWEEP_CONFIGS)


def breakdown_trials(shapes: Shapes) -> tuple[KernelConfig, KernelConfig, KernelConfig]:
    """The breakdown's configs beside the default: the multi-launch path side by side, the first swept
    warp-specialized config, and that config side by side."""
    specialized = next(c for c in SWEEP_CONFIGS if c.warp_specialize)
    return side_by_side(default_config(shapes.head_dim)), specialized, side_by_side(specialized)


def never_run(config: KernelConfig) -> bool:
    """Whether ``config`` uses a feature no GPU run has yet survived (TMA, warp specialization, partial launches
    on streams of their own): such a config is first checked in a child process (``runs_apart``)."""
    return config.tma or config.warp_specialize or config.side_by_side


def vetted(configs: Sequence[KernelConfig], apart: dict[str, str] | None) -> list[KernelConfig]:
    """``configs`` less the never-run ones whose check apart did not pass (``apart`` maps a config to its
    outcome, see runs_apart; None: nothing was checked apart, on CPU where the interpreter cannot fault)."""
    if apart is None:
        return list(configs)
    return [c for c in configs if not never_run(c) or apart.get(str(c)) == "ok"]


def sweep(
    shapes: Shapes, batch: int, device: torch.device, copy_gbps: float, apart: dict[str, str] | None
) -> Iterator[dict[str, Any]]:
    """Decode time of the shared-cartridge case at one batch over tile configs and split factors (graph replay),
    to choose the fixed default config from measurements rather than guesses; row by row, so a run cut short
    by its time limit keeps the rows it measured. Each row says which path it timed (``path``); never-run
    configs are timed only once they passed apart (``vetted``)."""
    case = cases(shapes)[0]
    kernel_bytes, _ = layer_bytes(shapes, case, batch, device)
    layers = [make_layer(shapes, case, batch, device) for _ in range(layers_fitting(kernel_bytes, shapes, device))]
    for config in correct_configs(layers[0], shapes, vetted(swept_configs(shapes), apart)):
        for splits in SWEEP_SPLITS:
            run = swept(config, splits)
            try:
                ms, _ = time_per_step(run, layers, shapes, device)
            except (ValueError, RuntimeError) as error:  # a config the launcher rejects or that fails to compile
                raise_if_device_fault(error)
                print(f"sweep {config} splits={splits}: {error}", file=sys.stderr)
                continue
            path = run.path(layers[0])
            row = {**asdict(config), "num_splits": splits, "batch": batch, "path": path, "kernel_ms": ms,
                   "bandwidth_fraction": kernel_bytes * shapes.layers / (ms * 1e-3) / 1e9 / copy_gbps}  # fmt: skip
            print(f"sweep {row}", flush=True)
            yield row


PROBE_TIMEOUT_S = 75.0


def runs_apart(configs: Sequence[KernelConfig], shapes: Shapes, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, str]:
    """Each config's outcome ("ok", or why not) of the shared-cartridge decode at every batch and split the
    sweep times, each run in a child process of its own (``--probe``), all at once. A never-run config may
    fault (illegal address), which leaves a process's CUDA context unusable for every launch after it, or
    deadlock (Triton's warp specialization on sm_90 is experimental), so it must not run here first; run side
    by side, the children cost one ``timeout_s`` at most, however many hang."""
    smoke = ["--smoke"] if shapes == SMOKE else []
    children = {
        config: subprocess.Popen(
            [sys.executable, __file__, *smoke, "--probe", json.dumps(asdict(config))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for config in dict.fromkeys(configs)
    }
    deadline = time.monotonic() + timeout_s
    outcomes = {}
    for config, child in children.items():
        try:
            _, stderr = child.communicate(timeout=max(deadline - time.monotonic(), 0.0))
            outcomes[str(config)] = "ok" if child.returncode == 0 else f"failed: {stderr.strip()[-500:]}"
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            outcomes[str(config)] = f"no answer in {timeout_s:g} s"
        if outcomes[str(config)] != "ok":
            print(f"probe {config}: {outcomes[str(config)]}; not timed", file=sys.stderr)
    return outcomes


def probe(config: KernelConfig, shapes: Shapes, device: torch.device) -> int:
    """``--probe``: 0 when ``config`` decodes the shared-cartridge case right at each swept batch and split."""
    for batch in target_batches(shapes, device):
        layer = make_layer(shapes, cases(shapes)[0], batch, device)
        expected = decode_attention(layer.q, layer.table, layer.own, backend="torch").float()
        for splits in SWEEP_SPLITS:
            error = (_decode_with(layer, config, splits).float() - expected).abs().max().item()
            if not error <= tolerance(shapes):
                print(f"batch {batch}, splits {splits}: max error {error:.3g}", file=sys.stderr)
                return 1
    sync(device)
    return 0


@dataclass
class FlashInputs:
    """One layer's shared-cartridge step laid out for torch's flash attention: the GQA group of each KV head
    folded into query rows, so each half is one SDPA call without repeating keys."""

    cartridge_q: Tensor  # [1, kv_heads, batch * group, head_dim]
    cartridge_k: Tensor  # [1, kv_heads, cartridge tokens, head_dim]
    cartridge_v: Tensor
    own_q: Tensor  # [batch, kv_heads, group, head_dim]
    own_k: Tensor  # [batch, kv_heads, own tokens, head_dim]
    own_v: Tensor

    @classmethod
    def of(cls, layer: Layer) -> FlashInputs:
        batch, q_heads, head_dim = layer.q.shape
        (cartridge,) = layer.table.segments
        kv_heads = cartridge.kv_heads
        grouped = layer.q.view(batch, kv_heads, q_heads // kv_heads, head_dim)
        keys, values = cartridge.dense(layer.q.dtype)
        own = [x.dense(layer.q.dtype) for x in layer.own]
        return cls(
            cartridge_q=grouped.transpose(0, 1).reshape(1, kv_heads, -1, head_dim),
            cartridge_k=keys[None],
            cartridge_v=values[None],
            own_q=grouped,
            own_k=torch.stack([k for k, _ in own]),
            own_v=torch.stack([v for _, v in own]),
        )


def flash_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA on torch's flash-attention backend on CUDA (a mature kernel to hold ours against), default elsewhere."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def breakdown(
    shapes: Shapes, batch: int, device: torch.device, copy_gbps: float, apart: dict[str, str] | None
) -> Iterator[dict[str, Any]]:
    """Where the shared-cartridge step's time goes: the dispatched path over both the cartridge and the
    requests' own KV, then the same path (``path``) over the cartridge alone and over the own KV alone
    (default config, graph replay), each with its own bandwidth fraction; both again with the multi-launch
    path's launches side by side (the own walk, bound by bandwidth, may then overlap the cartridge walk, bound
    by latency: at batch 64 the two in a row cannot reach the target); each half on torch's flash attention
    (no LSE, no merge: a floor for what a mature kernel takes); and with the first warp-specialized swept
    config, the cartridge alone (the walk it is meant to speed up) and both side by side. Row by row, so a run
    cut short keeps the rows it measured."""
    case = cases(shapes)[0]
    kernel_bytes, _ = layer_bytes(shapes, case, batch, device)
    layers = [make_layer(shapes, case, batch, device) for _ in range(layers_fitting(kernel_bytes, shapes, device))]
    flash = [FlashInputs.of(layer) for layer in layers]
    own_layers = [Layer(x.q, SegmentTable([], [[]] * batch), x.own) for x in layers]
    cartridge_bytes = sum(map(stored_bytes, layers[0].table.segments))
    own_bytes = batch * stored_bytes(layers[0].own[0])
    cartridge_keys, own_keys = shapes.cartridge_len * case.cartridges, case.own_len
    fused = Forced(None).path(layers[0]) == "fused"  # the halves take the path the whole step takes
    both, cartridge = Forced(fused), Forced(fused, own=False)
    ours: dict[str, tuple[Callable[[Any], object], list[Any], int, int, str]] = {
        "cartridge+own": (both, layers, kernel_bytes, cartridge_keys + own_keys, both.path(layers[0])),
        "cartridge only": (cartridge, layers, cartridge_bytes, cartridge_keys, cartridge.path(layers[0])),
        "own only": (both, own_layers, own_bytes, own_keys, both.path(own_layers[0])),
    }
    # Torch's flash kernels may fail (a GPU they have no kernel for), and so may configs not yet run on a GPU
    # (timed only once they passed apart, see runs_apart): either costs its own row.
    others: dict[str, tuple[Callable[[Any], object], list[Any], int, int, str]] = {
        "cartridge only, torch flash SDPA": (lambda x: flash_sdpa(x.cartridge_q, x.cartridge_k, x.cartridge_v),
                                             flash, cartridge_bytes, cartridge_keys, "torch flash"),
        "own only, torch flash SDPA": (lambda x: flash_sdpa(x.own_q, x.own_k, x.own_v), flash, own_bytes, own_keys,
                                       "torch flash"),
    }  # fmt: skip
    by_side, specialized, specialized_by_side = breakdown_trials(shapes)
    right = correct_configs(layers[0], shapes, vetted(breakdown_trials(shapes), apart))
    experimental = {
        "cartridge+own, multi-launch side by side": (by_side, kernel_bytes, cartridge_keys + own_keys),
        "cartridge only, warp-specialized": (specialized, cartridge_bytes, cartridge_keys),
        "cartridge+own, warp-specialized side by side": (specialized_by_side, kernel_bytes,
                                                         cartridge_keys + own_keys),
    }  # fmt: skip
    for phase, (config, phase_bytes, keys) in experimental.items():
        if config in right:
            own = "cartridge+own" in phase
            trial = Forced(False, config, own)
            others[phase] = (trial, layers, phase_bytes, keys, trial.path(layers[0]))
    for phase, (run, inputs, phase_bytes, keys, path) in {**ours, **others}.items():
        try:
            ms, _ = time_per_step(run, inputs, shapes, device)
        except RuntimeError as error:
            raise_if_device_fault(error)
            if phase in ours:  # ours must not fail
                raise
            print(f"breakdown {phase}: {error}", file=sys.stderr)
            continue
        row = {"phase": phase, "batch": batch, "path": path, "kernel_ms": ms,
               "bandwidth_fraction": phase_bytes * shapes.layers / (ms * 1e-3) / 1e9 / copy_gbps,
               "tflops": attention_flops(shapes, batch, keys) / (ms * 1e-3) / 1e12}  # fmt: skip
        print(f"breakdown {row}", flush=True)
        yield row


def kernel_profile(shapes: Shapes, batch: int, device: torch.device) -> list[dict[str, Any]]:
    """Device time per kernel of one eagerly launched shared-cartridge step, fused and multi-launch paths
    (torch.profiler): what each launch costs, and by difference with the graph replay, the gaps between them.
    Empty without CUDA."""
    if device.type != "cuda":
        return []
    try:
        return _profile_paths(shapes, batch, device)
    except RuntimeError as error:  # a profiler the machine refuses must not cost the sweep after it
        raise_if_device_fault(error)
        print(f"kernel profile at batch {batch}: {error}", file=sys.stderr)
        return []


def _profile_paths(shapes: Shapes, batch: int, device: torch.device) -> list[dict[str, Any]]:
    case = cases(shapes)[0]
    kernel_bytes, _ = layer_bytes(shapes, case, batch, device)
    layers = [make_layer(shapes, case, batch, device) for _ in range(layers_fitting(kernel_bytes, shapes, device))]
    rows = []
    for path, fused in (("fused", True), ("multi-launch", False)):
        for layer in layers:  # warm-up: compile, fill the plan caches
            Forced(fused)(layer)
        sync(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for layer in layers:
                Forced(fused)(layer)
            sync(device)
        for event in prof.key_averages():
            device_us = float(getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0))
            if device_us > 0:
                per_layer = {"calls_per_layer": event.count / len(layers), "us_per_layer": device_us / len(layers)}
                rows.append({"path": path, "batch": batch, "kernel": event.key[:80], **per_layer})
                print(f"profile {rows[-1]}", flush=True)
    return rows


COLUMNS = (("kernel_ms", "kernel ms", 3), ("kernel_eager_ms", "eager ms", 3), ("fused_ms", "fused ms", 3),
           ("multi_launch_ms", "multi ms", 3),
           ("reference_ms", "sdpa ms", 3), ("per_request_ms", "per-req ms", 3),
           ("bandwidth_fraction", "bw frac", 2))  # fmt: skip


def print_row(row: dict[str, Any] | None) -> None:
    """One table line (the header for None), printed as soon as the row is measured."""
    if row is None:
        print(f"{'case':<22}{'batch':>6}" + "".join(f"{title:>11}" for _, title, _ in COLUMNS), flush=True)
        return
    cells = ["-".rjust(11) if row[key] is None else f"{row[key]:11.{digits}f}" for key, _, digits in COLUMNS]
    print(f"{row['case']:<22}{row['batch']:>6}" + "".join(cells), flush=True)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Kernel vs SDPA time per case against batch size; skipped (False) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == name]
        for key, style in (("kernel_ms", "-o"), ("reference_ms", "--x")):
            points = [(r["batch"], r[key]) for r in mine if r[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{name} {key.removesuffix('_ms')}")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per step (all layers)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for kernels-gpu.json / .png")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument(
        "--one-step", type=int, metavar="BATCH", help="only launch one layer's shared-cartridge step at BATCH on "
        "each path, fused then multi-launch (what bench/ncu_gpu.sh profiles), and exit"
    )  # fmt: skip
    parser.add_argument("--probe", metavar="CONFIG_JSON", help="only check one KernelConfig (what the sweep runs "
                        "apart for never-run configs) and exit 0 if it decodes right")  # fmt: skip
    args = parser.parse_args(argv)
    if args.one_step is not None and args.one_step < 1:
        parser.error("--one-step: the batch must be at least 1")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels first import triton
        device, shapes = torch.device("cpu"), SMOKE
    elif torch.cuda.is_available():
        device, shapes = torch.device("cuda"), FULL
    else:
        print("no CUDA device; use --smoke to check the script on CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.probe:
        return probe(KernelConfig(**json.loads(args.probe)), shapes, device)
    if args.one_step is not None:
        layer = make_layer(shapes, cases(shapes)[0], args.one_step, device)
        for fused in (True, False):
            Forced(fused)(layer)
        sync(device)
        return 0
    failures = check_correctness(shapes, device)
    if failures:
        print("correctness check failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    copy_gbps = copy_bandwidth_gbps(shapes, device)
    peak_tflops = matmul_tflops(shapes, device)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "versions": {"torch": torch.__version__, "triton": importlib.metadata.version("triton")},
        "copy_bandwidth_gbps": copy_gbps,
        "matmul_tflops": peak_tflops,
        "timing": "kernel_ms (what decode_attention dispatches to), fused_ms (the fused decode kernel), "
        "multi_launch_ms (the multi-launch path), per_request_ms and reference_ms: median CUDA-graph replay of a "
        "step over all layers; kernel_eager_ms: the dispatched step launched eagerly from Python. Medians of "
        f"{shapes.iters} timed runs, of fewer (at least {MIN_ITERS}) where they would take over "
        f"{MEASURE_BUDGET_MS / 1e3:g} s. bytes_per_step: what a step must read (each cartridge once, each "
        "request's own KV)",
        "shapes": {k: str(v) for k, v in asdict(shapes).items()},
        "rows": [],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"copy bandwidth {copy_gbps:.0f} GB/s, matmul {peak_tflops:.0f} TFLOP/s on {result['device']}")
    results = args.out / "kernels-gpu.json"
    try:
        measure_all(result, shapes, device, copy_gbps, lambda: write_json(results, result))
    except RuntimeError as fault:
        if not is_device_fault(fault):
            raise
        result["device_fault"] = str(fault)
        write_json(results, result)
        print(f"DEVICE FAULT, run stopped (every later launch of this process would fail): {fault}", file=sys.stderr)
        return 1
    plotted = plot(result["rows"], args.out / "kernels-gpu.png")
    print(f"wrote {results}" + (" and kernels-gpu.png" if plotted else ""))
    return 0


def measure_all(
    result: dict[str, Any], shapes: Shapes, device: torch.device, copy_gbps: float, save: Callable[[], None]
) -> None:
    """Every table into ``result``, calling ``save`` after each row, newest information first so that a run
    its time limit cuts short keeps what matters: the cartridge cases, own_lengths, the checks apart of the
    never-run configs (``probes``), the breakdown and kernel profile at each target batch, the sweep, and the
    in-context-learning rows (unchanged since the first H200 run) last.

    Estimated on an H200 from the host cost of one eager 32-layer step (93 / 40 / 34 / 74 ms dispatched /
    fused / multi-launch / per-request at batch 64, 178 / 193 / 152 / 279 ms at 256; a capture costs about
    as much again) and the device times of the last run: correctness check ~30 s (compiles), copy and matmul
    ~2 s, cartridge rows ~70 s (27 rows, mostly kernel_eager_ms' medians: up to 23 eager steps each),
    own_lengths ~10 s, probes ~30 s (75 s if a child hangs), breakdowns ~15 s, profiles ~5 s, sweep ~100 s
    (14 configs x 6 splits x 2 batches at ~0.25 s / ~0.5 s a point, plus compiles), ICL rows ~90 s (the
    100k-token ones at batch 128-256 take ~15 s each): ~350 s of bench/gpu.sh's 390 s, the ICL rows the
    ones a slow run loses."""
    focus = target_batches(shapes, device)

    def keep(key: str, row: dict[str, Any]) -> None:
        result.setdefault(key, []).append(row)
        save()

    print_row(None)
    for case in (c for c in cases(shapes) if c.cartridges):
        for batch in shapes.batches:
            keep("rows", measure(shapes, case, batch, device, copy_gbps))
            print_row(result["rows"][-1])
    result["own_lengths"] = []  # how the shared-cartridge step's bandwidth fraction moves with the own KV
    for own_len in shapes.other_own_lens:
        case = Case(f"shared-1x{shapes.cartridge_len}-own{own_len}", 1, own_len)
        keep("own_lengths", measure(shapes, case, focus[0], device, copy_gbps))
        print_row(result["own_lengths"][-1])
    never = [c for c in (*breakdown_trials(shapes), *swept_configs(shapes)) if never_run(c)]
    result["probes"] = runs_apart(never, shapes) if device.type == "cuda" else None  # interpreted: no faults
    save()
    result["breakdown"], result["kernel_profile"] = [], []
    for batch in focus:
        for row in breakdown(shapes, batch, device, copy_gbps, result["probes"]):
            keep("breakdown", row)
        result["kernel_profile"] += kernel_profile(shapes, batch, device)
        save()
    if device.type == "cuda":
        result["sweep"] = []
        for row in (row for batch in focus for row in sweep(shapes, batch, device, copy_gbps, result["probes"])):
            keep("sweep", row)
    for case in (c for c in cases(shapes) if not c.cartridges):
        for batch in shapes.batches:
            keep("rows", measure(shapes, case, batch, device, copy_gbps))
            print_row(result["rows"][-1])


if __name__ == "__main__":
    sys.exit(main())
