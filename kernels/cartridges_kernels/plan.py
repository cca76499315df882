"""Host-side work planning: which query rows each kernel tile reads against which segment, and where it
writes.

The plan depends only on the batch's structure (lengths and segment lists), not on tensor contents, so it is
built once per step and reused by every layer (see :func:`plan_attention`'s cache). Of the own KVs it needs only
their formats and the longest one's length to the split choice's grain: a decode step's own KVs are one key
longer than the last step's, and it reuses that step's plan (causal rows find their position from the own KV's
length in the kernel).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cartridges_kernels.config import MIN_DOT, MIN_KEYS_PER_SPLIT, choose_num_splits, next_pow2
from cartridges_kernels.transfer import int32_tensor, to_device

# A segment's storage format: (key dtype, value dtype, key scale granularity, value scale granularity).
FormatKey = tuple[torch.dtype, torch.dtype, str | None, str | None]


@dataclass(frozen=True)
class BatchStructure:
    """Everything about a step that shapes the work, as hashable tuples (the plan cache key)."""

    query_lens: tuple[int, ...]
    request_segments: tuple[tuple[int, ...], ...]
    segment_lens: tuple[int, ...]
    segment_formats: tuple[FormatKey, ...]
    own_max_len: int  # the longest own KV, rounded down to MIN_KEYS_PER_SPLIT (see own_split_len)
    own_formats: tuple[FormatKey, ...] | None  # None: no own KV

    @property
    def query_starts(self) -> list[int]:
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        return starts


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: segments of one storage format, tiles of query rows, and the output slot per row.

    ``sources`` names the launch's segments in meta-table order: table indices for cartridges, request indices
    for own KV (``own`` is True). ``tiles`` is int32 [num_tiles, 3]: (segment in launch, first row, row
    count). Rows hold the query token, its first partial-output slot (split s writes slot + s) and, for causal
    launches, how many of its request's query tokens follow it (its position in the own KV is the KV's
    length - 1 - that). ``block_m`` is the tile height actually needed. ``query_rows`` is only planned for the
    warp-specialized kernel's cartridge launches (see :func:`plan_attention`).
    """

    sources: tuple[int, ...]
    own: bool
    tiles: Tensor
    row_token: Tensor
    row_slot: Tensor
    row_back: Tensor
    block_m: int
    num_splits: int
    query_rows: Tensor | None = None


@dataclass(frozen=True)
class AttentionPlan:
    launches: tuple[LaunchPlan, ...]
    num_slots: int


@dataclass(frozen=True)
class _Use:
    source: int  # segment index in the launch
    request: int
    part: int  # index among this request's uses within the launch


def _group_uses(structure: BatchStructure) -> list[tuple[bool, list[int], list[_Use]]]:
    """Split the work into launches by storage format (cartridges) plus own KV, skipping empty work."""
    groups: list[tuple[bool, list[int], list[_Use]]] = []
    for fmt in dict.fromkeys(structure.segment_formats):
        sources = [i for i, f in enumerate(structure.segment_formats) if f == fmt]
        local = {s: j for j, s in enumerate(sources)}
        uses: list[_Use] = []
        for r, indices in enumerate(structure.request_segments):
            mine = [i for i in indices if i in local and structure.segment_lens[i] > 0]
            uses += [_Use(local[i], r, p) for p, i in enumerate(mine) if structure.query_lens[r] > 0]
        if uses:
            groups.append((False, sources, uses))
    if structure.own_formats is not None:  # an own KV holds at least its request's queries (validated)
        for fmt in dict.fromkeys(structure.own_formats):
            requests = [r for r, f in enumerate(structure.own_formats) if f == fmt]
            uses = [_Use(j, r, 0) for j, r in enumerate(requests) if structure.query_lens[r] > 0]
            if uses:
                groups.append((True, requests, uses))
    return groups


def _tile_rows(
    structure: BatchStructure, uses: list[_Use], own: bool, block_t: int, shared_reads: bool
) -> tuple[list[tuple[int, int, int]], list[int], list[int], list[int]]:
    """Lay out query rows so each tile reads one segment; with shared reads a tile mixes requests."""
    starts = structure.query_starts
    runs: dict[tuple[int, int], list[int]] = {}
    for u, use in enumerate(uses):
        runs.setdefault((use.source, -1 if shared_reads else u), []).append(u)
    tiles: list[tuple[int, int, int]] = []
    row_token: list[int] = []
    row_use: list[int] = []
    row_back: list[int] = []
    for (source, _), run in runs.items():
        first = len(row_token)
        for u in run:
            r = uses[u].request
            n = structure.query_lens[r]
            row_token += range(starts[r], starts[r] + n)
            row_use += [u] * n
            if own:
                row_back += range(n - 1, -1, -1)
        for tile_start in range(first, len(row_token), block_t):
            tiles.append((source, tile_start, min(block_t, len(row_token) - tile_start)))
    return tiles, row_token, row_use, row_back


@functools.lru_cache(maxsize=16)
def plan_attention(
    structure: BatchStructure,
    kv_heads: int,
    group_pad: int,
    block_m: int,
    device: torch.device,
    shared_reads: bool,
    num_splits: int | None,
    q_heads: int | None = None,
) -> AttentionPlan:
    """The launches for one step, cached: every layer of a step has the same structure.

    ``block_m`` caps a tile's query rows (tokens x ``group_pad``); launches whose tiles are smaller get a
    smaller block. ``num_splits`` forces the split-KV factor; None picks it from the grid size (see
    choose_num_splits). ``q_heads`` given: cartridge launches also get ``query_rows`` for the warp-specialized
    kernel (see :func:`_query_rows`).
    """
    launches: list[LaunchPlan] = []
    num_slots = 0
    for own, sources, uses in _group_uses(structure):
        tiles, row_token, row_use, row_back = _tile_rows(
            structure, uses, own, block_m // group_pad, shared_reads or own
        )
        longest = structure.own_max_len if own else max(structure.segment_lens[s] for s in sources)
        splits = num_splits or choose_num_splits(len(tiles) * kv_heads, longest, device)
        use_slot = [num_slots + use.part * splits for use in uses]
        num_slots += (max(use.part for use in uses) + 1) * splits
        launch_block_m = max(MIN_DOT, group_pad * next_pow2(max(t[2] for t in tiles)))
        query_rows = None
        if q_heads and not own:
            rows = _query_rows(tiles, row_token, launch_block_m // group_pad, kv_heads, group_pad, q_heads)
            query_rows = to_device(torch.tensor(rows, dtype=torch.long), device)
        launches.append(
            LaunchPlan(
                sources=tuple(sources),
                own=own,
                tiles=int32_tensor(tiles, device),
                row_token=int32_tensor(row_token, device),
                row_slot=int32_tensor([use_slot[u] for u in row_use], device),
                row_back=int32_tensor(row_back if own else [0], device),
                block_m=launch_block_m,
                num_splits=splits,
                query_rows=query_rows,
            )
        )
    return AttentionPlan(launches=tuple(launches), num_slots=num_slots)


def _query_rows(
    tiles: list[tuple[int, int, int]],
    row_token: list[int],
    tokens_per_tile: int,
    kv_heads: int,
    group_pad: int,
    q_heads: int,
) -> list[list[int]]:
    """[tokens, heads]: the query token and head of every row the warp-specialized kernel reads, KV head by KV
    head, tile by tile (row m of a tile is its token m // group_pad's head kv_head * group + m % group_pad), so
    one gather puts each program's rows in one contiguous block. Padding rows (past a tile's tokens or its GQA
    group) repeat a real row; the kernel does not store them."""
    group = q_heads // kv_heads
    tokens: list[int] = []
    heads: list[int] = []
    for kv_head in range(kv_heads):
        group_heads = [kv_head * group + min(g, group - 1) for g in range(group_pad)]
        for _, start, count in tiles:
            for i in range(tokens_per_tile):
                tokens += [row_token[start + min(i, count - 1)]] * group_pad
                heads += group_heads
    return [tokens, heads]


def own_split_len(lengths: Sequence[int]) -> int:
    """The longest of ``lengths`` to the grain choose_num_splits reads it in: steps whose own KVs differ by less
    plan alike. It is taken over every own KV, whatever its format, so a launch of one format may be split for a
    longer walk than its own (any split is correct: the kernel reads each walk's length from its table)."""
    return max(lengths, default=0) // MIN_KEYS_PER_SPLIT * MIN_KEYS_PER_SPLIT
