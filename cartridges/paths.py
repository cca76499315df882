"""Where heavy, reproducible things (built binaries, model files) are cached outside the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CARTRIDGES_CACHE``, else ``$XDG_CACHE_HOME/cartridges``, else ``~/.cache/cartridges``."""
    explicit = os.environ.get("CARTRIDGES_CACHE")
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cartridges"
    root = Path(explicit) if explicit else default
    root.mkdir(parents=True, exist_ok=True)
    return root
