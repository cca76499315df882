"""Right-padded batches of conversations, and the hidden states of the frozen model over them.

Only answer positions are ever projected to the vocabulary (``rows``/``cols``), which keeps the logits small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from cartridges.artifact import Cartridge
from cartridges.kvcache import forward_with_cartridge, positions_after


@dataclass
class Conversation:
    """Student tokens (user turn + answer) and the teacher's top-k log-probs of each answer token."""

    ids: torch.Tensor
    answer_start: int
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor

    @property
    def answer(self) -> torch.Tensor:
        return self.ids[self.answer_start :]

    def truncated(self, max_tokens: int) -> Conversation | None:
        """Cut the answer's tail to fit ``max_tokens``; ``None`` when not a single answer token fits."""
        if len(self.ids) <= max_tokens:
            return self
        keep = max_tokens - self.answer_start
        if keep <= 0:
            return None
        return Conversation(self.ids[:max_tokens], self.answer_start, self.topk_ids[:keep], self.topk_logprobs[:keep])


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    """(rows, cols): positions whose next token is an answer token."""
    cols: torch.Tensor
    targets: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(
    conversations: Sequence[Conversation], pad_id: int, device: torch.device, prefix: torch.Tensor | None = None
) -> Batch:
    """Right-pad conversations (each optionally preceded by ``prefix``, e.g. the chunk for in-context scoring)."""
    lead = 0 if prefix is None else len(prefix)
    seqs = [c.ids if prefix is None else torch.cat([prefix, c.ids]) for c in conversations]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols = [], []
    for i, (seq, conv) in enumerate(zip(seqs, conversations, strict=True)):
        input_ids[i, : len(seq)] = seq
        attention_mask[i, : len(seq)] = 1
        start = lead + conv.answer_start
        cols.append(torch.arange(start - 1, len(seq) - 1))
        rows.append(torch.full((len(seq) - start,), i))
    row, col = torch.cat(rows), torch.cat(cols)
    return Batch(
        input_ids.to(device),
        attention_mask.to(device),
        row.to(device),
        col.to(device),
        input_ids[row, col + 1].to(device),
        torch.cat([c.topk_ids for c in conversations]).long().to(device),
        torch.cat([c.topk_logprobs for c in conversations]).float().to(device),
    )


def answer_logprobs(model: PreTrainedModel, batch: Batch, cartridge: Cartridge | None = None) -> torch.Tensor:
    """Log-softmax over the vocabulary at every answer position, ``[answer_tokens, vocab]``."""
    if cartridge is None:
        hidden = model.get_decoder()(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=positions_after(0, batch.attention_mask),
        ).last_hidden_state
    else:
        hidden = forward_with_cartridge(model, cartridge, batch.input_ids, batch.attention_mask)
    logits: torch.Tensor = model.get_output_embeddings()(hidden[batch.rows, batch.cols])
    return logits.float().log_softmax(-1)
