"""Triton building blocks shared by the attention kernels: one tile of query rows, one segment's keys.

A tile is ``BLOCK_M`` query rows: row m is token m // GROUP_PAD of the tile and query head
kv_head * GROUP + m % GROUP_PAD, so the GQA group of one KV head shares every key load. The segment kernel
attends a tile over one segment; the fused decode kernel walks several segments and then each request's own
KV with the same running softmax state, so the state lives in the caller and these helpers update it.
"""

from __future__ import annotations

import triton
import triton.language as tl

META_COLUMNS = tl.constexpr(11)  # int64 columns per segment_meta() row (see segment_kernel.segment_meta)


@triton.jit
def load_query_rows(
    q_ptr: tl.tensor,
    stride_qt: tl.tensor,
    stride_qh: tl.tensor,
    row_token_ptr: tl.tensor,
    row_start: tl.tensor,
    row_count: tl.tensor,
    kv_head: tl.tensor,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> tuple[tl.tensor, ...]:
    """The tile's queries [BLOCK_M, BLOCK_D] and, per row, its tile token, query token, head and validity
    (see tile_rows)."""
    t, t_valid, token, row_valid, head = tile_rows(
        row_token_ptr, row_start, row_count, kv_head, GROUP, GROUP_PAD, BLOCK_M
    )
    q = _load_queries(q_ptr, stride_qt, stride_qh, token, head, row_valid, HEAD_DIM, BLOCK_D)
    return q, t, t_valid, row_valid, token, head


@triton.jit
def load_token_rows(
    q_ptr: tl.tensor,
    stride_qt: tl.tensor,
    stride_qh: tl.tensor,
    token: tl.tensor,
    t_valid: tl.tensor,
    kv_head: tl.tensor,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> tuple[tl.tensor, ...]:
    """load_query_rows for rows whose query tokens ``token`` [BLOCK_M] the caller already knows."""
    row_valid, head = group_heads(t_valid, kv_head, GROUP, GROUP_PAD, BLOCK_M)
    q = _load_queries(q_ptr, stride_qt, stride_qh, token, head, row_valid, HEAD_DIM, BLOCK_D)
    return q, tl.arange(0, BLOCK_M) // GROUP_PAD, t_valid, row_valid, token, head


@triton.jit
def tile_rows(
    row_token_ptr: tl.tensor,
    row_start: tl.tensor,
    row_count: tl.tensor,
    kv_head: tl.tensor,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
) -> tuple[tl.tensor, ...]:
    """Per row of a tile: its tile token t, whether t is one of the tile's ``row_count``, its query token
    row_token_ptr[row_start + t], whether the row is real, and its query head (see group_heads)."""
    t = tl.arange(0, BLOCK_M) // GROUP_PAD
    t_valid = t < row_count
    token = tl.load(row_token_ptr + row_start + t, mask=t_valid, other=0).to(tl.int64)
    row_valid, head = group_heads(t_valid, kv_head, GROUP, GROUP_PAD, BLOCK_M)
    return t, t_valid, token, row_valid, head


@triton.jit
def group_heads(
    t_valid: tl.tensor, kv_head: tl.tensor, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr
) -> tuple[tl.tensor, ...]:
    """Row m's query head kv_head * GROUP + m % GROUP_PAD, and whether the row is real (its token is, and its
    place in the padded group is one of the GROUP heads)."""
    g = tl.arange(0, BLOCK_M) % GROUP_PAD
    return t_valid & (g < GROUP), kv_head * GROUP + g


@triton.jit
def _load_queries(
    q_ptr: tl.tensor,
    stride_qt: tl.tensor,
    stride_qh: tl.tensor,
    token: tl.tensor,
    head: tl.tensor,
    row_valid: tl.tensor,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> tl.tensor:
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )


@triton.jit
def load_segment(
    meta_ptr: tl.tensor,
    index: tl.tensor,
    kv_head: tl.tensor,
    K_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
) -> tuple[tl.tensor, ...]:
    """One KV head of the segment in row ``index`` of a segment_meta() table: key/value base pointers, their
    token strides, key/value scale pointers (meaningless when unquantized) and the used length."""
    meta = meta_ptr + index.to(tl.int64) * META_COLUMNS
    k_base = tl.load(meta + 0).to(tl.pointer_type(K_DTYPE)) + kv_head * tl.load(meta + 5)
    v_base = tl.load(meta + 1).to(tl.pointer_type(V_DTYPE)) + kv_head * tl.load(meta + 7)
    ks_ptr = tl.load(meta + 2).to(tl.pointer_type(tl.float32)) + kv_head * tl.load(meta + 9)
    vs_ptr = tl.load(meta + 3).to(tl.pointer_type(tl.float32)) + kv_head * tl.load(meta + 10)
    length = tl.load(meta + 4).to(tl.int32)
    k_stride_t = tl.load(meta + 6)
    v_stride_t = tl.load(meta + 8)
    if ALIGNED:  # pointers read from a table carry no alignment facts; without them every load is scalar
        k_base = tl.multiple_of(k_base, 16)
        v_base = tl.multiple_of(v_base, 16)
        k_stride_t = tl.multiple_of(k_stride_t, 16)
        v_stride_t = tl.multiple_of(v_stride_t, 16)
    return k_base, v_base, k_stride_t, v_stride_t, ks_ptr, vs_ptr, length


@triton.jit
def tile_entry(tiles_ptr: tl.tensor, tile: tl.tensor) -> tuple[tl.tensor, ...]:
    """(segment in the launch, first row, row count) of tile ``tile`` of a LaunchPlan's tiles."""
    return tl.load(tiles_ptr + tile * 3), tl.load(tiles_ptr + tile * 3 + 1), tl.load(tiles_ptr + tile * 3 + 2)


@triton.jit
def split_range(
    total: tl.tensor, split: tl.tensor, num_splits: tl.tensor, BLOCK_N: tl.constexpr
) -> tuple[tl.tensor, ...]:
    """Keys [lo, hi) of ``total`` that split ``split`` of ``num_splits`` handles, in whole BLOCK_N blocks."""
    chunk = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    return lo, tl.minimum(lo + chunk, total)


@triton.jit
def empty_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr) -> tuple[tl.tensor, ...]:
    """The running softmax state (row max, row sum, unnormalized output) of a tile that has seen no key."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    return m_i, l_i, acc


@triton.jit
def attend_keys(
    q: tl.tensor,
    m_i: tl.tensor,
    l_i: tl.tensor,
    acc: tl.tensor,
    k_base: tl.tensor,
    v_base: tl.tensor,
    k_stride_t: tl.tensor,
    v_stride_t: tl.tensor,
    ks_ptr: tl.tensor,
    vs_ptr: tl.tensor,
    lo: tl.tensor,
    hi: tl.tensor,
    qk_scale: tl.tensor,
    qpos: tl.tensor,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr,
    CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> tuple[tl.tensor, ...]:
    """Fold keys [lo, hi) of one segment into the running base-2 softmax state (m_i, l_i, acc) of the tile.

    With CAUSAL, row m also sees only keys <= qpos[m]. Rows of padding (zero queries) are not masked: their
    state is never stored. Keys are dequantized on load: per-channel key scales fold into the query, per-token
    key scales into the scores, value scales into the loaded values (per token) or into p @ v (per channel),
    so segments with different scales can share acc. Dots take ``DOT_PRECISION`` (config.dot_precision).

    The softmax scale rides in the exponent's multiply-add and p @ v accumulates into the rescaled acc, as in
    Triton's fused-attention tutorial: on sm_90 that took the shared walk from 590 to 524 instructions per
    64-key block (Triton 3.6; 630 to 564 with 3.9) and freed registers (tests/kernels/_compile_sm90.py).

    With TMA (sm_90+, a segment whose rows are 16-byte aligned), key and value blocks are copied by the
    Tensor Memory Accelerator: one descriptor per segment instead of an address and a mask per thread and
    16-byte piece, and rows past ``hi`` arrive as zeros. Whole blocks are then folded without masks and only
    a partial last block with them (on sm_90 with Triton 3.6: 326 instructions per shared-walk block, against
    395 masked). The callers' launchers set the allocator Triton needs for descriptors made on the device.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    if K_SCALE == 2:  # q . (k * s) == (q * s) . k
        q = (q.to(tl.float32) * tl.load(ks_ptr + offs_d, mask=d_valid, other=0.0)[None, :]).to(q.dtype)
    v_chan = tl.zeros([BLOCK_D], dtype=tl.float32)  # per-channel value scales (unused otherwise)
    if V_SCALE == 2:
        v_chan = tl.load(vs_ptr + offs_d, mask=d_valid, other=0.0)
    if TMA:
        k_rows = tl.make_tensor_descriptor(k_base, [hi, HEAD_DIM], [k_stride_t, 1], [BLOCK_N, BLOCK_D])
        v_rows = tl.make_tensor_descriptor(v_base, [hi, HEAD_DIM], [v_stride_t, 1], [BLOCK_N, BLOCK_D])
    else:
        k_rows = k_base
        v_rows = v_base
    if TMA and not CAUSAL:  # whole blocks unmasked, then the partial one
        masked_from = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for start in range(lo, masked_from, BLOCK_N):
            m_i, l_i, acc = fold_block(
                q, m_i, l_i, acc, k_rows, v_rows, k_stride_t, v_stride_t, ks_ptr, vs_ptr, v_chan, start, hi,
                qk_scale, qpos, BLOCK_N, HEAD_DIM, BLOCK_D, K_SCALE, V_SCALE, CAUSAL, TMA, False, DOT_PRECISION,
            )  # fmt: skip
        if masked_from < hi:
            m_i, l_i, acc = fold_block(
                q, m_i, l_i, acc, k_rows, v_rows, k_stride_t, v_stride_t, ks_ptr, vs_ptr, v_chan, masked_from, hi,
                qk_scale, qpos, BLOCK_N, HEAD_DIM, BLOCK_D, K_SCALE, V_SCALE, CAUSAL, TMA, True, DOT_PRECISION,
            )  # fmt: skip
    else:  # pointer loads: a separate tail would stage its loads through registers and spill (sm_90 compile)
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = fold_block(
                q, m_i, l_i, acc, k_rows, v_rows, k_stride_t, v_stride_t, ks_ptr, vs_ptr, v_chan, start, hi,
                qk_scale, qpos, BLOCK_N, HEAD_DIM, BLOCK_D, K_SCALE, V_SCALE, CAUSAL, TMA, True, DOT_PRECISION,
            )  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def fold_block(
    q: tl.tensor,
    m_i: tl.tensor,
    l_i: tl.tensor,
    acc: tl.tensor,
    k_rows: tl.tensor,
    v_rows: tl.tensor,
    k_stride_t: tl.tensor,
    v_stride_t: tl.tensor,
    ks_ptr: tl.tensor,
    vs_ptr: tl.tensor,
    v_chan: tl.tensor,
    start: tl.tensor,
    hi: tl.tensor,
    qk_scale: tl.tensor,
    qpos: tl.tensor,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr,
    CAUSAL: tl.constexpr,
    TMA: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> tuple[tl.tensor, ...]:
    """Keys [start, start + BLOCK_N) into the state. ``k_rows`` / ``v_rows``: tensor descriptors with TMA,
    else the segment's key/value base pointers. Without MASKED every key of the block is below ``hi`` and
    visible to every row: no score is masked and no row can still be without a key."""
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < hi
    if TMA:
        k = k_rows.load([start, 0]).T
    else:
        k = tl.load(
            k_rows + offs_n[None, :].to(tl.int64) * k_stride_t + offs_d[:, None],
            mask=n_valid[None, :] & d_valid[:, None],
            other=0.0,
        )
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)
    if K_SCALE == 1:  # per-token key scales and the softmax scale in one multiply per score
        s *= (tl.load(ks_ptr + offs_n, mask=n_valid, other=0.0) * qk_scale)[None, :]
        exp_scale = 1.0
    else:
        exp_scale = qk_scale
    if MASKED:
        visible = n_valid[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= qpos[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * exp_scale)  # exp_scale > 0: the max commutes with it
    m_safe = m_new
    if MASKED:  # a row that has seen no key yet keeps m = -inf; the exponent needs a finite reference
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * exp_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if TMA:
        v = v_rows.load([start, 0]).to(tl.float32)
    else:
        v = tl.load(
            v_rows + offs_n[:, None].to(tl.int64) * v_stride_t + offs_d[None, :],
            mask=n_valid[:, None] & d_valid[None, :],
            other=0.0,
        ).to(tl.float32)
    if V_SCALE == 1:
        v *= tl.load(vs_ptr + offs_n, mask=n_valid, other=0.0)[:, None]
    if V_SCALE == 2:
        acc = (
            acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION) * v_chan[None, :]
        )
    else:
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def store_rows(
    out_ptr: tl.tensor,
    lse_ptr: tl.tensor,
    slot: tl.tensor,
    token: tl.tensor,
    head: tl.tensor,
    row_valid: tl.tensor,
    m_i: tl.tensor,
    l_i: tl.tensor,
    acc: tl.tensor,
    n_tokens: tl.tensor,
    q_heads: tl.tensor,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    """Normalize the tile and store out [slots, tokens, q_heads, HEAD_DIM] (cast to out_ptr's dtype) and
    lse2 [slots, tokens, q_heads]; a row that saw no key stores 0 and -inf, so it drops out of a merge."""
    offs_d = tl.arange(0, BLOCK_D)
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    flat = (slot.to(tl.int64) * n_tokens + token) * q_heads + head
    tl.store(lse_ptr + flat, lse, mask=row_valid)
    tl.store(
        out_ptr + flat[:, None] * HEAD_DIM + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :],
    )
