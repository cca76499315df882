"""Quantized cartridges: the quantizer's error bound, and the kernel's in-kernel dequantization."""

from __future__ import annotations

import pytest
import torch

from cartridges.quantize import Granularity, QuantFormat
from cartridges_kernels import KVSegment, QuantizedKV, SegmentTable, prefill_attention, quantize_kv

from ._build import make_batch, oracle

# Stated bounds, for unit-normal keys/values and head_dim 16: max |out - exact| of attention over int8 (resp.
# fp8 e4m3) cartridges. int8 keeps ~7 bits per element, e4m3 ~4 bits of mantissa.
OUTPUT_BOUND = {"int8": 0.02, "fp8": 0.12}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_quantizer_error_bound(fmt: QuantFormat, granularity: Granularity) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 33, 16) * torch.linspace(0.1, 5, 16)
    x[1, 4] = 0.0  # an all-zero token row
    quant = quantize_kv(x, fmt, granularity)
    err = (quant.dequantize() - x).abs()
    scales = quant.scales.unsqueeze(-1) if granularity == "token" else quant.scales.unsqueeze(1)
    if fmt == "int8":
        assert (err <= scales * 0.5 + 1e-6).all()
    else:  # e4m3: 3 mantissa bits -> relative error <= 2^-4, plus the subnormal step 2^-9 * scale
        assert (err <= x.abs() / 16 + scales * 2.0**-9 + 1e-6).all()
    if granularity == "token":
        assert torch.equal(quant.dequantize()[1, 4], torch.zeros(16))


def test_quantized_kv_rejects_wrong_scales() -> None:
    with pytest.raises(ValueError, match="channel scales"):
        QuantizedKV(torch.zeros(2, 5, 4, dtype=torch.int8), torch.ones(2, 5), "channel")
    with pytest.raises(ValueError, match="int8 or float8"):
        QuantizedKV(torch.zeros(2, 5, 4), torch.ones(2, 5), "token")
    for bad in (0.0, -1.0, float("inf"), float("nan")):  # each would dequantize to NaN or garbage
        scales = torch.ones(2, 5)
        scales[1, 3] = bad
        with pytest.raises(ValueError, match="finite and positive"):
            QuantizedKV(torch.zeros(2, 5, 4, dtype=torch.int8), scales, "token")


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_a_row_too_small_for_its_scale_gets_scale_one(fmt: QuantFormat) -> None:
    x = torch.zeros(1, 2, 4)
    x[0, 0, 0] = 1e-45  # the smallest subnormal: absmax / 127 or / 448 underflows to 0
    quant = quantize_kv(x, fmt, "token")
    assert quant.scales.tolist() == [[1.0, 1.0]]
    assert torch.equal(quant.dequantize(), torch.zeros(1, 2, 4))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_zero_tokens_get_channel_scales_of_one(fmt: QuantFormat) -> None:
    """A cartridge or own KV with no tokens yet quantizes like an all-zero one (was an IndexError from amax)."""
    quant = quantize_kv(torch.zeros(2, 0, 8), fmt, "channel")
    assert torch.equal(quant.scales, torch.ones(2, 8)) and quant.data.shape == (2, 0, 8)
    assert quant.dequantize().shape == (2, 0, 8)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_non_finite_input_is_refused(bad: float, granularity: Granularity) -> None:
    x = torch.randn(2, 3, 4)
    x[1, 2, 0] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_kv(x, "int8", granularity)


@pytest.mark.parametrize(
    ("fmt", "key_granularity", "value_granularity"),
    [
        ("int8", "channel", "token"),
        ("int8", "token", "channel"),
        ("fp8", "channel", "token"),
        ("fp8", "token", "token"),
    ],
)
def test_kernel_dequantizes_on_load(
    fmt: QuantFormat, key_granularity: Granularity, value_granularity: Granularity
) -> None:
    torch.manual_seed(1)
    exact = make_batch([29, 7], [[0, 1], [1], [0]], own_lens=[3, 2, 1])
    quantized = [
        KVSegment(quantize_kv(s.dense()[0], fmt, key_granularity), quantize_kv(s.dense()[1], fmt, value_granularity))
        for s in exact.table.segments
    ]
    table = SegmentTable(quantized, exact.table.request_segments)
    out = prefill_attention(exact.q, exact.query_lens, table, exact.own_kv, backend="triton")
    # Tight: the kernel computes attention over exactly the dequantized values.
    dequantized = SegmentTable([KVSegment(*s.dense()) for s in quantized], exact.table.request_segments)
    reference = prefill_attention(exact.q, exact.query_lens, dequantized, exact.own_kv, backend="torch")
    torch.testing.assert_close(out, reference, atol=2e-4, rtol=0)
    # Loose: the error vs exact inputs stays within the stated bound, and is not zero (it was quantized).
    error = (out.double() - oracle(exact)).abs().max().item()
    assert 1e-5 < error < OUTPUT_BOUND[fmt]


def test_quantized_own_kv_with_nan_tail() -> None:
    torch.manual_seed(2)
    batch = make_batch([5], [[0], [0]], own_lens=[4, 6])
    assert batch.own_kv is not None
    own = []
    for seg in batch.own_kv:
        k, v = seg.keys, seg.values
        assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        qk = quantize_kv(torch.nan_to_num(k), "int8", "token")
        qk.scales[:, seg.num_tokens :] = float("nan")  # stale scales past the used length must be masked too
        own.append(KVSegment(qk, quantize_kv(torch.nan_to_num(v), "int8", "channel"), length=seg.num_tokens))
    out = prefill_attention(batch.q, batch.query_lens, batch.table, own, backend="triton")
    reference = prefill_attention(batch.q, batch.query_lens, batch.table, own, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, atol=2e-4, rtol=0)
