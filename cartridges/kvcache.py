"""Cartridges as a model's past key/values: shared by the trainer (student forward) and the serving engine.

A cartridge's keys are stored after RoPE at positions ``0..p-1``; composed cartridges are concatenated in order, and
the request's own tokens take positions from ``sum(p)`` on (DESIGN.md §7). These helpers are the one place that
turns cartridges into a transformers ``DynamicCache`` and computes those positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from cartridges.artifact import Cartridge


def compose(cartridges: Sequence[Cartridge]) -> Cartridge:
    """Concatenate cartridges along p, in order, without retraining; the first one's frozen rows stay frozen."""
    if not cartridges:
        raise ValueError("compose needs at least one cartridge")
    if len(cartridges) == 1:
        return cartridges[0]
    layers = range(cartridges[0].num_layers)
    return Cartridge(
        [torch.cat([c.keys[i] for c in cartridges], dim=1) for i in layers],
        [torch.cat([c.values[i] for c in cartridges], dim=1) for i in layers],
        cartridges[0].frozen_tokens,
    )


def cartridge_cache(cartridge: Cartridge, batch_size: int) -> DynamicCache:
    """A fresh cache holding the cartridge for every row of a batch (views, so gradients reach the cartridge)."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(cartridge.keys, cartridge.values, strict=True)):
        cache.update(k.unsqueeze(0).expand(batch_size, -1, -1, -1), v.unsqueeze(0).expand(batch_size, -1, -1, -1), i)
    return cache


def positions_after(prefix_tokens: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a padded batch whose real tokens follow ``prefix_tokens`` cached positions.

    Works for left and right padding: each row's first real token gets ``prefix_tokens``; pads get a harmless value.
    """
    return (prefix_tokens + attention_mask.long().cumsum(-1) - 1).clamp(min=prefix_tokens)


def forward_with_cartridge(
    model: PreTrainedModel,
    cartridge: Cartridge,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Last hidden states ``[batch, seq, hidden]`` of the model reading ``input_ids`` after the cartridge.

    Returns hidden states rather than logits so callers project only the positions they need.
    """
    batch = input_ids.shape[0]
    cartridge_mask = attention_mask.new_ones(batch, cartridge.p)
    out = model.get_decoder()(
        input_ids=input_ids,
        attention_mask=torch.cat([cartridge_mask, attention_mask], dim=1),
        position_ids=positions_after(cartridge.p, attention_mask),
        past_key_values=cartridge_cache(cartridge, batch),
        use_cache=True,
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


@torch.no_grad()
def prefix_cartridge(model: PreTrainedModel, token_ids: Sequence[int], frozen_tokens: int = 1) -> Cartridge:
    """The model's own KV cache of ``token_ids`` at positions ``0..n-1``: the cartridge that equals that context."""
    ids = torch.tensor([list(token_ids)], device=model.device)
    cache = model.get_decoder()(input_ids=ids, use_cache=True).past_key_values  # no logits needed
    keys = [layer.keys[0].detach().clone() for layer in cache.layers]
    values = [layer.values[0].detach().clone() for layer in cache.layers]
    return Cartridge(keys, values, frozen_tokens)
