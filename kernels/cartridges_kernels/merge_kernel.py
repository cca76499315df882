"""Triton kernel: merge partial attentions (outputs + base-2 LSE) into the final output and its LSE.

Each program merges one (token, query head) across all slots with an online rescale, so the number of slots
(segments x splits) is not bounded by a tile size. Slots nobody wrote hold LSE -inf and are skipped; their
output memory is never read, so it need not be initialized.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from cartridges_kernels.config import padded_head_dim

BLOCK_P = 16


@triton.jit
def _merge_kernel(
    part_o_ptr: tl.tensor,
    part_lse_ptr: tl.tensor,
    out_ptr: tl.tensor,
    out_lse_ptr: tl.tensor,
    num_slots: int,
    num_rows: int,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)  # token * q_heads + head
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_run = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, num_slots, BLOCK_P):
        offs_p = (first + tl.arange(0, BLOCK_P)).to(tl.int64)
        lse = tl.load(part_lse_ptr + offs_p * num_rows + row, mask=offs_p < num_slots, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse - m_safe)
        scale = tl.exp2(m_run - m_safe)
        o = tl.load(
            part_o_ptr + (offs_p[:, None] * num_rows + row) * HEAD_DIM + offs_d[None, :],
            mask=(lse > float("-inf"))[:, None] & d_valid[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = acc * scale + tl.sum(o * w[:, None], axis=0)
        total = total * scale + tl.sum(w, axis=0)
        m_run = m_new
    has_keys = total > 0.0
    out = acc / tl.where(has_keys, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_valid)
    tl.store(
        out_lse_ptr + row + tl.arange(0, 1),
        tl.where(has_keys, m_run + tl.log2(tl.where(has_keys, total, 1.0)), float("-inf")),
    )


def launch_merge(part_o: Tensor, part_lse: Tensor, out: Tensor, out_lse: Tensor) -> None:
    """Merge ``part_o`` [slots, tokens, q_heads, head_dim] (any float dtype) / ``part_lse`` [slots, tokens,
    q_heads] (fp32) into contiguous ``out`` [tokens, q_heads, head_dim] (any float dtype) and ``out_lse``
    [tokens, q_heads] fp32.
    """
    slots, tokens, q_heads, head_dim = part_o.shape
    if not (out.is_contiguous() and out_lse.is_contiguous() and part_o.is_contiguous() and part_lse.is_contiguous()):
        raise ValueError("merge buffers must be contiguous")
    num_rows = tokens * q_heads
    if num_rows == 0:
        return
    _merge_kernel[(num_rows,)](
        part_o,
        part_lse,
        out,
        out_lse,
        slots,
        num_rows,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        BLOCK_P=BLOCK_P,
    )
