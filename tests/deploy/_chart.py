"""Helpers shared by the chart tests: paths, running helm, picking objects out of a render."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cartridges"
CI_VALUES = CHART / "ci"

Render = Callable[..., list[dict[str, Any]]]
"""``render(values_file, namespace=..., release=..., sets={...})``: the chart's objects, CRDs included."""


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def template_args(values: str, namespace: str, release: str, sets: dict[str, str] | None) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace, "-f", str(CI_VALUES / values)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def container(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    (found,) = find(objects, "Deployment", deployment)
    first: dict[str, Any] = found["spec"]["template"]["spec"]["containers"][0]
    return first
