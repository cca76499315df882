"""crds/ and the chart's files/crds/ hold exactly what cartridges/api.py generates (no hand edits, no drift)."""

from __future__ import annotations

from pathlib import Path

from cartridges import crd


def test_generated_crds_match_the_committed_files(tmp_path: Path) -> None:
    assert crd.main(["--check"]) == 0, "crds/ is stale: run `python -m cartridges.crd`"
    crd.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in crd.CRD_DIR.glob("*.yaml"))


def test_drift_is_detected(tmp_path: Path) -> None:
    crd.main(["--out", str(tmp_path)])
    stale = next(tmp_path.iterdir())
    stale.write_text(stale.read_text().replace("minimum: 16", "minimum: 8"))
    assert crd.main(["--check", "--out", str(tmp_path)]) == 1
