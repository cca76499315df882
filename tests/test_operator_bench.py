"""bench/operator_apply.py leaves nothing running when a step after the operator's start fails."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from _processes import assert_none_left

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cluster


def test_a_failure_after_the_operator_started_stops_it_and_the_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import operator_apply

    def corpus_never_ready(what: str, *args: object) -> None:
        raise AssertionError(f"timed out waiting for {what}")

    monkeypatch.setattr(operator_apply, "wait_for", corpus_never_ready)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the benchmark's work directory lands here
    monkeypatch.setattr(sys, "argv", ["operator_apply.py", "--cartridges", "1", "--out", str(tmp_path / "out.json")])

    with pytest.raises(AssertionError, match="corpus ready"):
        operator_apply.main()

    assert_none_left(tmp_path)
    assert not (tmp_path / "out.json").exists()


def test_no_cartridges_is_refused_before_a_cluster_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zero Cartridges would wait the watch's full 10 minutes for Jobs that never come, then fail on no data."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import operator_apply

    def no_cluster(workdir: Path) -> None:
        raise AssertionError("started a cluster")

    monkeypatch.setattr(operator_apply, "start_cluster", no_cluster)
    monkeypatch.setattr(sys, "argv", ["operator_apply.py", "--cartridges", "0"])
    with pytest.raises(SystemExit) as exit_:
        operator_apply.main()
    assert exit_.value.code == 2 and "--cartridges" in capsys.readouterr().err
