"""Results files the GPU benchmarks rewrite after every row."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` whole or not at all (a temp file renamed over ``path``): a run its time limit kills
    mid-write keeps the last complete results rather than a truncated file."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temp, path)
