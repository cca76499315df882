"""Triton kernel: one launch per layer for decode, cartridges and own KV walked by programs of their own.

The multi-launch path (segment_kernel + merge_kernel) costs four launches per layer (fill, cartridge partials,
own-KV partials, merge). Here one launch runs every program of the step (decode_plan.DecodePlan says which):
shared programs walk a tile's cartridges with all of its requests' queries (each cartridge streamed once
for all of them), own programs walk one request's own KV with that request's query rows alone. Each writes
its rows of one slot, the normalized output plus base-2 LSE (-inf where it saw no key), so nothing needs
filling beforehand; the merge kernel combines the slots, unless there is only one, which is then the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cartridges_kernels.config import MIN_DOT, KernelConfig, check_launch, dot_precision, next_pow2, padded_head_dim
from cartridges_kernels.decode_plan import TILE_COLUMNS, DecodePlan
from cartridges_kernels.reference import LOG2E
from cartridges_kernels.segment_kernel import TL_DTYPE, aligned, granularity, segment_meta, tma_descriptors
from cartridges_kernels.segments import KVSegment, kv_element_bytes, storage_of, storage_segments
from cartridges_kernels.tile import (
    attend_keys,
    empty_state,
    load_query_rows,
    load_segment,
    load_token_rows,
    split_range,
    store_rows,
)

_TILE_COLUMNS = tl.constexpr(TILE_COLUMNS)


@triton.jit
def _fused_decode_kernel(
    q_ptr: tl.tensor,
    stride_qt: int,
    stride_qh: int,
    seg_meta_ptr: tl.tensor,
    own_meta_ptr: tl.tensor,
    tiles_ptr: tl.tensor,
    tile_segments_ptr: tl.tensor,
    row_request_ptr: tl.tensor,
    out_ptr: tl.tensor,
    lse_ptr: tl.tensor,
    n_tokens: int,
    q_heads: int,
    qk_scale: float,
    shared_programs: int,
    shared_splits: int,
    own_splits: int,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    OWN_BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    OWN_BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SEG_K_DTYPE: tl.constexpr,
    SEG_V_DTYPE: tl.constexpr,
    SEG_K_SCALE: tl.constexpr,
    SEG_V_SCALE: tl.constexpr,
    SEG_ALIGNED: tl.constexpr,
    OWN_K_DTYPE: tl.constexpr,
    OWN_V_DTYPE: tl.constexpr,
    OWN_K_SCALE: tl.constexpr,
    OWN_V_SCALE: tl.constexpr,
    OWN_ALIGNED: tl.constexpr,
    TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    if program < shared_programs:
        _shared_program(
            q_ptr, stride_qt, stride_qh, seg_meta_ptr, tiles_ptr, tile_segments_ptr, row_request_ptr, out_ptr,
            lse_ptr, n_tokens, q_heads, qk_scale, program // shared_splits, program % shared_splits, shared_splits,
            kv_head, GROUP, GROUP_PAD, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D,
            SEG_K_DTYPE, SEG_V_DTYPE, SEG_K_SCALE, SEG_V_SCALE, SEG_ALIGNED, TMA and SEG_ALIGNED, DOT_PRECISION,
        )  # fmt: skip
    else:
        item = program - shared_programs
        _own_program(
            q_ptr, stride_qt, stride_qh, own_meta_ptr, out_ptr, lse_ptr, n_tokens, q_heads, qk_scale,
            item // own_splits, item % own_splits, own_splits, shared_splits, kv_head,
            GROUP, GROUP_PAD, OWN_BLOCK_M, OWN_BLOCK_N, HEAD_DIM, BLOCK_D,
            OWN_K_DTYPE, OWN_V_DTYPE, OWN_K_SCALE, OWN_V_SCALE, OWN_ALIGNED, TMA and OWN_ALIGNED, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _shared_program(
    q_ptr: tl.tensor,
    stride_qt: tl.tensor,
    stride_qh: tl.tensor,
    meta_ptr: tl.tensor,
    tiles_ptr: tl.tensor,
    tile_segments_ptr: tl.tensor,
    row_request_ptr: tl.tensor,
    out_ptr: tl.tensor,
    lse_ptr: tl.tensor,
    n_tokens: tl.tensor,
    q_heads: tl.tensor,
    qk_scale: tl.tensor,
    tile: tl.tensor,
    split: tl.tensor,
    num_splits: tl.tensor,
    kv_head: tl.tensor,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
    TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """Chunk ``split`` of a tile's cartridges, laid end to end, for all of the tile's query rows: slot ``split``."""
    desc = tiles_ptr + tile * _TILE_COLUMNS
    first_segment = tl.load(desc)
    segment_count = tl.load(desc + 1)
    q, _, _, row_valid, token, head = load_query_rows(
        q_ptr, stride_qt, stride_qh, row_request_ptr, tl.load(desc + 2), tl.load(desc + 3), kv_head,
        GROUP, GROUP_PAD, BLOCK_M, HEAD_DIM, BLOCK_D,
    )  # fmt: skip
    lo, hi = split_range(tl.load(desc + 4), split, num_splits, BLOCK_N)
    base = lo * 0  # where the current cartridge starts among the tile's keys
    qpos = tl.zeros([BLOCK_M], dtype=tl.int32)  # unused: decode sees every key
    m_i, l_i, acc = empty_state(BLOCK_M, BLOCK_D)
    for i in range(segment_count):
        segment = tl.load(tile_segments_ptr + first_segment + i)
        k_base, v_base, k_stride_t, v_stride_t, ks_ptr, vs_ptr, length = load_segment(
            meta_ptr, segment, kv_head, K_DTYPE, V_DTYPE, ALIGNED
        )
        m_i, l_i, acc = attend_keys(
            q, m_i, l_i, acc, k_base, v_base, k_stride_t, v_stride_t, ks_ptr, vs_ptr,
            tl.maximum(lo - base, 0), tl.minimum(hi - base, length), qk_scale, qpos,
            BLOCK_N, HEAD_DIM, BLOCK_D, K_SCALE, V_SCALE, False, TMA, DOT_PRECISION,
        )  # fmt: skip
        base += length
    store_rows(out_ptr, lse_ptr, split, token, head, row_valid, m_i, l_i, acc, n_tokens, q_heads, HEAD_DIM, BLOCK_D)


@triton.jit
def _own_program(
    q_ptr: tl.tensor,
    stride_qt: tl.tensor,
    stride_qh: tl.tensor,
    meta_ptr: tl.tensor,
    out_ptr: tl.tensor,
    lse_ptr: tl.tensor,
    n_tokens: tl.tensor,
    q_heads: tl.tensor,
    qk_scale: tl.tensor,
    request: tl.tensor,
    split: tl.tensor,
    num_splits: tl.tensor,
    first_slot: tl.tensor,
    kv_head: tl.tensor,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
    TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """Chunk ``split`` of one request's own KV for that request's GROUP query rows (padded to BLOCK_M):
    slot ``first_slot + split``."""
    rows = tl.arange(0, BLOCK_M) // GROUP_PAD
    q, _, _, row_valid, token, head = load_token_rows(
        q_ptr, stride_qt, stride_qh, (rows * 0 + request).to(tl.int64), rows == 0, kv_head,
        GROUP, GROUP_PAD, BLOCK_M, HEAD_DIM, BLOCK_D,
    )  # fmt: skip
    k_base, v_base, k_stride_t, v_stride_t, ks_ptr, vs_ptr, length = load_segment(
        meta_ptr, request, kv_head, K_DTYPE, V_DTYPE, ALIGNED
    )
    lo, hi = split_range(length, split, num_splits, BLOCK_N)
    m_i, l_i, acc = empty_state(BLOCK_M, BLOCK_D)
    m_i, l_i, acc = attend_keys(
        q, m_i, l_i, acc, k_base, v_base, k_stride_t, v_stride_t, ks_ptr, vs_ptr, lo, hi, qk_scale,
        tl.zeros([BLOCK_M], dtype=tl.int32), BLOCK_N, HEAD_DIM, BLOCK_D, K_SCALE, V_SCALE, False, TMA, DOT_PRECISION,
    )  # fmt: skip
    slot = first_slot + split
    store_rows(out_ptr, lse_ptr, slot, token, head, row_valid, m_i, l_i, acc, n_tokens, q_heads, HEAD_DIM, BLOCK_D)


def _format_constants(prefix: str, segments: Sequence[KVSegment], fallback: torch.dtype) -> dict[str, object]:
    """The storage-format constexprs of one side (cartridges or own KV); the caller checked that its non-empty
    segments share one (empty ones are never read)."""
    segments = storage_segments(segments)
    if not segments:
        dtype = TL_DTYPE[fallback]
        return {f"{prefix}_K_DTYPE": dtype, f"{prefix}_V_DTYPE": dtype, f"{prefix}_K_SCALE": 0,
                f"{prefix}_V_SCALE": 0, f"{prefix}_ALIGNED": False}  # fmt: skip
    keys, values = segments[0].keys, segments[0].values
    return {
        f"{prefix}_K_DTYPE": TL_DTYPE[storage_of(keys).dtype],
        f"{prefix}_V_DTYPE": TL_DTYPE[storage_of(values).dtype],
        f"{prefix}_K_SCALE": granularity(keys),
        f"{prefix}_V_SCALE": granularity(values),
        f"{prefix}_ALIGNED": all(map(aligned, segments)),
    }


def launch_fused_decode(
    q: Tensor,
    plan: DecodePlan,
    kv_heads: int,
    segments: Sequence[KVSegment],
    used: Sequence[KVSegment],
    own_kv: Sequence[KVSegment] | None,
    out: Tensor,
    lse: Tensor,
    sm_scale: float,
    config: KernelConfig,
) -> None:
    """Run the planned launch. ``segments`` is the whole table (indexed by the plan), ``used`` the ones the
    plan reads (one storage format), ``own_kv`` one per request (one format). Writes ``out`` / ``lse``
    [plan.num_slots, tokens, q_heads(, head_dim)]: the output itself (any float dtype) when there is one slot,
    partials for launch_merge otherwise."""
    tokens, q_heads, head_dim = q.shape
    group = q_heads // kv_heads
    group_pad = next_pow2(group)
    kv_bytes = kv_element_bytes([*used, *storage_segments(own_kv or [])])
    check_launch(config, plan.block_m, group_pad, head_dim, kv_bytes, q.device)
    if q.stride(-1) != 1:
        raise ValueError("queries must be contiguous along head_dim")
    if plan.programs == 0:
        return
    seg_meta = segment_meta(segments, q.device) if segments else torch.zeros(1, 11, dtype=torch.int64, device=q.device)
    own_meta = seg_meta if own_kv is None else segment_meta(own_kv, q.device)
    _fused_decode_kernel[(plan.programs, kv_heads)](
        q,
        q.stride(0),
        q.stride(1),
        seg_meta,
        own_meta,
        plan.tiles,
        plan.tile_segments,
        plan.row_request,
        out,
        lse,
        tokens,
        q_heads,
        sm_scale * LOG2E,
        plan.shared_programs,
        plan.shared_splits,
        plan.own_splits,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=plan.block_m,
        OWN_BLOCK_M=max(MIN_DOT, group_pad),
        BLOCK_N=config.block_n,
        OWN_BLOCK_N=plan.own_block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        **_format_constants("SEG", used, q.dtype),
        **_format_constants("OWN", own_kv or [], q.dtype),
        TMA=tma_descriptors(config, q.device),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
