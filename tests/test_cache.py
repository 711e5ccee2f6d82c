"""Caches: every cache path of an output folder; frame caches: hits, invalidation by file identity and by settings,
refresh and disable."""

from __future__ import annotations

import os

import pytest

from dwarf3gpu.cache import CACHE_ENTRIES, FrameCache, cache_dir, cache_path, stack_cache_dir
from dwarf3gpu.errors import Dwarf3Warning


def test_cache_paths_of_an_output_folder(tmp_path):
    """Every known entry lives directly under ``<out>/cache/``, with the renamed dark and colour-calibration
    entries; nothing is created by asking."""
    assert cache_dir(tmp_path) == tmp_path / "cache"
    assert set(CACHE_ENTRIES) == {"scores.json", "transforms.json", "dark", "stack", "colour_calibration.json"}
    for entry in CACHE_ENTRIES:
        assert cache_path(tmp_path, entry) == tmp_path / "cache" / entry
    assert cache_path(str(tmp_path), "dark") == tmp_path / "cache" / "dark"
    assert stack_cache_dir(tmp_path, "0123abcd") == tmp_path / "cache" / "stack" / "0123abcd"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("entry", ["calibration", "calibration.json", "Dark", "", "stack/x", "scores"])
def test_unknown_cache_entry_raises(tmp_path, entry):
    """Unknown names (the old ``calibration`` entries included) are refused, with the known ones listed."""
    with pytest.raises(ValueError, match="unknown cache entry") as info:
        cache_path(tmp_path, entry)
    assert all(name in str(info.value) for name in CACHE_ENTRIES)


def test_cache_round_trip_and_invalidation(tmp_path):
    frame = tmp_path / "a.fits"
    frame.write_bytes(b"x" * 10)
    path = tmp_path / "cache" / "scores.json"
    c = FrameCache(path, {"threshold": 5})
    assert c.get(frame) is None
    c.put(frame, {"v": 1.25})
    c.save()
    again = FrameCache(path, {"threshold": 5})
    assert again.get(frame) == {"v": 1.25} and again.hits == 1
    assert FrameCache(path, {"threshold": 4}).get(frame) is None  # other settings
    assert FrameCache(path, {"threshold": 5}, refresh=True).get(frame) is None
    assert FrameCache(path, {"threshold": 5}, enabled=False).get(frame) is None
    st = frame.stat()
    os.utime(frame, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # file replaced/touched
    assert FrameCache(path, {"threshold": 5}).get(frame) is None


def test_damaged_cache_is_ignored(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("{ broken")
    frame = tmp_path / "a.fits"
    frame.write_bytes(b"x")
    with pytest.warns(Dwarf3Warning, match="damaged cache entry"):
        c = FrameCache(path, {})
    assert c.get(frame) is None
    c.put(frame, {"v": 2})
    c.save()
    assert FrameCache(path, {}).get(frame) == {"v": 2}


def test_disabled_cache_writes_nothing(tmp_path):
    path = tmp_path / "scores.json"
    c = FrameCache(path, {}, enabled=False)
    c.save()
    assert not path.exists()
