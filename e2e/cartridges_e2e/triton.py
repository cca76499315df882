"""The test fixtures' view of Triton: the server itself is started by :mod:`cartridges.tritonserver`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from cartridges.tritonserver import TritonServer


class TritonFactory(Protocol):
    """The ``triton_server_factory`` fixture: one server per model repository (and env) per session."""

    def __call__(self, model_repository: Path, env: dict[str, str] | None = None) -> TritonServer: ...
