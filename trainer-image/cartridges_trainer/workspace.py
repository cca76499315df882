"""A generation's output prefix in the store, mirrored by a local scratch directory.

Everything the trainer must not redo after a restart (synthesis shards, checkpoints) goes through here: written
locally, then uploaded; on restart, what the store already holds is fetched instead of recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cartridges.store import Store


@dataclass
class Workspace:
    store: Store
    prefix: str
    local: Path

    def uri(self, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{name}"

    def path(self, name: str) -> Path:
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def names(self, folder: str) -> list[str]:
        """Names (relative to the prefix) of the objects stored under ``folder``."""
        return sorted(f"{folder}/{name}" for name in self.store.names(self.uri(folder)))

    def upload(self, name: str) -> None:
        self.store.put_file(self.uri(name), self.path(name))

    def fetch(self, name: str) -> Path:
        """The local copy of a stored object, downloaded (and sha256-verified) unless already present."""
        path = self.path(name)
        if not path.exists():
            self.store.download(self.uri(name), path)
        return path

    def delete(self, folder: str) -> None:
        self.store.delete_prefix(self.uri(folder))
