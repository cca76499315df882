"""Every request's own KV as a range of rows in one pooled keys tensor and one values tensor.

A decode step appends one key and one value per request per layer. With a tensor per request that is two copies
per request per layer (128 launches a layer at batch 64, which made decode on a GPU host-bound); with every
request's rows in one pool, the runner writes a layer's new keys of the whole batch with one ``index_copy_`` and
the kernels read each request's range in place (a view: no copy, no concatenation).

The pool grows by reallocating and copying when no free range fits (up to ``max_rows``, when set; a server
that reserves its rows at start-up sets both to the same number and never grows), so a request's handle holds
row offsets, never tensors; a range returns to the pool when its handle is released (or garbage-collected). The pool is
used from one thread (the engine's scheduler); a handle collected elsewhere, or by the cycle collector in the
middle of an allocation, only queues its range, and the pool takes it back at its next call.
"""

from __future__ import annotations

import bisect
import weakref

import torch
from torch import Tensor

GROWTH = 2  # a full pool grows to at least this multiple of its rows (amortized copies)


class OwnKVFull(Exception):
    """No free range is long enough and the pool may not grow past ``max_rows``: wait for rows to come back."""


class OwnKVPool:
    """Keys and values ``[layers, kv_heads, rows, head_dim]`` handed out as row ranges (first fit)."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        rows: int = 0,
        max_rows: int | None = None,
    ) -> None:
        if max_rows is not None and not 0 <= rows <= max_rows:
            raise ValueError(f"a pool of {rows} rows cannot have max_rows={max_rows}")
        self.max_rows = max_rows
        shape = (layers, kv_heads, rows, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self._free: list[tuple[int, int]] = [(0, rows)] if rows else []  # (start, rows), sorted, coalesced
        self._returned: list[tuple[int, int]] = []  # released ranges not yet merged into _free

    @property
    def rows(self) -> int:
        return int(self.keys.shape[2])

    @classmethod
    def with_budget(
        cls, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, nbytes: int
    ) -> OwnKVPool:
        """``nbytes`` > 0: a pool of that much memory, reserved now, that never grows; 0: an empty pool that
        grows as requests need it."""
        if nbytes < 0:
            raise ValueError(f"own KV bytes must be >= 0, got {nbytes}")
        row = _row_bytes(layers, kv_heads, head_dim, dtype)
        rows = nbytes // row
        if nbytes and not rows:
            raise ValueError(f"{nbytes} bytes of own KV hold no token (one takes {row} bytes)")
        return cls(layers, kv_heads, head_dim, dtype, device, rows, max_rows=rows or None)

    @property
    def row_bytes(self) -> int:
        """Bytes of keys and values one row (one token) takes over all layers and heads."""
        layers, kv_heads, _, head_dim = self.keys.shape
        return _row_bytes(layers, kv_heads, head_dim, self.keys.dtype)

    @property
    def free_ranges(self) -> list[tuple[int, int]]:
        """(start, rows) of every free range, sorted and coalesced."""
        self._take_back()
        return list(self._free)

    @property
    def free_rows(self) -> int:
        return sum(n for _, n in self.free_ranges)

    def fits(self, capacity: int) -> bool:
        """Whether a free range holds ``capacity`` rows now (allocating them would not grow the pool)."""
        self._take_back()
        return self._first_fit(capacity) is not None

    def allocate(self, capacity: int) -> OwnKV:
        """A handle on ``capacity`` free rows; grows the pool when no free range is long enough.

        Raises :class:`OwnKVFull` when growing would pass ``max_rows``, ``torch.OutOfMemoryError`` when the
        device has no memory for it.
        """
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if capacity == 0:
            return OwnKV(self, 0, 0)
        self._take_back()
        index = self._first_fit(capacity)
        if index is None:
            self._grow(capacity)
            index = self._first_fit(capacity)
            assert index is not None  # growth leaves a free range of at least capacity rows at the end
        start, n = self._free[index]
        if n == capacity:
            del self._free[index]
        else:
            self._free[index] = (start + capacity, n - capacity)
        return OwnKV(self, start, capacity)

    def _first_fit(self, capacity: int) -> int | None:
        """Index of the first free range of at least ``capacity`` rows."""
        return next((i for i, (_, n) in enumerate(self._free) if n >= capacity), None)

    def _grow(self, capacity: int) -> None:
        """Reallocate with room for ``capacity`` more rows at the end: GROWTH times the rows (at most
        ``max_rows``), or just enough when that much memory is not there."""
        old = self.rows
        tail = self._free[-1][1] if self._free and sum(self._free[-1]) == old else 0
        needed = old - tail + capacity
        rows = max(GROWTH * old, needed)
        if self.max_rows is not None:
            if needed > self.max_rows:
                raise OwnKVFull(f"no free range of {capacity} rows ({self.free_rows} of {self.max_rows} rows free)")
            rows = min(rows, self.max_rows)
        try:
            grown = self._reallocated(rows)
        except torch.OutOfMemoryError:
            if rows == needed:
                raise
            grown = None  # retried below: here the failed attempt's half-made copy is still referenced
        self.keys, self.values = grown or self._reallocated(needed)
        self._merge(old, self.rows - old)

    def _reallocated(self, rows: int) -> tuple[Tensor, Tensor]:
        """Copies of keys and values with ``rows`` rows (the current ones first)."""
        copies = []
        for current in (self.keys, self.values):
            grown = current.new_empty((*current.shape[:2], rows, current.shape[3]))
            grown[:, :, : current.shape[2]] = current
            copies.append(grown)
        return copies[0], copies[1]

    def _take_back(self) -> None:
        while self._returned:
            self._merge(*self._returned.pop())

    def _merge(self, start: int, rows: int) -> None:
        """Put a range back into the free list, merged with free neighbours."""
        if rows == 0:
            return
        index = bisect.bisect(self._free, (start, rows))
        if index < len(self._free) and start + rows == self._free[index][0]:
            rows += self._free.pop(index)[1]
        if index > 0 and sum(self._free[index - 1]) == start:
            start, previous = self._free.pop(index - 1)
            rows += previous
            index -= 1
        self._free.insert(index, (start, rows))


def _row_bytes(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


class OwnKV:
    """One request's own KV: rows ``[start, start + capacity)`` of its pool, the first ``length`` filled.

    Its rows go back to the pool on ``release()`` or when the handle is garbage-collected.
    """

    def __init__(self, pool: OwnKVPool, start: int, capacity: int) -> None:
        self.pool = pool
        self.start = start
        self.capacity = capacity
        self.length = 0
        self._finalizer = weakref.finalize(self, pool._returned.append, (start, capacity))

    @property
    def keys(self) -> Tensor:
        """[layers, kv_heads, capacity, head_dim], a view of the pool (valid until the pool next grows)."""
        return self.pool.keys[:, :, self.start : self.start + self.capacity]

    @property
    def values(self) -> Tensor:
        return self.pool.values[:, :, self.start : self.start + self.capacity]

    @property
    def nbytes(self) -> int:
        return self.capacity * self.pool.row_bytes

    def release(self) -> None:
        """Give the rows back now (idempotent). The handle keeps no rows: writing through it again fails."""
        self._finalizer()
        self.capacity = self.length = 0
