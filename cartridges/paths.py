"""Where heavy, reproducible things (built binaries, model files) are cached outside the repository."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """``$CARTRIDGES_CACHE``, else ``$XDG_CACHE_HOME/cartridges``, else ``~/.cache/cartridges``."""
    explicit = os.environ.get("CARTRIDGES_CACHE")
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cartridges"
    root = Path(explicit) if explicit else default
    root.mkdir(parents=True, exist_ok=True)
    return root


def fill_once(target: Path, fill: Callable[[Path], object]) -> Path:
    """``target`` (a file or directory of the cache), made by ``fill(path)`` (which must create ``path``) unless
    it exists already.

    Several processes ask at once (the ranks of one trainer, a CLI beside the tests), so: an exclusive lock on a
    file beside ``target`` lets one of them do the work (a GGUF dequantization takes minutes) while the others wait
    and then find it done; ``fill`` writes into a fresh temporary directory beside ``target``, so ``target`` only
    ever appears whole, by one rename. An existing ``target`` is never replaced or deleted, since another process
    may be loading from it; one that appears anyway (a process that took no lock) wins, and ours is discarded."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            staged = Path(tmp) / target.name
            fill(staged)
            try:
                staged.rename(target)
            except OSError:  # a non-empty directory is in the way: someone else's complete one
                if not target.exists():
                    raise
    return target
