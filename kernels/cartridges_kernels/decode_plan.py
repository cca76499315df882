"""Host-side planning of the fused decode launch: which requests share a tile, and which segments it walks.

A decode tile holds requests that read the same cartridge list, so each cartridge is streamed once per tile
for all of them; the tile then reads each of its requests' own KV in turn. Split-KV cuts a tile's keys (its
cartridges, then its requests' own KV, laid end to end) into equal chunks, one per CTA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from cartridges_kernels.config import MIN_DOT, choose_num_splits, next_pow2

TILE_COLUMNS = 5  # first entry in tile_segments, number of segments, first row, row count, keys in total


@dataclass(frozen=True)
class DecodeStructure:
    """What shapes a decode step's work, as hashable tuples (the plan cache key)."""

    request_segments: tuple[tuple[int, ...], ...]
    segment_lens: tuple[int, ...]
    own_lens: tuple[int, ...] | None


@dataclass(frozen=True)
class DecodePlan:
    """The fused launch: ``tiles`` int32 [num_tiles, TILE_COLUMNS] (see TILE_COLUMNS), ``tile_segments`` the
    tiles' segment lists back to back (int32), ``row_request`` the request of each tile row (int32)."""

    tiles: Tensor
    tile_segments: Tensor
    row_request: Tensor
    block_m: int
    num_splits: int


def _share_groups(structure: DecodeStructure, shared_reads: bool) -> dict[tuple[int, ...], list[int]]:
    """Requests keyed by the non-empty segments they read; without shared reads, one group per request.

    The key is sorted: attention over a union of segments does not depend on their order.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, indices in enumerate(structure.request_segments):
        key = tuple(sorted(i for i in indices if structure.segment_lens[i] > 0))
        groups.setdefault(key if shared_reads else (*key, -1 - r), []).append(r)
    return groups


@functools.lru_cache(maxsize=16)
def plan_decode(
    structure: DecodeStructure,
    kv_heads: int,
    group_pad: int,
    block_m: int,
    device: torch.device,
    shared_reads: bool,
    num_splits: int | None,
) -> DecodePlan:
    """The fused launch for one decode step, cached: every layer of a step has the same structure.

    Every request gets a tile row, even one with no keys (its output is written as zeros), so the outputs
    need no initialization. ``num_splits`` forces split-KV; None picks it from the grid (choose_num_splits).
    """
    tiles: list[tuple[int, int, int, int, int]] = []
    tile_segments: list[int] = []
    row_request: list[int] = []
    for key, requests in _share_groups(structure, shared_reads).items():
        segments = [i for i in key if i >= 0]
        first = len(tile_segments)
        tile_segments += segments
        shared_keys = sum(structure.segment_lens[i] for i in segments)
        # A tile walks each request's own KV with all of its rows, so batching requests pays only for the
        # cartridge keys they share; requests that share none (an ICL prompt each) get a tile each: more CTAs.
        per_tile = block_m // group_pad if shared_keys else 1
        for start in range(0, len(requests), per_tile):
            chunk = requests[start : start + per_tile]
            own_keys = 0 if structure.own_lens is None else sum(structure.own_lens[r] for r in chunk)
            tiles.append((first, len(segments), len(row_request), len(chunk), shared_keys + own_keys))
            row_request += chunk
    splits = num_splits or choose_num_splits(len(tiles) * kv_heads, max((t[4] for t in tiles), default=0), device)
    return DecodePlan(
        tiles=torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, TILE_COLUMNS),
        tile_segments=torch.tensor(tile_segments or [0], dtype=torch.int32, device=device),
        row_request=torch.tensor(row_request or [0], dtype=torch.int32, device=device),
        block_m=max(MIN_DOT, group_pad * next_pow2(max((t[3] for t in tiles), default=1))),
        num_splits=splits,
    )
