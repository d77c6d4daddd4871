"""A score cache that makes a pair-building run resumable: an image already scored is not scored again.

The key is ``<sha256 of the image file>:<context>``, where the context hashes what the score depends on besides
the image (the reference files' hashes, the prompt, and :attr:`MetricSuite.signature`), so a moved or renamed
file keeps its scores and a changed model or reference re-scores. The file is JSON, rewritten through a
temporary file and a rename, so an interrupted run leaves the last complete version.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import ManifestError

__all__ = ["file_hash", "context_key", "ScoreCache"]

_VERSION = 1


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def context_key(ref_hashes: Sequence[str], prompt: str, signature: str) -> str:
    """Short hash of (reference file hashes in order, prompt, metric-suite signature)."""
    blob = json.dumps({"refs": list(ref_hashes), "prompt": prompt, "suite": signature}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ScoreCache:
    """``get(image_hash, context) -> dict | None``, ``put(...)``, ``save()`` (atomic; only when changed)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self._dirty = False
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ManifestError(f"Score cache '{self.path}' is not valid JSON ({exc}). It is only a cache: "
                                    f"delete it and run again (everything will be re-scored).") from exc
            if (not isinstance(data, dict) or data.get("version") != _VERSION
                    or not isinstance(data.get("scores"), dict)):
                raise ManifestError(f"Score cache '{self.path}' has an unknown layout (expected version "
                                    f"{_VERSION}). Delete it and run again.")
            self.entries = data["scores"]

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, image_hash: str, context: str) -> dict | None:
        return self.entries.get(f"{image_hash}:{context}")

    def put(self, image_hash: str, context: str, scores: dict) -> None:
        self.entries[f"{image_hash}:{context}"] = dict(scores)
        self._dirty = True

    def save(self) -> None:
        """Write the cache atomically (temporary file + ``os.replace``) if anything changed."""
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"version": _VERSION, "scores": self.entries}, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)
        self._dirty = False
