"""Rendering the Helm chart with the real helm CLI (built once from its Go module, cached like the other services)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _chart import Render

from cartridges_e2e import chart


@pytest.fixture(scope="session")
def helm() -> Path:
    from cartridges_e2e import binaries

    return binaries.helm().path


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """``render(values_file, namespace=..., release=..., sets={...})``: the chart's objects, CRDs included."""

    def render(
        values: str,
        namespace: str = "cartridges-system",
        release: str = "cartridges",
        sets: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        return chart.render(helm, values, namespace, release, sets)

    return render
