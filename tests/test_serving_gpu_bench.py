"""bench/serving_gpu.py (the serving runner on a GPU) in its CPU smoke mode: the script a GPU run depends on
still runs, its correctness check against transformers passes, and it writes its rows and their plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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
    assert (tmp_path / "serving-gpu.png").stat().st_size > 0


def bench_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/serving_gpu.py imported here, its DEVICE restored afterwards (``--smoke`` sets it to the CPU)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import serving_gpu

    monkeypatch.setattr(serving_gpu, "DEVICE", serving_gpu.DEVICE)
    return serving_gpu


def main_with_a_failed(check: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """serving_gpu.main's exit code for a one-step smoke run into ``out`` whose ``check`` (check_correctness or
    check_graphs) finds the logits off by 3.5."""
    serving_gpu = bench_module(monkeypatch)
    monkeypatch.setattr(serving_gpu, check, lambda: {"max_abs_logit_error": 3.5, "ok": False})
    return serving_gpu.main(["--smoke", "--steps", "1", "--out", str(out)])


def test_a_failed_correctness_check_exits_non_zero_with_a_message_and_writes_no_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_with_a_failed("check_correctness", tmp_path, monkeypatch) != 0

    assert "failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_graph_check_still_times_the_eager_rows_then_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GPU run is one shot: replayed steps that decode wrong cost the graph rows, not the eager ones."""
    assert main_with_a_failed("check_graphs", tmp_path, monkeypatch) != 0

    assert "CUDA graph check failed" in capsys.readouterr().err
    result = json.loads((tmp_path / "serving-gpu.json").read_text())
    assert result["cuda_graphs_check"]["ok"] is False
    assert [(row["method"], row["cuda_graphs"]) for row in result["rows"]] == [("cartridge", False), ("icl", False)] * 2


@pytest.mark.parametrize("steps", ["0", "-3", "two"])
def test_a_step_count_that_is_not_positive_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], steps: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_module(monkeypatch).main(["--smoke", "--steps", steps, "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--steps" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # -3 steps wrote rows of negative tokens/s


def test_the_cuda_graph_check_passes_on_emulated_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_graphs, which a GPU run depends on, over the CPU emulation of graphs with the kernels interpreted."""
    serving_gpu = bench_module(monkeypatch)
    monkeypatch.setattr(serving_gpu, "DEVICE", "cpu")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    result = serving_gpu.check_graphs(emulated_capture(monkeypatch), long_prompt=24)
    assert result is not None and result["ok"], result
    assert result["captures"] >= 1 and result["replays"] >= 8
