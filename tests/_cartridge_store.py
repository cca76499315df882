"""Test helpers: base models and random cartridges for a model, put into a store the way users and the operator do."""

from __future__ import annotations

import io
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from cartridges import layout
from cartridges.artifact import (
    TENSORS_FILE,
    Cartridge,
    ModelFingerprint,
    StoredCartridge,
    save_cartridge,
    upload_artifact,
)
from cartridges.models import LoadedModel
from cartridges.store import Store, StoreError, StoreURI

GATE_WAIT_S = 60.0  # a failure guard only: tests release the gate long before


def random_cartridge(fingerprint: ModelFingerprint, p: int, seed: int, scale: float = 1.0) -> Cartridge:
    """Keys/values large enough that attending to them visibly changes the tiny model's output."""
    generator = torch.Generator().manual_seed(seed)
    shape = (fingerprint.num_kv_heads, p, fingerprint.head_dim)

    def layer() -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    return Cartridge([layer() for _ in range(fingerprint.num_layers)], [layer() for _ in range(fingerprint.num_layers)])


def publish(
    store: Store,
    root: str,
    namespace: str,
    name: str,
    cartridge: StoredCartridge,
    fingerprint: ModelFingerprint,
    generation: int = 1,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Upload a generation (its manifest recording ``training`` and ``metrics``) and point ``current.json`` at it;
    returns the generation prefix."""
    prefix = layout.generation_prefix(root, namespace, name, generation)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = save_cartridge(cartridge, Path(tmp), fingerprint, training=training, metrics=metrics)
        upload_artifact(store, Path(tmp), prefix)
    pointer = layout.Pointer(generation=generation, prefix=prefix, sha256=manifest.file_sha256)
    store.put_json(layout.current_pointer(root, namespace, name), pointer.model_dump())
    return prefix


def truncate_in_minio(store: Store, uri: str) -> None:
    """Cut the last bytes of an object in MinIO behind the store's back, keeping the sha256 recorded for the whole
    (what a bit flip or a truncating proxy leaves)."""
    parsed = StoreURI.parse(uri)
    recorded = {"sha256": store.stat(uri).sha256 or ""}
    client = store._backend(parsed).client  # type: ignore[attr-defined]
    data = client.get_object(parsed.bucket, parsed.key).read()[:-3]
    client.put_object(parsed.bucket, parsed.key, io.BytesIO(data), len(data), metadata=recorded)


def put_model(lm: LoadedModel, store: Store, uri: str) -> None:
    """The model as an HF directory in the store at ``uri``, where ``spec.baseModel.uri`` points."""
    with tempfile.TemporaryDirectory() as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        for path in Path(tmp).iterdir():
            store.put_file(f"{uri}/{path.name}", path)


class GatedStore(Store):
    """Holds the download of one cartridge's tensors until ``release`` is set (failing it if ``fail`` is)."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated, self.fail, self.downloads = gated, False, 0
        self.started, self.release = threading.Event(), threading.Event()

    def download(self, uri: str, path: Path, expected_sha256: str | None = None) -> Any:
        if f"/{self.gated}/" in uri and uri.endswith(TENSORS_FILE):
            self.downloads += 1
            self.started.set()
            assert self.release.wait(GATE_WAIT_S), "the test never released the download"
            if self.fail:
                raise StoreError("download failed (simulated)", uri)
        return super().download(uri, path, expected_sha256)
