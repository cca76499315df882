"""The serving engine behind the Triton router model: base model, cartridge cache, continuous batching.

Public API: :class:`Engine` (``submit`` / ``generate`` / ``metrics`` / ``close``), :class:`EngineConfig`,
:class:`SamplingParams`, :class:`Completion`, :class:`StreamEvent`, :class:`RequestHandle`, the cache
:class:`CartridgeCache`, the per-request errors rooted at :class:`EngineError`, and :data:`MODEL_REPOSITORY`.
"""

from pathlib import Path

from cartridges_serving.cache import CacheStats, CartridgeCache, check_cartridge_id
from cartridges_serving.engine import (
    Completion,
    Engine,
    EngineConfig,
    EngineMetrics,
    KVStats,
    RequestHandle,
    SamplingParams,
    StreamEvent,
)
from cartridges_serving.errors import (
    CartridgeInvalid,
    CartridgeNotFound,
    CartridgeRefused,
    EngineError,
    EngineUnavailable,
    InvalidRequest,
)

MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
"""Triton's model repository with the router model; installed with the package, copied to ``/models`` in the image."""

__all__ = [
    "MODEL_REPOSITORY",
    "CacheStats",
    "CartridgeCache",
    "CartridgeInvalid",
    "CartridgeNotFound",
    "CartridgeRefused",
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineMetrics",
    "EngineUnavailable",
    "InvalidRequest",
    "KVStats",
    "RequestHandle",
    "SamplingParams",
    "StreamEvent",
    "check_cartridge_id",
]
