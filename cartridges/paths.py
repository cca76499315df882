"""Where heavy, reproducible things (built binaries, model files) are cached outside the repository."""

from __future__ import annotations

import fcntl
import os
import shutil
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
    may be loading from it; one that appears anyway (a process that took no lock) wins, and ours is discarded.
    A fill that was killed left its temporary directory behind (hundreds of MB); the next fill removes it."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if target.exists():
            return target
        _remove_staging(target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=_staging_prefix(target)) as tmp:
            staged = Path(tmp) / target.name
            fill(staged)
            try:
                staged.rename(target)
            except OSError:  # a non-empty directory is in the way: someone else's complete one
                if not target.exists():
                    raise
    return target


def _staging_prefix(target: Path) -> str:
    return f".{target.name}."


def _remove_staging(target: Path) -> None:
    """Remove the temporary directories of ``target``'s fills that died. Only the holder of ``target``'s lock
    creates one, so while we hold it none is in use. Those of a target whose name merely starts with ours
    (``a.b`` for ``a``) have a dot after the prefix, which the random part of a temporary name never has."""
    prefix = _staging_prefix(target)
    for path in target.parent.iterdir():
        stale = path.name.startswith(prefix) and "." not in path.name.removeprefix(prefix)
        if stale and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
