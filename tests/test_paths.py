"""The cache's fill_once: a fill killed half-way leaves nothing behind once the next fill has run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cartridges.paths import fill_once

# Fills its target slowly: writes part of it, says where, then waits to be killed.
KILLED_FILL = """
import sys, time
from pathlib import Path
from cartridges.paths import fill_once

def fill(staged: Path) -> None:
    staged.mkdir()
    (staged / "part").write_bytes(b"x" * 1024)
    print(staged, flush=True)
    time.sleep(600)

fill_once(Path(sys.argv[1]), fill)
"""


def test_a_fill_killed_half_way_leaves_nothing_once_the_next_fill_has_run(tmp_path: Path) -> None:
    target = tmp_path / "model-v1.2"
    neighbour = tmp_path / ".model-v1.2.x.abcd1234"  # a staging directory of another target, model-v1.2.x
    neighbour.mkdir()
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_FILL, str(target)], stdout=subprocess.PIPE, text=True
    ) as killed:
        assert killed.stdout is not None
        staged = Path(killed.stdout.readline().strip())
        os.kill(killed.pid, signal.SIGKILL)
    assert staged.parent.is_dir()  # what the reviewer found: the dead fill's directory stays

    fill_once(target, lambda path: path.write_text("whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f".{target.name}.lock", neighbour.name])
    assert target.read_text() == "whole"
