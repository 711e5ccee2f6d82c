"""Every cache of a session's output folder, ``processedData/<session>/cache/``, and the per-frame result caches.

This module owns every cache path (:data:`CACHE_ENTRIES` lists them, ``dwarf3 cache`` shows them):
``scores.json`` and ``transforms.json`` (per-frame measurements and registrations, :class:`FrameCache`),
``dark/`` (master darks and their hot-pixel maps), ``stack/<key>/`` (stacked intermediates:
:func:`save_stacked`, :func:`load_stacked`) and ``colour_calibration.json`` (the last master's colour gains).

A per-frame cache file holds one entry per frame, keyed by the frame's file name and valid only while the file's identity
(size and modification time in nanoseconds) and the hash of the settings that produced the entry are unchanged.
Adding frames to a session therefore only measures the new ones, and changing a relevant setting recomputes
everything. Cache files are written atomically; a damaged cache file is ignored (and rewritten), never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json_atomic
from .errors import Dwarf3Error, Dwarf3Warning
from .fitsio import read_fits, write_fits
from .products import Stacked, squeeze_plane

__all__ = ["FrameCache", "settings_hash", "file_identity", "CACHE_ENTRIES", "cache_dir", "cache_path",
           "stack_cache_dir", "save_stacked", "load_stacked", "load_stacked_or_discard", "discard_damaged", "STACK_KEYS"]

CACHE_FORMAT = 1

CACHE_ENTRIES = {
    "scores.json": "measurements and star lists",
    "transforms.json": "registrations",
    "dark": "master darks and hot-pixel maps",
    "stack": "stacked intermediates",
    "colour_calibration.json": "colour calibration of the last master",
}
"""Name under ``cache/`` -> what it holds: every cache a run writes."""


def cache_dir(out_dir: Path) -> Path:
    """The cache folder of a session's output folder."""
    return Path(out_dir) / "cache"


def cache_path(out_dir: Path, entry: str) -> Path:
    """The path of one of :data:`CACHE_ENTRIES` under ``out_dir``'s cache folder."""
    if entry not in CACHE_ENTRIES:
        raise ValueError(f"unknown cache entry {entry!r}; known: {', '.join(CACHE_ENTRIES)}")
    return cache_dir(out_dir) / entry


def stack_cache_dir(out_dir: Path, key: str) -> Path:
    """Folder of the stacked intermediates made under settings hash ``key``."""
    return cache_path(out_dir, "stack") / key


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
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            discard_damaged(self.path, f"{exc.__class__.__name__}: {exc}", remove=False)
            return {}
        if not isinstance(data, dict) or not isinstance(data.get("frames", {}), dict):
            discard_damaged(self.path, "not a cache file of this program", remove=False)
            return {}
        if data.get("format") != CACHE_FORMAT or data.get("settings_hash") != self.key:
            return {}  # another version or other settings: recomputed, as expected
        return data.get("frames") or {}

    def get(self, frame: str | os.PathLike) -> dict[str, Any] | None:
        """The cached value of ``frame``, or None when absent or stale."""
        path = Path(frame)
        entry = self._entries.get(path.name) if self.enabled else None
        if isinstance(entry, dict) and isinstance(entry.get("value"), dict) and entry.get("identity") == file_identity(path):
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


#: Settings that change the stacked pixels (the intermediate cache key).
STACK_KEYS = ("debayer", "interpolation", "demosaic", "sigma", "sigma_lower", "sigma_upper", "maxiters", "cenfunc", "stdfunc",
               "normalisation", "weights", "feather_px", "crop")


def save_stacked(folder: Path, stacked: Stacked) -> None:
    """Cache the stacked arrays (FITS) and their description (meta.json, written last)."""
    write_fits(squeeze_plane(stacked.mean), folder / "mean.fits")
    write_fits(stacked.coverage.astype(np.float32), folder / "coverage.fits")
    write_fits(squeeze_plane(np.asarray(stacked.rejected, np.float32)), folder / "rejected.fits")
    if stacked.rgb is not None and stacked.is_cfa:
        write_fits(stacked.rgb, folder / "rgb.fits")
    if stacked.single is not None:
        write_fits(squeeze_plane(stacked.single[0]), folder / "single.fits")
        write_fits(stacked.single[1].astype(np.float32), folder / "single_valid.fits")
    meta = {k: getattr(stacked, k) for k in ("is_cfa", "tile_plan", "crop", "matrices", "backgrounds")}
    write_json_atomic(folder / "meta.json", meta)


def discard_damaged(path: Path, problem: str, *, remove: bool = True) -> None:
    """Warn (:class:`~dwarf3gpu.errors.Dwarf3Warning`) that a cache entry is damaged and will be recomputed;
    ``remove`` deletes it (a file or a folder) now."""
    warnings.warn(f"damaged cache entry {path} ({problem}): discarded and recomputed", Dwarf3Warning, stacklevel=3)
    if remove:
        if Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)


def load_stacked_or_discard(folder: Path) -> Stacked | None:
    """:func:`load_stacked`, or None (with a warning, the entry removed) when the entry is damaged."""
    try:
        stacked = load_stacked(folder)
        if stacked.mean.shape[-2:] != stacked.coverage.shape or stacked.rejected.shape[-2:] != stacked.coverage.shape:
            raise ValueError("its images differ in size")
        return stacked
    except (Dwarf3Error, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        discard_damaged(folder, str(exc))
        return None


def load_stacked(folder: Path) -> Stacked:
    """The :class:`~dwarf3gpu.products.Stacked` that :func:`save_stacked` wrote (``from_cache`` True)."""
    meta = json.loads((folder / "meta.json").read_text())
    mean = read_fits(folder / "mean.fits").data
    if mean.ndim == 2:
        mean = mean[None]
    rgb = None
    if (folder / "rgb.fits").is_file():
        rgb = read_fits(folder / "rgb.fits").data
    elif not meta["is_cfa"]:
        rgb = mean
    coverage = read_fits(folder / "coverage.fits").data.astype(np.int32)
    rejected = read_fits(folder / "rejected.fits").data.astype(np.int32)
    crop = tuple(meta["crop"]) if meta["crop"] else None
    single = None
    if (folder / "single.fits").is_file():
        data = read_fits(folder / "single.fits").data
        single = (data if data.ndim == 3 else data[None], read_fits(folder / "single_valid.fits").data > 0.5)
    return Stacked(mean, coverage, rejected, rgb, meta["is_cfa"], meta["tile_plan"], crop, meta["matrices"],
                   meta["backgrounds"], from_cache=True, single=single)
