"""Packed batches of conversations, and the frozen model's log-probs at their distilled tokens.

Several conversations share a row when they fit (first-fit decreasing), each seeing only the cartridge and its own
earlier tokens, with positions restarting after the cartridge: the result equals one conversation per row, without
the padding. Only target positions are projected to the vocabulary (``rows``/``cols``), which keeps logits small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from cartridges.artifact import Cartridge
from cartridges.kvcache import cartridge_cache


@dataclass
class Conversation:
    """Student tokens (user turn + answer) and the teacher's top-k log-probs of each distilled token.

    Distillation covers the tokens from ``target_start`` on: the answer (``answer_start``), and with the grounded
    recipe the user turn too, whose quoted corpus text the teacher predicts from its context. Evaluation scores
    only the answer (:meth:`answer_only`).
    """

    ids: torch.Tensor
    answer_start: int
    target_start: int
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor

    @property
    def answer(self) -> torch.Tensor:
        return self.ids[self.answer_start :]

    @property
    def targets(self) -> torch.Tensor:
        return self.ids[self.target_start :]

    def answer_only(self) -> Conversation:
        """The same conversation distilled (or scored) on its answer tokens alone."""
        skip = self.answer_start - self.target_start
        return Conversation(
            self.ids, self.answer_start, self.answer_start, self.topk_ids[skip:], self.topk_logprobs[skip:]
        )

    def truncated(self, max_tokens: int) -> Conversation | None:
        """Cut the tail to fit ``max_tokens``; ``None`` when not a single answer token fits."""
        if len(self.ids) <= max_tokens:
            return self
        if max_tokens <= self.answer_start:
            return None
        keep = max_tokens - self.target_start
        return Conversation(
            self.ids[:max_tokens], self.answer_start, self.target_start, self.topk_ids[:keep], self.topk_logprobs[:keep]
        )


@dataclass
class Batch:
    input_ids: torch.Tensor
    segments: torch.Tensor
    """Which packed sequence each token belongs to; -1 for padding."""
    positions: torch.Tensor
    """Each token's position within its own sequence."""
    rows: torch.Tensor
    """(rows, cols): positions whose next token is a target token."""
    cols: torch.Tensor
    targets: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor

    @property
    def tokens(self) -> int:
        return int((self.segments >= 0).sum())

    def attention_mask(self, prefix_tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``[rows, 1, width, prefix + width]`` mask: the cached prefix, then causal within each sequence."""
        rows, width = self.segments.shape
        index = torch.arange(width, device=self.segments.device)
        own = (self.segments[:, :, None] == self.segments[:, None, :]) & (index[:, None] >= index[None, :])
        allowed = torch.cat([own.new_ones(rows, width, prefix_tokens), own], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def pack(
    conversations: Sequence[Conversation],
    pad_id: int,
    device: torch.device,
    row_tokens: int = 0,
) -> Batch:
    """Pack conversations into rows of ``max(row_tokens, longest)`` tokens."""
    seqs = [c.ids for c in conversations]
    capacity = max(row_tokens, *(len(s) for s in seqs))
    fill: list[int] = []
    placements: list[tuple[int, int, int]] = []  # (conversation, row, offset)
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        row = next((r for r, used in enumerate(fill) if used + len(seqs[i]) <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        placements.append((i, row, fill[row]))
        fill[row] += len(seqs[i])
    shape = (len(fill), max(fill))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    rows, cols, topk_ids, topk_logprobs = [], [], [], []
    for segment, (i, row, offset) in enumerate(placements):
        seq, conv, end = seqs[i], conversations[i], offset + len(seqs[i])
        input_ids[row, offset:end] = seq
        segments[row, offset:end] = segment
        positions[row, offset:end] = torch.arange(len(seq))
        cols.append(torch.arange(offset + conv.target_start - 1, end - 1))
        rows.append(torch.full((len(conv.targets),), row))
        topk_ids.append(conv.topk_ids)
        topk_logprobs.append(conv.topk_logprobs)
    row_index, col_index = torch.cat(rows), torch.cat(cols)
    return Batch(
        input_ids.to(device),
        segments.to(device),
        positions.to(device),
        row_index.to(device),
        col_index.to(device),
        input_ids[row_index, col_index + 1].to(device),
        torch.cat(topk_ids).long().to(device),
        torch.cat(topk_logprobs).float().to(device),
    )


def target_logprobs(model: PreTrainedModel, batch: Batch, cartridge: Cartridge | None = None) -> torch.Tensor:
    """Log-softmax over the vocabulary at every target position, ``[target_tokens, vocab]``.

    With a cartridge, every sequence reads it as past key/values and its positions start at p.
    """
    p = 0 if cartridge is None else cartridge.p
    hidden = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask(p, model.dtype),
        position_ids=p + batch.positions,
        past_key_values=None if cartridge is None else cartridge_cache(cartridge, len(batch.input_ids)),
        use_cache=cartridge is not None,
    ).last_hidden_state
    logits: torch.Tensor = model.get_output_embeddings()(hidden[batch.rows, batch.cols])
    return logits.float().log_softmax(-1)
