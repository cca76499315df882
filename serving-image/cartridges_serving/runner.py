"""A direct forward pass over a Llama-style HF model for a ragged batch, with attention over cartridge segments.

transformers' own forward wants one dense padded KV cache per batch, which would copy every cartridge into every
request's cache. Here the decoder layers are run by hand (the weights stay in the HF modules) and every attention
call goes through ``cartridges_kernels.prefill_attention``: shared cartridge segments are read in place, each
request's own KV is a range of rows in one pool (``own_kv_pool``: a layer's new keys for the whole batch are one
write), and prefill chunks and single decode tokens mix in one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from cartridges.artifact import StoredCartridge
from cartridges_kernels import KVSegment, PooledKV, SegmentTable, prefill_attention
from cartridges_serving.own_kv import OwnKV, OwnKVPool

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass
class BatchItem:
    """One request's slice of a step: new token ids, the position of the first, its cartridges and own KV."""

    token_ids: Sequence[int]
    start_position: int
    cartridges: Sequence[StoredCartridge]
    own: OwnKV


class LlamaRunner:
    """Runs the decoder layers of a loaded HF Llama-family model; returns next-token logits per request."""

    def __init__(self, model: PreTrainedModel, own_kv_bytes: int = 0) -> None:
        """``own_kv_bytes`` > 0 reserves that much memory for requests' own KV now, and never more; 0 grows the
        pool as requests need it."""
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"the serving engine runs {sorted(SUPPORTED_MODEL_TYPES)} models, not {config.model_type}")
        self.model = model
        self.decoder: Any = model.model  # the HF decoder stack: embed_tokens, rotary_emb, layers, norm
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.max_positions = int(config.max_position_embeddings)
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        if own_kv_bytes < 0:
            raise ValueError(f"own_kv_bytes must be >= 0, got {own_kv_bytes}")
        row_bytes = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        rows = own_kv_bytes // row_bytes if own_kv_bytes > 0 else 0
        if own_kv_bytes > 0 and rows == 0:
            raise ValueError(f"{own_kv_bytes} bytes of own KV hold no token (one takes {row_bytes} bytes)")
        self.own_kv_pool = OwnKVPool(
            self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device, rows, max_rows=rows or None
        )

    def new_own_kv(self, capacity: int) -> OwnKV:
        """Rows for one request's own KV (``capacity`` tokens), from this runner's pool."""
        return self.own_kv_pool.allocate(capacity)

    @torch.inference_mode()
    def step(self, items: Sequence[BatchItem]) -> Tensor:
        """Append each item's tokens to its own KV and return logits of each item's last token: [items, vocab]."""
        query_lens = [len(item.token_ids) for item in items]
        for item, n in zip(items, query_lens, strict=True):
            if item.own.pool is not self.own_kv_pool:
                raise ValueError("own KV must come from this runner's new_own_kv")
            if item.own.length + n > item.own.capacity:
                raise ValueError(f"{n} new tokens overflow an own KV of {item.own.capacity} ({item.own.length} used)")
        ids = torch.tensor([t for item in items for t in item.token_ids], dtype=torch.long, device=self.device)
        positions = torch.cat(
            [
                torch.arange(it.start_position, it.start_position + n, device=self.device)
                for it, n in zip(items, query_lens, strict=True)
            ]
        )
        table_order, request_segments = _unique_cartridges(items)
        hidden = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [tokens, 1, head_dim], broadcast over heads
        # Pool rows of this step's new tokens, in q's order: one index_copy_ per layer writes them all.
        rows = torch.tensor(
            [item.own.start + item.own.length + i for item, n in zip(items, query_lens, strict=True) for i in range(n)],
            dtype=torch.long,
            device=self.device,
        )
        keys, values = self.own_kv_pool.keys, self.own_kv_pool.values
        own_starts = [item.own.start for item in items]
        own_lengths = [item.own.length + n for item, n in zip(items, query_lens, strict=True)]
        for index, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = _rope(attn.q_proj(x).view(-1, self.num_heads, self.head_dim), cos, sin)
            k = _rope(attn.k_proj(x).view(-1, self.num_kv_heads, self.head_dim), cos, sin)
            v = attn.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
            keys[index].index_copy_(1, rows, k.transpose(0, 1))
            values[index].index_copy_(1, rows, v.transpose(0, 1))
            own_kv = PooledKV(keys[index], values[index], own_starts, own_lengths)
            table = SegmentTable([KVSegment(c.keys[index], c.values[index]) for c in table_order], request_segments)
            out = prefill_attention(q, query_lens, table, own_kv, sm_scale=float(attn.scaling))
            hidden = hidden + attn.o_proj(out.reshape(-1, self.num_heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        for item, n in zip(items, query_lens, strict=True):
            item.own.length += n
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        return self.model.lm_head(self.decoder.norm(hidden[last])).float()


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _unique_cartridges(items: Sequence[BatchItem]) -> tuple[list[StoredCartridge], list[list[int]]]:
    """Each distinct cartridge object once (so kernels read it once for all its users) and per-request indices."""
    order: list[StoredCartridge] = []
    index: dict[int, int] = {}
    per_request = []
    for item in items:
        indices = []
        for cartridge in item.cartridges:
            if id(cartridge) not in index:
                index[id(cartridge)] = len(order)
                order.append(cartridge)
            indices.append(index[id(cartridge)])
        per_request.append(indices)
    return order, per_request
