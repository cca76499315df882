"""Helpers shared by the chart tests: paths, running helm, picking objects out of a render."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cartridges_e2e.chart import CHART, CI_VALUES, REPO, find, run_helm, template_args

__all__ = [
    "CHART",
    "CI_VALUES",
    "REPO",
    "Render",
    "container",
    "find",
    "installable_chart",
    "run_helm",
    "template_args",
]

Render = Callable[..., list[dict[str, Any]]]
"""``render(values_file, namespace=..., release=..., sets={...})``: the chart's objects, CRDs included."""


def container(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    (found,) = find(objects, "Deployment", deployment)
    first: dict[str, Any] = found["spec"]["template"]["spec"]["containers"][0]
    return first


def installable_chart(into: Path) -> Path:
    """A copy of the chart that helm installs on the test API server. Built from source without version stamping,
    that server reports v0.0.0, so the copy drops the kubeVersion constraint; everything else is as shipped."""
    chart = into / CHART.name
    shutil.copytree(CHART, chart)
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    del meta["kubeVersion"]
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    return chart
