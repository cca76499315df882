"""The cartridge artifact: ``cartridge.safetensors`` + ``manifest.json`` (DESIGN.md §5).

Tensors are ``layers.<i>.keys`` / ``layers.<i>.values`` shaped ``[kv_heads, p, head_dim]``, keys stored after RoPE
at positions ``0..p-1``, the first ``frozen_tokens`` rows included. The manifest pins the base model (weights and
tokenizer hashes, architecture numbers) so a cartridge only ever loads into the model it was trained for.

A quantized artifact (``dtype`` int8 or fp8, see :func:`quantize_cartridge`) stores one byte per element plus
float32 ``layers.<i>.keys_scales`` / ``layers.<i>.values_scales``, per token or per channel as its manifest's
``quantization`` says; serving keeps it quantized (the kernels dequantize on load), everything else reads it
dequantized.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    ModelMismatch,
    Quantization,
    read_manifest,
)
from cartridges.quantize import STORAGE_DTYPES, Granularity, QuantFormat, QuantizedKV, quantize_kv
from cartridges.store import IntegrityError, Store

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _Layers:
    """What dense and quantized cartridges share: per-layer keys and values of one shape, and their geometry."""

    keys: Sequence[torch.Tensor | QuantizedKV]
    values: Sequence[torch.Tensor | QuantizedKV]
    frozen_tokens: int

    def _check_shapes(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ArtifactError(
                f"need the same non-zero number of key and value layers, got {len(self.keys)}/{len(self.values)}"
            )
        shape = self.keys[0].shape
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if len(k.shape) != 3 or k.shape != shape or v.shape != shape:
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

    def check_fits(self, model: ModelFingerprint) -> None:
        geometry = (self.num_layers, self.num_kv_heads, self.head_dim)
        expected = (model.num_layers, model.num_kv_heads, model.head_dim)
        if geometry != expected:
            raise ArtifactError(
                f"cartridge geometry (layers, kv_heads, head_dim)={geometry} does not match {model.model_id} {expected}"
            )


@dataclass
class Cartridge(_Layers):
    """Per-layer keys and values, each ``[kv_heads, p, head_dim]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    frozen_tokens: int = 1

    def __post_init__(self) -> None:
        self._check_shapes()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def nbytes_in(self, dtype: torch.dtype) -> int:
        """The bytes these keys and values would take held in ``dtype``."""
        return sum(t.numel() for t in (*self.keys, *self.values)) * dtype.itemsize

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cartridge:
        return Cartridge(
            [k.to(device=device, dtype=dtype) for k in self.keys],
            [v.to(device=device, dtype=dtype) for v in self.values],
            self.frozen_tokens,
        )


@dataclass
class QuantizedCartridge(_Layers):
    """A cartridge in one byte per element (int8 or fp8 e4m3) plus float32 scales: half the bytes of bf16 for the
    attention kernels to read each decode step, which dequantize on load."""

    keys: list[QuantizedKV]
    values: list[QuantizedKV]
    frozen_tokens: int = 1

    def __post_init__(self) -> None:
        self._check_shapes()
        if len({x.format for x in (*self.keys, *self.values)}) != 1:
            raise ArtifactError("a quantized cartridge stores every layer's keys and values in one format")

    @property
    def format(self) -> QuantFormat:
        return self.keys[0].format

    @property
    def quantization(self) -> Quantization:
        return Quantization(keys=self.keys[0].granularity, values=self.values[0].granularity)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (*self.keys, *self.values))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Cartridge:
        return Cartridge(
            [k.dequantize(dtype) for k in self.keys], [v.dequantize(dtype) for v in self.values], self.frozen_tokens
        )


def quantize_cartridge(
    cartridge: Cartridge, fmt: QuantFormat, keys: Granularity = "channel", values: Granularity = "token"
) -> QuantizedCartridge:
    """Absmax-quantize every layer. Per-channel scales suit keys (RoPE leaves outlier channels), per-token scales
    suit values; ``bench/quality.py --formats`` measures the answer-NLL cost of the defaults."""
    return QuantizedCartridge(
        [quantize_kv(k, fmt, keys) for k in cartridge.keys],
        [quantize_kv(v, fmt, values) for v in cartridge.values],
        cartridge.frozen_tokens,
    )


StoredCartridge = Cartridge | QuantizedCartridge


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ArtifactError(f"unsupported cartridge dtype {dtype}; use one of {sorted(DTYPES)}")


def save_cartridge(
    cartridge: StoredCartridge,
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
    tensors: dict[str, torch.Tensor] = {}
    for i in range(cartridge.num_layers):
        for side in ("keys", "values"):
            x = getattr(cartridge, side)[i]
            if isinstance(x, QuantizedKV):
                tensors[f"layers.{i}.{side}_scales"] = x.scales.detach().to("cpu").contiguous()
                x = x.data
            tensors[f"layers.{i}.{side}"] = x.detach().to("cpu").contiguous()
    tensors_path = directory / TENSORS_FILE
    save_file(tensors, str(tensors_path), metadata={"format_version": str(FORMAT_VERSION)})
    dtype: str
    quantization: Quantization | None
    if isinstance(cartridge, QuantizedCartridge):
        dtype, quantization = cartridge.format, cartridge.quantization
    else:
        dtype, quantization = _dtype_name(cartridge.keys[0].dtype), None
    manifest = CartridgeManifest(
        base_model=base_model,
        p=cartridge.p,
        frozen_tokens=cartridge.frozen_tokens,
        dtype=dtype,
        quantization=quantization,
        corpus_digest=corpus_digest,
        training=training or {},
        metrics=metrics or {},
        file_sha256=sha256_file(tensors_path),
        file_bytes=tensors_path.stat().st_size,
    )
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    return manifest


def load_cartridge(
    directory: Path,
    *,
    expected_model: ModelFingerprint | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Cartridge, CartridgeManifest]:
    """Load and verify an artifact: file sha256, manifest vs tensors, and (if given) manifest vs base model.

    A quantized artifact comes back dequantized (to ``dtype``, default float32)."""
    cartridge, manifest = load_stored_cartridge(directory, expected_model=expected_model, device=device, dtype=dtype)
    if isinstance(cartridge, QuantizedCartridge):
        return cartridge.dequantize(dtype or torch.float32), manifest
    return cartridge, manifest


def load_stored_cartridge(
    directory: Path,
    *,
    expected_model: ModelFingerprint | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[StoredCartridge, CartridgeManifest]:
    """:func:`load_cartridge`, but a quantized artifact stays quantized (``dtype`` applies to dense ones): what
    serving holds."""
    manifest = read_manifest(directory / MANIFEST_FILE)
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{directory}: format version {manifest.format_version}, this build reads {FORMAT_VERSION}")
    if expected_model is not None and manifest.base_model.mismatches(expected_model):
        raise ModelMismatch(str(directory), manifest.base_model, expected_model)
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
    layers = range(manifest.base_model.num_layers)
    try:
        keys = [_layer_tensor(tensors, manifest, f"layers.{i}.keys") for i in layers]
        values = [_layer_tensor(tensors, manifest, f"layers.{i}.values") for i in layers]
    except KeyError as err:
        raise ArtifactError(f"{tensors_path}: missing tensor {err} for a {len(layers)}-layer model") from err
    except ValueError as err:  # a quantized layer whose data or scales do not fit together
        raise ArtifactError(f"{tensors_path}: {err}") from err
    cartridge: StoredCartridge = (
        QuantizedCartridge(keys, values, manifest.frozen_tokens)
        if manifest.quantization
        else Cartridge(keys, values, manifest.frozen_tokens)
    )
    cartridge.check_fits(manifest.base_model)
    stored = cartridge.format if isinstance(cartridge, QuantizedCartridge) else _dtype_name(keys[0].dtype)
    if cartridge.p != manifest.p or stored != manifest.dtype:
        raise ArtifactError(
            f"{tensors_path}: tensors have p={cartridge.p} dtype={stored}, "
            f"manifest says p={manifest.p} dtype={manifest.dtype}"
        )
    if isinstance(cartridge, Cartridge) and dtype is not None:
        return cartridge.to(dtype=dtype), manifest
    return cartridge, manifest


def without_directory(err: Exception, directory: Path | str) -> str:
    """An artifact error's text without the directory it was loaded from: a download directory, gone by the time
    the error is read, names nothing the reader can find (the caller names the cartridge instead). A file in it is
    named by its file name alone."""
    return str(err).removeprefix(f"{directory}: ").replace(f"{directory}/", "")


def _layer_tensor(tensors: dict[str, torch.Tensor], manifest: CartridgeManifest, name: str) -> Any:
    """One layer's keys or values: the tensor, or for a quantized artifact the data with its scales."""
    if manifest.quantization is None:
        return tensors[name]
    data = tensors[name]
    if data.dtype != STORAGE_DTYPES.get(manifest.dtype):
        raise ValueError(f"{name} is {data.dtype}, the manifest says {manifest.dtype}")
    granularity = getattr(manifest.quantization, name.rsplit(".", 1)[-1])
    return QuantizedKV(data, tensors[f"{name}_scales"], granularity)


def upload_artifact(store: Store, directory: Path, prefix: str) -> CartridgeManifest:
    """Upload tensors first, manifest last: a reader that finds the manifest finds complete tensors."""
    manifest = read_manifest(directory / MANIFEST_FILE)
    store.put_file(f"{prefix.rstrip('/')}/{TENSORS_FILE}", directory / TENSORS_FILE)
    store.put_file(f"{prefix.rstrip('/')}/{MANIFEST_FILE}", directory / MANIFEST_FILE)
    return manifest


def download_artifact(store: Store, prefix: str, directory: Path) -> CartridgeManifest:
    """Fetch an artifact into ``directory``, verifying the manifest against its recorded sha256 and the tensors
    against the manifest's. Either one corrupt is an :class:`ArtifactError`, not a store error: reading it again
    cannot help, the cartridge must be written again."""
    manifest_uri = f"{prefix.rstrip('/')}/{MANIFEST_FILE}"
    try:
        store.download(manifest_uri, directory / MANIFEST_FILE)
        manifest = read_manifest(directory / MANIFEST_FILE)
        store.download(f"{prefix.rstrip('/')}/{TENSORS_FILE}", directory / TENSORS_FILE, manifest.file_sha256)
    except IntegrityError as err:
        which = "manifest" if err.uri == manifest_uri else "tensors"
        raise ArtifactError(f"corrupt cartridge {which}: {err}") from err
    return manifest
