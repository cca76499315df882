"""bench/decode_host.py end to end at tiny batches: rows per label, earlier labels kept, a plot beside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(out: Path, label: str, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in (".", "serving-image", "kernels"))}
    script = [sys.executable, str(ROOT / "bench" / "decode_host.py")]
    proc = subprocess.run(
        [*script, "--label", label, "--out", str(out), "--batches", "1", "3", "--steps", "2", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_each_label_keeps_its_rows_and_the_plot_shows_them(tmp_path: Path) -> None:
    out = tmp_path / "decode-host.json"
    run_bench(out, "first")
    run_bench(out, "graphs", "--graphs")
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["first", "graphs"]
    for run in runs.values():
        assert [row["batch"] for row in run["rows"]] == [1, 3]
        assert all(row["host_ms_per_step"] > 0 for row in run["rows"])
        assert run["commit"] and "--label" in run["command"]
    assert all(row["ops_per_step"] > 16 * 10 for row in runs["first"]["rows"])  # 16 layers
    assert all(row["ops_per_step"] < 16 for row in runs["graphs"]["rows"])  # tables and two copies, no layer
    for eager, replay in zip(runs["first"]["rows"], runs["graphs"]["rows"], strict=True):
        assert 0 < 4 * replay["python_calls_per_step"] < eager["python_calls_per_step"]  # no layer's Python
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("option", [["--steps", "0"], ["--batches", "1", "0"]])
def test_counts_below_one_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, option: list[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import decode_host

    out = tmp_path / "decode-host.json"
    with pytest.raises(SystemExit) as exit_:
        decode_host.main(["--label", "x", "--out", str(out), *option])
    assert exit_.value.code == 2 and option[0] in capsys.readouterr().err
    assert not out.exists()
