"""bench/serving.py's command line: bad counts are refused before the model loads or a results file is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("option", [["--batches", "4", "0"], ["--max-tokens", "-1"], ["--load-concurrency", "x"]])
def test_counts_below_one_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, option: list[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import serving

    with pytest.raises(SystemExit) as exit_:
        serving.main(["--out", str(tmp_path), *option])
    assert exit_.value.code == 2 and option[0] in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
