"""Random inputs and an independent float64 oracle (softmax over the explicitly concatenated keys)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cartridges_kernels import KVSegment, SegmentTable


@dataclass
class Batch:
    """A batch of requests: queries, the shared segment table and per-request own KV."""

    q: Tensor
    query_lens: list[int]
    table: SegmentTable
    own_kv: Sequence[KVSegment] | None


def rand_segment(
    kv_heads: int, length: int, head_dim: int, dtype: torch.dtype = torch.float32, capacity: int | None = None
) -> KVSegment:
    """A segment whose rows past ``length`` (up to ``capacity``) are NaN, so a missing mask poisons the
    output."""
    cap = length if capacity is None else capacity
    keys = torch.full((kv_heads, cap, head_dim), float("nan"), dtype=dtype)
    values = torch.full((kv_heads, cap, head_dim), float("nan"), dtype=dtype)
    keys[:, :length] = torch.randn(kv_heads, length, head_dim).to(dtype)
    values[:, :length] = torch.randn(kv_heads, length, head_dim).to(dtype)
    return KVSegment(keys, values, length=length)


def pool_views(
    spans: Sequence[tuple[int, int, int]], kv_heads: int = 2, pool_len: int = 64, head_dim: int = 16
) -> list[KVSegment]:
    """Segments that are views into one NaN-filled KV pool, one per (first row, used rows, view rows) span, so a
    read outside a view's used rows poisons the output."""
    keys = torch.full((kv_heads, pool_len, head_dim), float("nan"))
    values = torch.full((kv_heads, pool_len, head_dim), float("nan"))
    views = []
    for first, used, rows in spans:
        keys[:, first : first + used] = torch.randn(kv_heads, used, head_dim)
        values[:, first : first + used] = torch.randn(kv_heads, used, head_dim)
        views.append(KVSegment(keys[:, first : first + rows], values[:, first : first + rows], length=used))
    return views


def make_batch(
    segment_lens: Sequence[int],
    request_segments: Sequence[Sequence[int]],
    own_lens: Sequence[int] | None,
    query_lens: Sequence[int] | None = None,
    kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Random batch; own KV gets 3 spare NaN rows; query_lens default to one token each (decode)."""
    lens = list(query_lens) if query_lens is not None else [1] * len(request_segments)
    segments = [rand_segment(kv_heads, n, head_dim, dtype) for n in segment_lens]
    own = None if own_lens is None else [rand_segment(kv_heads, n, head_dim, dtype, n + 3) for n in own_lens]
    q = torch.randn(sum(lens), kv_heads * group, head_dim).to(dtype)
    return Batch(q, lens, SegmentTable(segments, [list(s) for s in request_segments]), own)


def oracle(batch: Batch, sm_scale: float | None = None) -> Tensor:
    """float64 attention over cat(segments..., own KV) per request, causal only within the own KV."""
    head_dim = batch.q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    outs = []
    start = 0
    for r, n in enumerate(batch.query_lens):
        q = batch.q[start : start + n].double()
        start += n
        parts = [batch.table.segments[i] for i in batch.table.request_segments[r]]
        own = batch.own_kv[r] if batch.own_kv is not None else None
        keys = [p.dense(torch.float64)[0] for p in parts]
        values = [p.dense(torch.float64)[1] for p in parts]
        visible = [torch.ones(n, p.num_tokens, dtype=torch.bool) for p in parts]
        if own is not None:
            k, v = own.dense(torch.float64)
            keys.append(k)
            values.append(v)
            pos = own.num_tokens - n + torch.arange(n)
            visible.append(torch.arange(own.num_tokens)[None, :] <= pos[:, None])
        k_all = torch.cat(keys, dim=1) if keys else torch.zeros(q.shape[1], 0, head_dim, dtype=torch.float64)
        v_all = torch.cat(values, dim=1) if values else k_all
        mask = torch.cat(visible, dim=1) if visible else torch.zeros(n, 0, dtype=torch.bool)
        group = q.shape[1] // max(k_all.shape[0], 1)
        k_all = k_all.repeat_interleave(group, 0)
        v_all = v_all.repeat_interleave(group, 0)
        scores = torch.einsum("thd,hld->thl", q, k_all) * scale
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # no visible key -> zero output
        outs.append(torch.einsum("thl,hld->thd", probs, v_all))
    return torch.cat(outs)
