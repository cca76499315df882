"""The warp-specialized cartridge kernel (KernelConfig(warp_specialize=True)) gives the segment kernel's
attention, and runs exactly the launches it is meant for: cartridges stored aligned in 16 bits.

The interpreter runs its descriptor loads and its one masked loop; what warp specialization does to them is the
compiler's (tests/kernels/test_gpu_compile.py checks that it applies on sm_90).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cartridges_kernels import KernelConfig, KVSegment, SegmentTable, dispatch, prefill_attention, quantize_kv
from cartridges_kernels.config import check_config
from cartridges_kernels.dispatch import segmented_attention_triton
from cartridges_kernels.segment_kernel import aligned
from cartridges_kernels.segments import storage_of

from ._build import Batch, make_batch, oracle

ATOL = 2e-3  # fp16 inputs
WS = KernelConfig(block_m=16, block_n=16, tma=True, warp_specialize=True)


@pytest.fixture
def ws_launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many launches ran the warp-specialized kernel."""
    from cartridges_kernels import ws_kernel

    calls: list[int] = []
    real = ws_kernel.launch_ws_partials

    def spy(*args: object) -> None:
        calls.append(1)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(ws_kernel, "launch_ws_partials", spy)
    return calls


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("group", [2, 3])
def test_decode_matches_oracle(ws_launches: list[int], num_splits: int | None, group: int) -> None:
    torch.manual_seed(31)
    # Odd lengths (a partial last block), an empty cartridge, a split inside a segment, a padded GQA group.
    batch = make_batch(
        [37, 0, 70, 16], [[0, 1], [2], [0, 2, 3], [1], [3]], own_lens=[3, 18, 1, 33, 2], group=group,
        dtype=torch.float16,
    )  # fmt: skip
    scale = batch.q.shape[-1] ** -0.5
    out = segmented_attention_triton(
        batch.q, batch.query_lens, batch.table, batch.own_kv, scale, num_splits, True, WS, False
    )[0]
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)
    assert ws_launches == [1]  # the cartridges' launch; own KV keeps the segment kernel


def test_prefill_and_many_tiles_match_oracle(ws_launches: list[int]) -> None:
    """Chunks of several tokens over cartridges, in more tiles than one per cartridge (tile order matters)."""
    torch.manual_seed(32)
    batch = make_batch(
        [21, 40], [[0], [0, 1], [1], [0, 1]], own_lens=[9, 21, 5, 12], query_lens=[4, 17, 2, 9],
        dtype=torch.float16,
    )  # fmt: skip
    out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="triton", config=WS)
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)
    assert ws_launches == [1]


def test_keys_and_values_of_different_16_bit_types(ws_launches: list[int]) -> None:
    torch.manual_seed(35)
    batch = make_batch([37, 20], [[0, 1], [1]], own_lens=[3, 2], dtype=torch.float16)
    mixed = SegmentTable(
        [KVSegment(s.keys, storage_of(s.values).to(torch.bfloat16), s.length) for s in batch.table.segments],
        batch.table.request_segments,
    )
    out = segmented_attention_triton(batch.q, batch.query_lens, mixed, batch.own_kv, 0.25, None, True, WS, False)[0]
    expected = oracle(Batch(batch.q, batch.query_lens, mixed, batch.own_kv), 0.25)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)
    assert ws_launches == [1]


def test_other_launches_keep_the_segment_kernel(ws_launches: list[int]) -> None:
    """fp32 or quantized cartridges, unaligned ones, and queries whose rows a descriptor cannot step over (12
    fp16 channels: 24 bytes) are not this kernel's: same answers, no launch of it."""
    torch.manual_seed(33)
    wide = make_batch([29, 7], [[0, 1], [1], [0]], own_lens=[3, 2, 1])
    unaligned = make_batch([29], [[0], [0]], own_lens=[4, 2], head_dim=12, dtype=torch.float16)
    padded = make_batch([29], [[0], [0]], own_lens=[4, 2], head_dim=12, dtype=torch.float16)
    rows = torch.zeros(2, 29, 16, dtype=torch.float16)  # each row starts on 32 bytes: aligned storage
    keys, values = rows.clone(), rows.clone()
    keys[..., :12], values[..., :12] = padded.table.segments[0].dense(torch.float16)
    segment = KVSegment(keys[..., :12], values[..., :12])
    padded = Batch(padded.q, padded.query_lens, SegmentTable([segment], [[0], [0]]), padded.own_kv)
    assert aligned(segment)
    for batch in (wide, unaligned, padded):
        out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="triton", config=WS)
        torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)
    quantized = SegmentTable(
        [KVSegment(quantize_kv(s.dense()[0], "int8", "channel"), s.values) for s in wide.table.segments],
        wide.table.request_segments,
    )
    out = prefill_attention(wide.q, wide.query_lens, quantized, wide.own_kv, backend="triton", config=WS)
    want = prefill_attention(wide.q, wide.query_lens, quantized, wide.own_kv, backend="torch")
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)
    assert ws_launches == []


def test_warp_specialization_needs_descriptors() -> None:
    with pytest.raises(ValueError, match="set tma=True"):
        check_config(replace(WS, tma=False), group_pad=2, head_dim=16, kv_bytes=2)


def test_fused_decode_ignores_it(ws_launches: list[int]) -> None:
    """The fused kernel has no warp-specialized walk (its loops sit in a branch, where Triton turns it off)."""
    torch.manual_seed(34)
    batch = make_batch([37], [[0], [0]], own_lens=[3, 5], dtype=torch.float16)
    out = dispatch.decode_attention(batch.q, batch.table, batch.own_kv, backend="triton", config=WS)
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)
    assert ws_launches == []
