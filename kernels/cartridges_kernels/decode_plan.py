"""Host-side planning of the fused decode launch: which requests share a tile, and how each walk is split.

The launch runs two kinds of programs. A *shared* program walks the cartridges of a tile: requests that read
the same cartridge list, their queries batched, so each cartridge is streamed once per tile for all of them.
An *own* program walks one request's own KV with only that request's query rows. Keeping the own KV out of
the shared tiles matters: a tile that walked each of its requests' own KV in turn did a full tile's dot
products for one request's rows, which doubled the compute of a shared-cartridge step on an H200 (measured:
bench/results/kernels-gpu.json). Each walk is cut into chunks (split-KV) that write partial outputs and
base-2 LSEs to their own slot, and the merge kernel combines the slots; a step with one slot per row (a
cartridge-only or own-KV-only step that is not split) writes the output directly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cartridges_kernels.config import MAX_SPLITS, MIN_DOT, MIN_KEYS_PER_SPLIT, next_pow2, target_programs
from cartridges_kernels.transfer import int32_tensor

TILE_COLUMNS = 5  # first entry in tile_segments, number of segments, first row, row count, cartridge keys


@dataclass(frozen=True)
class DecodeStructure:
    """What shapes a decode step's work, as hashable tuples (the plan cache key)."""

    request_segments: tuple[tuple[int, ...], ...]
    segment_lens: tuple[int, ...]
    own_keys: int | None  # the longest own KV (None: no own KV), rounded up by own_walk_keys


@dataclass(frozen=True)
class DecodePlan:
    """The fused launch: ``tiles`` int32 [num_tiles, TILE_COLUMNS] (see TILE_COLUMNS), ``tile_segments`` the
    tiles' segment lists back to back (int32), ``row_request`` the request of each tile row (int32).

    Shared programs come first on grid axis 0 (tile-major, ``shared_splits`` per tile) and write slots
    0..shared_splits-1; own programs follow (request-major, ``own_splits`` per request) and write the slots
    after those. ``shared_splits`` is 0 when no request reads a cartridge key (and has own KV), ``own_splits``
    is 0 without own KV."""

    tiles: Tensor
    tile_segments: Tensor
    row_request: Tensor
    block_m: int
    own_block_n: int  # keys per block of the own walks (config.own_block_n), which their splits are cut in
    shared_splits: int
    own_splits: int
    num_requests: int
    shared_rows: int  # (request, cartridge key) pairs the shared walks cover: the work the dispatcher weighs

    @property
    def num_slots(self) -> int:
        return self.shared_splits + self.own_splits

    @property
    def shared_programs(self) -> int:
        return self.tiles.shape[0] * self.shared_splits

    @property
    def programs(self) -> int:
        return self.shared_programs + self.num_requests * self.own_splits


def own_walk_keys(lengths: Sequence[int], own_block_n: int) -> int:
    """The longest of ``lengths`` rounded up to whole ``own_block_n`` blocks: the decode steps of one block
    share a plan. The split choice then sees up to a block more keys than the longest walk (it may cut the own
    walks once more; any cut is correct, the kernel reads each walk's length from its table)."""
    return -(-max(lengths, default=0) // own_block_n) * own_block_n


def _share_groups(structure: DecodeStructure, shared_reads: bool) -> dict[tuple[int, ...], list[int]]:
    """Requests keyed by the non-empty segments they read; without shared reads, one group per request.

    The key is sorted: attention over a union of segments does not depend on their order.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, indices in enumerate(structure.request_segments):
        key = tuple(sorted(i for i in indices if structure.segment_lens[i] > 0))
        groups.setdefault(key if shared_reads else (*key, -1 - r), []).append(r)
    return groups


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_decode_splits(
    tiles: int,
    max_shared: int,
    requests: int,
    max_own: int | None,
    kv_heads: int,
    block_n: int,
    own_block_n: int,
    device: torch.device,
    forced: int | None = None,
) -> tuple[int, int]:
    """(shared_splits, own_splits) for a step whose tiles read up to ``max_shared`` cartridge keys and whose
    requests hold up to ``max_own`` own keys (None: no own KV); shared_splits is 0 when only own KV is read.

    Own KV is split only when its programs alone would leave SMs idle (long ICL prompts at small batch).
    Cartridge walks are cut into chunks no longer than an own walk (at least MIN_KEYS_PER_SPLIT keys), so no
    shared program runs long after the own programs are done, and further when the grid would not fill the
    GPU (small batches, where partials are cheap). ``forced`` sets both counts instead. Chunks are whole
    blocks (``block_n`` cartridge keys, ``own_block_n`` own keys), and each count is cut to the fewest chunks of
    that size covering the longest walk, so its last chunk is never empty."""
    if requests == 0:
        return 0, 0
    target = target_programs(device) // max(kv_heads, 1)
    own = 0
    if max_own is not None:
        if forced is not None:
            own = forced
        elif requests < target:
            own = min(_cdiv(target, requests), max_own // MIN_KEYS_PER_SPLIT)
        own = _whole_blocks(own, max_own, own_block_n)
    if max_shared == 0 and max_own is not None:
        return 0, own
    if forced is not None:
        return _whole_blocks(forced, max_shared, block_n), own
    chunk = max(MIN_KEYS_PER_SPLIT, _cdiv(max_own or 0, max(own, 1)))
    shared = _cdiv(max_shared, chunk)
    if tiles * shared + requests * own < target:
        shared = _cdiv(target - requests * own, tiles)
    return _whole_blocks(shared, max_shared, block_n), own


def _whole_blocks(splits: int, keys: int, block: int) -> int:
    """The fewest chunks of whole ``block``-key blocks that cut ``keys`` as finely as ``splits`` would (at least
    one, at most MAX_SPLITS): the kernel's split_range then leaves none of them empty."""
    blocks = max(1, _cdiv(keys, block))
    splits = max(1, min(splits, blocks, MAX_SPLITS))
    return _cdiv(blocks, _cdiv(blocks, splits))


@functools.lru_cache(maxsize=16)
def plan_decode(
    structure: DecodeStructure,
    kv_heads: int,
    group_pad: int,
    block_m: int,
    block_n: int,
    own_block_n: int,
    device: torch.device,
    shared_reads: bool,
    num_splits: int | None,
) -> DecodePlan:
    """The fused launch for one decode step, cached: every layer of a step has the same structure.

    Every request gets a tile row, even one that reads no cartridge key (its rows then record that they saw
    none), so no output or slot needs initializing. ``num_splits`` forces the number of chunks of every walk;
    None chooses them (both: choose_decode_splits).
    """
    tiles: list[tuple[int, int, int, int, int]] = []
    tile_segments: list[int] = []
    row_request: list[int] = []
    per_tile = block_m // group_pad
    for key, requests in _share_groups(structure, shared_reads).items():
        segments = [i for i in key if i >= 0]
        first = len(tile_segments)
        tile_segments += segments
        shared_keys = sum(structure.segment_lens[i] for i in segments)
        for start in range(0, len(requests), per_tile):
            chunk = requests[start : start + per_tile]
            tiles.append((first, len(segments), len(row_request), len(chunk), shared_keys))
            row_request += chunk
    max_shared = max((t[4] for t in tiles), default=0)
    shared_splits, own_splits = choose_decode_splits(
        len(tiles), max_shared, len(row_request), structure.own_keys, kv_heads, block_n, own_block_n, device, num_splits
    )
    # Without shared programs the tile size only sets the registers the (unused) shared branch reserves,
    # which would cut the own programs' occupancy: at batch 8 of 32k-token ICL prompts 11.9 ms vs 8.4.
    rows_per_tile = max((t[3] for t in tiles), default=1) if shared_splits else 1
    return DecodePlan(
        tiles=int32_tensor(tiles if shared_splits else [], device).reshape(-1, TILE_COLUMNS),
        tile_segments=int32_tensor(tile_segments or [0], device),
        row_request=int32_tensor(row_request or [0], device),
        block_m=max(MIN_DOT, group_pad * next_pow2(rows_per_tile)),
        own_block_n=own_block_n,
        shared_splits=shared_splits,
        own_splits=own_splits,
        num_requests=len(structure.request_segments),
        shared_rows=sum(t[3] * t[4] for t in tiles),
    )
