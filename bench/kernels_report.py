"""Markdown summary of a kernels-gpu.json (bench/kernels_gpu.py): the issue's two targets, then every table.

    python bench/kernels_report.py [bench/results/kernels-gpu.json]

What a GPU session pastes into kernels/README.md and its note, computed rather than copied by hand. Fields a
results file predates (older runs lack fused_ms, own_lengths, kernel_profile, path) print as "-" or are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "kernels-gpu.json"
BANDWIDTH_TARGET = 0.70  # of copy bandwidth, one shared 2048-token cartridge at batch 64
SPEEDUP_TARGET = 2.0  # over per-request reads at batch 256
STEP_COLUMNS = ("kernel_ms", "fused_ms", "multi_launch_ms", "reference_ms", "per_request_ms", "bandwidth_fraction")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def find(rows: list[dict[str, Any]], case: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["case"] == case and r["batch"] == batch), None)


def targets(result: dict[str, Any]) -> list[str]:
    """The two targets of the kernels issue, each with its measured value and whether it is met."""
    shared = (r["case"] for r in result["rows"] if r["case"].startswith("shared-1x") and "int8" not in r["case"])
    case = next(shared, None)
    if case is None:
        return []
    lines = []
    at_64, at_256 = find(result["rows"], case, 64), find(result["rows"], case, 256)
    if at_64 and at_64.get("bandwidth_fraction") is not None:
        fraction = at_64["bandwidth_fraction"]
        met = "met" if fraction >= BANDWIDTH_TARGET else "not met"
        lines.append(f"- {case}, batch 64: {fraction:.2f} of copy bandwidth (target {BANDWIDTH_TARGET}: {met})")
    if at_256 and at_256.get("per_request_ms") and at_256.get("kernel_ms"):
        speedup = at_256["per_request_ms"] / at_256["kernel_ms"]
        met = "met" if speedup >= SPEEDUP_TARGET else "not met"
        lines.append(
            f"- {case}, batch 256: {speedup:.1f}x faster than per-request reads (target {SPEEDUP_TARGET}x: {met})"
        )
    return lines


def report(result: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
    peak = result.get("matmul_tflops")
    lines = [
        f"{result['device']} ({versions}); copy bandwidth {result['copy_bandwidth_gbps']:.0f} GB/s"
        + (f", dense matmul {peak:.0f} TFLOP/s" if peak else ""),
        "",
    ]
    lines += [*targets(result), "", "ms per decode step over all layers (CUDA-graph replay):", ""]
    step_rows = [*result["rows"], *result.get("own_lengths", [])]
    lines += table(
        ["case", "batch", *STEP_COLUMNS], ([r["case"], r["batch"], *map(r.get, STEP_COLUMNS)] for r in step_rows)
    )
    if result.get("breakdown"):
        lines += ["", "Breakdown of the shared-cartridge step:", ""]
        lines += table(
            ["phase", "batch", "path", "ms", "bandwidth_fraction", "TFLOP/s", "matmul_fraction"],
            (
                [r["phase"], r["batch"], r.get("path"), r["kernel_ms"], r["bandwidth_fraction"], r.get("tflops"),
                 r["tflops"] / peak if peak and r.get("tflops") else None]
                for r in result["breakdown"]
            ),
        )  # fmt: skip
    if result.get("kernel_profile"):
        lines += ["", "Device time per kernel and layer (one eager step, torch.profiler):", ""]
        lines += table(
            ["path", "batch", "kernel", "calls/layer", "us/layer"],
            (
                [r["path"], r["batch"], r["kernel"], r["calls_per_layer"], r["us_per_layer"]]
                for r in result["kernel_profile"]
            ),
        )
    if result.get("sweep"):
        lines += ["", "Fastest tile configs per batch (sweep):", ""]
        best = []
        for batch in sorted({r["batch"] for r in result["sweep"]}):
            best += sorted((r for r in result["sweep"] if r["batch"] == batch), key=lambda r: r["kernel_ms"])[:5]
        keys = [
            "batch",
            "path",
            "block_m",
            "block_n",
            "num_warps",
            "num_stages",
            "own_block_n",
            "tma",
            "warp_specialize",
            "side_by_side",
            "num_splits",
            "kernel_ms",
        ]
        lines += table(keys, (["auto" if k in r and r[k] is None else r.get(k) for k in keys] for r in best))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="?", default=RESULTS, help="a kernels-gpu.json")
    args = parser.parse_args(argv)
    sys.stdout.write(report(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
