"""Triton kernel: attention of batched query rows over one KV segment per tile, writing partials + base-2 LSE.

Grid = (tiles, kv_heads, splits). A tile is up to ``BLOCK_M`` query rows (tokens x GQA group) that all read
the same segment, so a cartridge shared by many requests is streamed once per tile of its users rather than
once per request; tiles of one segment run concurrently and share its reads through L2. Split s handles the
s-th chunk of the segment's keys. Segments are addressed through a table of raw pointers, so the unique
cartridge tensors are never copied together.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cartridges.quantize import QuantizedKV
from cartridges_kernels.config import KernelConfig, check_launch, dot_precision, next_pow2, padded_head_dim
from cartridges_kernels.plan import LaunchPlan
from cartridges_kernels.reference import LOG2E
from cartridges_kernels.segments import (
    KVData,
    KVSegment,
    PooledKV,
    PoolLayers,
    kv_element_bytes,
    storage_of,
    storage_segments,
)
from cartridges_kernels.tile import (
    attend_keys,
    empty_state,
    load_query_rows,
    load_segment,
    split_range,
    store_rows,
    tile_entry,
)
from cartridges_kernels.transfer import retained, to_device

# Scale modes (constexpr): how stored keys/values turn into real values.
SCALE_NONE, SCALE_TOKEN, SCALE_CHANNEL = 0, 1, 2
_SCALE_MODE = {None: SCALE_NONE, "token": SCALE_TOKEN, "channel": SCALE_CHANNEL}

TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.int8: tl.int8,
    torch.float8_e4m3fn: tl.float8e4nv,
}


@triton.jit
def _segment_partials_kernel(
    q_ptr: tl.tensor,
    stride_qt: int,
    stride_qh: int,
    meta_ptr: tl.tensor,
    tiles_ptr: tl.tensor,
    row_token_ptr: tl.tensor,
    row_slot_ptr: tl.tensor,
    row_back_ptr: tl.tensor,
    part_o_ptr: tl.tensor,
    part_lse_ptr: tl.tensor,
    n_tokens: int,
    q_heads: int,
    qk_scale: float,
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
    CAUSAL: tl.constexpr,
    ALIGNED: tl.constexpr,
    TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seg, row_start, row_count = tile_entry(tiles_ptr, tile)
    k_base, v_base, k_stride_t, v_stride_t, ks_ptr, vs_ptr, length = load_segment(
        meta_ptr, seg, kv_head, K_DTYPE, V_DTYPE, ALIGNED
    )
    q, t, t_valid, row_valid, token, head = load_query_rows(
        q_ptr, stride_qt, stride_qh, row_token_ptr, row_start, row_count, kv_head,
        GROUP, GROUP_PAD, BLOCK_M, HEAD_DIM, BLOCK_D,
    )  # fmt: skip

    lo, hi = split_range(length, split, tl.num_programs(2), BLOCK_N)
    qpos = tl.zeros([BLOCK_M], dtype=tl.int32)
    if CAUSAL:
        back = tl.load(row_back_ptr + row_start + t, mask=t_valid, other=0)
        qpos = tl.where(t_valid, length - 1 - back, -1)  # the row's position in its own KV
        hi = tl.minimum(hi, tl.max(qpos, axis=0) + 1)

    m_i, l_i, acc = empty_state(BLOCK_M, BLOCK_D)
    m_i, l_i, acc = attend_keys(
        q, m_i, l_i, acc, k_base, v_base, k_stride_t, v_stride_t, ks_ptr, vs_ptr, lo, hi, qk_scale,
        qpos, BLOCK_N, HEAD_DIM, BLOCK_D, K_SCALE, V_SCALE, CAUSAL, TMA and ALIGNED, DOT_PRECISION,
    )  # fmt: skip
    slot = tl.load(row_slot_ptr + row_start + t, mask=t_valid, other=0) + split
    store_rows(
        part_o_ptr, part_lse_ptr, slot, token, head, row_valid, m_i, l_i, acc, n_tokens, q_heads, HEAD_DIM, BLOCK_D
    )


def _scale_info(x: KVData) -> tuple[int, int]:
    """(pointer, head stride) of a quantized tensor's scales; (0, 0) when unquantized."""
    if isinstance(x, QuantizedKV):
        if x.scales.size(-1) > 1 and x.scales.stride(-1) != 1:  # one scale per row has no stride to speak of
            raise ValueError("quantization scales must be contiguous along their last dimension")
        return x.scales.data_ptr(), x.scales.stride(0)
    return 0, 0


def segment_meta(segments: Sequence[KVSegment], device: torch.device) -> Tensor:
    """int64 [len(segments), 11], the per-segment row the kernel reads: key, value, key-scale and value-scale
    pointers (0 when unquantized), used length, key head/token strides, value head/token strides, key-scale
    and value-scale head strides. Raw pointers let one launch address many separately allocated tensors.

    The device tensor is cached by its contents: every layer of every decode step over the same cartridges
    reuses it instead of paying a host-to-device copy per launch (which would also break CUDA-graph capture).
    A cached table stays valid because it holds nothing but the values it was keyed by. A pool's table is
    not cached (its lengths change every step) and comes from its starts without a view per request; a pool
    that is one of :class:`PoolLayers` gets its rows of the table made for every layer on the first layer's
    call (one copy per step), unless the caller set ``tables`` already: a captured step's buffer, rewritten with
    ``pool_layer_tables`` before each replay. Copies are queued without stalling the host
    (``transfer.to_device``)."""
    if isinstance(segments, PooledKV):
        return _layer_table(segments, device) if segments.layers else to_device(pooled_meta(segments), device)
    return retained(_meta_tensor(_meta_rows(segments), device))


@functools.lru_cache(maxsize=1024)
def _meta_tensor(rows: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor:
    return to_device(torch.tensor(rows, dtype=torch.int64), device)


def _meta_rows(segments: Sequence[KVSegment]) -> tuple[tuple[int, ...], ...]:
    rows = []
    for seg in segments:
        k, v = storage_of(seg.keys), storage_of(seg.values)
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError("segment keys/values must be contiguous along head_dim")
        ks_ptr, ks_sh = _scale_info(seg.keys)
        vs_ptr, vs_sh = _scale_info(seg.values)
        rows.append(
            (
                k.data_ptr(),
                v.data_ptr(),
                ks_ptr,
                vs_ptr,
                seg.num_tokens,
                k.stride(0),
                k.stride(1),
                v.stride(0),
                v.stride(1),
                ks_sh,
                vs_sh,
            )
        )
    return tuple(rows)


def pooled_meta(pool: PooledKV) -> Tensor:
    """The rows of _meta_rows for each request of a pool (on the CPU): the pool's row with its pointers moved
    to the request's first row and its length, written into a flat int64 array (the row repeat and column
    writes run in C, so the cost barely grows with the batch) and wrapped without a copy."""
    row = _meta_rows([pool.whole])[0]
    if not pool:
        return torch.empty((0, len(row)), dtype=torch.int64)
    k_ptr, v_ptr, k_token_stride, v_token_stride = row[0], row[1], row[6], row[8]
    k_row, v_row = k_token_stride * pool.keys.element_size(), v_token_stride * pool.values.element_size()
    flat = array("q", row) * len(pool)
    flat[0 :: len(row)] = array("q", [k_ptr + start * k_row for start in pool.starts])
    flat[1 :: len(row)] = array("q", [v_ptr + start * v_row for start in pool.starts])
    flat[4 :: len(row)] = array("q", pool.lengths)
    return torch.frombuffer(flat, dtype=torch.int64).view(len(pool), len(row))


def _layer_table(pool: PooledKV, device: torch.device) -> Tensor:
    """Layer ``pool.layer``'s rows of the table of every layer of ``pool.layers``, made and copied on first use."""
    layers = pool.layers
    assert layers is not None
    if layers.tables is None or layers.tables.device != device:
        layers.tables = to_device(pool_layer_tables(layers), device)
    return layers.tables[pool.layer]


def pool_layer_tables(layers: PoolLayers) -> Tensor:
    """The tables of every layer of ``layers`` on the CPU, int64 [layers, requests, meta columns]: layer l's
    pointers are layer 0's moved by l layer strides."""
    first = pooled_meta(layers.pools[0])
    tables = first.expand(len(layers.pools), -1, -1).clone()  # (repeat() of a frombuffer tensor is 40x slower)
    steps = torch.arange(len(layers.pools), dtype=torch.int64)[:, None]
    tables[:, :, 0] += steps * (layers.keys.stride(0) * layers.keys.element_size())
    tables[:, :, 1] += steps * (layers.values.stride(0) * layers.values.element_size())
    return tables


def aligned(segment: KVSegment) -> bool:
    """Whether every head and token row of the segment starts on a 16-byte boundary with strides that are
    multiples of 16 elements: the promise the kernel's ``ALIGNED`` path makes the compiler for wide loads."""
    for x in (storage_of(segment.keys), storage_of(segment.values)):
        if x.data_ptr() % 16 or x.stride(0) % 16 or x.stride(1) % 16:
            return False
    return True


def tma_descriptors(config: KernelConfig, device: torch.device) -> bool:
    """Whether a launch copies aligned segments' blocks with TMA (``config.tma``). If so, checks that the GPU
    has it and gives Triton the allocator its on-device tensor descriptors need (a little global scratch per
    program, allocated at launch: on the graph's pool under CUDA-graph capture)."""
    if not config.tma:
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        raise ValueError("KernelConfig(tma=True) needs a GPU with TMA (sm_90 or newer); leave tma off here")
    triton.set_allocator(_descriptor_scratch)
    return True


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def granularity(x: KVData) -> int:
    return _SCALE_MODE[x.granularity if isinstance(x, QuantizedKV) else None]


def launch_segment_partials(
    q: Tensor,
    plan: LaunchPlan,
    segments: Sequence[KVSegment],
    part_o: Tensor,
    part_lse: Tensor,
    sm_scale: float,
    config: KernelConfig,
) -> None:
    """Run one planned launch, writing partial outputs into ``part_o`` [slots, tokens, q_heads, head_dim] (any
    float dtype; the dispatcher uses q's) and ``part_lse`` [slots, tokens, q_heads] fp32. ``segments`` are
    the launch's segments in plan order and must share one storage format."""
    tokens, q_heads, head_dim = q.shape
    first = storage_segments(segments, include_empty=True)[0]  # all share its format
    kv_heads = first.kv_heads
    group = q_heads // kv_heads
    group_pad = next_pow2(group)
    keys, values = first.keys, first.values
    check_launch(config, plan.block_m, group_pad, head_dim, kv_element_bytes([first]), q.device)
    if q.stride(-1) != 1:
        raise ValueError("queries must be contiguous along head_dim")
    grid = (plan.tiles.shape[0], kv_heads, plan.num_splits)
    _segment_partials_kernel[grid](
        q,
        q.stride(0),
        q.stride(1),
        segment_meta(segments, q.device),
        plan.tiles,
        plan.row_token,
        plan.row_slot,
        plan.row_back,
        part_o,
        part_lse,
        tokens,
        q_heads,
        sm_scale * LOG2E,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=plan.block_m,
        BLOCK_N=config.block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        K_DTYPE=TL_DTYPE[storage_of(keys).dtype],
        V_DTYPE=TL_DTYPE[storage_of(values).dtype],
        K_SCALE=granularity(keys),
        V_SCALE=granularity(values),
        CAUSAL=plan.own,
        ALIGNED=all(map(aligned, storage_segments(segments))),
        TMA=tma_descriptors(config, q.device),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
