"""Backend selection, input validation and the PyTorch reference path of the public entry points."""

from __future__ import annotations

from typing import Literal
from unittest import mock

import pytest
import torch

from cartridges_kernels import (
    BACKEND_ENV,
    KVSegment,
    SegmentTable,
    StepAttention,
    decode_attention,
    dispatch,
    prefill_attention,
)
from cartridges_kernels.config import FUSED_DECODE_MAX_SHARED_ROWS

from ._build import make_batch, oracle


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_reference_matches_oracle(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    batch = make_batch(
        [7, 0, 13],
        [[0, 2], [1], [2, 1, 0]],
        own_lens=[5, 6, 4],
        query_lens=[3, 1, 4],
        kv_heads=2,
        group=3,
        dtype=dtype,
    )
    out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="torch")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), oracle(batch), atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0)


def test_auto_uses_torch_on_cpu_and_env_forces_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch([4], [[0]], own_lens=[2])
    calls: list[int] = []
    real = dispatch._attend

    def spy(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch, "_attend", spy)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    auto = decode_attention(batch.q, batch.table, batch.own_kv)
    assert calls == []
    monkeypatch.setenv(BACKEND_ENV, "triton")
    forced = decode_attention(batch.q, batch.table, batch.own_kv)
    assert calls == [1]
    torch.testing.assert_close(forced, auto, atol=2e-4, rtol=0)
    monkeypatch.setenv(BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match="backend must be"):
        decode_attention(batch.q, batch.table, batch.own_kv)


def test_invalid_inputs_are_reported() -> None:
    batch = make_batch([4], [[0], [0]], own_lens=[2, 1])
    with pytest.raises(ValueError, match="do not partition"):
        prefill_attention(batch.q, [1, 2], batch.table, batch.own_kv)
    with pytest.raises(ValueError, match="describes 2 requests"):
        prefill_attention(batch.q[:1], [1], batch.table, batch.own_kv)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(torch.randn(2, 3, 16), batch.table, batch.own_kv)
    wrong_dim = SegmentTable([KVSegment(torch.randn(2, 4, 8), torch.randn(2, 4, 8))], [[0], [0]])
    with pytest.raises(ValueError, match="head_dim 8"):
        decode_attention(batch.q, wrong_dim, batch.own_kv)
    with pytest.raises(ValueError, match="sm_scale must be positive"):
        decode_attention(batch.q, batch.table, batch.own_kv, sm_scale=-0.5)
    with pytest.raises(ValueError, match="names segment 3"):
        SegmentTable(batch.table.segments, [[3]])
    with pytest.raises(ValueError, match="request 1 names segment -1"):
        SegmentTable(batch.table.segments, [[0], [0, -1]])
    with pytest.raises(ValueError, match="own KV has 1 rows but 2 queries"):
        prefill_attention(torch.randn(3, 4, 16), [1, 2], batch.table, batch.own_kv)
    with pytest.raises(ValueError, match="length 9 outside"):
        KVSegment(torch.randn(2, 4, 8), torch.randn(2, 4, 8), length=9)
    with pytest.raises(ValueError, match=r"keys \(2, 4, 16\) and values \(2, 4, 8\) must have the same shape"):
        KVSegment(torch.randn(2, 4, 16), torch.randn(2, 4, 8))  # the kernels would read values 16 wide


def test_plan_is_reused_across_layers() -> None:
    from cartridges_kernels.decode_plan import plan_decode
    from cartridges_kernels.plan import plan_attention

    plan_decode.cache_clear()
    plan_attention.cache_clear()
    layers = [make_batch([6, 9], [[0, 1], [1]], own_lens=[3, 2]) for _ in range(3)]
    for layer in layers:
        decode_attention(layer.q, layer.table, layer.own_kv, backend="triton")
    info = plan_decode.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    for layer in layers:  # a prefill chunk takes the split path, planned once per step as well
        q = torch.cat([layer.q, layer.q[:1]])
        prefill_attention(q, [1, 2], layer.table, layer.own_kv, backend="triton")
    info = plan_attention.cache_info()
    assert (info.misses, info.hits) == (1, 2)


@pytest.mark.parametrize("query_lens", [None, [1, 2]], ids=["decode", "prefill"])
def test_step_attention_checks_and_routes_once_per_step(
    monkeypatch: pytest.MonkeyPatch, query_lens: list[int] | None
) -> None:
    """Every layer of a step gets its own tensors' answer, while the checks and the route run on the first
    layer only; a layer whose tensors differ in layout is checked and routed again."""
    torch.manual_seed(8)
    checks: list[int] = []
    real = dispatch._validate

    def spy(*args: object) -> None:
        checks.append(1)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch, "_validate", spy)
    layers = [make_batch([6, 9], [[0, 1], [1]], own_lens=[3, 4], query_lens=query_lens) for _ in range(3)]
    structure = [list(r) for r in layers[0].table.request_segments]
    step = StepAttention(layers[0].query_lens, structure, backend="triton")
    structure[1].append(0)  # the step keeps its own copy of the structure
    for layer in layers:
        out = step(layer.q, layer.table.segments, layer.own_kv, sm_scale=0.25)
        torch.testing.assert_close(out.double(), oracle(layer, 0.25), atol=2e-5, rtol=0)
    assert checks == [1]
    longer = make_batch([6, 11], [[0, 1], [1]], own_lens=[3, 4], query_lens=query_lens)
    out = step(longer.q, longer.table.segments, longer.own_kv, sm_scale=0.25)
    torch.testing.assert_close(out.double(), oracle(longer, 0.25), atol=2e-5, rtol=0)
    assert checks == [1, 1]
    wrong = make_batch([6, 9], [[0, 1], [1]], own_lens=[3, 4], query_lens=query_lens, head_dim=8)
    with pytest.raises(ValueError, match="head_dim 8"):
        step(layers[0].q, wrong.table.segments, layers[0].own_kv)


def test_step_attention_keeps_its_route_when_a_layer_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose routing fails (say, a plan that would be copied inside a CUDA-graph capture) leaves the
    step's route as it was: the next layer like the first still runs the kernels."""
    torch.manual_seed(9)
    first = make_batch([6, 9], [[0, 1], [1]], own_lens=[3, 4])
    longer = make_batch([6, 11], [[0, 1], [1]], own_lens=[3, 4])
    step = StepAttention(first.query_lens, first.table.request_segments, backend="triton")
    step(first.q, first.table.segments, first.own_kv)
    monkeypatch.setattr(dispatch, "_route", mock.Mock(side_effect=RuntimeError("no plan copies here")))
    with pytest.raises(RuntimeError, match="no plan copies"):
        step(longer.q, longer.table.segments, longer.own_kv)
    kernels = mock.Mock(wraps=dispatch._attend)
    monkeypatch.setattr(dispatch, "_attend", kernels)
    out = step(first.q, first.table.segments, first.own_kv)
    torch.testing.assert_close(out.double(), oracle(first), atol=2e-5, rtol=0)
    assert kernels.call_count == 1


@pytest.mark.parametrize("fused", [True, False])
def test_steps_whose_own_kv_grew_reuse_the_plan(fused: bool) -> None:
    """A decode step's own KVs are a key longer than the last step's: it reuses that step's plan (the kernels
    read the lengths from the segment table), so steps are not re-planned and their plan tensors stay put."""
    from cartridges_kernels.decode_plan import plan_decode
    from cartridges_kernels.plan import plan_attention

    cache = plan_decode if fused else plan_attention
    cache.cache_clear()
    torch.manual_seed(5)
    for step in (0, 1, 2, 600):  # the last step's longest own KV needs more blocks (and splits): a new plan
        batch = make_batch([6, 9], [[0, 1], [1], [0]], own_lens=[3 + step, 2 + step, 14 + step])
        out, _ = dispatch.segmented_attention_triton(
            batch.q, batch.query_lens, batch.table, batch.own_kv, 0.25, None, True, None, fused
        )
        torch.testing.assert_close(out.double(), oracle(batch, 0.25), atol=2e-5, rtol=0)
    info = cache.cache_info()
    assert (info.misses, info.hits) == (2, 2)


def test_prefill_chunks_reuse_the_plan_with_causal_positions_from_the_own_kv() -> None:
    """Same chunk sizes over longer own KVs: one plan, and each query still sees exactly the own keys up to
    its position (rows past it are random, so a stale position would show)."""
    from cartridges_kernels.plan import plan_attention

    plan_attention.cache_clear()
    torch.manual_seed(6)
    for own_lens in ([5, 3], [9, 6], [13, 9]):
        batch = make_batch([7], [[0], []], own_lens=own_lens, query_lens=[2, 3])
        out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="triton")
        torch.testing.assert_close(out.double(), oracle(batch), atol=2e-5, rtol=0)
    info = plan_attention.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_torch_backend_reads_shared_segments_once_and_matches_the_reference() -> None:
    """The serving pattern: many decode requests on one cartridge, some composing two, plus a prefill chunk."""
    from cartridges_kernels.reference import segmented_attention_reference
    from cartridges_kernels.torch_backend import segmented_attention_torch

    torch.manual_seed(1)
    batch = make_batch(
        [40, 9],
        [[0]] * 6 + [[0, 1], [1, 0], []],
        own_lens=[3] * 6 + [4, 5, 6],
        query_lens=[1] * 6 + [1, 5, 6],
        kv_heads=3,
        group=3,
    )
    want_out, want_lse = segmented_attention_reference(batch.q, batch.query_lens, batch.table, batch.own_kv, 0.3)
    out, lse = segmented_attention_torch(batch.q, batch.query_lens, batch.table, batch.own_kv, 0.3)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), oracle(batch, 0.3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_segment_named_twice_counts_twice(backend: Literal["torch", "triton"]) -> None:
    """["x", "x"] composes x concatenated twice (what the engine's positions assume), in shared reads beside
    requests that name it once, for decode and prefill."""
    torch.manual_seed(3)
    batch = make_batch([11, 6], [[0, 0], [0], [1, 0, 1, 1], []], own_lens=[2, 3, 4, 5], query_lens=[1, 1, 3, 2])
    out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend=backend)
    torch.testing.assert_close(out.double(), oracle(batch), atol=2e-4, rtol=0)


def test_the_kernels_take_strided_queries_and_single_token_scales() -> None:
    """A transposed projection's queries (head_dim stride != 1) and the scales of a one-token cartridge whose last
    dimension has a stride but one element: the torch backend takes both, so the kernels must too."""
    from cartridges.quantize import QuantizedKV, quantize_kv
    from cartridges_kernels.segments import storage_of

    torch.manual_seed(5)
    batch = make_batch([1, 20], [[0, 1], [1]], own_lens=[5, 4])
    batch.q = batch.q.transpose(1, 2).contiguous().transpose(1, 2)
    one = batch.table.segments[0]
    keys = quantize_kv(storage_of(one.keys), "int8", "token")  # make_batch segments are dense
    scales = torch.empty(1, keys.scales.shape[0]).t()  # [heads, 1 token], stride(-1) == heads
    scales.copy_(keys.scales)
    segments = [KVSegment(QuantizedKV(keys.data, scales, "token"), one.values), batch.table.segments[1]]
    batch.table = SegmentTable(segments, batch.table.request_segments)
    assert batch.q.stride(-1) != 1 and scales.stride(-1) != 1
    out = decode_attention(batch.q, batch.table, batch.own_kv, backend="triton")
    torch.testing.assert_close(out.double(), oracle(batch), atol=3e-3, rtol=0)


@pytest.mark.parametrize(
    ("query_lens", "max_shared_rows", "fused", "path"),
    [
        (None, FUSED_DECODE_MAX_SHARED_ROWS, None, "fused"),  # decode over short cartridges
        ([1, 2], FUSED_DECODE_MAX_SHARED_ROWS, None, "multi-launch"),  # prefill
        ([1, 2], FUSED_DECODE_MAX_SHARED_ROWS, True, "multi-launch"),  # prefill has no fused kernel to force
        (None, 1, None, "multi-launch"),  # decode whose shared walks pass the threshold
        (None, 1, True, "fused"),  # the same, forced onto the fused kernel
    ],
)
def test_kernel_path_names_the_path_the_call_then_takes(
    monkeypatch: pytest.MonkeyPatch, query_lens: list[int] | None, max_shared_rows: int, fused: bool | None, path: str
) -> None:
    """kernel_path, which the benchmark records beside each timing, agrees with the kernels the call runs."""
    torch.manual_seed(10)
    monkeypatch.setattr(dispatch, "FUSED_DECODE_MAX_SHARED_ROWS", max_shared_rows)
    batch = make_batch([6, 9], [[0, 1], [1]], own_lens=[3, 4], query_lens=query_lens)
    fused_kernel = mock.Mock(wraps=dispatch.fused_decode_triton)
    monkeypatch.setattr(dispatch, "fused_decode_triton", fused_kernel)
    assert dispatch.kernel_path(batch.q, batch.query_lens, batch.table, batch.own_kv, fused=fused) == path
    out, _ = dispatch.segmented_attention_triton(
        batch.q, batch.query_lens, batch.table, batch.own_kv, 0.25, None, True, None, fused
    )
    assert fused_kernel.called == (path == "fused")
    torch.testing.assert_close(out.double(), oracle(batch, 0.25), atol=2e-5, rtol=0)
