"""Engine settings from the environment (serving pods) and from the chart's JSON (the operator): bad values fail
at start-up with the setting's name, never as a bare int() error or a silently ignored key."""

from __future__ import annotations

import pytest

from cartridges_operator.config import ServingEngine
from cartridges_serving.engine import EngineConfig

MODEL = {"CARTRIDGES_MODEL_URI": "s3://b/models/m"}


def test_engine_reads_its_settings_and_keeps_defaults() -> None:
    config = EngineConfig.from_env({**MODEL, "CARTRIDGES_KV_BYTES": "1048576", "CARTRIDGES_POINTER_TTL_S": "2.5"})
    assert (config.kv_bytes, config.pointer_ttl_s, config.max_batch_size) == (1 << 20, 2.5, 32)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CARTRIDGES_MAX_BATCH_SIZE", "0", "CARTRIDGES_MAX_BATCH_SIZE must be an integer >= 1, got '0'"),
        ("CARTRIDGES_KV_BYTES", "2GiB", "CARTRIDGES_KV_BYTES must be an integer >= 0, got '2GiB'"),
        ("CARTRIDGES_KV_BYTES", "-1", "CARTRIDGES_KV_BYTES must be an integer >= 0"),
        ("CARTRIDGES_POINTER_TTL_S", "nan", "CARTRIDGES_POINTER_TTL_S must be a number >= 0.0"),
        ("CARTRIDGES_CUDA_GRAPHS", "on", "CARTRIDGES_CUDA_GRAPHS must be true or false, got 'on'"),
    ],
)
def test_bad_engine_settings_name_the_setting(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_env({**MODEL, name: value})


def test_operator_passes_the_charts_engine_settings_on() -> None:
    engine = ServingEngine.from_json('{"maxBatchSize": 8, "kvBytes": 1024, "cudaGraphs": true}')
    env = {e["name"]: e["value"] for e in engine.env()}
    assert env["CARTRIDGES_MAX_BATCH_SIZE"] == "8" and env["CARTRIDGES_KV_BYTES"] == "1024"
    assert EngineConfig.from_env({**MODEL, **env}).cuda_graphs
    assert len(env) == 3  # unset keys keep the engine's own defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"maxBatchSize": 0}', "maxBatchSize must be an integer >= 1, got 0"),
        ('{"kvBytes": "80Gi"}', "kvBytes must be an integer >= 0, got '80Gi'"),
        ('{"maxBatchSize": true}', "maxBatchSize must be an integer"),
        ('{"cudaGraphs": 1}', "cudaGraphs must be true or false, got 1"),
        ('{"gpuMemory": 1}', r"unknown keys \['gpuMemory'\]"),
        ("[32]", "must be a JSON object"),
        ('{"maxBatchSize": 8', "CARTRIDGES_SERVING_ENGINE must be JSON"),
    ],
)
def test_bad_chart_engine_settings_stop_the_operator_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingEngine.from_json(text)
