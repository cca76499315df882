"""Cartridges trained elsewhere, converted into this product's format (:class:`~cartridges.artifact.Cartridge`).

Two sources: the reference implementation's ``.pt`` checkpoints, and PEFT prefix-tuning adapters (a prefix of
per-layer keys and values is exactly a cartridge: PEFT hands it to the model as already-rotated past key/values
and positions the input after it, as DESIGN.md §5 stores cartridges).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cartridges.artifact import Cartridge
from cartridges.manifest import ArtifactError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def import_cartridge(path: Path) -> Cartridge:
    """Convert ``path``: a PEFT adapter directory (or its ``adapter_config.json``), else a reference ``.pt``."""
    if path.is_dir() or path.name == PEFT_CONFIG:
        return import_peft_prefix(path if path.is_dir() else path.parent)
    return import_reference_pt(path)


def import_reference_pt(path: Path) -> Cartridge:
    """Convert a reference-implementation ``.pt`` (``trainable_keys``/``values``, optional ``frozen_*``).

    Each list holds one tensor per layer shaped ``[1, kv_heads, tokens, head_dim]``; frozen rows come first.
    """
    try:
        # The reference TrainableCache.save() pickles nn.ParameterList objects; allowing that one class keeps
        # weights_only's guarantee (no code from the file runs) while reading real reference checkpoints.
        with torch.serialization.safe_globals([torch.nn.ParameterList]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad pickle
        # Not torch's own advice (load with weights_only=False: run the file's code), but what the file should be.
        raise ArtifactError(
            f"{path}: not a readable torch checkpoint: expected the reference implementation's .pt (a torch.save "
            "of tensors and ParameterLists only) or a PEFT prefix-tuning adapter directory"
        ) from err
    if not isinstance(state, dict) or "trainable_keys" not in state or "trainable_values" not in state:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ArtifactError(f"{path}: expected a dict with trainable_keys/trainable_values, found {found}")

    def layers(name: str) -> list[torch.Tensor]:
        return [t.detach().squeeze(0) for t in state.get(name, [])]

    trainable_k, trainable_v = layers("trainable_keys"), layers("trainable_values")
    frozen_k, frozen_v = layers("frozen_keys"), layers("frozen_values")
    if (frozen_k or frozen_v) and not len(frozen_k) == len(frozen_v) == len(trainable_k):
        raise ArtifactError(
            f"{path}: {len(frozen_k)} frozen_keys and {len(frozen_v)} frozen_values layers for "
            f"{len(trainable_k)} trainable layers; expected one of each per layer"
        )
    frozen = int(frozen_k[0].shape[1]) if frozen_k and frozen_k[0].dim() == 3 else 0
    if frozen_k:
        try:
            trainable_k = [torch.cat([f, t], dim=1) for f, t in zip(frozen_k, trainable_k, strict=True)]
            trainable_v = [torch.cat([f, t], dim=1) for f, t in zip(frozen_v, trainable_v, strict=True)]
        except RuntimeError as err:  # frozen and trainable rows of different heads or head sizes
            raise ArtifactError(f"{path}: frozen rows do not match the trainable ones ({err})") from err
    return _finite(path, Cartridge(trainable_k, trainable_v, frozen))


def import_peft_prefix(directory: Path) -> Cartridge:
    """Convert a saved PEFT prefix-tuning adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    PEFT stores the prefix as ``prompt_embeddings`` ``[tokens, layers * 2 * kv_heads * head_dim]`` (after its
    optional projection) and reads it as ``[tokens, layers * 2, kv_heads, head_dim]``: entry ``2l`` is layer l's
    keys, ``2l + 1`` its values. For GQA models PEFT already sizes ``num_attention_heads`` to the KV heads.
    """
    config = _peft_config(directory)
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{directory}: no {PEFT_WEIGHTS} (only safetensors adapters can be imported)")
    try:
        embeddings = load_file(str(weights)).get("prompt_embeddings")
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{weights}: not a readable safetensors file ({err})") from err
    if embeddings is None:
        raise ArtifactError(f"{weights}: no prompt_embeddings tensor")
    tokens, layers, heads, token_dim = (
        int(config[key]) for key in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim")
    )
    if int(config.get("num_transformer_submodules") or 1) != 1 or token_dim % heads:
        raise ArtifactError(f"{directory}: only decoder-only adapters with token_dim divisible by heads import")
    expected = (tokens, layers * 2 * token_dim)
    if tuple(embeddings.shape) != expected:
        raise ArtifactError(f"{weights}: prompt_embeddings {tuple(embeddings.shape)}, config implies {expected}")
    kv = embeddings.detach().view(tokens, layers * 2, heads, token_dim // heads).permute(1, 2, 0, 3)
    keys, values = [kv[2 * i].contiguous() for i in range(layers)], [kv[2 * i + 1].contiguous() for i in range(layers)]
    return _finite(weights, Cartridge(keys, values, 0))


def _finite(path: Path, cartridge: Cartridge) -> Cartridge:
    """``cartridge``, once every key and value is a finite number: NaN or infinity (a diverged training run) would
    make every answer it conditions NaN, so it is refused as bad input, naming the first layer and side holding one."""
    for layer, sides in enumerate(zip(cartridge.keys, cartridge.values, strict=True)):
        for side, tensor in zip(("keys", "values"), sides, strict=True):
            if not bool(torch.isfinite(tensor).all()):
                raise ArtifactError(f"{path}: layer {layer} {side}: not finite (NaN or infinity: a diverged run?)")
    return cartridge


def _peft_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ArtifactError(f"{directory}: no {PEFT_CONFIG}; expected a PEFT adapter directory") from err
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise ArtifactError(f"{directory / PEFT_CONFIG}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("peft_type") != "PREFIX_TUNING":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ArtifactError(f"{directory}: a {found} adapter; only PREFIX_TUNING adapters are cartridges")
    missing = [k for k in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim") if not config.get(k)]
    if missing:
        raise ArtifactError(f"{directory / PEFT_CONFIG}: missing {', '.join(missing)}")
    return config
