"""Own KV handed over as one pool (PooledKV): the same attention as separate segments, without per-request views."""

from __future__ import annotations

import math

import pytest
import torch

from cartridges_kernels import KVSegment, PooledKV, PoolLayers, SegmentTable, dispatch, prefill_attention
from cartridges_kernels.segment_kernel import _meta_rows, pooled_meta, segment_meta

from ._build import Batch, make_batch, oracle

ATOL = 2e-4  # fp32 compute


def pooled_batch(
    own_lens: list[int], query_lens: list[int] | None = None, kv_heads: int = 2, group: int = 2, spare: int = 5
) -> Batch:
    """A batch whose own KVs are out-of-order ranges of one NaN-filled pool, ``spare`` NaN rows after each."""
    batch = make_batch([9, 30], [[0], [1, 0], [], [1]][: len(own_lens)], None, query_lens, kv_heads, group)
    rows = sum(own_lens) + spare * len(own_lens)
    keys = torch.full((kv_heads, rows, 16), float("nan"))
    values = torch.full((kv_heads, rows, 16), float("nan"))
    starts, first = [], rows
    for n in own_lens:  # last request first in the pool
        first -= n + spare
        keys[:, first : first + n] = torch.randn(kv_heads, n, 16)
        values[:, first : first + n] = torch.randn(kv_heads, n, 16)
        starts.append(first)
    batch.own_kv = PooledKV(keys, values, starts, own_lens)
    return batch


def no_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any per-request view of a pool fail: the kernel path must not build them."""

    def refuse(self: PooledKV, index: object) -> KVSegment:
        raise AssertionError("the Triton path made a per-request view of the pool")

    monkeypatch.setattr(PooledKV, "__getitem__", refuse)


def test_pool_meta_rows_equal_those_of_its_views() -> None:
    torch.manual_seed(0)
    pool = pooled_batch([3, 7, 0, 12]).own_kv
    assert isinstance(pool, PooledKV)
    pooled, viewed = pooled_meta(pool).tolist(), _meta_rows(list(pool))
    for request, length in enumerate(pool.lengths):
        if length:
            assert tuple(pooled[request]) == viewed[request]
        else:  # torch gives an empty view a null pointer; no kernel reads it
            assert tuple(pooled[request][4:]) == viewed[request][4:]


def test_layers_of_a_pool_share_one_table_made_once() -> None:
    """Every layer's rows equal its own pool's table; the first layer's call makes them all, later ones slice."""
    keys, values = torch.randn(4, 2, 30, 16), torch.randn(2, 4, 30, 16).transpose(0, 1)  # other layer strides
    layers = PoolLayers(keys, values, [20, 0, 9], [5, 9, 1])
    cpu = torch.device("cpu")
    first = segment_meta(layers.pools[0], cpu)
    made = layers.tables
    for layer, pool in enumerate(layers.pools):
        alone = PooledKV(keys[layer], values[layer], pool.starts, pool.lengths)
        assert torch.equal(segment_meta(pool, cpu), pooled_meta(alone))
    assert made is not None and layers.tables is made
    assert torch.equal(first, made[0])
    assert layers.pools[2].subset(range(3)) is layers.pools[2]  # a launch over all requests keeps the table
    assert layers.pools[2].subset([1]).layers is None


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_over_a_pool_matches_the_oracle(
    fused: bool, num_splits: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    batch = pooled_batch([4, 17, 1, 9], kv_heads=2, group=3)
    expected = oracle(batch)
    no_views(monkeypatch)
    out, _ = dispatch.segmented_attention_triton(
        batch.q, batch.query_lens, batch.table, batch.own_kv, 1 / math.sqrt(16), num_splits, True, None, fused=fused
    )
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


def test_prefill_over_a_pool_matches_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    batch = pooled_batch([6, 11, 2], query_lens=[3, 11, 1])
    expected = oracle(batch)
    no_views(monkeypatch)
    out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="triton")
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=0)


def test_torch_backend_reads_a_pool_as_its_views() -> None:
    torch.manual_seed(3)
    batch = pooled_batch([5, 2, 8], query_lens=[2, 1, 4])
    out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="torch")
    torch.testing.assert_close(out.double(), oracle(batch), atol=1e-5, rtol=0)


def test_bad_pools_are_refused() -> None:
    keys = torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match=r"request 1: rows 8\.\.12 outside the pool's 10"):
        PooledKV(keys, keys, [0, 8], [3, 4])
    with pytest.raises(ValueError, match="2 starts for 1 lengths"):
        PooledKV(keys, keys, [0, 8], [3])
    pool = PooledKV(keys, keys, [0, 5], [3, 1])
    table = SegmentTable([], [[], []])
    with pytest.raises(ValueError, match="request 1: own KV has 1 rows but 2 queries"):
        prefill_attention(torch.randn(4, 4, 16), [2, 2], table, pool)
    with pytest.raises(ValueError, match="head_dim 16"):
        prefill_attention(torch.randn(2, 4, 8), [1, 1], table, pool)
