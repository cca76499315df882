"""The merge kernel against the merge reference, and both against attention over the union of keys."""

from __future__ import annotations

import torch

from cartridges_kernels.merge_kernel import launch_merge
from cartridges_kernels.reference import merge_partials_reference, partial_attention_reference


def test_merge_kernel_matches_reference_with_many_and_empty_slots() -> None:
    torch.manual_seed(0)
    slots, tokens, heads, dim = 21, 3, 2, 24  # more slots than one BLOCK_P chunk; head_dim not a power of 2
    part_o = torch.randn(slots, tokens, heads, dim)
    part_lse = torch.randn(slots, tokens, heads) * 4
    part_lse[3] = float("-inf")
    part_o[3] = float("nan")  # unwritten slot: must never be read
    part_lse[:, 1, 0] = float("-inf")  # a row with no keys at all
    out = torch.empty(tokens, heads, dim, dtype=torch.float16)
    out_lse = torch.empty(tokens, heads)
    launch_merge(part_o, part_lse, out, out_lse)
    keep = [s for s in range(slots) if s != 3]
    ref_o, ref_lse = merge_partials_reference([part_o[s] for s in keep], [part_lse[s] for s in keep])
    ref_o[1, 0] = 0.0
    torch.testing.assert_close(out.float(), ref_o, atol=2e-3, rtol=0)
    torch.testing.assert_close(out_lse, ref_lse, atol=1e-5, rtol=0)
    assert out_lse[1, 0] == float("-inf")
    assert torch.equal(out[1, 0], torch.zeros(dim, dtype=torch.float16))


def test_partials_merge_to_attention_over_the_union() -> None:
    torch.manual_seed(1)
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 11, 8, dtype=torch.float64)
    v = torch.randn(2, 11, 8, dtype=torch.float64)
    whole, whole_lse = partial_attention_reference(q, k, v, 0.3)
    pieces = [partial_attention_reference(q, k[:, a:b], v[:, a:b], 0.3) for a, b in [(0, 4), (4, 4), (4, 11)]]
    merged, merged_lse = merge_partials_reference([p[0] for p in pieces], [p[1] for p in pieces])
    torch.testing.assert_close(merged, whole)
    torch.testing.assert_close(merged_lse, whole_lse)
