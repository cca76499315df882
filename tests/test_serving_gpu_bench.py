"""bench/serving_gpu.py (the serving runner on a GPU) in its CPU smoke mode: the script a GPU run depends on
still runs, its correctness check against transformers passes, and it writes its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _graph_replay import emulated_capture

from cartridges_kernels import BACKEND_ENV

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_checks_the_runner_and_writes_rows(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in (".", "serving-image", "kernels"))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serving_gpu.py"), "--smoke", "--steps", "2", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "serving-gpu.json").read_text())
    assert result["correctness"]["ok"] and result["correctness"]["max_abs_logit_error"] < 1e-3
    assert [(row["method"], row["batch"]) for row in result["rows"]] == [
        ("cartridge", 1), ("icl", 1), ("cartridge", 2), ("icl", 2)
    ]  # fmt: skip
    assert all(row["decode_tokens_per_s"] > 0 for row in result["rows"])


def test_the_cuda_graph_check_passes_on_emulated_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_graphs, which a GPU run depends on, over the CPU emulation of graphs with the kernels interpreted."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import serving_gpu

    monkeypatch.setattr(serving_gpu, "DEVICE", "cpu")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    result = serving_gpu.check_graphs(emulated_capture(monkeypatch), long_prompt=24)
    assert result is not None and result["ok"], result
    assert result["captures"] >= 1 and result["replays"] >= 8
