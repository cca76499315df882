"""Held-out evaluation: answer NLL per token with no context, with the corpus in context (ICL), and the cartridge.

ICL reads the whole corpus (rendered as the teacher's system turn) when it fits the model's context window, since
that is what the cartridge stands in for; otherwise each shard's own chunk, and ``iclContext`` says which.
``iclGainRecovered`` = (none - cartridge) / (none - icl): 1 means the cartridge is as good as that context; None
when that context gave no gain (:func:`cartridges.api.icl_gain_recovered`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cartridges.api import icl_gain_recovered
from cartridges.artifact import Cartridge
from cartridges.kvcache import prefix_cartridge
from cartridges.models import LoadedModel
from cartridges_trainer.batching import pack, target_logprobs
from cartridges_trainer.synthesis import Shard

EVAL_BATCH = 8


def fits_context(lm: LoadedModel, context_tokens: int, shards: Sequence[Shard] | int) -> bool:
    """Whether ``context_tokens`` followed by the longest held-out conversation (of ``shards``, or that many
    tokens) fits the model's positions."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if isinstance(shards, int):
        longest = shards
    else:
        longest = max((len(c.ids) for s in shards for c in s.conversations), default=0)
    return limit is None or context_tokens + longest <= limit


def unseen(train: Sequence[Shard], held_out: Sequence[Shard]) -> tuple[list[Shard], int]:
    """The ``held_out`` shards without the conversations that a ``train`` shard holds too (the same token ids): a
    score on those is recall of a training example, not knowledge of the corpus. Also how many were dropped."""
    seen = {c.ids.numpy().tobytes() for shard in train for c in shard.conversations}
    kept = [Shard(s.context, [c for c in s.conversations if c.ids.numpy().tobytes() not in seen]) for s in held_out]
    dropped = sum(len(s.conversations) for s in held_out) - sum(len(s.conversations) for s in kept)
    return [s for s in kept if s.conversations], dropped


@torch.no_grad()
def evaluate(
    lm: LoadedModel,
    cartridge: Cartridge,
    shards: Sequence[Shard],
    corpus_context: list[int] | None = None,
    unquantized: Cartridge | None = None,
) -> dict[str, float | int | str | None]:
    """Mean answer NLL per token under the three conditions, and the fraction of the ICL gain recovered.

    ``corpus_context`` is the whole corpus as a system turn; it is used for ICL when it fits, else the chunks.
    ``cartridge`` is what is stored and served; a quantized one comes dequantized, with the cartridge it was
    quantized from as ``unquantized`` (scored as ``cartridgeUnquantized``: the quantization's cost).
    """
    whole = corpus_context is not None and fits_context(lm, len(corpus_context), shards)
    corpus_icl = prefix_cartridge(lm.model, corpus_context, frozen_tokens=0) if whole and corpus_context else None
    conditions: dict[str, Cartridge | None] = {"noContext": None, "icl": None, "cartridge": cartridge}
    if unquantized is not None:
        conditions["cartridgeUnquantized"] = unquantized
    totals = dict.fromkeys(conditions, 0.0)
    tokens = 0
    pad_id = lm.tokenizer.pad_token_id or 0
    for shard in shards:
        icl = corpus_icl or prefix_cartridge(lm.model, shard.context.tolist(), frozen_tokens=0)
        for i in range(0, len(shard.conversations), EVAL_BATCH):
            batch = pack([c.answer_only() for c in shard.conversations[i : i + EVAL_BATCH]], pad_id, lm.device)
            for name, prefix in conditions.items():
                logprobs = target_logprobs(lm.model, batch, icl if name == "icl" else prefix)
                totals[name] += F.nll_loss(logprobs, batch.targets, reduction="sum").item()
            tokens += len(batch.targets)
    scores: dict[str, float | int | str | None] = {
        name: total / tokens if tokens else None for name, total in totals.items()
    }
    scores["iclGainRecovered"] = icl_gain_recovered(totals["noContext"], totals["icl"], totals["cartridge"])
    scores["iclContext"] = "corpus" if whole else "chunk"
    scores["answerTokens"] = tokens
    return scores
