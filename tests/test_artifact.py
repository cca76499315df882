"""The cartridge artifact: save/load round trip, verification, and the reference-implementation importer."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3TextConfig, PhiConfig, PretrainedConfig

from cartridges.artifact import (
    MANIFEST_FILE,
    TENSORS_FILE,
    ArtifactError,
    Cartridge,
    ModelFingerprint,
    QuantizedCartridge,
    download_artifact,
    load_cartridge,
    load_stored_cartridge,
    quantize_cartridge,
    save_cartridge,
    upload_artifact,
    without_directory,
)
from cartridges.hashing import sha256_file
from cartridges.models import LoadedModel, fingerprint, load_base_model, tiny_llama
from cartridges.quantize import QuantFormat
from cartridges.store import Store
from cartridges_e2e.minio import MinioServer


def random_cartridge(model: LoadedModel, p: int = 16, dtype: torch.dtype = torch.float32) -> Cartridge:
    fp = model.fingerprint
    shape = (fp.num_kv_heads, p, fp.head_dim)
    layers = range(fp.num_layers)
    return Cartridge(
        [torch.randn(shape, dtype=dtype) for _ in layers], [torch.randn(shape, dtype=dtype) for _ in layers]
    )


def test_round_trip_preserves_tensors_and_manifest(tiny_model: LoadedModel, tmp_path: Path) -> None:
    cartridge = random_cartridge(tiny_model, dtype=torch.bfloat16)
    manifest = save_cartridge(cartridge, tmp_path, tiny_model.fingerprint, corpus_digest="abc", metrics={"nll": 1.5})
    loaded, read = load_cartridge(tmp_path, expected_model=tiny_model.fingerprint)
    assert read == manifest and read.p == 16 and read.dtype == "bfloat16"
    for a, b in zip(cartridge.keys + cartridge.values, loaded.keys + loaded.values, strict=True):
        assert torch.equal(a, b)
    as_fp32, _ = load_cartridge(tmp_path, dtype=torch.float32)
    assert as_fp32.keys[0].dtype == torch.float32


def test_truncated_tensors_are_rejected(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_cartridge(random_cartridge(tiny_model), tmp_path, tiny_model.fingerprint)
    data = (tmp_path / TENSORS_FILE).read_bytes()
    (tmp_path / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_cartridge(tmp_path)


ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
RESAVE_UNDER_ASCII = """
import locale, sys
from pathlib import Path
from cartridges.artifact import load_cartridge, save_cartridge
assert locale.getpreferredencoding().lower() in ("ascii", "ansi_x3.4-1968"), locale.getpreferredencoding()
cartridge, manifest = load_cartridge(Path(sys.argv[1]))
save_cartridge(cartridge, Path(sys.argv[2]), manifest.base_model, training=manifest.training)
"""


def test_manifest_with_non_ascii_text_round_trips_under_an_ascii_locale(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    """The Triton stub runs under an ASCII locale: a manifest is UTF-8 whatever the locale (a corpus file named
    ``café notes.md`` puts non-ASCII text in the description)."""
    training = {"description": "café notes"}
    save_cartridge(random_cartridge(tiny_model), tmp_path / "a", tiny_model.fingerprint, training=training)
    env = {**os.environ, **ASCII_LOCALE}
    subprocess.run(
        [sys.executable, "-c", RESAVE_UNDER_ASCII, str(tmp_path / "a"), str(tmp_path / "b")], env=env, check=True
    )
    _, manifest = load_cartridge(tmp_path / "b")
    assert manifest.training == training


def test_artifact_errors_drop_the_download_directory_wherever_they_name_it(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    """Serving and the CLI load from a temporary directory that is gone once the error is read."""
    save_cartridge(random_cartridge(tiny_model), tmp_path, tiny_model.fingerprint)
    (tmp_path / MANIFEST_FILE).write_bytes(b"\xaf{}")
    with pytest.raises(ArtifactError) as caught:
        load_cartridge(tmp_path)
    assert str(tmp_path) not in without_directory(caught.value, tmp_path)
    assert MANIFEST_FILE in without_directory(caught.value, tmp_path)


def test_cartridge_for_another_model_is_a_clear_error(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_cartridge(random_cartridge(tiny_model), tmp_path, tiny_model.fingerprint)
    other = tiny_llama(seed=1)
    with pytest.raises(
        ArtifactError, match=r"trained for tiny-llama-seed0, not the loaded tiny-llama-seed1.*weights_sha256"
    ):
        load_cartridge(tmp_path, expected_model=other.fingerprint)


def test_cartridge_trained_under_another_rope_scaling_is_a_clear_error(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """The same weights under another RoPE scaling rotate keys differently: the weights hash (weight files only)
    cannot tell, so the manifest's rope settings must."""
    plain = tmp_path / "plain"
    tiny_model.model.save_pretrained(plain)
    tiny_model.tokenizer.save_pretrained(plain)
    scaled = tmp_path / "scaled"
    shutil.copytree(plain, scaled)
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}))
    trained_under = load_base_model(scaled).fingerprint
    save_cartridge(random_cartridge(tiny_model), tmp_path / "cartridge", trained_under)
    with pytest.raises(ArtifactError, match=r"rope_scaling: \{'rope_type': 'linear', 'factor': 8.0.*\} != None"):
        load_cartridge(tmp_path / "cartridge", expected_model=load_base_model(plain).fingerprint)
    load_cartridge(tmp_path / "cartridge", expected_model=trained_under)


def _fingerprint_under(config: PretrainedConfig, tiny_model: LoadedModel) -> ModelFingerprint:
    """The tiny model's fingerprint with its RoPE read from ``config`` (only the config's rope settings matter)."""
    return fingerprint(SimpleNamespace(config=config), tiny_model.tokenizer, "m", "0" * 64)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "config, changed",
    [
        (Gemma3TextConfig(), lambda c: c.rope_parameters["full_attention"].update(rope_theta=500000.0)),
        (PhiConfig(), lambda c: c.rope_parameters.update(partial_rotary_factor=1.0)),
    ],
    ids=["gemma3-full-attention-theta", "phi-partial-rotary-factor"],
)
def test_rope_settings_beyond_theta_and_scaling_are_compared(
    config: PretrainedConfig, changed: Callable[[PretrainedConfig], None], tiny_model: LoadedModel
) -> None:
    """Gemma3's per-layer-type thetas and Phi's partial rotation leave rope_theta/rope_scaling unchanged."""
    trained_under = _fingerprint_under(config, tiny_model)
    served = copy.deepcopy(config)
    changed(served)
    assert [m.split(":")[0] for m in trained_under.mismatches(_fingerprint_under(served, tiny_model))] == [
        "rope_parameters"
    ]
    assert trained_under.mismatches(_fingerprint_under(copy.deepcopy(config), tiny_model)) == []


def test_manifest_without_rope_parameters_still_loads(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """Cartridges written before rope_parameters was recorded are checked on the fields they have."""
    save_cartridge(random_cartridge(tiny_model), tmp_path, tiny_model.fingerprint)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["base_model"].pop("rope_parameters") == {"rope_theta": 10000.0, "rope_type": "default"}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    load_cartridge(tmp_path, expected_model=tiny_model.fingerprint)


def test_manifest_that_lies_about_p_is_rejected(tiny_model: LoadedModel, tmp_path: Path) -> None:
    save_cartridge(random_cartridge(tiny_model), tmp_path, tiny_model.fingerprint)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["p"] = 32
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest says p=32"):
        load_cartridge(tmp_path)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_round_trip_stays_quantized_for_serving(
    fmt: QuantFormat, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    cartridge = random_cartridge(tiny_model)
    quantized = quantize_cartridge(cartridge, fmt)
    manifest = save_cartridge(quantized, tmp_path, tiny_model.fingerprint)
    assert manifest.dtype == fmt and manifest.quantization is not None
    assert (manifest.quantization.keys, manifest.quantization.values) == ("channel", "token")
    stored, _ = load_stored_cartridge(tmp_path, expected_model=tiny_model.fingerprint)
    assert isinstance(stored, QuantizedCartridge) and stored.format == fmt
    for a, b in zip(quantized.keys + quantized.values, stored.keys + stored.values, strict=True):
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scales, b.scales)
    dense, _ = load_cartridge(tmp_path, dtype=torch.float32)  # everything but serving reads it dequantized
    assert isinstance(dense, Cartridge)
    tolerance = {"int8": 0.02, "fp8": 0.07}[fmt]  # of the largest magnitude per scale group
    for exact, approx in zip(cartridge.keys + cartridge.values, dense.keys + dense.values, strict=True):
        assert (approx - exact).abs().max() <= tolerance * exact.abs().max()
    assert stored.nbytes < cartridge.nbytes / 2


def test_quantized_artifact_whose_tensors_disagree_is_rejected(tiny_model: LoadedModel, tmp_path: Path) -> None:
    cartridge = random_cartridge(tiny_model, p=8)  # p differs from head_dim: token and channel scales differ
    save_cartridge(quantize_cartridge(cartridge, "int8"), tmp_path, tiny_model.fingerprint)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["dtype"] = "fp8"
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="layers.0.keys is torch.int8, the manifest says fp8"):
        load_stored_cartridge(tmp_path)
    manifest["dtype"], manifest["quantization"]["keys"] = "int8", "token"  # scales shaped per channel
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="token scales must be float32"):
        load_cartridge(tmp_path)


@pytest.mark.parametrize("bad", [0.0, float("inf")])
def test_quantized_artifact_with_unusable_scales_is_rejected(
    tiny_model: LoadedModel, tmp_path: Path, bad: float
) -> None:
    """A zero or infinite scale dequantizes to NaN: the artifact is invalid, never served."""
    quantized = quantize_cartridge(random_cartridge(tiny_model, p=8), "fp8")
    save_cartridge(quantized, tmp_path, tiny_model.fingerprint)
    tensors = load_file(tmp_path / TENSORS_FILE)
    tensors["layers.1.values_scales"][0, 3] = bad
    save_file(tensors, tmp_path / TENSORS_FILE)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["file_sha256"] = sha256_file(tmp_path / TENSORS_FILE)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="token scales must be finite and positive"):
        load_stored_cartridge(tmp_path, expected_model=tiny_model.fingerprint)


def test_geometry_is_checked_on_save(tiny_model: LoadedModel, tmp_path: Path) -> None:
    bad = Cartridge([torch.zeros(1, 4, 16)] * 2, [torch.zeros(1, 4, 16)] * 2)
    with pytest.raises(ArtifactError, match="geometry"):
        save_cartridge(bad, tmp_path, tiny_model.fingerprint)
    with pytest.raises(ArtifactError, match="layer 1"):
        Cartridge([torch.zeros(2, 4, 16), torch.zeros(2, 5, 16)], [torch.zeros(2, 4, 16)] * 2)


@pytest.mark.minio
def test_upload_and_verified_download_through_minio(
    tiny_model: LoadedModel, minio_server: MinioServer, s3_prefix: str, tmp_path: Path
) -> None:
    store: Store = minio_server.store()
    save_cartridge(random_cartridge(tiny_model), tmp_path / "out", tiny_model.fingerprint)
    prefix = f"{s3_prefix}cartridges/default/demo/g1"
    uploaded = upload_artifact(store, tmp_path / "out", prefix)
    downloaded = download_artifact(store, prefix, tmp_path / "in")
    assert downloaded == uploaded
    load_cartridge(tmp_path / "in", expected_model=tiny_model.fingerprint)
    # Corrupt the tensors in the store: the download must fail and leave no tensors file behind.
    store.put_bytes(f"{prefix}/{TENSORS_FILE}", b"corrupt")
    with pytest.raises(ArtifactError, match="corrupt cartridge tensors"):
        download_artifact(store, prefix, tmp_path / "again")
    assert not (tmp_path / "again" / TENSORS_FILE).exists()


def test_a_settings_key_set_to_none_differs_from_one_absent(tiny_model: LoadedModel) -> None:
    """Two transformers versions may write the same RoPE settings with and without a None-valued key: the refusal
    must still say what differs, not print an empty difference."""
    fp = tiny_model.fingerprint
    rope = fp.rope_parameters or {}
    other = fp.model_copy(update={"rope_parameters": {**rope, "factor": None}})
    assert fp.mismatches(other) == ["rope_parameters: factor (absent) != None"]
