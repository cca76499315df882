"""The Triton kernel path (interpreted on CPU) against the float64 oracle."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from cartridges_kernels import KernelConfig, SegmentTable, decode_attention, merge_kernel, prefill_attention

from ._build import Batch, make_batch, oracle, pool_views

ATOL = 2e-4  # fp32 compute


def run(
    batch: Batch,
    *,
    num_splits: int | None = None,
    shared_reads: bool = True,
    config: KernelConfig | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    return prefill_attention(
        batch.q,
        batch.query_lens,
        batch.table,
        batch.own_kv,
        backend="triton",
        num_splits=num_splits,
        shared_reads=shared_reads,
        config=config,
        sm_scale=sm_scale,
    )


def test_decode_one_segment() -> None:
    torch.manual_seed(0)
    batch = make_batch([19], [[0], [0], [0]], own_lens=[4, 1, 7])
    out = decode_attention(batch.q, batch.table, batch.own_kv, backend="triton")
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("kv_heads", "group"), [(2, 1), (1, 4), (2, 3), (1, 8)])
def test_several_segments_odd_lengths_and_gqa(kv_heads: int, group: int) -> None:
    torch.manual_seed(1)
    batch = make_batch(
        [5, 37, 1, 70],
        [[1, 0], [2], [0, 1, 2, 3], [3, 1]],
        own_lens=[3, 9, 1, 2],
        kv_heads=kv_heads,
        group=group,
    )
    torch.testing.assert_close(run(batch).double(), oracle(batch), atol=ATOL, rtol=0)


def test_empty_segments_and_requests_without_keys() -> None:
    torch.manual_seed(2)
    # Segment 1 is empty; request 2 has no query tokens this step and an empty own KV.
    batch = make_batch([6, 0], [[0, 1], [1], [1]], own_lens=[2, 5, 0], query_lens=[1, 1, 0])
    out = run(batch)
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)
    # Without own KV, a request that reads only an empty segment sees no key at all: its output is zero.
    cartridges_only = make_batch([0, 4], [[0], [0, 1]], own_lens=None)
    out = run(cartridges_only)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out.double(), oracle(cartridges_only), atol=ATOL, rtol=0)


def test_each_request_reads_exactly_its_listed_segments() -> None:
    torch.manual_seed(3)
    batch = make_batch([8, 11, 13], [[0, 1], [1, 2]], own_lens=[2, 3])
    base = run(batch)
    # Composition order does not change attention (keys carry their RoPE positions) ...
    swapped = SegmentTable(batch.table.segments, [[1, 0], [2, 1]])
    torch.testing.assert_close(run(Batch(batch.q, batch.query_lens, swapped, batch.own_kv)), base, atol=ATOL, rtol=0)
    # ... but which segments are listed does, per request.
    other = SegmentTable(batch.table.segments, [[0, 1], [0, 2]])
    changed = run(Batch(batch.q, batch.query_lens, other, batch.own_kv))
    torch.testing.assert_close(changed[0], base[0], atol=ATOL, rtol=0)
    assert (changed[1] - base[1]).abs().max() > 1e-2


def test_shared_and_per_request_reads_agree() -> None:
    torch.manual_seed(4)
    batch = make_batch([23, 9], [[0], [0, 1], [0], [1, 0], [0]], own_lens=[1, 2, 3, 4, 5])
    shared = run(batch, shared_reads=True)
    single = run(batch, shared_reads=False)
    torch.testing.assert_close(shared, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.double(), oracle(batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_splits", [2, 5, 9])
def test_split_kv_matches_unsplit(num_splits: int) -> None:
    torch.manual_seed(5)
    # 9 splits of a 70-key segment with 16-key blocks leaves some splits empty.
    batch = make_batch([70, 33], [[0, 1], [1]], own_lens=[50, 3])
    config = KernelConfig(block_m=16, block_n=16)
    whole = run(batch, num_splits=1, config=config)
    split = run(batch, num_splits=num_splits, config=config)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(split.double(), oracle(batch), atol=ATOL, rtol=0)


def test_prefill_is_causal_within_own_kv() -> None:
    torch.manual_seed(6)
    batch = make_batch([12], [[0], [0]], own_lens=[9, 5], query_lens=[4, 5])
    out = run(batch, config=KernelConfig(block_m=16, block_n=16))
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)
    # Changing request 0's last own row may only change its last query's output.
    assert batch.own_kv is not None
    own0 = batch.own_kv[0]
    assert isinstance(own0.keys, torch.Tensor) and isinstance(own0.values, torch.Tensor)
    own0.keys[:, 8] += 3.0
    own0.values[:, 8] -= 3.0
    again = run(batch, config=KernelConfig(block_m=16, block_n=16))
    torch.testing.assert_close(again[:3], out[:3], atol=1e-6, rtol=0)
    torch.testing.assert_close(again[4:], out[4:], atol=1e-6, rtol=0)
    assert (again[3] - out[3]).abs().max() > 1e-2


def test_prefill_tiles_span_requests_and_tokens() -> None:
    torch.manual_seed(7)
    # 2 query heads per KV head and block_m 16: 8 tokens per tile, so 11-token chunks span tiles.
    batch = make_batch([10, 3], [[0, 1], [1], [0]], own_lens=[11, 12, 2], query_lens=[11, 3, 2])
    out = run(batch, config=KernelConfig(block_m=16, block_n=16))
    torch.testing.assert_close(out.double(), oracle(batch), atol=ATOL, rtol=0)


def test_segment_views_into_larger_buffers() -> None:
    torch.manual_seed(8)
    batch = make_batch([], [[], []], own_lens=[2, 1])
    batch.table = SegmentTable(pool_views([(5, 12, 12)], pool_len=40), [[0], [0]])
    torch.testing.assert_close(run(batch).double(), oracle(batch), atol=ATOL, rtol=0)


def test_fp16_compute() -> None:
    """fp16 queries and KV: partials are kept in fp16 too (half the bytes the merge reads), within fp16 error."""
    torch.manual_seed(9)
    batch = make_batch([21, 6], [[0, 1], [1]], own_lens=[3, 4], dtype=torch.float16, query_lens=[2, 1])
    with mock.patch.object(merge_kernel, "launch_merge", wraps=merge_kernel.launch_merge) as merge:
        out = run(batch, num_splits=3)
    assert merge.call_args.args[0].dtype == torch.float16
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), oracle(batch), atol=3e-3, rtol=0)


def test_custom_softmax_scale() -> None:
    torch.manual_seed(10)
    batch = make_batch([9], [[0]], own_lens=[2])
    torch.testing.assert_close(run(batch, sm_scale=0.7).double(), oracle(batch, 0.7), atol=ATOL, rtol=0)
