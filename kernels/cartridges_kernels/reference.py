"""PyTorch reference for segmented attention: per-segment partials with base-2 log-sum-exp, then a merge.

This mirrors the Triton kernels step by step (same decomposition, same base-2 LSE), so it doubles as the CPU
backend of the dispatcher and as the readable specification the kernels are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cartridges_kernels.segments import KVSegment, SegmentTable

LOG2E = 1.4426950408889634


def partial_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, sm_scale: float, q_positions: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of queries over one segment, normalized within the segment.

    q: [tokens, q_heads, head_dim]; k, v: [kv_heads, length, head_dim] (q_heads a multiple of kv_heads, GQA).
    q_positions: [tokens] index of each query's own key; key j is visible iff j <= position (None: all
    visible). Returns (out [tokens, q_heads, head_dim], lse2 [tokens, q_heads]); a query that sees no key gets
    out 0 and lse2 -inf, so it drops out of the merge.
    """
    group = q.shape[1] // k.shape[0]
    k = k.to(q.dtype).repeat_interleave(group, dim=0)
    v = v.to(q.dtype).repeat_interleave(group, dim=0)
    scores = torch.einsum("thd,hld->thl", q, k) * (sm_scale * LOG2E)
    if q_positions is not None:
        hidden = torch.arange(k.shape[1], device=q.device)[None, :] > q_positions[:, None]
        scores = scores.masked_fill(hidden[:, None, :], float("-inf"))
    lse2 = torch.logsumexp(scores * math.log(2.0), dim=-1) / math.log(2.0)
    safe_lse = torch.where(torch.isfinite(lse2), lse2, torch.zeros_like(lse2))
    probs = torch.exp2(scores - safe_lse[..., None])
    return torch.einsum("thl,hld->thd", probs, v), lse2


def merge_partials_reference(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Combine partial attentions over disjoint key sets into attention over their union.

    outputs: P tensors [..., head_dim]; lses: P matching base-2 LSE tensors [...]. Returns (out, lse2).
    """
    lse = torch.stack(list(lses))
    merged = torch.logsumexp(lse * math.log(2.0), dim=0) / math.log(2.0)
    safe = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    weights = torch.exp2(lse - safe)
    out = (weights[..., None] * torch.stack(list(outputs))).sum(dim=0)
    return out, merged


def segmented_attention_reference(
    q: Tensor,
    query_lens: Sequence[int],
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    sm_scale: float,
) -> tuple[Tensor, Tensor]:
    """Attention for a ragged batch; q: [total_tokens, q_heads, head_dim], requests' tokens back to back.

    Request r attends, without a mask, over its cartridge segments and, causally, over its own KV whose last
    ``query_lens[r]`` rows are the queries' own keys. Computes in at least float32; returns (out in q.dtype,
    lse2 float32-or-wider [total_tokens, q_heads]).
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    start = 0
    for r, n in enumerate(query_lens):
        q_r = q[start : start + n].to(compute)
        start += n
        parts = [
            partial_attention_reference(q_r, *table.segments[i].dense(compute), sm_scale)
            for i in table.request_segments[r]
        ]
        if own_kv is not None:
            own = own_kv[r]
            positions = own.num_tokens - n + torch.arange(n, device=q.device)
            parts.append(partial_attention_reference(q_r, *own.dense(compute), sm_scale, positions))
        if not parts:
            outs.append(torch.zeros_like(q_r))
            lses.append(torch.full(q_r.shape[:2], float("-inf"), dtype=compute, device=q.device))
            continue
        out, lse = merge_partials_reference([p[0] for p in parts], [p[1] for p in parts])
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs).to(q.dtype), torch.cat(lses)
