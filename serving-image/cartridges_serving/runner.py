"""A direct forward pass over a Llama-style HF model for a ragged batch, with attention over cartridge segments.

transformers' own forward wants one dense padded KV cache per batch, which would copy every cartridge into every
request's cache. Here the decoder layers are run by hand (the weights stay in the HF modules) and every attention
call goes through ``cartridges_kernels.StepAttention``: shared cartridge segments are read in place, each
request's own KV is a range of rows in one pool (``own_kv_pool``: a layer's new keys for the whole batch are one
write), and prefill chunks and single decode tokens mix in one step. A layer's q, k and v projections run as one
matmul and so do the MLP's gate and up projections (their weights become views of one tensor: no extra memory),
and RoPE turns q and k together: on a GPU every op is a launch, and the step's host time is its op count.
A step is :meth:`LlamaRunner.prepare` (the host's part), :meth:`LlamaRunner.forward` (the device's part, which a
CUDA graph can capture: ``graphs``) and :meth:`LlamaRunner.advance`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from cartridges.artifact import StoredCartridge
from cartridges_kernels import KVSegment, PoolLayers, StepAttention
from cartridges_kernels.transfer import to_device
from cartridges_serving.own_kv import OwnKV, OwnKVPool

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass
class BatchItem:
    """One request's slice of a step: new token ids, the position of the first, its cartridges and own KV."""

    token_ids: Sequence[int]
    start_position: int
    cartridges: Sequence[StoredCartridge]
    own: OwnKV


@dataclass
class StepInputs:
    """What a step's forward pass reads, prepared on the host: the query lengths, one index tensor (token ids,
    positions, pool rows, last rows), the own-KV ranges of every layer, and the distinct cartridges with each
    request's indices into them."""

    query_lens: list[int]
    indices: Tensor
    own: PoolLayers
    cartridges: list[StoredCartridge]
    request_segments: list[list[int]]


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
        self.own_kv_pool = OwnKVPool.with_budget(
            self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device, own_kv_bytes
        )
        self._qkv = [
            _fuse_linears(a.q_proj, a.k_proj, a.v_proj) for a in (layer.self_attn for layer in self.decoder.layers)
        ]
        self._gate_up = [_fuse_linears(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in self.decoder.layers]

    def new_own_kv(self, capacity: int) -> OwnKV:
        """Rows for one request's own KV (``capacity`` tokens), from this runner's pool."""
        return self.own_kv_pool.allocate(capacity)

    def step(self, items: Sequence[BatchItem]) -> Tensor:
        """Append each item's tokens to its own KV and return logits of each item's last token: [items, vocab]."""
        inputs = self.prepare(items)
        logits = self.forward(inputs, to_device(inputs.indices, self.device))
        self.advance(items)
        return logits

    def prepare(self, items: Sequence[BatchItem]) -> StepInputs:
        """The host's part of a step: checks, and what :meth:`forward` reads (its index tensor still on the CPU)."""
        query_lens = [len(item.token_ids) for item in items]
        for item, n in zip(items, query_lens, strict=True):
            if item.own.pool is not self.own_kv_pool:
                raise ValueError("own KV must come from this runner's new_own_kv")
            if item.own.length + n > item.own.capacity:
                raise ValueError(f"{n} new tokens overflow an own KV of {item.own.capacity} ({item.own.length} used)")
        own_lengths = [item.own.length + n for item, n in zip(items, query_lens, strict=True)]
        pool = self.own_kv_pool
        cartridges, request_segments = _unique_cartridges(items)
        return StepInputs(
            query_lens=query_lens,
            indices=torch.tensor(_step_indices(items, query_lens), dtype=torch.long),
            own=PoolLayers(pool.keys, pool.values, [item.own.start for item in items], own_lengths),
            cartridges=cartridges,
            request_segments=request_segments,
        )

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, indices: Tensor) -> Tensor:
        """The device's part of a step: writes the new tokens' keys and values to the pool and returns logits.

        ``indices`` is ``inputs.indices`` on the device. Nothing here copies from the host or reads a tensor's
        value on it, so a CUDA graph can capture this call (see ``graphs``)."""
        tokens, query_lens = sum(inputs.query_lens), inputs.query_lens
        ids, positions, rows, last = indices.split([tokens, tokens, tokens, len(query_lens)])
        hidden = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0, :, None, :], _signed_sin(sin[0, :, None, :])  # [tokens, 1, head_dim]: broadcast over heads
        keys, values = inputs.own.keys, inputs.own.values
        heads, rotated = self.num_heads, self.num_heads + self.num_kv_heads  # q and k heads: both get RoPE
        attention = StepAttention(query_lens, inputs.request_segments)  # checked and planned on layer 0
        for index, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            qkv = F.linear(_norm(layer.input_layernorm, hidden), *self._qkv[index])
            qkv = qkv.view(tokens, rotated + self.num_kv_heads, self.head_dim)
            qk, v = _rope(qkv[:, :rotated], cos, sin), qkv[:, rotated:]
            q, k = qk[:, :heads], qk[:, heads:]
            keys[index].index_copy_(1, rows, k.transpose(0, 1))
            values[index].index_copy_(1, rows, v.transpose(0, 1))
            segments = [KVSegment(c.keys[index], c.values[index]) for c in inputs.cartridges]
            out = attention(q, segments, inputs.own.pools[index], sm_scale=float(attn.scaling))
            hidden = _plus_linear(hidden, out.reshape(tokens, heads * self.head_dim), attn.o_proj)
            gate, up = F.linear(_norm(layer.post_attention_layernorm, hidden), *self._gate_up[index]).chunk(2, dim=-1)
            hidden = _plus_linear(hidden, layer.mlp.act_fn(gate) * up, layer.mlp.down_proj)
        return self.model.lm_head(_norm(self.decoder.norm, hidden[last])).float()

    @staticmethod
    def advance(items: Sequence[BatchItem]) -> None:
        """Count each item's tokens into its own KV, once the step that wrote them has been issued."""
        for item in items:
            item.own.length += len(item.token_ids)


def _step_indices(items: Sequence[BatchItem], query_lens: Sequence[int]) -> list[int]:
    """Token ids, their positions, their pool rows (in q's order: one index_copy_ per layer writes a layer's new
    keys), then each request's last token: one list, so one copy to the device."""
    ids: list[int] = []
    positions: list[int] = []
    rows: list[int] = []
    for item, n in zip(items, query_lens, strict=True):
        ids += item.token_ids
        positions += range(item.start_position, item.start_position + n)
        rows += range(item.own.start + item.own.length, item.own.start + item.own.length + n)
    return ids + positions + rows + [end - 1 for end in itertools.accumulate(query_lens)]


def _fuse_linears(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """One weight (and bias) for linears that read the same input; each keeps its rows of it as a view, so the
    model holds the same memory and its own forward still works. A second runner on the same model finds the
    fused tensors on the first linear and shares them (fusing again would leave the first runner a copy)."""
    fused: tuple[Tensor, Tensor | None] | None = getattr(linears[0], "_cartridges_fused", None)
    if fused is not None and all(_shares_storage(linear.weight, fused[0]) for linear in linears):
        return fused
    weight = torch.cat([linear.weight.detach() for linear in linears])
    with_bias = any(linear.bias is not None for linear in linears)
    bias = torch.cat([_bias(linear) for linear in linears]) if with_bias else None
    start = 0
    for linear in linears:
        rows = slice(start, start + linear.out_features)
        linear.weight = nn.Parameter(weight[rows], requires_grad=False)
        if linear.bias is not None and bias is not None:  # (the second for the type checker)
            linear.bias = nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    setattr(linears[0], "_cartridges_fused", (weight, bias))  # noqa: B010 (nn.Module's typed __setattr__)
    return weight, bias


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _bias(linear: nn.Linear) -> Tensor:
    if linear.bias is None:
        return linear.weight.new_zeros(linear.out_features)
    return linear.bias.detach()


def _norm(norm: Any, x: Tensor) -> Tensor:
    """The model's RMSNorm as one op (HF's takes six; it rounds to x's dtype before the weight, this after)."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps  # Llama/Mistral/Qwen2 name it so; others eps
    return F.rms_norm(x, norm.weight.shape, norm.weight, eps)


def _plus_linear(hidden: Tensor, x: Tensor, linear: nn.Linear) -> Tensor:
    """``hidden + linear(x)`` as one matmul: the residual is its accumulator."""
    base = hidden if linear.bias is None else hidden + linear.bias
    return torch.addmm(base, x, linear.weight.t())


def _signed_sin(sin: Tensor) -> Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(half) * signed sin."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """HF's x * cos + rotate_half(x) * sin in three ops (rotate_half takes two more)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


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
