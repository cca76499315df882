"""Base-model loading: the tiny random model, SmolLM2 from its GGUF, store URIs, and bad sources."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cartridges.cli.common import _tiny_model_dir
from cartridges.models import LoadedModel, ModelLoadError, _local_copy, load_base_model, tiny_llama
from cartridges.store import ObjectInfo, Store, StoreURI
from cartridges_e2e.minio import MinioServer


def test_tiny_model_is_deterministic_and_fingerprinted() -> None:
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.weights_sha256 != c.fingerprint.weights_sha256
    assert (a.fingerprint.num_layers, a.fingerprint.num_kv_heads, a.fingerprint.head_dim) == (2, 2, 16)
    ids = a.tokenizer("héllo wörld")["input_ids"]
    assert a.tokenizer.decode(ids) == "héllo wörld"


def _store_model(model: LoadedModel, local: Path, store: Store, prefix: str) -> list[str]:
    """Save ``model`` to ``local`` and upload it under ``prefix``; the names of its files."""
    model.model.save_pretrained(local)
    model.tokenizer.save_pretrained(local)
    for path in local.iterdir():
        store.put_file(f"{prefix}/{path.name}", path)
    return sorted(path.name for path in local.iterdir())


def test_hf_directory_round_trip_through_a_file_store(tiny_model: LoadedModel, tmp_path: Path) -> None:
    store = Store()
    _store_model(tiny_model, tmp_path / "tiny", store, f"file://{tmp_path}/store/models/tiny")
    loaded = load_base_model(f"file://{tmp_path}/store/models/tiny", store=store)
    assert loaded.fingerprint.tokenizer_sha256 == tiny_model.fingerprint.tokenizer_sha256
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded.model(ids).logits, tiny_model.model(ids).logits, atol=1e-5)


def test_a_stored_model_keeps_its_file_names_however_its_prefix_is_spelled(
    tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARTRIDGES_CACHE", str(tmp_path / "cache"))
    store = Store()
    names = _store_model(tiny_model, tmp_path / "tiny", store, f"file://{tmp_path}/store/models/tiny")
    spellings = [f"file://{tmp_path}/store/models/tiny", f"file://localhost{tmp_path}/store/models/tiny/",
                 f"file://{tmp_path}/store//models/./tiny"]  # fmt: skip
    copies = {_local_copy(spelling, store) for spelling in spellings}
    assert len(copies) == 1 and sorted(path.name for path in copies.pop().iterdir()) == names


def test_stored_model_files_that_would_land_outside_the_cache_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 takes any key; one that is no plain relative path below the model's prefix names no file of the copy."""
    monkeypatch.setenv("CARTRIDGES_CACHE", str(tmp_path / "cache"))

    class Hostile(Store):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def names(self, prefix: str) -> list[str]:
            return ["config.json", self.name]

    for name in ("../../escaped.json", "/abs.json", "sub//x.json", "./x.json"):
        with pytest.raises(ModelLoadError, match=f"object {name!r} under .* is not a plain relative path"):
            _local_copy(f"file://{tmp_path}/store/models/m", Hostile(name))
    assert not list(tmp_path.rglob("*.json"))


def _at_once(work: Callable[[], object], workers: int = 4) -> list[object]:
    """What ``work`` returned (or the error it raised, as text) in each of ``workers`` processes started together."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(workers), context.Queue()

    def run() -> None:
        barrier.wait()
        try:
            results.put(work())
        except Exception as err:
            results.put(f"{type(err).__name__}: {err}")

    processes = [context.Process(target=run) for _ in range(workers)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join()
    return outcomes


def test_processes_filling_the_model_cache_at_once_all_get_the_whole_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several CLIs (or trainer ranks) start on one cache: none fails, and none sees a directory half-written."""
    monkeypatch.setenv("CARTRIDGES_CACHE", str(tmp_path / "cache"))
    outcomes = _at_once(lambda: sorted(path.name for path in _tiny_model_dir().iterdir()))
    cached = sorted(path.name for path in (tmp_path / "cache" / "models" / "tiny-llama-seed0").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(cached)
    assert outcomes == [cached] * 4


def test_processes_copying_a_stored_model_at_once_download_it_once(
    tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ranks of one trainer copy the base model into the node's cache at once: one downloads, the others wait
    for its complete copy."""
    monkeypatch.setenv("CARTRIDGES_CACHE", str(tmp_path / "cache"))
    source, log = f"file://{tmp_path}/store/models/tiny", tmp_path / "downloads.log"

    class Slow(Store):
        def download(self, uri: str, path: Path, expected_sha256: str | None = None) -> ObjectInfo:
            with log.open("a") as file:
                file.write(f"{uri}\n")
            time.sleep(0.2)  # long enough that every worker starts before the first file is there
            return super().download(uri, path, expected_sha256)

    names = _store_model(tiny_model, tmp_path / "tiny", Store(), source)
    outcomes = _at_once(lambda: sorted(path.name for path in _local_copy(source, Slow()).iterdir()))
    assert outcomes == [names] * 4
    assert len(log.read_text().splitlines()) == len(names)


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model not found"):
        load_base_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="must be .gguf"):
        load_base_model(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_base_model(tmp_path / "fake.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_base_model(tmp_path / "empty")


def test_gguf_of_a_non_causal_lm_is_rejected(tmp_path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'bert' is not a supported causal LM"):
        load_base_model(tmp_path / "bert.gguf")


@pytest.mark.smollm2
def test_smollm2_answers_a_simple_question_greedily(smollm2: LoadedModel) -> None:
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = str(smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    input_ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
    out = smollm2.model.generate(input_ids, max_new_tokens=8, do_sample=False)  # type: ignore[operator]
    answer = str(smollm2.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
    assert "paris" in answer.lower()
    fp = smollm2.fingerprint
    assert (fp.num_layers, fp.num_kv_heads, fp.head_dim) == (30, 3, 64)


@pytest.mark.minio
def test_a_replaced_model_without_a_recorded_sha256_is_loaded_again(
    minio_server: MinioServer, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights another tool uploaded (no sha256 in the metadata) and later replaced are not served from the
    cache of the first upload: the cache key follows the object's revision."""
    monkeypatch.setenv("CARTRIDGES_CACHE", str(tmp_path / "cache"))
    store = minio_server.store()
    source = f"{s3_prefix}models/tiny"
    loaded, expected = [], []
    for seed in (0, 1):
        local = tmp_path / f"tiny-{seed}"
        model = tiny_llama(seed=seed)
        model.model.save_pretrained(local)
        model.tokenizer.save_pretrained(local)
        for path in local.iterdir():  # as another S3 client writes them: no sha256 metadata
            parsed = StoreURI.parse(f"{source}/{path.name}")
            client = store._backend(parsed).client  # type: ignore[attr-defined]
            client.fput_object(parsed.bucket, parsed.key, str(path))
        assert store.stat(f"{source}/config.json").sha256 is None
        loaded.append(load_base_model(source, store=store).fingerprint.weights_sha256)
        expected.append(load_base_model(local).fingerprint.weights_sha256)
    assert loaded == expected and expected[0] != expected[1]
