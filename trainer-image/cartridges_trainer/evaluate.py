"""Held-out evaluation: answer NLL per token with no context, with the chunk in context (ICL), and with the cartridge.

``iclGainRecovered`` = (none - cartridge) / (none - icl): 1 means the cartridge is as good as having the chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cartridges.artifact import Cartridge
from cartridges.models import LoadedModel
from cartridges_trainer.batching import answer_logprobs, pack
from cartridges_trainer.synthesis import Shard

EVAL_BATCH = 8


@torch.no_grad()
def evaluate(lm: LoadedModel, cartridge: Cartridge, shards: Sequence[Shard]) -> dict[str, float | int | None]:
    """Mean answer NLL per token under the three conditions, and the fraction of the ICL gain recovered."""
    totals = {"noContext": 0.0, "icl": 0.0, "cartridge": 0.0}
    tokens = 0
    pad_id = lm.tokenizer.pad_token_id or 0
    for shard in shards:
        for i in range(0, len(shard.conversations), EVAL_BATCH):
            convs = shard.conversations[i : i + EVAL_BATCH]
            plain = pack(convs, pad_id, lm.device)
            conditions = {
                "noContext": (plain, None),
                "icl": (pack(convs, pad_id, lm.device, prefix=shard.context), None),
                "cartridge": (plain, cartridge),
            }
            for name, (batch, prefix) in conditions.items():
                logprobs = answer_logprobs(lm.model, batch, prefix)
                totals[name] += F.nll_loss(logprobs, batch.targets, reduction="sum").item()
            tokens += len(plain.targets)
    scores: dict[str, float | int | None] = {name: total / tokens for name, total in totals.items()}
    gain = totals["noContext"] - totals["icl"]
    scores["iclGainRecovered"] = (totals["noContext"] - totals["cartridge"]) / gain if gain else None
    scores["answerTokens"] = tokens
    return scores
