"""The entry points the serving engine calls: segmented attention for decode and for prefill.

Triton kernels run on CUDA; elsewhere the PyTorch backend runs (``torch_backend``: the reference's maths with
each shared segment read once for all its users). ``backend="triton"`` (or the environment
variable ``CARTRIDGES_KERNELS_BACKEND=triton``) forces the kernels, which on CPU needs ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cartridges.quantize import QuantizedKV
from cartridges_kernels.config import (
    FUSED_DECODE_MAX_SHARED_ROWS,
    KernelConfig,
    check_fp8_storage,
    default_config,
    next_pow2,
    own_block_n,
    shared_memory_limit,
)
from cartridges_kernels.decode_plan import DecodePlan, DecodeStructure, own_walk_keys, plan_decode
from cartridges_kernels.plan import AttentionPlan, BatchStructure, FormatKey, own_split_len, plan_attention
from cartridges_kernels.segments import (
    KVData,
    KVSegment,
    PooledKV,
    SegmentTable,
    segment_lengths,
    select,
    storage_of,
    storage_segments,
)
from cartridges_kernels.streams import run_side_by_side
from cartridges_kernels.torch_backend import segmented_attention_torch
from cartridges_kernels.transfer import retained

Backend = Literal["auto", "triton", "torch"]
BACKEND_ENV = "CARTRIDGES_KERNELS_BACKEND"


def decode_attention(
    q: Tensor,
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    *,
    sm_scale: float | None = None,
    backend: Backend | None = None,
    num_splits: int | None = None,
    shared_reads: bool = True,
    config: KernelConfig | None = None,
) -> Tensor:
    """One decode step. q: [batch, q_heads, head_dim] (one token per request) -> [batch, q_heads, head_dim].

    Request r attends over ``table.segments[i]`` for i in ``table.request_segments[r]`` and over all
    ``own_kv[r].length`` rows of its own KV (which already holds this token's key/value). See
    :func:`prefill_attention` for the options.
    """
    return prefill_attention(
        q,
        [1] * q.shape[0],
        table,
        own_kv,
        sm_scale=sm_scale,
        backend=backend,
        num_splits=num_splits,
        shared_reads=shared_reads,
        config=config,
    )


def prefill_attention(
    q: Tensor,
    query_lens: Sequence[int],
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    *,
    sm_scale: float | None = None,
    backend: Backend | None = None,
    num_splits: int | None = None,
    shared_reads: bool = True,
    config: KernelConfig | None = None,
) -> Tensor:
    """A chunk of query tokens per request. q: [sum(query_lens), q_heads, head_dim], requests back to back.

    Cartridge segments are fully visible; the own KV ``own_kv[r]`` ([kv_heads, capacity, head_dim], ``length``
    rows used) ends with the chunk's keys, and query i of the chunk sees own rows 0 through
    ``length - query_lens[r] + i`` (causal). ``own_kv=None`` attends over cartridges only. q_heads must be a
    multiple of kv_heads (GQA). Returns [sum(query_lens), q_heads, head_dim] in q's dtype.

    Options: ``sm_scale`` (> 0, default 1/sqrt(head_dim)); ``backend`` ("auto": Triton on CUDA, else PyTorch;
    default from $CARTRIDGES_KERNELS_BACKEND); ``num_splits`` forces split-KV (default: only when the grid
    would not fill the GPU); ``shared_reads=False`` gives every request its own pass over a cartridge (for
    comparison); ``config`` overrides the tile sizes. A model's layers call :class:`StepAttention` instead.
    """
    step = StepAttention(
        query_lens,
        table.request_segments,
        backend=backend,
        num_splits=num_splits,
        shared_reads=shared_reads,
        config=config,
    )
    return step(q, table.segments, own_kv, sm_scale=sm_scale)


class StepAttention:
    """Segmented attention for every layer of one step (see :func:`prefill_attention` for the arguments).

    The layers of a step share its structure (query lengths, the cartridges each request reads, the own KVs'
    lengths) and differ only in their tensors. So the checks, the choice of kernel path and its launch plans
    are made on the first layer's call and reused: a later call compares its tensors' layout (shapes, storage
    formats, lengths, device: per cartridge, and once for a pool of own KV) with the first's and goes straight
    to the launches. A call whose layout differs is checked and routed again.
    """

    def __init__(
        self,
        query_lens: Sequence[int],
        request_segments: Sequence[Sequence[int]],
        *,
        backend: Backend | None = None,
        num_splits: int | None = None,
        shared_reads: bool = True,
        config: KernelConfig | None = None,
    ) -> None:
        self.query_lens = tuple(query_lens)
        self.request_segments = tuple(map(tuple, request_segments))
        self.backend, self.num_splits, self.shared_reads, self.config = backend, num_splits, shared_reads, config
        self._layout: tuple[object, ...] | None = None
        self._route: _Route | None = None  # None: the PyTorch backend

    def __call__(
        self,
        q: Tensor,
        segments: Sequence[KVSegment],
        own_kv: Sequence[KVSegment] | None,
        *,
        sm_scale: float | None = None,
    ) -> Tensor:
        """This layer's attention: ``segments`` are its cartridge segments, indexed by ``request_segments``."""
        table = SegmentTable(segments, self.request_segments)
        layout = _layout(q, segments, own_kv)
        if layout != self._layout:
            _validate(q, self.query_lens, table, own_kv)
            route = None
            if _resolve_backend(self.backend, q) == "triton":
                route = _route(
                    q, self.query_lens, table, own_kv, self.num_splits, self.shared_reads, self.config, fused=None
                )
            self._route, self._layout = route, layout  # together: a failed call leaves the last layer's
        scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
        if not scale > 0:  # the kernels take the running max of unscaled scores
            raise ValueError(f"sm_scale must be positive, got {sm_scale}")
        if self._route is None:
            return segmented_attention_torch(q, self.query_lens, table, own_kv, scale)[0]
        return _attend(self._route, q, self.query_lens, table, own_kv, scale)[0]


def segmented_attention_triton(
    q: Tensor,
    query_lens: Sequence[int],
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    sm_scale: float,
    num_splits: int | None,
    shared_reads: bool,
    config: KernelConfig | None,
    fused: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Kernel path, without prefill_attention's checks of the inputs. Decode (one query token per request)
    whose cartridges share one storage format and whose own KV share one, and whose shared walks are short
    enough for it to win (config.FUSED_DECODE_MAX_SHARED_ROWS), runs the fused kernel: one launch per layer,
    plus a merge when a row has several slots. Otherwise: one partials launch per storage format, one for own
    KV, a merge. ``fused`` True or False forces the choice (where the batch allows the fused kernel at all),
    for benchmarks and tests. ``config`` None takes config.default_config for the storage of the KV the step
    reads.

    Returns (out [tokens, q_heads, head_dim] in q's dtype, base-2 LSE [tokens, q_heads] float32).
    """
    route = _route(q, query_lens, table, own_kv, num_splits, shared_reads, config, fused)
    return _attend(route, q, query_lens, table, own_kv, sm_scale)


KernelPath = Literal["fused", "multi-launch"]


def kernel_path(
    q: Tensor,
    query_lens: Sequence[int],
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    *,
    num_splits: int | None = None,
    shared_reads: bool = True,
    config: KernelConfig | None = None,
    fused: bool | None = None,
) -> KernelPath:
    """Which path :func:`segmented_attention_triton` takes with these arguments: "fused" (the fused decode
    kernel) or "multi-launch". A benchmark records it beside each timing, since the dispatcher switches paths
    with the batch's shape (config.FUSED_DECODE_MAX_SHARED_ROWS). Plans the call as it would, launches nothing.
    """
    route = _route(q, query_lens, table, own_kv, num_splits, shared_reads, config, fused)
    return "fused" if route.fused_plan is not None else "multi-launch"


@dataclass(frozen=True)
class _Route:
    """How the kernels run a call, worked out from its structure alone: every layer of a step takes the same.
    ``fused_plan`` is the fused decode kernel's plan, else ``launches`` the multi-launch path's; ``used`` are
    the table indices of the non-empty segments some request reads."""

    config: KernelConfig
    kv_heads: int
    used: tuple[int, ...]
    fused_plan: DecodePlan | None = None
    launches: AttentionPlan | None = None


def _route(
    q: Tensor,
    query_lens: Sequence[int],
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    num_splits: int | None,
    shared_reads: bool,
    config: KernelConfig | None,
    fused: bool | None,
) -> _Route:
    """The path and plans of a call (see segmented_attention_triton)."""
    named = table.named_segments
    used = tuple(i for i, s in enumerate(table.segments) if i in named and s.num_tokens > 0)
    used_formats = {_format(table.segments[i]) for i in used}
    own_formats = {_format(s) for s in storage_segments(own_kv or [])}
    formats = used_formats | own_formats
    capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
    check_fp8_storage({dtype for k, v, _, _ in formats for dtype in (k, v)}, capability)
    config = config or default_config(q.shape[-1], *_storage(formats), shared_memory=shared_memory_limit(q.device))
    q_heads = q.shape[1]
    kv_heads = _kv_heads(table, own_kv, q_heads)
    decode = set(query_lens) <= {1}  # one token per request
    if fused is not False and decode and len(used_formats) <= 1 and len(own_formats) <= 1:
        # Without own KV the own branch never runs: it gets blocks as small as the shared walk's.
        own_n = own_block_n(config, q.shape[-1], *_storage(own_formats, used_formats)) if own_formats else None
        fused_plan = _plan_decode(q, table, own_kv, kv_heads, num_splits, shared_reads, config, own_n)
        if fused or fused_plan.shared_rows < FUSED_DECODE_MAX_SHARED_ROWS:
            return _Route(config, kv_heads, used, fused_plan=fused_plan)
    structure = BatchStructure(
        query_lens=tuple(query_lens),
        request_segments=tuple(map(tuple, table.request_segments)),
        segment_lens=tuple(s.num_tokens for s in table.segments),
        segment_formats=tuple(_format(s) for s in table.segments),
        own_max_len=0 if own_kv is None else own_split_len(segment_lengths(own_kv)),
        own_formats=None if own_kv is None else _formats(own_kv),
    )
    group_pad = next_pow2(q_heads // kv_heads)
    ws_heads = q_heads if config.warp_specialize else None  # the warp-specialized kernel's query gather
    plan = plan_attention(structure, kv_heads, group_pad, config.block_m, q.device, shared_reads, num_splits, ws_heads)
    return _Route(config, kv_heads, used, launches=retained(plan))


def _attend(
    route: _Route,
    q: Tensor,
    query_lens: Sequence[int],
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    sm_scale: float,
) -> tuple[Tensor, Tensor]:
    """Run a routed call's launches over this call's tensors."""
    if q.stride(-1) != 1:  # the kernels load a query row as one vector (a transposed projection, say)
        q = q.contiguous()
    if route.fused_plan is not None:
        used = [table.segments[i] for i in route.used]
        return fused_decode_triton(q, route.fused_plan, route.kv_heads, table, used, own_kv, sm_scale, route.config)
    from cartridges_kernels.merge_kernel import launch_merge  # imports triton only on this path
    from cartridges_kernels.segment_kernel import launch_segment_partials
    from cartridges_kernels.ws_kernel import launch_ws_partials, warp_specializes

    plan = route.launches
    assert plan is not None
    tokens, q_heads, head_dim = q.shape
    # Partials in q's dtype, as on the fused path: at batch 64 with a shared cartridge fp32 ones added 45% to
    # the bytes a decode step must move (9 slots written and merged), 16-bit ones half that.
    part_o = torch.empty((plan.num_slots, tokens, q_heads, head_dim), dtype=q.dtype, device=q.device)
    part_lse = torch.full((plan.num_slots, tokens, q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    jobs = []
    for launch in plan.launches:
        sources = own_kv if launch.own else table.segments
        assert sources is not None
        segments = select(sources, launch.sources)
        launcher = launch_ws_partials if warp_specializes(launch, segments, q) else launch_segment_partials
        jobs.append(functools.partial(launcher, q, launch, segments, part_o, part_lse, sm_scale, route.config))
    if route.config.side_by_side:
        run_side_by_side(jobs, q.device)
    else:
        for job in jobs:
            job()
    out = torch.empty((tokens, q_heads, head_dim), dtype=q.dtype, device=q.device)
    out_lse = torch.empty((tokens, q_heads), dtype=torch.float32, device=q.device)
    launch_merge(part_o, part_lse, out, out_lse)
    return out, out_lse


def _layout(q: Tensor, segments: Sequence[KVSegment], own_kv: Sequence[KVSegment] | None) -> tuple[object, ...]:
    """What the checks and the route read of a call's tensors: calls of equal layouts pass the same checks
    and take the same route."""
    if own_kv is None:
        own: object = None
    elif isinstance(own_kv, PooledKV):
        own = (_segment_layout(own_kv.whole), own_kv.lengths)
    else:
        own = tuple(map(_segment_layout, own_kv))
    return q.shape, q.dtype, q.device, tuple(map(_segment_layout, segments)), own


def _segment_layout(segment: KVSegment) -> tuple[object, ...]:
    return _format(segment), segment.num_tokens, segment.kv_heads, segment.head_dim, segment.device


def _storage(formats: AbstractSet[FormatKey], others: AbstractSet[FormatKey] = frozenset()) -> tuple[int, bool]:
    """(widest element in bytes of ``formats``, 1 when empty; whether any of ``formats`` or ``others`` is
    quantized): what sizes a kernel's shared-memory pipeline, and what costs it registers."""
    element_bytes = max((dtype.itemsize for k, v, _, _ in formats for dtype in (k, v)), default=1)
    return element_bytes, any(k or v for _, _, k, v in formats | others)


def _plan_decode(
    q: Tensor,
    table: SegmentTable,
    own_kv: Sequence[KVSegment] | None,
    kv_heads: int,
    num_splits: int | None,
    shared_reads: bool,
    config: KernelConfig,
    own_n: int | None,
) -> DecodePlan:
    """The fused decode plan of this step (cached by the step's structure: every layer reuses it, and so do the
    next steps until the longest own KV needs another block); own walks in blocks of ``own_n`` keys (None:
    config.block_n)."""
    own_block = own_n or config.block_n
    structure = DecodeStructure(
        request_segments=tuple(map(tuple, table.request_segments)),
        segment_lens=tuple(s.num_tokens for s in table.segments),
        own_keys=None if own_kv is None else own_walk_keys(segment_lengths(own_kv), own_block),
    )
    group_pad = next_pow2(q.shape[1] // kv_heads)
    return retained(
        plan_decode(
            structure,
            kv_heads,
            group_pad,
            config.block_m,
            config.block_n,
            own_block,
            q.device,
            shared_reads,
            num_splits,
        )
    )


def fused_decode_triton(
    q: Tensor,
    plan: DecodePlan,
    kv_heads: int,
    table: SegmentTable,
    used: Sequence[KVSegment],
    own_kv: Sequence[KVSegment] | None,
    sm_scale: float,
    config: KernelConfig,
) -> tuple[Tensor, Tensor]:
    """The fused decode path (see fused_kernel): one launch, plus a merge when a row has several slots.

    Partials are kept in q's dtype, as the output is: a 16-bit partial rounds as the output will, and halves
    what the launch writes and the merge reads."""
    from cartridges_kernels.fused_kernel import launch_fused_decode  # imports triton only on this path
    from cartridges_kernels.merge_kernel import launch_merge

    tokens, q_heads, head_dim = q.shape
    out = torch.empty((tokens, q_heads, head_dim), dtype=q.dtype, device=q.device)
    out_lse = torch.empty((tokens, q_heads), dtype=torch.float32, device=q.device)
    if plan.num_slots == 1:
        launch_fused_decode(q, plan, kv_heads, table.segments, used, own_kv, out, out_lse, sm_scale, config)
        return out, out_lse
    part_o = torch.empty((plan.num_slots, tokens, q_heads, head_dim), dtype=q.dtype, device=q.device)
    part_lse = torch.empty((plan.num_slots, tokens, q_heads), dtype=torch.float32, device=q.device)
    launch_fused_decode(q, plan, kv_heads, table.segments, used, own_kv, part_o, part_lse, sm_scale, config)
    launch_merge(part_o, part_lse, out, out_lse)
    return out, out_lse


def _resolve_backend(backend: Backend | None, q: Tensor) -> Literal["triton", "torch"]:
    choice = backend or os.environ.get(BACKEND_ENV, "auto")
    if choice == "auto":
        return "triton" if q.is_cuda else "torch"
    if choice not in ("triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {choice!r}")
    return "triton" if choice == "triton" else "torch"


def _format(segment: KVSegment) -> FormatKey:
    def granularity(x: KVData) -> str | None:
        return x.granularity if isinstance(x, QuantizedKV) else None

    k, v = segment.keys, segment.values
    return storage_of(k).dtype, storage_of(v).dtype, granularity(k), granularity(v)


def _formats(segments: Sequence[KVSegment]) -> tuple[FormatKey, ...]:
    """The storage format of each segment (a pool's, once)."""
    if isinstance(segments, PooledKV):
        return (_format(segments.whole),) * len(segments)
    return tuple(_format(s) for s in segments)


def _kv_heads(table: SegmentTable, own_kv: Sequence[KVSegment] | None, q_heads: int) -> int:
    if table.segments:
        return table.segments[0].kv_heads
    own = storage_segments(own_kv or [], include_empty=True)
    return own[0].kv_heads if own else q_heads


def _validate(q: Tensor, query_lens: Sequence[int], table: SegmentTable, own_kv: Sequence[KVSegment] | None) -> None:
    """Fail with a clear message on shape mismatches the kernels would otherwise turn into garbage."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, q_heads, head_dim], got {tuple(q.shape)}")
    if sum(query_lens) != q.shape[0] or min(query_lens, default=0) < 0:
        raise ValueError(f"query_lens {list(query_lens)} do not partition {q.shape[0]} query tokens")
    if table.num_requests != len(query_lens):
        raise ValueError(f"table describes {table.num_requests} requests, batch has {len(query_lens)}")
    if own_kv is not None and len(own_kv) != len(query_lens):
        raise ValueError(f"{len(own_kv)} own-KV segments for {len(query_lens)} requests")
    q_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = _kv_heads(table, own_kv, q_heads)
    for seg in [*table.segments, *storage_segments(own_kv or [], include_empty=True)]:
        if seg.kv_heads != kv_heads or seg.head_dim != head_dim:
            raise ValueError(
                f"segment [{seg.kv_heads} heads, head_dim {seg.head_dim}] does not match "
                f"[{kv_heads} heads, head_dim {head_dim}]"
            )
        if seg.device != q.device:
            raise ValueError(f"segment on {seg.device}, queries on {q.device}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    if own_kv is not None:
        lengths = segment_lengths(own_kv)
        if any(map(operator.lt, lengths, query_lens)):
            r = next(r for r, (rows, n) in enumerate(zip(lengths, query_lens, strict=True)) if rows < n)
            raise ValueError(f"request {r}: own KV has {lengths[r]} rows but {query_lens[r]} queries")
