"""The serving runner on the Triton kernel path (interpreted on CPU, as conftest sets up) against its PyTorch path.

What a GPU server runs: own KV from the runner's pool handed to the kernels as one PooledKV, ragged prefill chunks
beside decode tokens, zero, one and two composed cartridges, and a pool that grows between steps.
"""

from __future__ import annotations

import pytest
import torch

from cartridges.artifact import Cartridge
from cartridges.models import LoadedModel, tiny_llama
from cartridges_kernels import BACKEND_ENV
from cartridges_serving.runner import BatchItem, LlamaRunner


def random_cartridge(runner: LlamaRunner, p: int, seed: int) -> Cartridge:
    generator = torch.Generator().manual_seed(seed)
    shape = (runner.num_layers, runner.num_kv_heads, p, runner.head_dim)
    keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    return Cartridge(list(keys), list(values))


def generate(runner: LlamaRunner, cartridges: list[list[Cartridge]]) -> torch.Tensor:
    """Logits of a chunked prefill then two decode steps; a late request joins (the pool grows) at the first."""
    prompts = [[5, 9, 200, 31, 7, 3, 3], [17, 3, 99], [250, 1, 2, 3, 4, 8, 16, 32, 64]]
    items = [
        BatchItem(ids[:4], sum(c.p for c in carts), carts, runner.new_own_kv(len(ids) + 2))
        for ids, carts in zip(prompts, cartridges, strict=True)
    ]
    logits = [runner.step(items)]  # the first chunk of every prompt
    for item, ids in zip(items, prompts, strict=True):
        item.start_position += len(item.token_ids)
        item.token_ids = ids[4:] or [1]
    late = BatchItem([40, 41, 42, 43, 44], 0, [], runner.new_own_kv(64))
    logits.append(runner.step([*items, late]))
    for item in [*items, late]:
        item.start_position += len(item.token_ids)
        item.token_ids = [7]
    logits.append(runner.step([*items, late]))
    return torch.cat(logits)


def test_kernel_path_gives_the_torch_path_logits(tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = LlamaRunner(tiny_model.model)
    a, b = random_cartridge(runner, 24, 0), random_cartridge(runner, 9, 1)
    compositions = [[], [a], [a, b]]
    monkeypatch.setenv(BACKEND_ENV, "torch")
    expected = generate(runner, compositions)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    got = generate(runner, compositions)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    assert runner.own_kv_pool.free_rows == runner.own_kv_pool.rows  # every request's rows went back


def test_a_released_own_kv_cannot_be_written(tiny_model: LoadedModel) -> None:
    runner = LlamaRunner(tiny_model.model)
    own = runner.new_own_kv(8)
    own.release()
    with pytest.raises(ValueError, match="overflow an own KV of 0"):
        runner.step([BatchItem([5, 6], 0, [], own)])


def test_runners_on_one_model_share_its_fused_weights() -> None:
    """A second runner must not leave the first a stale copy: a weight update reaches both, and the model."""
    model = tiny_llama(seed=0).model
    first, second = LlamaRunner(model), LlamaRunner(model)
    item = BatchItem([5, 9, 200], 0, [], first.new_own_kv(3))
    before = first.step([item])
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(0.5)
        model.model.layers[1].mlp.up_proj.weight.mul_(2.0)
    logits = [r.step([BatchItem([5, 9, 200], 0, [], r.new_own_kv(3))]) for r in (first, second)]
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    assert not torch.allclose(logits[0], before)
