"""``.ci/run``, the CI entry point, run with stand-ins for the system tools and ``make`` it calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CI_RUN = Path(__file__).parent.parent / ".ci" / "run"
LDCONFIG = (
    "#!/bin/sh\necho '\tlibpython3.11.so.1.0 (libc6,x86-64) => /usr/lib/libpython3.11.so.1.0'\nexec yes '\tlibx.so'\n"
)
"""A cache listing libpython first and much after it: ldconfig is still writing when ``grep -q`` has its match."""


def run_ci(tmp_path: Path, demo_exit: int = 0) -> tuple[int, list[str]]:
    """``.ci/run`` in a copy of its folder; its exit code and the commands the stand-ins saw (a store the demo was
    given is listed with whether it existed then)."""
    shutil.copytree(CI_RUN.parent, tmp_path / "repo" / ".ci")
    tools, seen = tmp_path / "bin", tmp_path / "seen"
    tools.mkdir()
    stand_ins = {
        "ldconfig": LDCONFIG,
        "apt-get": f'#!/bin/sh\necho "apt-get $*" >> {seen}\n',
        "go": "#!/bin/sh\n",
        "make": f'#!/bin/sh\necho "make $* ${{CARTRIDGES_STORE:-}}" >> {seen}\n'
        f'[ "$1" = demo-quick ] && exit {demo_exit}\nexit 0\n',
    }
    for name, script in stand_ins.items():
        (tools / name).write_text(script, encoding="utf-8")
        (tools / name).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmp")}
    code = subprocess.run(["bash", str(tmp_path / "repo" / ".ci" / "run")], env=env, capture_output=True).returncode
    return code, seen.read_text(encoding="utf-8").splitlines() if seen.exists() else []


def test_libpython_in_a_large_cache_installs_nothing(tmp_path: Path) -> None:
    """``ldconfig -p | grep -q`` under pipefail: ldconfig dies of SIGPIPE once grep found the library, and the
    pipeline failing read as the library missing."""
    code, seen = run_ci(tmp_path)
    assert code == 0 and not [command for command in seen if command.startswith("apt-get")], seen


def test_the_demos_store_is_removed_and_its_exit_code_kept(tmp_path: Path) -> None:
    for demo_exit in (0, 3):
        code, seen = run_ci(tmp_path / str(demo_exit), demo_exit)
        assert code == demo_exit
        assert seen[-1].startswith(f"make demo-quick file://{tmp_path / str(demo_exit) / 'tmp'}/"), seen
        assert list((tmp_path / str(demo_exit) / "tmp").iterdir()) == []
