"""The fused decode kernel (interpreted on CPU) against the float64 oracle and against the multi-launch path.

Each test checks which path ran, so a batch that silently fell back to the multi-launch kernels cannot pass
as a test of the fused one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
import torch

from cartridges.quantize import Granularity, QuantFormat
from cartridges_kernels import (
    KernelConfig,
    KVSegment,
    SegmentTable,
    decode_attention,
    decode_plan,
    dispatch,
    fused_kernel,
    merge_kernel,
    quantize_kv,
    segment_kernel,
)
from cartridges_kernels.config import default_config
from cartridges_kernels.decode_plan import DecodeStructure, plan_decode
from cartridges_kernels.dispatch import segmented_attention_triton
from cartridges_kernels.reference import segmented_attention_reference

from ._build import Batch, make_batch, oracle, pool_views
from .test_quantized_attention import OUTPUT_BOUND

ATOL = 2e-4  # fp32 compute
SMALL = KernelConfig(block_m=16, block_n=16, own_block_n=16)  # several tiles and key blocks from small inputs


@contextmanager
def launches() -> Iterator[dict[str, mock.MagicMock]]:
    """Count the launches of each kernel while the block runs."""
    with (
        mock.patch.object(fused_kernel, "launch_fused_decode", wraps=fused_kernel.launch_fused_decode) as fused,
        mock.patch.object(merge_kernel, "launch_merge", wraps=merge_kernel.launch_merge) as merge,
        mock.patch.object(
            segment_kernel, "launch_segment_partials", wraps=segment_kernel.launch_segment_partials
        ) as partials,
    ):
        yield {"fused": fused, "merge": merge, "partials": partials}


def fused(
    batch: Batch, *, num_splits: int | None = None, shared_reads: bool = True, config: KernelConfig = SMALL
) -> torch.Tensor:
    """Decode through the dispatcher, asserting that it took the fused kernel (one launch, at most one merge)."""
    options: dict[str, Any] = {"num_splits": num_splits, "shared_reads": shared_reads, "config": config}
    with launches() as calls:
        out = decode_attention(batch.q, batch.table, batch.own_kv, backend="triton", **options)
    assert calls["fused"].call_count == 1 and calls["partials"].call_count == 0
    assert calls["merge"].call_count <= 1
    return out


def unfused(batch: Batch, num_splits: int | None = None) -> torch.Tensor:
    """The multi-launch path on the same inputs."""
    head_dim = batch.q.shape[-1]
    return segmented_attention_triton(
        batch.q, batch.query_lens, batch.table, batch.own_kv, 1 / math.sqrt(head_dim), num_splits, True, SMALL, False
    )[0]


@pytest.mark.parametrize(("kv_heads", "group"), [(2, 1), (1, 4), (2, 3), (1, 8)])
@pytest.mark.parametrize(
    ("segment_lens", "request_segments"),
    [
        ([19], [[0], [0], [0]]),  # one cartridge shared by all
        ([5, 37, 1, 70], [[1, 0], [2], [0, 1, 2, 3], [3, 1], [0, 1]]),  # several, odd lengths, lists differ
    ],
)
def test_matches_oracle(segment_lens: list[int], request_segments: list[list[int]], kv_heads: int, group: int) -> None:
    torch.manual_seed(len(segment_lens) * 10 + group)
    own_lens = [3, 9, 1, 2, 17][: len(request_segments)]
    batch = make_batch(segment_lens, request_segments, own_lens=own_lens, kv_heads=kv_heads, group=group)
    torch.testing.assert_close(fused(batch).double(), oracle(batch), atol=ATOL, rtol=0)


def test_own_walks_in_automatic_blocks() -> None:
    """Without own_block_n the own walk takes blocks of up to 128 keys (config.own_block_n): own KVs shorter
    than one block, exactly one, and several with a ragged end, split or not."""
    torch.manual_seed(13)
    batch = make_batch([21], [[0]] * 4, own_lens=[5, 128, 300, 129], group=2)
    auto = KernelConfig(block_m=16, block_n=16)
    for splits in (None, 3):
        out = fused(batch, num_splits=splits, config=auto)
        torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)


def test_empty_segments_and_requests_without_keys() -> None:
    torch.manual_seed(2)
    # Segment 1 is empty; requests 1 and 2 read only it, request 3 reads no cartridge.
    batch = make_batch([6, 0], [[0, 1], [1], [1], []], own_lens=[2, 5, 1, 3])
    torch.testing.assert_close(fused(batch).double(), oracle(batch), atol=ATOL, rtol=0)
    # Without own KV (cartridges only) a request that reads only an empty segment sees no key: output zero.
    cartridges_only = make_batch([0, 4, 21], [[0], [0, 1], [2, 1]], own_lens=None)
    for splits in (1, 3):
        out = fused(cartridges_only, num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        torch.testing.assert_close(out.double(), oracle(cartridges_only), atol=ATOL, rtol=0)


def test_tiles_group_requests_by_cartridge_list() -> None:
    torch.manual_seed(3)
    # 11 requests on [0, 1] (listed in either order) need two 8-request tiles; others read other lists.
    lists = [[0, 1], [1, 0]] * 5 + [[0, 1], [1], [], [2, 0], [1]]
    batch = make_batch([13, 30, 7], lists, own_lens=[(3 * r) % 11 + 1 for r in range(len(lists))], group=2)
    out = fused(batch)
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)
    torch.testing.assert_close(out, unfused(batch), atol=1e-5, rtol=0)


def test_plan_shares_one_tile_per_cartridge_list() -> None:
    structure = DecodeStructure(
        request_segments=((0, 1), (1,), (1, 0), (1, 2), (0, 1)),
        segment_lens=(100, 50, 0),  # segment 2 is empty, so [1, 2] reads what [1] reads
        own_keys=5,
    )
    cpu = torch.device("cpu")
    shared = plan_decode(structure, 2, 4, 64, 16, 16, cpu, True, 1)
    # (first segment entry, segment count, first row, rows, cartridge keys)
    assert shared.tiles.tolist() == [[0, 2, 0, 3, 150], [2, 1, 3, 2, 50]]
    assert shared.tile_segments.tolist() == [0, 1, 1]
    assert shared.row_request.tolist() == [0, 2, 4, 1, 3]
    assert shared.block_m == 16  # 3 requests x 4 padded query heads
    # Shared programs (2 tiles x 1 split) write slot 0, own programs (one per request) slot 1.
    assert (shared.shared_splits, shared.own_splits, shared.num_slots, shared.programs) == (1, 1, 2, 2 + 5)
    single = plan_decode(structure, 2, 4, 64, 16, 16, cpu, False, 1)
    assert single.tiles.shape[0] == 5 and single.block_m == 16
    spill = plan_decode(structure, 2, 4, 8, 16, 16, cpu, True, 1)  # 2 requests per tile
    assert spill.tiles[:, 3].tolist() == [2, 1, 2]
    split = plan_decode(structure, 2, 4, 64, 16, 16, cpu, True, 4)  # own KVs of at most 5 keys: one chunk
    assert (split.shared_splits, split.own_splits, split.programs) == (4, 1, 2 * 4 + 5)


def test_requests_that_share_no_cartridge() -> None:
    """Requests that read no cartridge key share tiles that walk nothing (they record that they saw no key);
    a step in which no request reads one (ICL prompts) has no shared programs and writes the output directly."""
    structure = DecodeStructure(request_segments=((), (), (0,), (1,), ()), segment_lens=(0, 7), own_keys=9)
    plan = plan_decode(structure, 2, 4, 64, 16, 16, torch.device("cpu"), True, 1)
    assert plan.tiles[:, 3].tolist() == [4, 1] and plan.tiles[:, 4].tolist() == [0, 7]
    icl = DecodeStructure(request_segments=((), (0,), ()), segment_lens=(0,), own_keys=9)
    plan = plan_decode(icl, 2, 4, 64, 16, 16, torch.device("cpu"), True, None)
    assert (plan.shared_splits, plan.own_splits, plan.num_slots, plan.programs) == (0, 1, 1, 3)
    torch.manual_seed(4)
    for lists in ([[], [], [0], [1], [1], []], [[], [0], [], [0], [], []]):
        batch = make_batch([0, 12], lists, own_lens=[9, 8, 7, 6, 5, 4])
        with launches() as calls:
            out = fused(batch)
        torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)
        assert calls["merge"].call_count == (1 if [1] in lists else 0)


def test_one_slot_per_row_writes_the_output_directly() -> None:
    torch.manual_seed(12)
    cartridges_only = make_batch([30, 5], [[0, 1], [1], [0]], own_lens=None)
    both = make_batch([30, 5], [[0, 1], [1], [0]], own_lens=[3, 1, 4])
    for batch, merges in ((cartridges_only, 0), (both, 1)):
        with launches() as calls:
            out = fused(batch)
        assert calls["merge"].call_count == merges
        torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("tiles", "max_shared", "requests", "max_own", "want"),
    [
        (4, 2048, 64, 128, (8, 1)),  # batch 64 sharing a 2048-token cartridge: chunks of 256 cartridge keys
        (16, 2048, 256, 128, (8, 1)),
        (1, 2048, 1, 128, (32, 1)),  # batch 1: cut until the grid fills 264 programs (33 per KV head)
        (0, 0, 4, 32768, (0, 9)),  # ICL prompts at batch 4: only the own KV, split to fill the grid
        (1, 2048, 4, None, (32, 0)),  # cartridges only: one tile, cut to fill the grid, a block a chunk at most
        (4, 2048, 64, None, (8, 0)),  # 9 splits would fill the grid, but 4-block chunks leave the 9th empty
        (0, 0, 0, None, (0, 0)),
    ],
)
def test_decode_splits_balance_and_fill_the_grid(
    tiles: int, max_shared: int, requests: int, max_own: int | None, want: tuple[int, int]
) -> None:
    with mock.patch.object(decode_plan, "target_programs", return_value=264):  # an H200: 132 SMs
        assert (
            decode_plan.choose_decode_splits(tiles, max_shared, requests, max_own, 8, 64, 128, torch.device("cuda"))
            == want
        )


@pytest.mark.parametrize("forced", [None, 1, 3, 7, 64])
def test_no_split_is_left_empty(forced: int | None) -> None:
    """For any step shape, the longest cartridge walk and the longest own walk, cut as the kernel's split_range
    cuts them (whole blocks of the given size), have keys in their last chunk."""

    def last_chunk_has_keys(keys: int, splits: int, block: int) -> bool:
        chunk = math.ceil(math.ceil(keys / splits) / block) * block  # as split_range computes it
        return keys == 0 or (splits - 1) * chunk < keys

    with mock.patch.object(decode_plan, "target_programs", return_value=264):
        for tiles, requests in ((1, 1), (1, 3), (4, 64), (16, 256), (7, 100)):
            for max_shared in (0, 1, 63, 64, 65, 300, 2048, 5000):
                for max_own in (None, 0, 1, 129, 3000, 4000, 32896):
                    shared, own = decode_plan.choose_decode_splits(
                        tiles, max_shared, requests, max_own, 8, 64, 128, torch.device("cuda"), forced
                    )
                    assert shared == 0 or last_chunk_has_keys(max_shared, shared, 64), (tiles, max_shared, shared)
                    assert own == 0 or last_chunk_has_keys(max_own or 0, own, 128), (requests, max_own, own)


@pytest.mark.parametrize("num_splits", [2, 5, 13])
def test_shared_per_request_split_and_multi_launch_agree(num_splits: int) -> None:
    torch.manual_seed(5)
    # Up to 70 + 33 + 50 keys per tile in 16-key chunks: 13 splits leave some empty, and chunks straddle the
    # boundaries between cartridges and own KVs.
    batch = make_batch([70, 33], [[0, 1], [1], [0, 1], [1, 0], [0]], own_lens=[50, 3, 20, 1, 7], group=3)
    want = fused(batch, num_splits=1)
    torch.testing.assert_close(want.double(), oracle(batch), atol=ATOL, rtol=0)
    variants = {
        "per-request tiles": fused(batch, num_splits=1, shared_reads=False),
        "split": fused(batch, num_splits=num_splits),
        "per-request tiles, split": fused(batch, num_splits=num_splits, shared_reads=False),
        "multi-launch path, split": unfused(batch, num_splits),
    }
    for name, got in variants.items():
        error = (got - want).abs().max().item()
        assert error <= 1e-5, f"{name}: max error {error:.3g}"


@pytest.mark.parametrize("num_splits", [1, 4])
def test_every_output_row_is_written(num_splits: int) -> None:
    """Partials start as NaN: a row or slot the kernel skipped would show (no fill launch)."""
    torch.manual_seed(6)
    batch = make_batch([40, 0], [[0], [1], [0, 1], []], own_lens=[35, 0, 2, 0], group=2)
    tokens, q_heads, head_dim = batch.q.shape
    structure = DecodeStructure(
        request_segments=tuple(tuple(s) for s in batch.table.request_segments),
        segment_lens=tuple(s.num_tokens for s in batch.table.segments),
        own_keys=max(s.num_tokens for s in batch.own_kv or []),
    )
    plan = plan_decode(structure, 2, 2, SMALL.block_m, 16, 16, batch.q.device, True, num_splits)
    assert plan.num_slots == (2 if num_splits == 1 else 3 + 3)  # at most one chunk per 16 keys of a walk
    out = torch.full((plan.num_slots, tokens, q_heads, head_dim), float("nan"))
    lse = torch.full((plan.num_slots, tokens, q_heads), float("nan"))
    segments = batch.table.segments
    fused_kernel.launch_fused_decode(
        batch.q, plan, 2, segments, [segments[0]], batch.own_kv, out, lse, 1 / math.sqrt(head_dim), SMALL
    )
    assert not out.isnan().any() and not lse.isnan().any()
    merged, merged_lse = torch.empty_like(batch.q), torch.empty(tokens, q_heads)
    merge_kernel.launch_merge(out, lse, merged, merged_lse)
    torch.testing.assert_close(merged.double(), oracle(batch), atol=ATOL, rtol=0)
    assert (merged_lse[[1, 3]] == float("-inf")).all()  # requests that saw no key


def test_segment_views_into_nan_filled_pools() -> None:
    torch.manual_seed(7)
    views = pool_views([(5, 17, 17), (40, 3, 24)])  # the second view has unused (NaN) rows
    batch = make_batch([], [[], [], []], own_lens=[2, 1, 6])
    batch.table = SegmentTable(views, [[0, 1], [1], [0]])
    for splits in (1, 3):
        torch.testing.assert_close(fused(batch, num_splits=splits).double(), oracle(batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("fmt", "key_granularity", "value_granularity"),
    [("int8", "channel", "token"), ("int8", "token", "channel"), ("fp8", "channel", "token")],
)
def test_quantized_cartridges_and_own_kv(
    fmt: QuantFormat, key_granularity: Granularity, value_granularity: Granularity
) -> None:
    torch.manual_seed(8)
    exact = make_batch([29, 7], [[0, 1], [1], [0], [0, 1]], own_lens=[3, 2, 1, 6])
    assert exact.own_kv is not None

    def quantized(segment: KVSegment) -> KVSegment:
        keys, values = segment.dense()
        return KVSegment(quantize_kv(keys, fmt, key_granularity), quantize_kv(values, fmt, value_granularity))

    table = SegmentTable([quantized(s) for s in exact.table.segments], exact.table.request_segments)
    for own in (exact.own_kv, [quantized(s) for s in exact.own_kv]):
        batch = Batch(exact.q, exact.query_lens, table, own)
        for splits in (1, 3):
            out = fused(batch, num_splits=splits)
            # Tight: attention over exactly the dequantized values.
            dequantized = [KVSegment(*s.dense()) for s in table.segments]
            want = oracle(Batch(exact.q, exact.query_lens, SegmentTable(dequantized, table.request_segments), own))
            torch.testing.assert_close(out.double(), want, atol=ATOL, rtol=0)
            # Loose: within the stated bound of attention over the unquantized inputs (own KV quantized too).
            error = (out.double() - oracle(exact)).abs().max().item()
            assert 1e-5 < error < OUTPUT_BOUND[fmt]


def test_long_shared_walks_take_the_multi_launch_path() -> None:
    """Above FUSED_DECODE_MAX_SHARED_ROWS (request, cartridge key) pairs the dispatcher takes the multi-launch path,
    which an H200 measured faster there; below it, the fused kernel."""
    torch.manual_seed(13)
    batch = make_batch([30, 5], [[0, 1], [1], [0], [0, 1]], own_lens=[3, 1, 4, 2])  # 35 + 5 + 30 + 35 = 105 pairs
    for threshold, fused_launches in ((106, 1), (105, 0)):
        with mock.patch.object(dispatch, "FUSED_DECODE_MAX_SHARED_ROWS", threshold), launches() as calls:
            out = decode_attention(batch.q, batch.table, batch.own_kv, backend="triton", config=SMALL)
        assert calls["fused"].call_count == fused_launches
        assert calls["partials"].call_count == 2 * (1 - fused_launches)  # cartridges, own KV
        torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)


def test_mixed_storage_formats_take_the_multi_launch_path() -> None:
    torch.manual_seed(9)
    batch = make_batch([12, 8], [[0, 1], [1]], own_lens=[2, 3])
    first = batch.table.segments[0]
    int8 = KVSegment(quantize_kv(first.dense()[0], "int8", "channel"), quantize_kv(first.dense()[1], "int8", "token"))
    table = SegmentTable([int8, batch.table.segments[1]], batch.table.request_segments)
    with launches() as calls:
        out = decode_attention(batch.q, table, batch.own_kv, backend="triton", config=SMALL)
    assert calls["fused"].call_count == 0 and calls["partials"].call_count == 3
    want = decode_attention(batch.q, table, batch.own_kv, backend="torch")
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)


def test_fp16_compute_and_default_config() -> None:
    torch.manual_seed(10)
    batch = make_batch([21, 6], [[0, 1], [1], [0, 1]], own_lens=[3, 4, 40], dtype=torch.float16, group=4)
    out = fused(batch, config=default_config(16))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), oracle(batch), atol=3e-3, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_log_sum_exp_matches_the_reference(num_splits: int) -> None:
    torch.manual_seed(11)
    batch = make_batch([10, 0], [[0], [1], [0, 1]], own_lens=None, group=2)
    scale = 0.25
    args = (batch.q, batch.query_lens, batch.table, batch.own_kv, scale)
    with launches() as calls:
        out, lse = segmented_attention_triton(*args, num_splits, True, SMALL)
    assert calls["fused"].call_count == 1
    want_out, want_lse = segmented_attention_reference(*args)
    torch.testing.assert_close(out, want_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-5, rtol=0)  # base 2; -inf for request 1
    empty = make_batch([4], [], own_lens=[])
    assert segmented_attention_triton(empty.q, [], empty.table, [], scale, num_splits, True, SMALL)[0].shape[0] == 0
