"""The cartridge manifest: what an artifact is bound to and what it contains (DESIGN.md §5).

Kept free of torch so light components (the operator) can read and check manifests cheaply.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
TENSORS_FILE = "cartridge.safetensors"
MANIFEST_FILE = "manifest.json"


class ArtifactError(ValueError):
    """The artifact is corrupt, truncated, inconsistent, or for another base model; the message says which."""


class ModelFingerprint(BaseModel):
    """What a cartridge is bound to: the exact weights, tokenizer and attention geometry of its base model."""

    model_config = ConfigDict(frozen=True)

    model_id: str
    weights_sha256: str
    tokenizer_sha256: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None  # every RoPE setting; None in manifests written before it existed

    def mismatches(self, other: ModelFingerprint, width: int | None = None) -> list[str]:
        """Human-readable differences (empty when compatible); ``model_id`` is a label, not identity. With
        ``width``, long strings are cut to that many characters (a hash prefix tells two models apart as well).

        The rope settings are compared on their own: ``weights_sha256`` hashes the weight files only, and the same
        weights served under another RoPE scaling rotate keys differently from the cartridge's stored keys.
        ``rope_parameters`` is compared only when both sides record it, so older cartridges still load."""
        fields: tuple[str, ...] = (
            "weights_sha256",
            "tokenizer_sha256",
            "num_layers",
            "num_kv_heads",
            "head_dim",
            "rope_theta",
            "rope_scaling",
        )
        if self.rope_parameters is not None and other.rope_parameters is not None:
            fields += ("rope_parameters",)
        return [
            _difference(f, getattr(self, f), getattr(other, f), width)
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]


_ABSENT = "(absent)"
"""A settings key one side does not have (unlike one it sets to None)."""


def _difference(name: str, mine: Any, theirs: Any, width: int | None) -> str:
    """``name: mine != theirs``; of two settings dicts, only the keys that differ (whole dicts cut short could read
    the same), and with ``width`` long strings (hashes) cut to that many characters."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k, _ABSENT) != theirs.get(k, _ABSENT))
        return f"{name}: " + ", ".join(f"{k} {mine.get(k, _ABSENT)} != {theirs.get(k, _ABSENT)}" for k in keys)
    return f"{name}: {_cut(mine, width)} != {_cut(theirs, width)}"


def _cut(value: object, width: int | None) -> str:
    text = str(value)
    return text if width is None or not isinstance(value, str) or len(text) <= width else f"{text[:width]}..."


class ModelMismatch(ArtifactError):
    """A cartridge for another base model. It carries both fingerprints, so a caller can say which model to load
    (the CLI names its ``--model``); the message itself names no remedy, which depends on the caller."""

    _MODELS = re.compile(r"cartridge was trained for (\S+), not the loaded (\S+) \(")

    def __init__(self, where: str, trained_for: ModelFingerprint, loaded: ModelFingerprint) -> None:
        self.trained_for, self.loaded = trained_for, loaded
        super().__init__(f"{where}: {self.summary()}")

    def summary(self, width: int | None = None) -> str:
        """The message without where the cartridge was loaded from; ``width`` cuts long values (hashes)."""
        differences = "; ".join(self.trained_for.mismatches(self.loaded, width))
        return (
            f"cartridge was trained for {self.trained_for.model_id}, not the loaded {self.loaded.model_id} "
            f"({differences})"
        )

    @classmethod
    def model_ids_in(cls, message: str) -> tuple[str, str] | None:
        """(trained for, loaded) from a mismatch's message as a server sent it on, where only the text arrives."""
        found = cls._MODELS.search(message)
        return (found[1], found[2]) if found else None


class Quantization(BaseModel):
    """How a quantized artifact's scales run (``dtype`` int8 or fp8): per token or per channel, for each side."""

    keys: Literal["token", "channel"]
    values: Literal["token", "channel"]


class CartridgeManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    base_model: ModelFingerprint
    p: int = Field(gt=0)
    frozen_tokens: int = Field(ge=0)
    dtype: str
    quantization: Quantization | None = None
    corpus_digest: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    file_sha256: str
    file_bytes: int


def read_manifest(path: Path) -> CartridgeManifest:
    try:
        return CartridgeManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ArtifactError(f"missing manifest {path}") from err
    except ValueError as err:
        raise ArtifactError(f"invalid manifest {path}: {err}") from err
