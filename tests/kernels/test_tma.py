"""Blocks copied by tensor descriptors (KernelConfig(tma=True)) give the attention the pointer loads give.

The interpreter runs descriptor loads with the hardware's semantics (rows past the described length arrive as
zeros), so these tests catch a wrong shape, stride or offset; the sm_90 compile check covers the lowering.
"""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
import torch

from cartridges.quantize import QuantFormat
from cartridges_kernels import KernelConfig, KVSegment, SegmentTable, prefill_attention, quantize_kv
from cartridges_kernels.dispatch import segmented_attention_triton
from cartridges_kernels.segment_kernel import aligned, tma_descriptors

from ._build import Batch, make_batch, oracle

ATOL = 2e-4
TMA = KernelConfig(block_m=16, block_n=16, own_block_n=16, tma=True)


def _all_aligned(batch: Batch) -> bool:
    return all(map(aligned, [*batch.table.segments, *(batch.own_kv or [])]))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_matches_oracle(fused: bool, num_splits: int | None) -> None:
    torch.manual_seed(21)
    # Odd lengths (partial last blocks), a split inside a segment, own KV with NaN rows past its length.
    batch = make_batch([37, 5, 70], [[0, 1], [2], [0, 1, 2], [1]], own_lens=[3, 18, 1, 33], group=3)
    assert _all_aligned(batch)  # so the descriptor path is the one compiled
    scale = batch.q.shape[-1] ** -0.5
    out = segmented_attention_triton(
        batch.q, batch.query_lens, batch.table, batch.own_kv, scale, num_splits, True, TMA, fused
    )[0]
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)


def test_prefill_matches_oracle() -> None:
    torch.manual_seed(22)
    batch = make_batch([12, 40], [[0], [0, 1]], own_lens=[9, 21], query_lens=[4, 17])
    assert _all_aligned(batch)
    out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="triton", config=TMA)
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)


def test_unaligned_segments_fall_back_to_pointer_loads() -> None:
    torch.manual_seed(23)
    batch = make_batch([29], [[0], [0]], own_lens=[4, 2], head_dim=12)  # 48-byte rows: no descriptor allowed
    assert not _all_aligned(batch)
    out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="triton", config=TMA)
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_blocks(fmt: QuantFormat) -> None:
    torch.manual_seed(24)
    exact = make_batch([29, 7], [[0, 1], [1], [0]], own_lens=[3, 2, 1])
    quantized = [
        KVSegment(quantize_kv(s.dense()[0], fmt, "channel"), quantize_kv(s.dense()[1], fmt, "token"))
        for s in exact.table.segments
    ]
    assert all(map(aligned, quantized))
    table = SegmentTable(quantized, exact.table.request_segments)
    out = prefill_attention(exact.q, exact.query_lens, table, exact.own_kv, backend="triton", config=TMA)
    plain = replace(TMA, tma=False)
    want = prefill_attention(exact.q, exact.query_lens, table, exact.own_kv, backend="triton", config=plain)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_tma_needs_hopper() -> None:
    cuda = torch.device("cuda", 0)
    ampere = mock.patch.object(torch.cuda, "get_device_capability", return_value=(8, 0))
    with ampere, pytest.raises(ValueError, match="sm_90 or newer"):
        tma_descriptors(TMA, cuda)
    assert not tma_descriptors(replace(TMA, tma=False), cuda)
