"""Work planning: shared cartridges are read by one tile for all of their users; slots never collide."""

from __future__ import annotations

import torch

from cartridges_kernels.plan import BatchStructure, plan_attention

FP16: tuple[torch.dtype, torch.dtype, None, None] = (torch.float16, torch.float16, None, None)
INT8: tuple[torch.dtype, torch.dtype, str, str] = (torch.int8, torch.int8, "channel", "token")


def structure(shared_users: int) -> BatchStructure:
    return BatchStructure(
        query_lens=(1,) * shared_users,
        request_segments=((0, 1),) * shared_users,
        segment_lens=(100, 50),
        segment_formats=(FP16, INT8),
        own_max_len=0,
        own_formats=(FP16,) * shared_users,
    )


def test_shared_cartridge_is_one_tile_for_all_users() -> None:
    shared = plan_attention(structure(5), 2, 4, 64, torch.device("cpu"), True, 1)
    single = plan_attention(structure(5), 2, 4, 64, torch.device("cpu"), False, 1)
    # One launch per storage format, plus own KV.
    assert [(launch.own, launch.tiles.shape[0]) for launch in shared.launches] == [
        (False, 1),
        (False, 1),
        (True, 5),
    ]
    assert [(launch.own, launch.tiles.shape[0]) for launch in single.launches] == [
        (False, 5),
        (False, 5),
        (True, 5),
    ]
    # 5 users x 4 padded query heads fit one 32-row tile; a lone request needs only the 16-row minimum.
    assert [launch.block_m for launch in shared.launches] == [32, 32, 16]


def test_users_beyond_one_tile_spill_into_more_tiles() -> None:
    plan = plan_attention(structure(40), 2, 4, 64, torch.device("cpu"), True, 1)
    assert plan.launches[0].tiles.tolist() == [[0, 0, 16], [0, 16, 16], [0, 32, 8]]


def test_every_request_part_and_split_gets_its_own_slot() -> None:
    plan = plan_attention(structure(3), 2, 4, 64, torch.device("cpu"), True, 3)
    seen: set[tuple[int, int]] = set()
    for launch in plan.launches:
        for token, slot in zip(launch.row_token.tolist(), launch.row_slot.tolist(), strict=True):
            for split in range(launch.num_splits):
                assert (token, slot + split) not in seen
                seen.add((token, slot + split))
    assert len(seen) == 3 * 3 * 3  # 3 requests x (2 cartridges + own KV) x 3 splits
    assert max(slot for _, slot in seen) < plan.num_slots
