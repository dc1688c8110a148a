"""Content-addressed storage of expensive artifacts, written atomically.

An entry's key is a hash of everything that determines it (task, scale,
configuration, seed and a fingerprint of the code that builds it), so a changed
input can never reuse a stale artifact, and an interrupted write leaves nothing
that looks finished: entries are built in a temporary folder and renamed into
place in one step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)


def content_key(parts: dict[str, Any]) -> str:
    """A short, stable hash of JSON-serialisable parts."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def code_fingerprint(paths: Iterable[Path]) -> str:
    """A hash of source and data files: editing any of them invalidates the cache."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Cache:
    """Entries are folders ``<root>/<kind>/<key>/`` holding a ``manifest.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "manifest.json").is_file()

    @contextlib.contextmanager
    def writing(self, kind: str, key: str, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it becomes the entry."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            yield staging
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            try:
                os.rename(staging, final)
            except OSError:
                if not self.has(kind, key):
                    raise
                # another process finished the same entry first; theirs is identical
                _logger.info("%s %s was written concurrently; keeping the existing one", kind, key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        return json.loads((self.path(kind, key) / "manifest.json").read_text())

    def size_bytes(self, kind: str, key: str) -> int:
        return sum(f.stat().st_size for f in self.path(kind, key).rglob("*") if f.is_file())
