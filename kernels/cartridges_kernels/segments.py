"""Inputs of segmented attention: KV segments and the per-request table of which segments each request reads.

A request attends over [its cartridges, in order] + [its own KV]. Cartridges are shared read-only tensors that
many requests may name; the table lists each unique tensor once so the kernels can read it once per step for
all of its users instead of once per request.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import Tensor

from cartridges.quantize import QuantizedKV

KVData = Tensor | QuantizedKV


def storage_of(x: KVData) -> Tensor:
    """The tensor holding the stored elements (the quantized payload for quantized data)."""
    return x.data if isinstance(x, QuantizedKV) else x


def kv_element_bytes(segments: Sequence[KVSegment]) -> int:
    """Bytes per stored key/value element, the widest over ``segments`` (1 when there are none): what sizes
    the kernels' shared-memory pipelines."""
    return max((storage_of(x).element_size() for s in segments for x in (s.keys, s.values)), default=1)


@dataclass(frozen=True)
class KVSegment:
    """Keys and values of one layer, each [kv_heads, capacity, head_dim]; only the first ``length`` rows are
    used.

    ``length`` lets a request's own KV live in a preallocated cache whose tail is unused (and may hold
    garbage). Keys are stored after RoPE, so a segment needs no position information here.
    """

    keys: KVData
    values: KVData
    length: int | None = None

    def __post_init__(self) -> None:
        k, v = storage_of(self.keys), storage_of(self.values)
        if k.dim() != 3 or v.dim() != 3:
            raise ValueError(f"keys/values must be [kv_heads, tokens, head_dim], got {tuple(k.shape)}")
        if k.shape != v.shape:  # the kernels read values with the keys' head_dim
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same shape")
        if k.device != v.device:
            raise ValueError("keys and values must be on the same device")
        if self.length is not None and not 0 <= self.length <= k.shape[1]:
            raise ValueError(f"length {self.length} outside [0, {k.shape[1]}]")

    @property
    def kv_heads(self) -> int:
        return int(storage_of(self.keys).shape[0])

    @property
    def head_dim(self) -> int:
        return int(storage_of(self.keys).shape[2])

    @property
    def num_tokens(self) -> int:
        return int(storage_of(self.keys).shape[1]) if self.length is None else self.length

    @property
    def device(self) -> torch.device:
        return storage_of(self.keys).device

    def dense(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Keys and values of the used rows as real-valued tensors (dequantized if needed)."""

        def real(x: KVData) -> Tensor:
            full = x.dequantize(dtype) if isinstance(x, QuantizedKV) else x.to(dtype)
            return full[:, : self.num_tokens]

        return real(self.keys), real(self.values)


@dataclass(frozen=True)
class SegmentTable:
    """Unique shared segments plus, per request, the ordered indices of the segments it reads.

    ``request_segments[r] == (2, 0)`` means request r reads segment 2 then segment 0 (order is the composition
    order the engine used to assign positions; attention itself does not depend on it).
    """

    segments: Sequence[KVSegment]
    request_segments: Sequence[Sequence[int]]

    def __post_init__(self) -> None:
        named = self.named_segments
        if named and (min(named) < 0 or max(named) >= len(self.segments)):
            r, i = next(
                (r, i)
                for r, indices in enumerate(self.request_segments)
                for i in indices
                if not 0 <= i < len(self.segments)
            )
            raise ValueError(f"request {r} names segment {i}, table has {len(self.segments)}")

    @property
    def num_requests(self) -> int:
        return len(self.request_segments)

    @functools.cached_property
    def named_segments(self) -> frozenset[int]:
        """Indices some request names (in C: a table is built every layer of every step)."""
        return frozenset().union(*self.request_segments)


class PooledKV(Sequence[KVSegment]):
    """Every request's own KV as a range of rows of one keys and one values tensor, ``[kv_heads, rows,
    head_dim]``: request r reads rows ``starts[r] : starts[r] + lengths[r]``.

    It is a sequence of :class:`KVSegment` views, which is all the PyTorch backend reads; the Triton path never
    makes those views. A pool has one storage format and one alignment, checked once, and the kernels' segment
    table comes from arithmetic on the starts: per-request Python at batch 64 took longer than the step's
    kernels (a pooled cache, like the serving runner's, hands one of these to every layer).
    """

    def __init__(
        self,
        keys: Tensor,
        values: Tensor,
        starts: Sequence[int],
        lengths: Sequence[int],
        layers: PoolLayers | None = None,
        layer: int = 0,
    ) -> None:
        """``layers``/``layer``: this pool is layer ``layer`` of ``layers`` (see :class:`PoolLayers`)."""
        self.layers, self.layer = layers, layer
        if not isinstance(keys, Tensor) or not isinstance(values, Tensor):
            raise TypeError("a PooledKV holds plain tensors; pass quantized own KV as KVSegments")
        self.keys, self.values = keys, values
        self.whole = KVSegment(keys, values)  # checks shapes, device
        self.starts, self.lengths = tuple(starts), tuple(lengths)
        if len(self.starts) != len(self.lengths):
            raise ValueError(f"{len(self.starts)} starts for {len(self.lengths)} lengths")
        rows = self.whole.num_tokens
        ends = tuple(map(operator.add, self.starts, self.lengths))
        if min(self.starts + self.lengths, default=0) < 0 or max(ends, default=0) > rows:
            r = next(r for r, end in enumerate(ends) if min(self.starts[r], self.lengths[r]) < 0 or end > rows)
            raise ValueError(f"request {r}: rows {self.starts[r]}..{ends[r]} outside the pool's {rows}")

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> KVSegment: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[KVSegment]: ...

    def __getitem__(self, index: int | slice) -> KVSegment | Sequence[KVSegment]:
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        start, length = self.starts[index], self.lengths[index]
        return KVSegment(self.keys[:, start : start + length], self.values[:, start : start + length])

    def on_layer(self, layer: int) -> PooledKV:
        """The same requests' rows in layer ``layer`` of ``self.layers``, without checking the ranges again
        (every layer of a pool has the same rows)."""
        assert self.layers is not None
        pool = copy.copy(self)
        pool.layer, pool.keys, pool.values = layer, self.layers.keys[layer], self.layers.values[layer]
        pool.whole = KVSegment(pool.keys, pool.values)
        return pool

    def subset(self, indices: Iterable[int]) -> PooledKV:
        """The requests ``indices``, in that order, over the same pool (itself when that is all of them)."""
        picked = list(indices)
        if picked == list(range(len(self))):
            return self
        return PooledKV(self.keys, self.values, [self.starts[i] for i in picked], [self.lengths[i] for i in picked])


class PoolLayers:
    """The same request ranges over every layer of a pooled cache, ``keys``/``values`` [layers, kv_heads, rows,
    head_dim]: ``pools[l]`` is layer l's :class:`PooledKV`. The kernels make the segment tables of all layers
    together, on the first layer's call (``tables``), so a step copies one table to the device, not one per
    layer."""

    def __init__(self, keys: Tensor, values: Tensor, starts: Sequence[int], lengths: Sequence[int]) -> None:
        self.keys, self.values = keys, values
        first = PooledKV(keys[0], values[0], starts, lengths, self, 0)
        self.pools = [first, *(first.on_layer(i) for i in range(1, keys.shape[0]))]
        self.tables: Tensor | None = None  # [layers, requests, meta columns] on the device, filled by the kernels


def segment_lengths(segments: Sequence[KVSegment]) -> tuple[int, ...]:
    """The used rows of each segment."""
    return segments.lengths if isinstance(segments, PooledKV) else tuple(s.num_tokens for s in segments)


def storage_segments(segments: Sequence[KVSegment], include_empty: bool = False) -> Sequence[KVSegment]:
    """What checks of storage (format, alignment, heads, head_dim, device) look at: the segments themselves,
    or a pool's whole tensor once. Empty segments are never read, so they are left out unless
    ``include_empty`` (their shapes must still match)."""
    if isinstance(segments, PooledKV):
        return [segments.whole] if include_empty or any(segments.lengths) else []
    return segments if include_empty else [s for s in segments if s.num_tokens > 0]


def select(segments: Sequence[KVSegment], indices: Sequence[int]) -> Sequence[KVSegment]:
    """``segments[i]`` for i in ``indices``, a pool staying a pool."""
    return segments.subset(indices) if isinstance(segments, PooledKV) else [segments[i] for i in indices]
