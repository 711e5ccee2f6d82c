"""Frame caches: hits, invalidation by file identity and by settings, refresh and disable."""

from __future__ import annotations

import os

from dwarf3gpu.cache import FrameCache


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
