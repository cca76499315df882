"""KernelConfig(side_by_side=True): the multi-launch path hands all its partial launches to
``streams.run_side_by_side`` and gives the same attention.

Off CUDA the launches run one after the other; what streams do to them on a GPU is checked by the GPU benchmark
(bench/kernels_gpu.py's correctness check has a side-by-side variant).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import pytest
import torch

from cartridges_kernels import KernelConfig, KVSegment, SegmentTable, dispatch, prefill_attention, quantize_kv
from cartridges_kernels.dispatch import segmented_attention_triton
from cartridges_kernels.streams import run_side_by_side

from ._build import Batch, make_batch, oracle

TILES = KernelConfig(block_m=16, block_n=16)


@pytest.fixture
def handed_over(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many launches each call of run_side_by_side got."""
    calls: list[int] = []

    def spy(jobs: Sequence[Callable[[], object]], device: torch.device) -> None:
        calls.append(len(jobs))
        run_side_by_side(jobs, device)

    monkeypatch.setattr(dispatch, "run_side_by_side", spy)
    return calls


def test_jobs_run_in_order_off_cuda() -> None:
    ran: list[int] = []
    run_side_by_side([functools.partial(ran.append, i) for i in range(3)], torch.device("cpu"))
    assert ran == [0, 1, 2]


def test_every_partial_launch_is_handed_over_and_attention_is_unchanged(handed_over: list[int]) -> None:
    """Cartridges of two storage formats (two launches) and own KV (a third), decode and prefill."""
    torch.manual_seed(41)
    batch = make_batch([37, 20], [[0, 1], [1], [0]], own_lens=[3, 18, 5])
    quantized = KVSegment(
        quantize_kv(batch.table.segments[1].dense()[0], "int8", "token"), batch.table.segments[1].values
    )
    table = SegmentTable([batch.table.segments[0], quantized], batch.table.request_segments)
    mixed = Batch(batch.q, batch.query_lens, table, batch.own_kv)
    config = KernelConfig(block_m=16, block_n=16, side_by_side=True)
    scale = batch.q.shape[-1] ** -0.5
    out = segmented_attention_triton(batch.q, batch.query_lens, table, batch.own_kv, scale, None, True, config, False)
    torch.testing.assert_close(out[0].double(), oracle(mixed), atol=1e-3, rtol=0)
    assert handed_over == [3]

    chunks = make_batch([21, 9], [[0], [0, 1]], own_lens=[9, 21], query_lens=[4, 17])
    got = prefill_attention(chunks.q, chunks.query_lens, chunks.table, chunks.own_kv, backend="triton", config=config)
    torch.testing.assert_close(got.double(), oracle(chunks), atol=1e-4, rtol=0)
    assert handed_over == [3, 2]  # one cartridge format, own KV


def test_off_by_default(handed_over: list[int]) -> None:
    torch.manual_seed(42)
    batch = make_batch([37], [[0], [0]], own_lens=[3, 5], query_lens=[2, 1])
    out = prefill_attention(batch.q, batch.query_lens, batch.table, batch.own_kv, backend="triton", config=TILES)
    torch.testing.assert_close(out.double(), oracle(batch), atol=1e-4, rtol=0)
    assert handed_over == []
