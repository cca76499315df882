"""The PyTorch backend of the dispatcher: segmented attention that reads each shared segment once per call.

The reference (``reference.py``) is the readable specification: it loops over requests and repeats keys for GQA,
so a cartridge named by 32 requests is copied and read 32 times per layer. Serving on CPU cannot afford that, so
this backend gathers the queries of every request that names a segment and attends them over the segment in one
matmul pair, handles GQA by grouping query heads instead of repeating keys, and folds each partial into a running
(output, log-sum-exp) accumulator. Own KV differs per request and is read once for its own queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cartridges_kernels.segments import KVSegment, SegmentTable

LN2 = 0.6931471805599453


def segmented_attention_torch(
    q: Tensor,
    query_lens: Sequence[int],
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    sm_scale: float,
) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`segmented_attention_reference`: (out in q.dtype, base-2 LSE [tokens, q_heads])."""
    compute = torch.promote_types(q.dtype, torch.float32)
    tokens, q_heads, head_dim = q.shape
    qc = q.to(compute)
    out = torch.zeros((tokens, q_heads, head_dim), dtype=compute, device=q.device)
    lse = torch.full((tokens, q_heads), float("-inf"), dtype=compute, device=q.device)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    if own_kv is not None:
        for r, own in enumerate(own_kv):
            first, end = starts[r], starts[r + 1]
            if end == first:
                continue
            causal_from = own.num_tokens - (end - first)  # query i sees own rows 0 .. causal_from + i
            o, s = _partial(qc[first:end], *own.dense(compute), sm_scale, causal_from if end - first > 1 else None)
            out[first:end], lse[first:end] = o, s
    for i, uses in _segment_uses(table.request_segments).items():
        user_rows = torch.cat([torch.arange(starts[r], starts[r + 1], device=q.device) for r in uses])
        if user_rows.numel() == 0:
            continue
        o, s = _partial(qc[user_rows], *table.segments[i].dense(compute), sm_scale, None)
        repeats = torch.cat([torch.full((starts[r + 1] - starts[r],), n, dtype=compute) for r, n in uses.items()])
        _merge_into(out, lse, user_rows, o, s + repeats.to(q.device).log()[:, None])
    return out.to(q.dtype), lse / LN2


def _segment_uses(request_segments: Sequence[Sequence[int]]) -> dict[int, dict[int, int]]:
    """segment -> {request: how many times the request names it}. A segment named twice is concatenated twice:
    its keys count twice in the softmax, which is its partial with ln(2) added to the log-sum-exp (the rows of a
    partial must be distinct to merge)."""
    uses: dict[int, dict[int, int]] = {}
    for r, indices in enumerate(request_segments):
        for i in indices:
            counts = uses.setdefault(i, {})
            counts[r] = counts.get(r, 0) + 1
    return uses


def _partial(q: Tensor, k: Tensor, v: Tensor, sm_scale: float, causal_from: int | None) -> tuple[Tensor, Tensor]:
    """Attention of q [n, q_heads, d] over k, v [kv_heads, L, d], normalized within them; natural-log LSE.

    Query heads are grouped per KV head (head h reads KV head h // group, as transformers' GQA does), so keys are
    never copied. ``causal_from``: query i sees keys 0 .. causal_from + i (None: all keys).
    """
    n, q_heads, d = q.shape
    kv_heads, length, _ = k.shape
    group = q_heads // kv_heads
    grouped = q.view(n, kv_heads, group, d).permute(1, 0, 2, 3).reshape(kv_heads, n * group, d)
    scores = torch.matmul(grouped, k.transpose(1, 2)).mul_(sm_scale)  # [kv_heads, n * group, L]
    if causal_from is not None:
        limit = causal_from + torch.arange(n, device=q.device).repeat_interleave(group)
        hidden = torch.arange(length, device=q.device)[None, :] > limit[:, None]
        scores.masked_fill_(hidden[None], float("-inf"))
    s = torch.logsumexp(scores, dim=-1)  # [kv_heads, n * group]; -inf only for an empty segment
    probs = scores.sub_(torch.where(torch.isfinite(s), s, torch.zeros_like(s))[..., None]).exp_()
    o = torch.matmul(probs, v)
    o = o.view(kv_heads, n, group, d).permute(1, 0, 2, 3).reshape(n, q_heads, d)
    return o, s.view(kv_heads, n, group).permute(1, 0, 2).reshape(n, q_heads)


def _merge_into(out: Tensor, lse: Tensor, rows: Tensor, o: Tensor, s: Tensor) -> None:
    """Fold a partial over disjoint keys into the accumulator rows: weights from the two log-sum-exps."""
    old = lse[rows]
    merged = torch.logaddexp(old, s)
    safe = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    w_old, w_new = torch.exp(old - safe)[..., None], torch.exp(s - safe)[..., None]
    out[rows] = out[rows] * w_old + o * w_new
    lse[rows] = merged
