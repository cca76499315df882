"""Importing cartridges trained elsewhere: the reference implementation's .pt and PEFT prefix-tuning adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _peft_adapter import peft_prefix_adapter
from safetensors.torch import load_file, save_file

from cartridges.importers import import_cartridge, import_peft_prefix, import_reference_pt
from cartridges.kvcache import forward_with_cartridge
from cartridges.manifest import ArtifactError
from cartridges.models import LoadedModel


def test_reference_pt_import_puts_frozen_rows_first(tmp_path: Path) -> None:
    layers, heads, dim = 3, 2, 8
    state: dict[str, list[torch.Tensor]] = {
        "frozen_keys": [torch.randn(1, heads, 1, dim) for _ in range(layers)],
        "frozen_values": [torch.randn(1, heads, 1, dim) for _ in range(layers)],
        "trainable_keys": [torch.nn.Parameter(torch.randn(1, heads, 15, dim)) for _ in range(layers)],
        "trainable_values": [torch.nn.Parameter(torch.randn(1, heads, 15, dim)) for _ in range(layers)],
    }
    torch.save(state, tmp_path / "ref.pt")
    frozen_keys, trainable_values = state["frozen_keys"], state["trainable_values"]
    cartridge = import_reference_pt(tmp_path / "ref.pt")
    assert (cartridge.p, cartridge.frozen_tokens, cartridge.num_layers) == (16, 1, layers)
    assert torch.equal(cartridge.keys[2][:, 0], frozen_keys[2][0, :, 0])
    assert torch.equal(cartridge.values[0][:, 1:], trainable_values[0][0].detach())


@pytest.mark.parametrize("frozen", [1, 0])
def test_reference_pt_import_reads_the_reference_parameter_lists(tmp_path: Path, frozen: int) -> None:
    """The reference TrainableCache.save() stores nn.ParameterLists (empty frozen ones when num_frozen_tokens=0)."""
    layers, heads, tokens, dim = 2, 2, 6, 8
    keys = [torch.randn(1, heads, tokens, dim) for _ in range(layers)]
    values = [torch.randn(1, heads, tokens, dim) for _ in range(layers)]

    def parameters(rows: list[torch.Tensor], part: slice, trainable: bool) -> torch.nn.ParameterList:
        if part.start == part.stop:  # the reference keeps empty frozen lists, not lists of empty tensors
            return torch.nn.ParameterList()
        return torch.nn.ParameterList(
            [torch.nn.Parameter(x[:, :, part].contiguous(), requires_grad=trainable) for x in rows]
        )

    state = {  # exactly TrainableCache.save's dict
        "trainable_keys": parameters(keys, slice(frozen, tokens), True),
        "trainable_values": parameters(values, slice(frozen, tokens), True),
        "frozen_keys": parameters(keys, slice(0, frozen), False),
        "frozen_values": parameters(values, slice(0, frozen), False),
    }
    torch.save(state, tmp_path / "cache.pt")
    cartridge = import_cartridge(tmp_path / "cache.pt")
    assert (cartridge.p, cartridge.frozen_tokens, cartridge.num_layers) == (tokens, frozen, layers)
    for imported, original in zip(cartridge.keys + cartridge.values, keys + values, strict=True):
        assert imported.shape == (heads, tokens, dim) and torch.equal(imported, original[0])


def test_reference_import_rejects_other_checkpoints(tmp_path: Path) -> None:
    torch.save({"model": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match="trainable_keys"):
        import_reference_pt(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    with pytest.raises(ArtifactError, match="not a readable torch checkpoint"):
        import_reference_pt(tmp_path / "garbage.pt")


@pytest.mark.parametrize(("side", "bad"), [("keys", math.nan), ("values", math.inf), ("values", -math.inf)])
def test_reference_import_refuses_keys_or_values_that_are_not_finite(tmp_path: Path, side: str, bad: float) -> None:
    """A diverged run's NaN or infinity would make every answer the cartridge conditions NaN: refused, naming where."""
    state = {f"trainable_{name}": [torch.randn(1, 2, 16, 8) for _ in range(3)] for name in ("keys", "values")}
    state[f"trainable_{side}"][1][0, 1, 5, 2] = bad
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(ArtifactError, match=f"layer 1 {side}: not finite"):
        import_reference_pt(tmp_path / "diverged.pt")


@pytest.mark.parametrize(("side", "entry"), [("keys", 2), ("values", 3)])
def test_peft_import_refuses_keys_or_values_that_are_not_finite(tmp_path: Path, side: str, entry: int) -> None:
    """PEFT stores layer l's keys as entry 2l of the prefix and its values as 2l + 1: both are checked."""
    peft_prefix_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    embeddings = load_file(str(weights))["prompt_embeddings"]
    token_dim = int(json.loads((tmp_path / "adapter_config.json").read_text())["token_dim"])
    embeddings[3, entry * token_dim] = math.nan
    save_file({"prompt_embeddings": embeddings}, str(weights))
    with pytest.raises(ArtifactError, match=f"layer 1 {side}: not finite"):
        import_peft_prefix(tmp_path)


def test_peft_prefix_import_reproduces_peft_logits(tiny_model: LoadedModel, tmp_path: Path) -> None:
    expected = peft_prefix_adapter(tmp_path / "adapter")
    cartridge = import_cartridge(tmp_path / "adapter")
    assert (cartridge.p, cartridge.frozen_tokens, cartridge.num_layers) == (5, 0, tiny_model.fingerprint.num_layers)
    cartridge.check_fits(tiny_model.fingerprint)
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        hidden = forward_with_cartridge(tiny_model.model, cartridge, ids, torch.ones_like(ids))
        logits = tiny_model.model.lm_head(hidden)
        without = tiny_model.model(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(without, expected, atol=1e-2), "the prefix must change the output"
    assert import_cartridge(tmp_path / "adapter" / "adapter_config.json").p == 5


def test_peft_import_rejects_other_adapters(tmp_path: Path) -> None:
    peft_prefix_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 6}))
    with pytest.raises(ArtifactError, match="config implies"):
        import_peft_prefix(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ArtifactError, match="only PREFIX_TUNING"):
        import_peft_prefix(tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(b"\xaf{}")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        import_peft_prefix(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ArtifactError, match="expected a PEFT adapter directory"):
        import_cartridge(tmp_path)
