"""A stand-in for the trainer at the operator's seam: honours the contract (config in, artifact + progress +
eval out, exit codes) in a second, with a random cartridge for the tiny model. The real trainer has its own tests."""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

from cartridges import layout
from cartridges.artifact import MANIFEST_FILE, Cartridge, save_cartridge, upload_artifact
from cartridges.contract import EXIT_PERMANENT, TrainerConfig
from cartridges.models import tiny_llama
from cartridges.store import Store, StoreURI

SLOW_TRAINING_S = 120.0
RELEASE_FILE = "release"
"""Written by a test under the generation's prefix: a trainer waiting for it goes on."""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    config = TrainerConfig.model_validate_json(parser.parse_args().config)
    store = Store.from_env()
    out = config.output_prefix
    if store.exists(f"{out}/{MANIFEST_FILE}"):  # as the real trainer: a finished generation is not trained again
        return 0
    documents = [d for prefix in config.corpus_prefixes for d in layout.read_documents(store, prefix)]
    if any("PERMANENT-FAILURE" in d.text for d in documents):
        print("corpus is unusable: it says PERMANENT-FAILURE", file=sys.stderr)
        return EXIT_PERMANENT
    training = layout.Progress(phase="training", step=1, total=2).model_dump()
    store.put_json(f"{out}/{layout.PROGRESS_FILE}", training)
    if any("SLOW-TRAINING" in d.text for d in documents):  # keeps writing, as a long training run does, until killed
        deadline = time.monotonic() + SLOW_TRAINING_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            store.put_json(f"{out}/{layout.PROGRESS_FILE}", training)
    if any("NAN-SCORES" in d.text for d in documents):  # a diverging run: a NaN loss until the test releases it
        diverged = {**training, "loss": float("nan")}
        deadline = time.monotonic() + SLOW_TRAINING_S
        while time.monotonic() < deadline and not store.exists(f"{out}/{RELEASE_FILE}"):
            store.put_json(f"{out}/{layout.PROGRESS_FILE}", diverged)
            time.sleep(0.2)
    model = tiny_llama()
    fp, p = model.fingerprint, config.spec.size
    shape = (fp.num_kv_heads, p, fp.head_dim)
    layers = range(fp.num_layers)
    cartridge = Cartridge([torch.randn(shape) for _ in layers], [torch.randn(shape) for _ in layers])
    with tempfile.TemporaryDirectory() as tmp:
        digest = config.corpus_prefixes[0].rsplit("/", 1)[-1]
        save_cartridge(cartridge, Path(tmp), fp, corpus_digest=digest, training={"training_hash": config.training_hash})
        upload_artifact(store, Path(tmp), out)
    if any("CORRUPT-ARTIFACT" in d.text for d in documents):
        store.put_bytes(f"{out}/cartridge.safetensors", b"corrupted after upload")
    if any("BITROT-ARTIFACT" in d.text for d in documents):
        _rot_keeping_recorded_sha256(store, f"{out}/cartridge.safetensors")
    scores = {"noContext": 3.0, "icl": 1.0, "cartridge": 1.5, "iclGainRecovered": 0.75}
    if any("NAN-SCORES" in d.text for d in documents):
        scores.update(cartridge=float("nan"), iclGainRecovered=float("nan"))
    store.put_json(f"{out}/{layout.EVAL_FILE}", scores)
    store.put_json(f"{out}/{layout.PROGRESS_FILE}", layout.Progress(phase="done", step=2, total=2).model_dump())
    return 0


def _rot_keeping_recorded_sha256(store: Store, uri: str) -> None:
    """Flip the last byte behind the store's back (bit rot, a rogue writer): the recorded sha256 still matches the
    manifest, only the bytes do not."""
    parsed = StoreURI.parse(uri)
    data = bytearray(store.get_bytes(uri))
    data[-1] ^= 0xFF
    client = store._backend(parsed).client  # type: ignore[attr-defined]
    recorded = {"sha256": store.stat(uri).sha256 or ""}
    client.put_object(parsed.bucket, parsed.key, io.BytesIO(bytes(data)), len(data), metadata=recorded)


if __name__ == "__main__":
    raise SystemExit(main())
