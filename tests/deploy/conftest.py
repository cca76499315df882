"""Rendering the Helm chart with the real helm CLI (built once from its Go module, cached like the other services)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart import Render, run_helm, template_args


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
        proc = run_helm(helm, *template_args(values, namespace, release, sets), "--include-crds")
        assert proc.returncode == 0, proc.stderr
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    return render
