"""The cartridge artifact: ``cartridge.safetensors`` + ``manifest.json`` (DESIGN.md §5).

Tensors are ``layers.<i>.keys`` / ``layers.<i>.values`` shaped ``[kv_heads, p, head_dim]``, keys stored after RoPE
at positions ``0..p-1``, the first ``frozen_tokens`` rows included. The manifest pins the base model (weights and
tokenizer hashes, architecture numbers) so a cartridge only ever loads into the model it was trained for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cartridges.hashing import sha256_file
from cartridges.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    ArtifactError,
    CartridgeManifest,
    ModelFingerprint,
    read_manifest,
)
from cartridges.store import IntegrityError, Store

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Cartridge:
    """Per-layer keys and values, each ``[kv_heads, p, head_dim]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    frozen_tokens: int = 1

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ArtifactError(
                f"need the same non-zero number of key and value layers, got {len(self.keys)}/{len(self.values)}"
            )
        shape = self.keys[0].shape
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k.dim() != 3 or k.shape != shape or v.shape != shape:
                raise ArtifactError(
                    f"layer {i}: keys {tuple(k.shape)} / values {tuple(v.shape)}, expected {tuple(shape)}"
                )
        if not 0 <= self.frozen_tokens <= self.p:
            raise ArtifactError(f"frozen_tokens={self.frozen_tokens} must be within 0..p={self.p}")

    @property
    def p(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_kv_heads(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cartridge:
        return Cartridge(
            [k.to(device=device, dtype=dtype) for k in self.keys],
            [v.to(device=device, dtype=dtype) for v in self.values],
            self.frozen_tokens,
        )

    def check_fits(self, model: ModelFingerprint) -> None:
        geometry = (self.num_layers, self.num_kv_heads, self.head_dim)
        expected = (model.num_layers, model.num_kv_heads, model.head_dim)
        if geometry != expected:
            raise ArtifactError(
                f"cartridge geometry (layers, kv_heads, head_dim)={geometry} does not match {model.model_id} {expected}"
            )


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ArtifactError(f"unsupported cartridge dtype {dtype}; use one of {sorted(DTYPES)}")


def save_cartridge(
    cartridge: Cartridge,
    directory: Path,
    base_model: ModelFingerprint,
    *,
    corpus_digest: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> CartridgeManifest:
    """Write the two artifact files into ``directory`` and return the manifest (with the file's sha256)."""
    cartridge.check_fits(base_model)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = _dtype_name(cartridge.keys[0].dtype)
    tensors: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(zip(cartridge.keys, cartridge.values, strict=True)):
        tensors[f"layers.{i}.keys"] = k.detach().to("cpu").contiguous()
        tensors[f"layers.{i}.values"] = v.detach().to("cpu").contiguous()
    tensors_path = directory / TENSORS_FILE
    save_file(tensors, str(tensors_path), metadata={"format_version": str(FORMAT_VERSION)})
    manifest = CartridgeManifest(
        base_model=base_model,
        p=cartridge.p,
        frozen_tokens=cartridge.frozen_tokens,
        dtype=dtype,
        corpus_digest=corpus_digest,
        training=training or {},
        metrics=metrics or {},
        file_sha256=sha256_file(tensors_path),
        file_bytes=tensors_path.stat().st_size,
    )
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return manifest


def load_cartridge(
    directory: Path,
    *,
    expected_model: ModelFingerprint | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Cartridge, CartridgeManifest]:
    """Load and verify an artifact: file sha256, manifest vs tensors, and (if given) manifest vs base model."""
    manifest = read_manifest(directory / MANIFEST_FILE)
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{directory}: format version {manifest.format_version}, this build reads {FORMAT_VERSION}")
    if expected_model is not None and (diff := manifest.base_model.mismatches(expected_model)):
        raise ArtifactError(
            f"{directory}: cartridge was trained for {manifest.base_model.model_id}, "
            f"not the loaded {expected_model.model_id} ({'; '.join(diff)})"
        )
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise ArtifactError(f"missing {tensors_path}")
    actual = sha256_file(tensors_path)
    if actual != manifest.file_sha256:
        raise ArtifactError(f"{tensors_path}: sha256 {actual} does not match the manifest's {manifest.file_sha256}")
    try:
        tensors = load_file(str(tensors_path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{tensors_path}: unreadable safetensors ({err})") from err
    layers = manifest.base_model.num_layers
    try:
        keys = [tensors[f"layers.{i}.keys"] for i in range(layers)]
        values = [tensors[f"layers.{i}.values"] for i in range(layers)]
    except KeyError as err:
        raise ArtifactError(f"{tensors_path}: missing tensor {err} for a {layers}-layer model") from err
    cartridge = Cartridge(keys, values, manifest.frozen_tokens)
    cartridge.check_fits(manifest.base_model)
    if cartridge.p != manifest.p or _dtype_name(keys[0].dtype) != manifest.dtype:
        raise ArtifactError(
            f"{tensors_path}: tensors have p={cartridge.p} dtype={keys[0].dtype}, "
            f"manifest says p={manifest.p} dtype={manifest.dtype}"
        )
    return (cartridge.to(dtype=dtype) if dtype is not None else cartridge), manifest


def upload_artifact(store: Store, directory: Path, prefix: str) -> CartridgeManifest:
    """Upload tensors first, manifest last: a reader that finds the manifest finds complete tensors."""
    manifest = read_manifest(directory / MANIFEST_FILE)
    store.put_file(f"{prefix.rstrip('/')}/{TENSORS_FILE}", directory / TENSORS_FILE)
    store.put_file(f"{prefix.rstrip('/')}/{MANIFEST_FILE}", directory / MANIFEST_FILE)
    return manifest


def download_artifact(store: Store, prefix: str, directory: Path) -> CartridgeManifest:
    """Fetch an artifact into ``directory``, verifying the tensors against the manifest's sha256."""
    store.download(f"{prefix.rstrip('/')}/{MANIFEST_FILE}", directory / MANIFEST_FILE)
    manifest = read_manifest(directory / MANIFEST_FILE)
    try:
        store.download(f"{prefix.rstrip('/')}/{TENSORS_FILE}", directory / TENSORS_FILE, manifest.file_sha256)
    except IntegrityError as err:
        raise ArtifactError(f"corrupt cartridge tensors: {err}") from err
    return manifest
