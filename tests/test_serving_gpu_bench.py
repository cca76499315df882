"""bench/serving_gpu.py (the serving runner on a GPU) in its CPU smoke mode: the script a GPU run depends on
still runs, its correctness check against transformers passes, and it writes its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
