"""The service binaries' cache: fills that race or fail never leave a broken or missing binary behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cartridges.paths import cache_dir
from cartridges_e2e import binaries

STEPS: dict[str, Callable[[], object]] = {
    "minio": binaries.minio,
    "helm": binaries.helm,
    "control plane": binaries.control_plane,
}


class FakeGo:
    """Stands in for ``go install`` (into ``$GOBIN``) and ``go build -o dir/``: slow, and writes the binaries last,
    like the real toolchain; ``fail`` makes it write part of the output and then fail."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.builds = 0

    def __call__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.builds += 1
        time.sleep(0.3)
        if args[0] == "install":
            out, packages = Path(env["GOBIN"]), [args[-1].split("@")[0]]
        else:
            out, packages = Path(args[args.index("-o") + 1]), args[args.index("-o") + 2 :]
        out.mkdir(parents=True, exist_ok=True)
        for package in packages:
            (out / package.rsplit("/", 1)[-1]).write_text("#!/bin/sh\n")
            if self.fail:
                raise binaries.BuildError("killed half-way")


def binary_paths(result: object) -> list[Path]:
    found = result.values() if isinstance(result, dict) else [result]
    return [binary.path for binary in found if isinstance(binary, binaries.Binary)]


@pytest.fixture
def fake_go(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeGo:
    """A fresh cache directory (never the shared one) and a fake Go toolchain."""
    monkeypatch.setenv("CARTRIDGES_CACHE", str(tmp_path / "cache"))
    go = FakeGo()
    monkeypatch.setattr(binaries, "_run_go", go)
    return go


@pytest.mark.parametrize("step", STEPS)
def test_concurrent_fills_build_once_and_both_find_the_binaries(fake_go: FakeGo, step: str) -> None:
    results: list[object] = []
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            results.append(STEPS[step]())
        except BaseException as err:  # reported below, with the other thread's outcome
            errors.append(err)

    threads = [threading.Thread(target=fill) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # the second starts while the first builds
    for thread in threads:
        thread.join()

    assert errors == []
    assert fake_go.builds == 1
    assert binary_paths(results[0]) == binary_paths(results[1])
    assert all(path.is_file() for path in binary_paths(results[0]))


@pytest.mark.parametrize("step", STEPS)
def test_a_failed_fill_leaves_no_partial_binary_and_the_next_one_builds(fake_go: FakeGo, step: str) -> None:
    fake_go.fail = True
    with pytest.raises(binaries.BuildError):
        STEPS[step]()
    assert [p.name for p in (cache_dir() / "bin").iterdir() if not p.name.endswith(".lock")] == []

    fake_go.fail = False
    assert all(path.is_file() for path in binary_paths(STEPS[step]()))


def test_the_control_plane_without_its_go_module_says_so(fake_go: FakeGo, monkeypatch: pytest.MonkeyPatch) -> None:
    """As when cartridges_e2e was installed from a wheel, which does not carry e2e/cluster."""
    monkeypatch.setattr(binaries, "CLUSTER_MODULE_DIR", cache_dir() / "no-checkout" / "cluster")
    with pytest.raises(binaries.BuildError, match="Go module in .*/no-checkout/cluster, which is missing"):
        binaries.control_plane()
    assert fake_go.builds == 0
