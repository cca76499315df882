"""bench/quality.py's command line, without the hours of training behind it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_makes_no_temporary_directory(tmp_path: Path) -> None:
    """The default --workdir was made (and left behind) when the parser was built: by --help, and by every run
    that names its own --workdir."""
    paths = (".", "operator", "trainer-image", "serving-image", "kernels", "e2e")
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in paths)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--help"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--workdir" in proc.stdout, proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("quality-store-")] == []
