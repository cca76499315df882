"""Helpers shared by the chart tests: paths, running helm, picking objects out of a render."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cartridges_e2e.chart import CHART, CI_VALUES, REPO, find, run_helm, template_args

__all__ = ["CHART", "CI_VALUES", "REPO", "Render", "container", "find", "run_helm", "template_args"]

Render = Callable[..., list[dict[str, Any]]]
"""``render(values_file, namespace=..., release=..., sets={...})``: the chart's objects, CRDs included."""


def container(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    (found,) = find(objects, "Deployment", deployment)
    first: dict[str, Any] = found["spec"]["template"]["spec"]["containers"][0]
    return first
