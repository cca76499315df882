"""The own-KV pool: first-fit row ranges, coalescing on release, growth that keeps every request's rows."""

from __future__ import annotations

import gc

import pytest
import torch

from cartridges_serving.own_kv import OwnKVFull, OwnKVPool


def new_pool(rows: int = 0, max_rows: int | None = None) -> OwnKVPool:
    cpu = torch.device("cpu")
    return OwnKVPool(layers=2, kv_heads=3, head_dim=4, dtype=torch.float32, device=cpu, rows=rows, max_rows=max_rows)


def test_ranges_are_disjoint_and_first_fit_reuses_released_rows() -> None:
    pool = new_pool(rows=10)
    a, b, c = pool.allocate(3), pool.allocate(4), pool.allocate(2)
    assert [(o.start, o.capacity) for o in (a, b, c)] == [(0, 3), (3, 4), (7, 2)]
    b.release()
    d = pool.allocate(2)
    assert (d.start, pool.free_rows) == (3, 3)  # first fit: the released range, split
    assert pool.rows == 10


def test_released_neighbours_coalesce_into_one_range() -> None:
    pool = new_pool(rows=9)
    a, b, c = pool.allocate(3), pool.allocate(3), pool.allocate(3)
    a.release()
    c.release()
    b.release()
    assert pool.free_ranges == [(0, 9)]
    assert pool.allocate(9).start == 0  # fits without growing
    assert pool.rows == 9


def test_growth_keeps_the_rows_of_live_requests() -> None:
    pool = new_pool()
    a = pool.allocate(5)
    a.keys.copy_(torch.randn_like(a.keys))
    a.values.copy_(torch.randn_like(a.values))
    before = a.keys.clone(), a.values.clone()
    b = pool.allocate(7)  # no room: the pool reallocates
    assert pool.rows >= 12 and b.start == 5
    assert torch.equal(a.keys, before[0]) and torch.equal(a.values, before[1])
    assert a.keys.shape == (2, 3, 5, 4) and a.nbytes == 2 * 2 * 3 * 5 * 4 * 4


def test_growth_absorbs_a_free_tail() -> None:
    pool = new_pool(rows=4)
    first = pool.allocate(1)
    big = pool.allocate(6)  # the 3 free rows at the end plus new ones, one range
    assert (first.start, big.start) == (0, 1)
    assert pool.rows >= 7


def test_a_dropped_handle_gives_its_rows_back() -> None:
    pool = new_pool(rows=8)
    handle = pool.allocate(8)
    assert pool.free_rows == 0
    del handle
    gc.collect()
    assert pool.free_rows == 8


def test_release_is_idempotent_and_zero_capacity_takes_nothing() -> None:
    pool = new_pool(rows=4)
    handle = pool.allocate(4)
    handle.release()
    handle.release()
    assert pool.free_ranges == [(0, 4)]
    empty = pool.allocate(0)
    assert empty.capacity == 0 and pool.free_rows == 4
    empty.release()
    assert pool.free_ranges == [(0, 4)]


def test_a_released_handle_holds_no_rows() -> None:
    pool = new_pool(rows=4)
    handle = pool.allocate(4)
    handle.length = 2
    handle.release()
    assert (handle.capacity, handle.length, handle.keys.shape[2]) == (0, 0, 0)
    assert pool.allocate(4).start == 0


def test_growth_falls_back_to_just_enough_rows_when_double_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = new_pool(rows=8)
    live = pool.allocate(8)
    real = OwnKVPool._reallocated
    attempts: list[int] = []

    def limited(self: OwnKVPool, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        attempts.append(rows)
        if rows > 11:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, rows)

    monkeypatch.setattr(OwnKVPool, "_reallocated", limited)
    grown = pool.allocate(3)
    assert attempts == [16, 11] and pool.rows == 11
    assert (live.start, grown.start) == (0, 8)
    with pytest.raises(torch.OutOfMemoryError):
        pool.allocate(1)  # 12 rows needed, none to spare: the error is the caller's


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        new_pool().allocate(-1)


def test_growth_stops_at_max_rows() -> None:
    pool = new_pool(rows=4, max_rows=6)
    live = pool.allocate(4)
    grown = pool.allocate(2)
    assert grown.start == 4 and pool.rows == 6  # grows to the limit, not to twice its rows
    with pytest.raises(OwnKVFull, match="no free range of 1 rows"):
        pool.allocate(1)
    live.release()
    assert pool.allocate(4).start == 0 and pool.rows == 6


def test_a_reserved_pool_never_reallocates() -> None:
    pool = new_pool(rows=5, max_rows=5)
    keys = pool.keys
    a, b = pool.allocate(2), pool.allocate(3)
    b.release()
    assert pool.fits(3) and not pool.fits(4)
    with pytest.raises(OwnKVFull, match=r"no free range of 4 rows \(3 of 5 rows free\)"):
        pool.allocate(4)
    a.release()
    assert pool.allocate(5).start == 0 and pool.keys is keys
    assert pool.row_bytes == 2 * 2 * 3 * 4 * 4


def test_a_pool_larger_than_its_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_rows=3"):
        new_pool(rows=4, max_rows=3)
