"""The GPU benchmark script, run end to end in its tiny CPU smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_writes_results(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels_gpu.py"), "--smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "kernels-gpu.json").read_text())
    assert {"device", "copy_bandwidth_gbps", "rows", "command"} <= result.keys()
    assert "--smoke" in result["command"]
    assert result["copy_bandwidth_gbps"] > 0
    cases = {row["case"] for row in result["rows"]}
    assert cases == {"shared-1x40", "shared-1x40-int8", "composed-2x40", "icl-64"}
    for row in result["rows"]:
        assert row["kernel_ms"] > 0 and row["reference_ms"] > 0 and row["bandwidth_fraction"] > 0
        assert row["fused_ms"] > 0 and row["multi_launch_ms"] > 0  # both paths the dispatcher chooses from
        assert (row["per_request_ms"] is None) == row["case"].startswith("icl")
    assert "shared-1x40" in proc.stdout
