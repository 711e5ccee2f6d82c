"""Per-frame result caches in ``processedData/<session>/cache/``.

A cache file holds one entry per frame, keyed by the frame's file name and valid only while the file's identity
(size and modification time in nanoseconds) and the hash of the settings that produced the entry are unchanged.
Adding frames to a session therefore only measures the new ones, and changing a relevant setting recomputes
everything. Cache files are written atomically; a damaged cache file is ignored (and rewritten), never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic

__all__ = ["FrameCache", "settings_hash", "file_identity"]

CACHE_FORMAT = 1


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able settings dictionary (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_identity(path: str | os.PathLike) -> list[int]:
    """``[size, mtime_ns]`` of a file: changes when the file is replaced or modified."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


class FrameCache:
    """A JSON file of per-frame entries tied to file identities and a settings hash.

    Parameters
    ----------
    path : pathlib.Path
        The cache file (e.g. ``processedData/<session>/cache/scores.json``).
    settings : dict
        Settings the cached values depend on; entries made under other settings are ignored.
    enabled : bool, default True
        False (``--no-cache``): never read nor write.
    refresh : bool, default False
        True (``--cache-refresh``): ignore what is stored, recompute and overwrite.
    """

    def __init__(self, path: Path, settings: dict[str, Any], *, enabled: bool = True, refresh: bool = False):
        self.path = Path(path)
        self.settings = settings
        self.key = settings_hash(settings)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self._entries: dict[str, dict[str, Any]] = {}
        if enabled and not refresh:
            self._entries = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        """Read the stored entries; an absent, damaged or other-settings file gives none."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("settings_hash") != self.key:
            return {}
        frames = data.get("frames")
        return frames if isinstance(frames, dict) else {}

    def get(self, frame: str | os.PathLike) -> dict[str, Any] | None:
        """The cached value of ``frame``, or None when absent or stale."""
        path = Path(frame)
        entry = self._entries.get(path.name) if self.enabled else None
        if entry is not None and entry.get("identity") == file_identity(path):
            self.hits += 1
            return entry["value"]
        self.misses += 1
        return None

    def put(self, frame: str | os.PathLike, value: dict[str, Any]) -> None:
        """Store the value of ``frame`` (kept in memory until :meth:`save`)."""
        path = Path(frame)
        self._entries[path.name] = {"identity": file_identity(path), "value": value}

    def save(self) -> None:
        """Write the cache file atomically (nothing when disabled)."""
        if not self.enabled:
            return
        write_json_atomic(
            self.path,
            {"format": CACHE_FORMAT, "settings_hash": self.key, "settings": self.settings, "frames": self._entries},
        )
