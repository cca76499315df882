"""The GPU benchmark script, run end to end in its tiny CPU smoke mode."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """bench/kernels_gpu.py --smoke (CPU, Triton interpreter), asserting it exits 0."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels_gpu.py"), "--smoke", "--out", str(out), *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def bench_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/kernels_gpu.py imported in this process (kernels interpreted, as conftest sets up)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # its sibling modules, as when run as a script
    spec = importlib.util.spec_from_file_location("kernels_gpu", ROOT / "bench" / "kernels_gpu.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_bench_smoke_writes_results(tmp_path: Path) -> None:
    proc = run_smoke(tmp_path)
    result = json.loads((tmp_path / "kernels-gpu.json").read_text())
    assert {"device", "copy_bandwidth_gbps", "rows", "command"} <= result.keys()
    assert "--smoke" in result["command"]
    assert result["copy_bandwidth_gbps"] > 0 and result["matmul_tflops"] > 0
    cases = {row["case"] for row in result["rows"]}
    assert cases == {"shared-1x40", "shared-1x40-int8", "composed-2x40", "icl-64"}
    for row in result["rows"]:
        assert row["kernel_ms"] > 0 and row["reference_ms"] > 0 and row["bandwidth_fraction"] > 0
        assert row["fused_ms"] > 0 and row["multi_launch_ms"] > 0  # both paths the dispatcher chooses from
        assert (row["per_request_ms"] is None) == row["case"].startswith("icl")
    assert "shared-1x40" in proc.stdout
    phases = {row["phase"] for row in result["breakdown"] if row["kernel_ms"] > 0 and row["tflops"] > 0}
    assert phases == {"cartridge+own", "cartridge+own, multi-launch side by side", "cartridge only", "own only",
                      "cartridge only, torch flash SDPA", "own only, torch flash SDPA",
                      "cartridge only, warp-specialized", "cartridge+own, warp-specialized side by side"}  # fmt: skip
    assert result["kernel_profile"] == []  # CUDA only
    assert result["probes"] is None  # interpreted kernels cannot fault: nothing is checked apart
    paths = {row["phase"]: row["path"] for row in result["breakdown"]}
    assert paths["cartridge only"] == paths["own only"] == paths["cartridge+own"] == "fused"  # batch 3
    assert [(row["case"], row["batch"]) for row in result["own_lengths"]] == [("shared-1x40-own9", 3)]
    assert result["own_lengths"][0]["kernel_ms"] > 0


def test_report_states_the_targets(tmp_path: Path) -> None:
    """bench/kernels_report.py on the committed H200 results (older fields only) and on a fresh smoke run."""
    report = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels_report.py")], capture_output=True, text=True, check=True
    ).stdout
    assert "shared-1x2048, batch 64: 0.26 of copy bandwidth (target 0.7: not met)" in report
    assert "batch 256: 3.1x faster than per-request reads (target 2.0x: met)" in report
    assert "| shared-1x2048 | 64 | 1.294 | - | 1.224 |" in report  # this run predates fused_ms
    run_smoke(tmp_path)
    report = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels_report.py"), str(tmp_path / "kernels-gpu.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| shared-1x40-own9 | 3 |" in report and "cartridge only, torch flash SDPA" in report
    assert "TFLOP/s" in report and "dense matmul" in report


def test_one_step_only_launches(tmp_path: Path) -> None:
    """--one-step (what bench/ncu_gpu.sh profiles) launches one layer on both paths and writes nothing."""
    run_smoke(tmp_path, "--one-step", "3")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("batch", ["0", "-1"])
def test_one_step_refuses_a_batch_below_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, batch: str
) -> None:
    """Not a silent full run (--one-step 0 was falsy) that would overwrite the results it was not asked for."""
    with pytest.raises(SystemExit) as exit_:
        bench_module(monkeypatch).main(["--smoke", "--one-step", batch, "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--one-step" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_flash_baseline_computes_the_same_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """The breakdown's flash-SDPA rows time the same attention as the kernel's halves, not a cheaper one."""
    import torch

    from cartridges_kernels import SegmentTable, decode_attention

    bench = bench_module(monkeypatch)
    torch.manual_seed(0)
    shapes = bench.SMOKE
    layer = bench.make_layer(shapes, bench.cases(shapes)[0], 3, torch.device("cpu"))
    flash = bench.FlashInputs.of(layer)
    batch, q_heads, head_dim = layer.q.shape
    kv_heads = shapes.kv_heads
    cartridge = bench.flash_sdpa(flash.cartridge_q, flash.cartridge_k, flash.cartridge_v)
    cartridge = cartridge.view(kv_heads, batch, q_heads // kv_heads, head_dim).transpose(0, 1).reshape(layer.q.shape)
    want = decode_attention(layer.q, layer.table, None, backend="torch")
    torch.testing.assert_close(cartridge, want, atol=1e-5, rtol=0)
    own = bench.flash_sdpa(flash.own_q, flash.own_k, flash.own_v).reshape(layer.q.shape)
    want = decode_attention(layer.q, SegmentTable([], [[]] * batch), layer.own, backend="torch")
    torch.testing.assert_close(own, want, atol=1e-5, rtol=0)


def test_sweep_times_only_configs_that_compute_the_right_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """A swept config that raises on the device or disagrees with the reference is left out, not fatal."""
    import torch

    from cartridges_kernels import KernelConfig

    bench = bench_module(monkeypatch)
    torch.manual_seed(0)
    layer = bench.make_layer(bench.SMOKE, bench.cases(bench.SMOKE)[0], 3, torch.device("cpu"))
    good, wrong, failing = KernelConfig(16, 16), KernelConfig(32, 16), KernelConfig(16, 32, tma=True)
    decode = bench._decode_with

    def on_device(layer: object, config: KernelConfig, num_splits: int | None) -> torch.Tensor:
        if config == failing:
            raise RuntimeError("this lowering fails here")
        out = decode(layer, config, num_splits)
        return out + 0.1 if config == wrong else out

    monkeypatch.setattr(bench, "_decode_with", on_device)
    assert bench.correct_configs(layer, bench.SMOKE, [good, wrong, failing]) == [good]


def test_experimental_configs_are_checked_in_a_child_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """runs_apart: a config that decodes right passes; one that fails, or does not answer in time, is left
    out without touching this process."""
    from cartridges_kernels import KernelConfig

    bench = bench_module(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]))
    good, refused = KernelConfig(16, 16), KernelConfig(16, 8)  # block_n below a dot's 16: refused
    outcomes = bench.runs_apart([good, refused], bench.SMOKE)
    assert outcomes[str(good)] == "ok" and outcomes[str(refused)].startswith("failed")
    assert bench.runs_apart([good], bench.SMOKE, timeout_s=0.01) == {str(good): "no answer in 0.01 s"}


def test_every_config_no_gpu_has_run_is_timed_only_after_passing_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """TMA and side-by-side configs, not only warp-specialized ones, may fault the device: the sweep and the
    breakdown time them only once their child process passed."""
    bench = bench_module(monkeypatch)
    shapes = bench.SMOKE
    configs = [*bench.swept_configs(shapes), *bench.breakdown_trials(shapes)]
    never = [c for c in configs if bench.never_run(c)]
    assert {(c.tma, c.warp_specialize, c.side_by_side) for c in never} >= {
        (True, False, False), (False, False, True), (True, True, False), (True, True, True)
    }  # fmt: skip
    assert bench.vetted(configs, {}) == [c for c in configs if c not in never]
    outcomes = {str(c): "failed: illegal address" for c in never} | {str(never[0]): "ok"}
    assert bench.vetted(configs, outcomes) == [c for c in configs if c not in never or c == never[0]]


def test_each_phase_is_saved_and_a_device_fault_stops_the_run_on_record(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run cut short (its time limit, a fault) keeps every row measured before; a CUDA error, sticky for the
    rest of the process, stops it with the error in the results rather than empty tables that look fine."""
    bench = bench_module(monkeypatch)
    monkeypatch.setattr(bench, "check_correctness", lambda shapes, device: [])
    monkeypatch.setattr(bench, "copy_bandwidth_gbps", lambda shapes, device: 1.0)
    monkeypatch.setattr(bench, "matmul_tflops", lambda shapes, device: 1.0)
    measured = []

    def measure(shapes: object, case: Any, batch: int, device: object, copy_gbps: float) -> dict[str, object]:
        measured.append(case)
        return {"case": case.name, "batch": batch, **dict.fromkeys(key for key, _, _ in bench.COLUMNS)}

    def breakdown(*args: object) -> object:
        yield {"phase": "cartridge+own", "batch": 3}
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "breakdown", breakdown)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "kernels-gpu.json").read_text())
    assert "illegal memory access" in result["device_fault"]
    assert [row["case"] for row in result["rows"]] == ["shared-1x40", "shared-1x40-int8", "composed-2x40"]
    assert [row["case"] for row in result["own_lengths"]] == ["shared-1x40-own9"]
    assert result["breakdown"] == [{"phase": "cartridge+own", "batch": 3}]
    assert not any(case.name.startswith("icl") for case in measured)  # the unchanged baselines come last
    assert list(tmp_path.iterdir()) == [tmp_path / "kernels-gpu.json"]  # no temp file left behind


def test_rows_say_which_path_they_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the dispatcher takes the multi-launch path (one 2048-token cartridge from batch 64), the
    breakdown's halves take it too (not the fused kernel for the own KV alone), and a swept config that only
    the fused kernel reads (own_block_n) is timed on the fused kernel."""
    import torch

    import cartridges_kernels.dispatch as dispatch
    from cartridges_kernels import KernelConfig

    bench = bench_module(monkeypatch)
    monkeypatch.setattr(dispatch, "FUSED_DECODE_MAX_SHARED_ROWS", 1)
    torch.manual_seed(0)
    rows = list(bench.breakdown(bench.SMOKE, 3, torch.device("cpu"), 1.0, None))
    paths = {row["phase"]: row["path"] for row in rows}
    assert paths["cartridge+own"] == paths["cartridge only"] == paths["own only"] == "multi-launch"
    layer = bench.make_layer(bench.SMOKE, bench.cases(bench.SMOKE)[0], 3, torch.device("cpu"))
    own_block = KernelConfig(16, 16, own_block_n=16)
    assert bench.swept(own_block, None).path(layer) == "fused"
    assert bench.swept(KernelConfig(16, 16), None).path(layer) == "multi-launch"


def test_slow_steps_take_fewer_timed_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.4 s step is timed 5 times, not 20: the device run's time limit is for the whole benchmark."""
    bench = bench_module(monkeypatch)
    assert bench.timed_runs(20, []) == 20
    assert bench.timed_runs(20, [1.0, 3.0]) == 20
    assert bench.timed_runs(20, [150.0]) == 13
    assert bench.timed_runs(20, [400.0, 380.0]) == bench.MIN_ITERS == 5
    assert bench.timed_runs(1, [400.0]) == 1


def test_correctness_is_checked_at_the_target_batches_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A path that is right at batch 3 but wrong where the timed target numbers come from (many requests' queries
    in one tile) fails the check, for every cartridge case, before anything is timed."""
    import torch

    bench = bench_module(monkeypatch)
    torch.manual_seed(0)
    monkeypatch.setattr(bench, "target_batches", lambda shapes, device: (3, 5))
    decode = bench.Forced.__call__

    def wrong_past_batch_3(self: Any, layer: object) -> torch.Tensor:
        out = decode(self, layer)
        return out + 1 if self.fused and out.shape[0] > 3 else out

    monkeypatch.setattr(bench.Forced, "__call__", wrong_past_batch_3)
    failures = bench.check_correctness(bench.SMOKE, torch.device("cpu"))
    assert [f.split(":")[0] for f in failures] == [
        "shared-1x40 batch 5 fused", "shared-1x40-int8 batch 5 fused", "composed-2x40 batch 5 fused"
    ]  # fmt: skip


def test_the_wheels_gpu_sh_carries_are_the_tested_versions() -> None:
    """The device machine has no package index: bench/gpu.sh's header downloads pydantic, minio and their
    dependencies beforehand. Each pin must exist and be what this environment runs (a near miss such as a missing
    ``.post1`` fails the download, and the serving benchmark with it)."""
    pins = re.findall(r"([A-Za-z0-9_.-]+)==(\S+?)\s", (ROOT / "bench" / "gpu.sh").read_text(encoding="utf-8"))
    assert {"pydantic", "minio", "urllib3", "certifi"} <= {name for name, _ in pins}
    assert [(name, importlib.metadata.version(name)) for name, _ in pins] == pins


@pytest.mark.parametrize("device_works", [True, False])
def test_a_refused_graph_capture_falls_back_to_eager_unless_the_device_stopped_working(
    monkeypatch: pytest.MonkeyPatch, device_works: bool
) -> None:
    """A capture refused by an op that cannot be captured says "CUDA error" as a sticky fault does: the step is
    timed eagerly while the device still runs work, and the run stops on record only when it does not. torch.cuda
    is the seam (no GPU here): the capture raises, and the health check's launch works or fails."""
    import contextlib

    import torch

    bench = bench_module(monkeypatch)
    refused = RuntimeError("CUDA error: operation not permitted when stream is capturing")

    @contextlib.contextmanager
    def capture(graph: object) -> Any:
        raise refused
        yield

    def synchronize(device: object) -> None:
        if not device_works:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(bench, "sync", lambda device: None)
    monkeypatch.setattr(bench, "median_ms", lambda step, shapes, device: 2.0)
    monkeypatch.setattr(torch, "ones", lambda *args, **kwargs: torch.zeros(1))  # the launch on "cuda"
    timing = lambda: bench.time_per_step(lambda layer: None, [0], bench.SMOKE, torch.device("cuda"))  # noqa: E731
    if device_works:
        assert timing() == (2.0 * bench.SMOKE.layers, 2.0 * bench.SMOKE.layers)
    else:
        with pytest.raises(bench.DeviceFault, match="no longer runs work: .*illegal memory access"):
            timing()
