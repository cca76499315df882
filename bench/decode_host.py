"""Host time of a serving decode step: what the runner's Python costs per step on the kernel path.

On an H200 the kernels of a batch-64 decode step with a shared 2048-token cartridge take about 1.3 ms for 32
layers (bench/results/kernels-gpu.json), while the serving runner took 77 ms a step (bench/results/serving-gpu.json):
decode there is bound by the host, which a faster GPU does not help. This runs ``LlamaRunner.step`` with the
Triton dispatcher on and its three kernels replaced by no-ops, so what it times is the host's part of a step,
on any machine: a random model with Llama-3.2-1B's layer and head counts (16 layers, 32 query and 8 KV heads)
cut to tiny widths (hidden 256, head_dim 8: the host work is per op and per request, not per byte), float32
on the CPU, every request reading one shared 2048-token cartridge after an 8-token prompt. Each ``--label`` (a
code version) keeps its rows in ``bench/results/decode-host.json``, with a plot beside it. Timings on a busy
2-core machine vary by a few ms a step (each row has the median and the fastest step); compare labels at
batch 32 and above. Each row also counts the step's ops: every aten op that is not a view, plus every kernel
launch, is a launch on a GPU (or a copy to it), so the count is what a GPU host pays per step, on any machine;
and so does its count of Python function calls (``python_calls_per_step``), the interpreter's share.

With ``--graphs`` every decode step goes through ``DecodeGraphs`` with a replay that costs nothing: what remains
is the host part of a replayed step (its index tensor and own-KV tables made and copied), to which a GPU adds one
graph launch.

    python bench/decode_host.py --label pooled-own-kv
    python bench/decode_host.py --label cuda-graphs-host-part --graphs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import serving_gpu
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from cartridges_kernels import BACKEND_ENV, fused_kernel, merge_kernel, segment_kernel
from cartridges_serving.graphs import DecodeGraphs, Replay
from cartridges_serving.runner import BatchItem, LlamaRunner

RESULTS = Path(__file__).resolve().parent / "results" / "decode-host.json"
BATCHES = (1, 8, 32, 64, 128, 256)
CARTRIDGE_TOKENS = 2048
PROMPT_TOKENS = 8


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing but count the launch."""

    launches = 0

    def __getitem__(self, grid: object) -> Any:
        def launch(*args: object, **kwargs: object) -> None:
            _NoLaunch.launches += 1

        return launch


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that would launch work on a GPU: all but views and allocations."""

    FREE = frozenset({"empty", "empty_strided", "detach", "detach_", "lift_fresh", "alias"})

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += not func.is_view and func.__name__.split(".")[0] not in self.FREE
        return func(*args, **(kwargs or {}))


def without_kernels() -> None:
    """The Triton path with every launch a no-op: the dispatcher, planners and launchers still run."""
    os.environ[BACKEND_ENV] = "triton"
    fused_kernel._fused_decode_kernel = _NoLaunch()
    segment_kernel._segment_partials_kernel = _NoLaunch()
    merge_kernel._merge_kernel = _NoLaunch()


def host_replays(step: Callable[[], Tensor]) -> tuple[Tensor, Replay]:
    """A capture whose replay costs the host nothing: what is left of a decode step replayed from a CUDA graph
    is its host part (the step's index tensor and own-KV tables, made and copied), plus one graph launch."""
    out = step()
    return out, lambda: out


def python_calls(work: Callable[[], object]) -> int:
    """Python function calls ``work`` makes: the host's interpreter work, counted the same on any machine
    (timings on a busy 2-core VM move by more than a small change saves)."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


def decode_host_ms(runner: LlamaRunner, batch: int, steps: int, graphs: bool) -> tuple[list[float], int, int]:
    """Wall time of each of ``steps`` decode steps for ``batch`` requests sharing one cartridge, then the ops
    and the Python calls of one more step each (counted apart: counting slows a step). ``graphs``: each step
    through DecodeGraphs."""
    step = DecodeGraphs(runner, host_replays, verify=False).step if graphs else runner.step  # no-op kernels
    cartridge = serving_gpu.random_cartridge(runner, CARTRIDGE_TOKENS)
    items = [
        BatchItem([1 + i for i in range(PROMPT_TOKENS)], CARTRIDGE_TOKENS, [cartridge], runner.new_own_kv(64 + steps))
        for _ in range(batch)
    ]
    step(items)  # prefill
    times = []
    for index in range(steps + 2):
        _next_token(items)
        started = time.perf_counter()
        step(items)
        if index >= 2:  # the first decode step plans a new structure, the second captures a graph
            times.append((time.perf_counter() - started) * 1e3)
    _next_token(items)
    launches, counter = _NoLaunch.launches, _CountOps()
    with counter:
        step(items)
    _next_token(items)
    return times, counter.ops + _NoLaunch.launches - launches, python_calls(lambda: step(items))


def _next_token(items: list[BatchItem]) -> None:
    for item in items:
        item.start_position += len(item.token_ids)
        item.token_ids = [1]


def measure(label: str, batches: tuple[int, ...], steps: int, graphs: bool) -> list[dict[str, Any]]:
    without_kernels()
    serving_gpu.DEVICE = "cpu"
    runner = LlamaRunner(serving_gpu.random_llama(256, 16, 32, 8, 64, torch.float32))
    rows = []
    print(f"{'label':<24}{'batch':>6}{'host ms/step':>14}{'us/layer':>10}{'fastest':>10}{'ops/step':>10}"
          f"{'calls/step':>12}", flush=True)  # fmt: skip
    for batch in batches:
        times, ops, calls = decode_host_ms(runner, batch, steps, graphs)
        ms, fastest = statistics.median(times), min(times)
        rows.append({"label": label, "batch": batch, "host_ms_per_step": ms, "host_us_per_layer": ms * 1e3 / 16,
                     "fastest_host_ms_per_step": fastest, "ops_per_step": ops,
                     "python_calls_per_step": calls})  # fmt: skip
        print(f"{label:<24}{batch:>6}{ms:>14.2f}{ms * 1e3 / 16:>10.0f}{fastest:>10.2f}{ops:>10}{calls:>12}",
              flush=True)  # fmt: skip
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (host, ops, calls) = plt.subplots(1, 3, figsize=(16, 4))
    for index, label in enumerate(dict.fromkeys(row["label"] for row in rows)):
        mine, style = (
            [row for row in rows if row["label"] == label],
            {"marker": "o", "label": label, "color": f"C{index}"},
        )
        host.plot([r["batch"] for r in mine], [r["host_ms_per_step"] for r in mine], **style)
        for ax, key in ((ops, "ops_per_step"), (calls, "python_calls_per_step")):
            counted = [r for r in mine if key in r]  # rows measured before a count existed have none
            if counted:
                ax.plot([r["batch"] for r in counted], [r[key] for r in counted], **style)
    host.set_ylabel("host ms per 16-layer step (kernels not run)")
    host.set_title("Serving runner: host time of a decode step")
    ops.set_ylabel("ops per step (launches on a GPU)")
    ops.set_title("Ops per 16-layer decode step")
    calls.set_ylabel("Python function calls per step")
    calls.set_title("Interpreter work per decode step")
    for ax in (ops, calls):
        ax.set_ylim(bottom=0)
    for ax in (host, ops, calls):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in the decode step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="names this code version's rows (replaces earlier ones)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--steps", type=serving_gpu.positive_int, default=30)
    parser.add_argument("--batches", type=serving_gpu.positive_int, nargs="+", default=list(BATCHES))
    parser.add_argument("--graphs", action="store_true", help="decode steps as replays of captured graphs")
    args = parser.parse_args(argv)
    rows = measure(args.label, tuple(args.batches), args.steps, args.graphs)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    result["runs"][args.label] = {
        "commit": _commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot([row for run in result["runs"].values() for row in run["rows"]], args.out.with_suffix(".png"))
    return 0


def _commit() -> str:
    """The commit of the code that ran (``dirty`` appended when the tree has changes)."""
    here = Path(__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
    dirty = subprocess.run(  # results written by earlier runs do not make the code dirty
        ["git", "status", "--porcelain", "--", ":/", ":(top,exclude)bench/results"],
        cwd=here,
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
