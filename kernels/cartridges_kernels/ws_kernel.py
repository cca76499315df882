"""Triton kernel: the multi-launch path's cartridge partials, warp-specialized (``KernelConfig.warp_specialize``).

The shared walk is bounded by its dot products, not its bytes (a cartridge read by 64 requests at GQA 4 does
256 FLOPs per byte), and one warpgroup that waits on each QK^T before its softmax leaves the tensor cores idle
half the time. Triton's automatic warp specialization splits such a loop into a producer warp that issues the
TMA copies and consumer warpgroups that run the dots and the softmax. On sm_90 (Triton 3.6 and 3.9) it takes
only a loop whose operands all come through tensor descriptors: a pointer load of the queries, or a descriptor
made from a pointer read out of a table, fails the compile; a partial last block after the loop, or the loop
inside a branch, silently turns it off. So this kernel differs from ``segment_kernel`` in three ways:

- the queries come gathered into tile order (``tile_queries``: each program's rows are one contiguous block);
- a segment's key and value pointers are typed base pointers (the first segment's) plus the offsets from the
  segment table;
- one loop walks every block of the chunk, the last one masked in the loop like the others.

It runs cartridge launches over aligned 16-bit segments; own KV (causal) and quantized cartridges keep
``segment_kernel``. The merge is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cartridges_kernels.config import KernelConfig, check_launch, dot_precision, next_pow2, padded_head_dim
from cartridges_kernels.plan import LaunchPlan
from cartridges_kernels.reference import LOG2E
from cartridges_kernels.segment_kernel import aligned, segment_meta, tma_descriptors
from cartridges_kernels.segments import KVSegment, kv_element_bytes, storage_of, storage_segments
from cartridges_kernels.tile import (
    META_COLUMNS,
    empty_state,
    fold_block,
    split_range,
    store_rows,
    tile_entry,
    tile_rows,
)


@triton.jit
def _cartridge_ws_kernel(
    q_tiles_ptr: tl.tensor,
    k_base_ptr: tl.tensor,
    v_base_ptr: tl.tensor,
    meta_ptr: tl.tensor,
    tiles_ptr: tl.tensor,
    row_token_ptr: tl.tensor,
    row_slot_ptr: tl.tensor,
    part_o_ptr: tl.tensor,
    part_lse_ptr: tl.tensor,
    n_tokens: int,
    q_heads: int,
    qk_scale: float,
    num_tiles: int,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seg, row_start, row_count = tile_entry(tiles_ptr, tile)

    q_rows = tl.make_tensor_descriptor(
        q_tiles_ptr, [tl.num_programs(1) * num_tiles * BLOCK_M, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, BLOCK_D]
    )
    q = q_rows.load([(kv_head * num_tiles + tile) * BLOCK_M, 0])
    meta = meta_ptr + seg.to(tl.int64) * META_COLUMNS
    k_base = _from_base(k_base_ptr, tl.load(meta + 0)) + kv_head * tl.load(meta + 5)
    v_base = _from_base(v_base_ptr, tl.load(meta + 1)) + kv_head * tl.load(meta + 7)
    k_stride_t = tl.multiple_of(tl.load(meta + 6), 16)
    v_stride_t = tl.multiple_of(tl.load(meta + 8), 16)
    lo, hi = split_range(tl.load(meta + 4).to(tl.int32), split, tl.num_programs(2), BLOCK_N)
    k_rows = tl.make_tensor_descriptor(k_base, [hi, HEAD_DIM], [k_stride_t, 1], [BLOCK_N, BLOCK_D])
    v_rows = tl.make_tensor_descriptor(v_base, [hi, HEAD_DIM], [v_stride_t, 1], [BLOCK_N, BLOCK_D])

    unused = tl.zeros([BLOCK_D], dtype=tl.float32)  # scales and positions: 16-bit cartridges, no causality
    qpos = tl.zeros([BLOCK_M], dtype=tl.int32)
    m_i, l_i, acc = empty_state(BLOCK_M, BLOCK_D)
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        m_i, l_i, acc = fold_block(
            q, m_i, l_i, acc, k_rows, v_rows, k_stride_t, v_stride_t, k_base_ptr, v_base_ptr, unused, start, hi,
            qk_scale, qpos, BLOCK_N, HEAD_DIM, BLOCK_D, 0, 0, False, True, True, DOT_PRECISION,
        )  # fmt: skip

    t, t_valid, token, row_valid, head = tile_rows(
        row_token_ptr, row_start, row_count, kv_head, GROUP, GROUP_PAD, BLOCK_M
    )
    slot = tl.load(row_slot_ptr + row_start + t, mask=t_valid, other=0) + split
    store_rows(
        part_o_ptr, part_lse_ptr, slot, token, head, row_valid, m_i, l_i, acc, n_tokens, q_heads, HEAD_DIM, BLOCK_D
    )


@triton.jit
def _from_base(base_ptr: tl.tensor, address: tl.tensor) -> tl.tensor:
    """The pointer at ``address`` (an int64 read from a segment table) as ``base_ptr`` plus an offset: a
    descriptor made from an integer cast to a pointer fails Triton's warp specialization on sm_90."""
    element = base_ptr.dtype.element_ty.primitive_bitwidth // 8
    return base_ptr + (address - base_ptr.to(tl.int64)) // element


def warp_specializes(plan: LaunchPlan, segments: Sequence[KVSegment], q: Tensor) -> bool:
    """Whether the launch was planned for this kernel (``query_rows``: a cartridge launch under a
    ``warp_specialize`` config) and is one it runs: cartridges stored unquantized in 16 bits, every one aligned
    for descriptors, and query rows whose width is a whole number of 16-byte pieces (the gathered queries' row
    stride, which a descriptor needs)."""
    stored = storage_segments(segments)
    return (
        plan.query_rows is not None
        and q.shape[-1] * q.element_size() % 16 == 0
        and all(
            isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16)
            for s in stored
            for x in (s.keys, s.values)
        )
        and all(map(aligned, stored))
    )


def tile_queries(q: Tensor, plan: LaunchPlan) -> Tensor:
    """q's rows in the kernel's tile order, [kv_heads * tiles * BLOCK_M, head_dim], in one gather: KV head h's
    tile t is rows (h * tiles + t) * BLOCK_M onwards (``plan.query_rows``)."""
    assert plan.query_rows is not None
    return q[plan.query_rows[0], plan.query_rows[1]]


def launch_ws_partials(
    q: Tensor,
    plan: LaunchPlan,
    segments: Sequence[KVSegment],
    part_o: Tensor,
    part_lse: Tensor,
    sm_scale: float,
    config: KernelConfig,
) -> None:
    """Run one planned cartridge launch with this kernel (see ``warp_specializes``); same outputs as
    ``segment_kernel.launch_segment_partials``."""
    tokens, q_heads, head_dim = q.shape
    first = storage_segments(segments, include_empty=True)[0]
    kv_heads = first.kv_heads
    group_pad = next_pow2(q_heads // kv_heads)
    check_launch(config, plan.block_m, group_pad, head_dim, kv_element_bytes([first]), q.device)
    tma_descriptors(config, q.device)  # checks the GPU, sets the descriptors' allocator
    num_tiles = plan.tiles.shape[0]
    _cartridge_ws_kernel[(num_tiles, kv_heads, plan.num_splits)](
        tile_queries(q, plan),
        storage_of(first.keys),
        storage_of(first.values),
        segment_meta(segments, q.device),
        plan.tiles,
        plan.row_token,
        plan.row_slot,
        part_o,
        part_lse,
        tokens,
        q_heads,
        sm_scale * LOG2E,
        num_tiles,
        GROUP=q_heads // kv_heads,
        GROUP_PAD=group_pad,
        BLOCK_M=plan.block_m,
        BLOCK_N=config.block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
