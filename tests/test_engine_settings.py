"""Engine settings from the environment (serving pods) and from the chart's JSON (the operator): bad values fail
at start-up with the setting's name, never as a bare int() error or a silently ignored key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from _cartridge_store import publish, random_cartridge

from cartridges.models import LoadedModel
from cartridges.store import Store
from cartridges_operator.config import ServingEngine
from cartridges_serving import Engine, SamplingParams
from cartridges_serving.engine import DTYPES, EngineConfig, engine_dtype

MODEL = {"CARTRIDGES_MODEL_URI": "s3://b/models/m"}


def test_engine_reads_its_settings_and_keeps_defaults() -> None:
    config = EngineConfig.from_env({**MODEL, "CARTRIDGES_KV_BYTES": "1048576", "CARTRIDGES_POINTER_TTL_S": "2.5"})
    assert (config.kv_bytes, config.pointer_ttl_s, config.max_batch_size) == (1 << 20, 2.5, 32)


def test_the_model_dtype_is_16_bit_on_a_gpu_and_float32_on_cpu_unless_set() -> None:
    """fp32 on a GPU reads twice the bytes the kernels are sized for, and its dots run as TF32."""
    cpu = {**MODEL, "CARTRIDGES_DEVICE": "cpu"}
    assert EngineConfig.from_env(cpu).dtype == "auto" and EngineConfig.from_env(cpu).model_dtype() == torch.float32
    explicit = EngineConfig.from_env({**cpu, "CARTRIDGES_DTYPE": "bfloat16"})
    assert explicit.model_dtype() == torch.bfloat16
    assert engine_dtype("auto", "cuda", bf16_supported=True) == torch.bfloat16
    assert engine_dtype("auto", "cuda", bf16_supported=False) == torch.float16  # before sm_80
    assert engine_dtype("float32", "cuda", bf16_supported=True) == torch.float32


def test_the_engine_serves_in_the_dtype_it_is_set_to(
    tiny_model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model, its own KV and the cartridges it loads all take CARTRIDGES_DTYPE, and start-up logs it."""
    root, store = f"file://{tmp_path}", Store()
    tiny_model.model.save_pretrained(tmp_path / "model")
    tiny_model.tokenizer.save_pretrained(tmp_path / "model")
    config = EngineConfig(str(tmp_path / "model"), store_root=root, device="cpu", dtype="bfloat16")
    caplog.set_level(logging.INFO, logger="cartridges_serving.engine")
    engine = Engine.from_config(config, store)
    try:
        fingerprint = engine.loaded.fingerprint  # the saved directory's weights, as the engine hashed them
        publish(store, root, "default", "alpha", random_cartridge(fingerprint, 4, 0), fingerprint)
        completion = engine.submit("hi", ["alpha"], SamplingParams(max_tokens=2)).result()
        assert completion.cartridge_tokens == 4 and len(completion.token_ids) == 2
        assert {p.dtype for p in engine.loaded.model.parameters()} == {torch.bfloat16}
        assert engine.runner.own_kv_pool.keys.dtype == torch.bfloat16
        assert engine.cartridges is not None
        keys = engine.cartridges.get("alpha").cartridge.keys[0]
        assert isinstance(keys, torch.Tensor) and keys.dtype == torch.bfloat16
    finally:
        engine.close()
    assert "in torch.bfloat16 (CARTRIDGES_DTYPE=bfloat16)" in caplog.text


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CARTRIDGES_MAX_BATCH_SIZE", "0", "CARTRIDGES_MAX_BATCH_SIZE must be an integer >= 1, got '0'"),
        ("CARTRIDGES_KV_BYTES", "2GiB", "CARTRIDGES_KV_BYTES must be an integer >= 0, got '2GiB'"),
        ("CARTRIDGES_KV_BYTES", "-1", "CARTRIDGES_KV_BYTES must be an integer >= 0"),
        ("CARTRIDGES_POINTER_TTL_S", "nan", "CARTRIDGES_POINTER_TTL_S must be a number >= 0.0"),
        ("CARTRIDGES_CUDA_GRAPHS", "on", "CARTRIDGES_CUDA_GRAPHS must be true or false, got 'on'"),
        ("CARTRIDGES_DTYPE", "fp16", "CARTRIDGES_DTYPE must be one of auto, bfloat16, float16, float32, got 'fp16'"),
    ],
)
def test_bad_engine_settings_name_the_setting(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_env({**MODEL, name: value})


def test_operator_passes_the_charts_engine_settings_on() -> None:
    engine = ServingEngine.from_json('{"maxBatchSize": 8, "kvBytes": 1024, "cudaGraphs": true, "dtype": "float16"}')
    env = {e["name"]: e["value"] for e in engine.env()}
    assert env["CARTRIDGES_MAX_BATCH_SIZE"] == "8" and env["CARTRIDGES_KV_BYTES"] == "1024"
    config = EngineConfig.from_env({**MODEL, **env})
    assert config.cuda_graphs and config.model_dtype() == torch.float16
    assert len(env) == 4  # unset keys keep the engine's own defaults
    assert ServingEngine.CHOICES["dtype"] == ("auto", *DTYPES)  # the operator checks what the engine accepts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"maxBatchSize": 0}', "maxBatchSize must be an integer >= 1, got 0"),
        ('{"kvBytes": "80Gi"}', "kvBytes must be an integer >= 0, got '80Gi'"),
        ('{"maxBatchSize": true}', "maxBatchSize must be an integer"),
        ('{"cudaGraphs": 1}', "cudaGraphs must be true or false, got 1"),
        ('{"dtype": "fp16"}', "dtype must be one of auto, bfloat16, float16, float32, got 'fp16'"),
        ('{"gpuMemory": 1}', r"unknown keys \['gpuMemory'\]"),
        ("[32]", "must be a JSON object"),
        ('{"maxBatchSize": 8', "CARTRIDGES_SERVING_ENGINE must be JSON"),
    ],
)
def test_bad_chart_engine_settings_stop_the_operator_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingEngine.from_json(text)
