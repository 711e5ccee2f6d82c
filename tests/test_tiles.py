"""Tiles (dwarf3gpu.tiles): the memory-budgeted planner, the tile driver through the stage operations, normalising a
rendered tile (dwarf3gpu.normalise), the memory budget (library, command line, resources), cropping to coverage.

``stack_tiles`` runs here on the NumPy reference stage operations; renderers that return arrays go through the
``array_renderer`` fixture (conftest), which writes them into the tile buffer as ``render_into`` must.
"""

from __future__ import annotations

import json
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from typer.testing import CliRunner

from dwarf3gpu import resources
from dwarf3gpu.backends import ReferenceStageOps
from dwarf3gpu.cli import app, parse_memory
from dwarf3gpu.clip import clip_settings, sigma_clip_mask_aware
from dwarf3gpu.errors import ConfigError
from dwarf3gpu.normalise import NORMALISATIONS, apply_normalisation, normalisation, normalise_frames
from dwarf3gpu.resources import available_memory, default_memory_budget
from dwarf3gpu.tiles import crop_to_coverage, plan_tiles, stack_tiles

#: The stage operations every stack_tiles test here runs on (NumPy reference: upload/download are identities).
REFERENCE = ReferenceStageOps()
#: Default clipping options (astropy's defaults: 3 sigma, 5 iterations, median, std).
DEFAULT_CLIP = clip_settings()
#: Parametrisation values (collection time; the ``bayer_patterns`` fixture holds the same four layouts).
PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")


# ------------------------------------------------------------------------------------------- normalisation


def test_normalisation_modes():
    ref = np.array([100.0, 200.0, 50.0])
    bg = np.array([110.0, 180.0, 50.0])
    offset, scale = normalisation(ref, bg, "additive")
    np.testing.assert_allclose(bg * scale + offset, ref)
    np.testing.assert_array_equal(scale, 1.0)
    offset, scale = normalisation(ref, bg, "multiplicative")
    np.testing.assert_allclose(bg * scale + offset, ref)
    np.testing.assert_array_equal(offset, 0.0)
    offset, scale = normalisation(ref, bg, "none")
    np.testing.assert_array_equal(offset, 0.0)
    np.testing.assert_array_equal(scale, 1.0)
    # many frames at once
    offsets, scales = normalisation(ref, np.stack([bg, ref]), "additive")
    assert offsets.shape == (2, 3)
    with pytest.raises(ConfigError, match="positive background"):
        normalisation(ref, np.array([10.0, 0.0, 5.0]), "multiplicative")
    with pytest.raises(ConfigError, match="unknown normalisation"):
        normalisation(ref, bg, "median")


def test_normalise_frames_per_frame_and_channel():
    rng = np.random.default_rng(10)
    stack = rng.uniform(0, 100, (4, 3, 5, 6)).astype(np.float32)
    bgs = rng.uniform(40, 60, (4, 3))
    offsets, scales = normalisation(bgs[0], bgs, "multiplicative")
    out = normalise_frames(stack, offsets, scales)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, stack * scales[:, :, None, None].astype(np.float32), rtol=1e-6)
    offsets, scales = normalisation(bgs[0, 1], bgs[:, 1], "additive")
    out = normalise_frames(stack, offsets, scales)
    np.testing.assert_allclose(out, stack + offsets[:, None, None, None].astype(np.float32), rtol=1e-6)
    in_place = stack.copy()
    normalise_frames(in_place, offsets, scales, out=in_place)
    np.testing.assert_array_equal(in_place, out)
    with pytest.raises(ValueError, match="offsets"):
        normalise_frames(stack, offsets[:2], scales[:2])


def test_normalisation_names():
    assert NORMALISATIONS == ("additive", "multiplicative", "none")


def test_apply_normalisation_per_channel_is_the_plain_float32_formula():
    """(C, h, w) tile, per channel: ``x * float32(scale[c]) + float32(offset[c])`` in float32, bit for bit, in
    place; NaN stays NaN; a float64 offset/scale is rounded to float32 first."""
    rng = np.random.default_rng(21)
    data = rng.uniform(-50.0, 3000.0, (3, 9, 14)).astype(np.float32)
    data[1, 2, 3] = np.nan
    offset = rng.uniform(-100.0, 100.0, 3)  # float64
    scale = rng.uniform(0.5, 1.5, 3)
    expected = np.empty_like(data)
    for c in range(3):
        expected[c] = data[c] * np.float32(scale[c]) + np.float32(offset[c])
    tile = data.copy()
    assert apply_normalisation(tile, offset, scale) is None
    assert tile.dtype == np.float32
    assert np.array_equal(tile.view(np.uint32), expected.view(np.uint32))
    assert np.isnan(tile[1, 2, 3])
    # one channel, and the identity
    one = data[:1].copy()
    apply_normalisation(one, offset[:1], scale[:1])
    assert np.array_equal(one.view(np.uint32), expected[:1].view(np.uint32))
    same = data.copy()
    apply_normalisation(same, np.zeros(3), np.ones(3))
    assert np.array_equal(same, data, equal_nan=True)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("origin", [(0, 0), (0, 1), (1, 0), (1, 1), (6, 9)])
def test_apply_normalisation_per_cfa_colour_follows_the_tile_origin(pattern, origin):
    """(1, h, w) CFA tile at ``origin`` of the frame: the pixel at absolute (row, col) has the colour
    ``pattern[2 (row % 2) + col % 2]`` and takes that colour's float32 scale and offset (R, G, B order), for
    both parities of each axis (odd tile sides too)."""
    rng = np.random.default_rng(22)
    h, w = 7, 10
    data = rng.uniform(0.0, 60000.0, (1, h, w)).astype(np.float32)
    offset = np.array([-12.25, 3.5, 101.0])
    scale = np.array([1.125, 0.75, 1.5])
    rows = origin[0] + np.arange(h)[:, None]
    cols = origin[1] + np.arange(w)[None, :]
    letters = np.array(list(pattern)).reshape(2, 2)[rows % 2, cols % 2]
    index = np.vectorize("RGB".index)(letters)
    expected = data[0] * scale.astype(np.float32)[index] + offset.astype(np.float32)[index]
    tile = data.copy()
    apply_normalisation(tile, offset, scale, pattern=pattern, origin=origin)
    assert np.array_equal(tile[0].view(np.uint32), expected.view(np.uint32))
    # the same tile read at the other phase gets other colours' numbers (the origin matters)
    other = data.copy()
    apply_normalisation(other, offset, scale, pattern=pattern, origin=(origin[0] + 1, origin[1]))
    assert not np.array_equal(other, tile)


# --------------------------------------------------------------------------------------------------- tiling


def covered_once(plan):
    """Every output pixel lies in exactly one tile."""
    hits = np.zeros((plan.height, plan.width), int)
    for r0, r1, c0, c1 in plan.tiles:
        hits[r0:r1, c0:c1] += 1
    return bool((hits == 1).all())


def test_plan_tiles_fits_the_budget_and_covers_the_image():
    plan = plan_tiles(2180, 3856, 40, 3, 1 << 30, workers=2, render_bytes_per_pixel=40)
    rows, cols = plan.tile_shape
    assert rows % 2 == 0 and cols % 2 == 0 and min(rows, cols) >= 16
    assert covered_once(plan) and len(plan.tiles) > 1
    assert all(r0 % 2 == 0 and c0 % 2 == 0 for r0, _, c0, _ in plan.tiles)
    assert all(r1 - r0 <= rows and c1 - c0 <= cols for r0, r1, c0, c1 in plan.tiles)
    assert plan.bytes_per_tile <= plan.budget
    # square-ish: the source window of a rotated frame stays small
    assert 0.5 <= rows / cols <= 2
    # the honest count: frame buffers (data, valid, weight) for N frames plus the renders in flight, the tile's
    # own outputs (mean float32, coverage and rejected int16) and the renderer's scratch per worker
    assert plan.bytes_per_pixel == (40 + 2) * (4 * 3 + 1 + 4) + 4 * 3 + 2 * 4 + 2 * 40
    assert json.loads(json.dumps(plan.to_json()))["n_tiles"] == len(plan.tiles)
    # the largest tile that fits: a grid one step finer in both axes would have been needed otherwise
    n_r, n_c = len({t[:2] for t in plan.tiles}), len({t[2:] for t in plan.tiles})
    bigger = (-(-2180 // max(n_r - 1, 1))) * (-(-3856 // max(n_c - 1, 1)))
    assert plan.fixed_bytes + bigger * plan.bytes_per_pixel > plan.budget
    # more frames, same budget: smaller tiles
    more = plan_tiles(2180, 3856, 200, 3, 1 << 30, workers=2)
    assert more.tile_shape[0] * more.tile_shape[1] < rows * cols and covered_once(more)
    # a generous budget: one tile, the whole (odd-sized) image
    whole = plan_tiles(101, 63, 5, 1, 1 << 30, workers=1)
    assert whole.tiles == [(0, 101, 0, 63)] and whole.tile_shape == (101, 63)
    # a wide, short image gets full-width bands; a forced tile shape is honoured
    wide = plan_tiles(40, 3856, 40, 3, 30 << 20, workers=1)
    assert wide.tile_shape[1] < 3856 or wide.tile_shape[0] < 40
    assert covered_once(wide)
    forced = plan_tiles(101, 63, 5, 1, 1 << 30, workers=1, tile_shape=(20, 30))
    assert forced.tile_shape == (20, 30) and len(forced.tiles) == 6 * 3 and covered_once(forced)


def test_plan_tiles_refuses_a_budget_that_cannot_hold_min_rows():
    """The library error names the memory budget (the setting ``memory_budget``), never a command-line flag."""
    with pytest.raises(ConfigError, match="too small") as info:
        plan_tiles(2180, 3856, 500, 3, 64 << 20, workers=2)
    message = str(info.value)
    assert "memory budget" in message and "Raise the memory budget" in message
    assert "--memory-budget" not in message
    assert info.value.setting == "memory_budget"
    with pytest.raises(ConfigError, match="too small"):
        plan_tiles(2180, 3856, 40, 3, 1 << 30, workers=1, tile_shape=(2180, 3856))
    with pytest.raises(ValueError):
        plan_tiles(0, 10, 1, 1, 1 << 30)


def test_cli_names_the_memory_budget_flag_for_a_budget_too_small(small_session, tmp_path):
    """``dwarf3 stack --memory-budget 1M``: the planner's error reaches the user with the flag's name, as a usage
    error (exit 2), without a traceback."""
    result = CliRunner().invoke(app, ["stack", str(small_session.session_dir), "--out", str(tmp_path),
                                      "--memory-budget", "1M", "--workers", "1", "--no-cache", "--quiet"],
                                terminal_width=400)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert isinstance(result.exception, SystemExit)
    assert "--memory-budget" in text and "too small" in text and "Raise the memory budget" in text
    assert "Traceback" not in text


def test_parse_memory():
    assert parse_memory("4G") == 4 << 30
    assert parse_memory("512M") == 512 << 20
    assert parse_memory("512m") == 512 << 20
    assert parse_memory("1.5g") == 3 << 29
    assert parse_memory("800MiB") == 800 << 20
    assert parse_memory("2 GB") == 2 << 30
    assert parse_memory("100k") == 102400
    assert parse_memory("1T") == 1 << 40
    assert parse_memory("1048576") == 1 << 20
    for bad in ("", "lots", "4X", "-1G", "0", "G4"):
        with pytest.raises(ConfigError, match="memory-budget"):
            parse_memory(bad)


def test_default_memory_budget_is_a_safe_share_of_the_available_ram():
    budget = default_memory_budget()
    assert 0 < budget <= resources.DEFAULT_BUDGET_CAP
    assert budget <= available_memory()
    assert REFERENCE.memory_budget() > 0


def frame_source(rng, n, channels, height, width):
    """Random frames with per-frame footprints, feather-like weights and a few NaN samples."""
    data = rng.normal(500.0, 15.0, (n, channels, height, width)).astype(np.float32)
    hit = rng.random(data.shape) < 0.02
    data[hit] += 800.0
    valid = np.ones((n, height, width), bool)
    for k in range(n):
        top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
        valid[k, :top] = False
        valid[k, :, :left] = False
    weight = np.where(valid, rng.uniform(0.2, 1.0, valid.shape), 0.0).astype(np.float32)
    data[0, 1 % channels, 3, 4] = np.nan
    return data, valid, weight


def frames_render(data, valid, weight):
    """Array-returning render function over in-memory frames (fresh arrays, as a real warp would return); wrap it
    with the ``array_renderer`` fixture."""
    def render(k, row0, row1, col0, col1):
        window = np.s_[row0:row1, col0:col1]
        return data[k][(slice(None),) + window].copy(), valid[k][window].copy(), weight[k][window].copy()
    return render


def test_stack_tiles_is_independent_of_the_tile_size(array_renderer):
    rng = np.random.default_rng(11)
    n, channels, height, width = 13, 3, 70, 41
    data, valid, weight = frame_source(rng, n, channels, height, width)
    frame_weights = rng.uniform(0.5, 1.5, n)
    probe = plan_tiles(height, width, n, channels, 1 << 40, workers=1)
    results, seen = [], set()
    for shape in ((16, 16), (30, 41), (70, 20), (70, 41)):
        plan = plan_tiles(height, width, n, channels, 1 << 30, workers=1, tile_shape=shape)
        assert plan.tile_shape == shape
        calls = []
        results.append(stack_tiles(plan, array_renderer(frames_render(data, valid, weight)), n,
                                   (channels, height, width), ops=REFERENCE, settings=DEFAULT_CLIP,
                                   frame_weights=frame_weights, progress=lambda d, t: calls.append((d, t))))
        assert calls == [(i + 1, len(plan.tiles)) for i in range(len(plan.tiles))]
        seen.add(len(plan.tiles))
    assert seen == {5 * 3, 3, 1} and probe.tiles == [(0, height, 0, width)]
    # a budget that fits exactly a 16 x 16 tile: 5 x 3 tiles, evened out to 14 x 14 (70 = 5 x 14, 41 <= 3 x 14)
    small = plan_tiles(height, width, n, channels, probe.fixed_bytes + 16 * 16 * probe.bytes_per_pixel, workers=1)
    assert small.tile_shape == (14, 14) and len(small.tiles) == 15
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    mean, coverage, rejected = results[0]
    assert mean.shape == (3, height, width) and coverage.shape == (height, width)
    assert rejected.shape == (3, height, width)
    # same as clipping the whole stack at once (a sample counts where valid and every channel is finite)
    shared = valid & np.isfinite(data).all(axis=1)
    direct = sigma_clip_mask_aware(data, shared, weight, frame_weights)
    np.testing.assert_array_equal(mean, direct.mean)
    np.testing.assert_array_equal(coverage, direct.coverage[0])
    np.testing.assert_array_equal(rejected, direct.rejected)
    # and with a thread pool rendering and clipping
    with ThreadPoolExecutor(3) as pool:
        threaded = stack_tiles(plan, array_renderer(frames_render(data, valid, weight)), n, (channels, height, width),
                               ops=REFERENCE, settings=DEFAULT_CLIP, frame_weights=frame_weights, executor=pool)
    for a, b in zip(results[-1], threaded):
        np.testing.assert_array_equal(a, b)


class IntoRenderer:
    """A renderer with ``render_into``: it writes straight into the tile buffer's views (as the pipeline's
    renderers do) and checks they are C-contiguous; calling it as a function would fail, so stack_tiles must use
    ``render_into``."""

    def __init__(self, data, valid, weight):
        self.data, self.valid, self.weight, self.filled = data, valid, weight, []

    def __call__(self, *args):
        raise AssertionError("stack_tiles must call render_into")

    def render_into(self, k, row0, row1, col0, col1, data, valid, weight):
        assert data.flags.c_contiguous and valid.flags.c_contiguous and weight.flags.c_contiguous
        data[...] = self.data[k][:, row0:row1, col0:col1]
        valid[...] = self.valid[k][row0:row1, col0:col1]
        weight[...] = self.weight[k][row0:row1, col0:col1]
        self.filled.append(k)


def test_stack_tiles_render_into_gives_the_same_result(array_renderer):
    """Rendering into the tile buffer's own views (every tile size, NaN samples still invalid) gives the bytes of
    copying fresh arrays in; every frame is rendered once per tile."""
    rng = np.random.default_rng(12)
    n, channels, height, width = 9, 3, 37, 29
    data, valid, weight = frame_source(rng, n, channels, height, width)
    for shape in ((16, 16), (37, 29)):
        plan = plan_tiles(height, width, n, channels, 1 << 30, workers=1, tile_shape=shape)
        into = IntoRenderer(data, valid, weight)
        got = stack_tiles(plan, into, n, (channels, height, width), ops=REFERENCE, settings=DEFAULT_CLIP)
        want = stack_tiles(plan, array_renderer(frames_render(data, valid, weight)), n, (channels, height, width),
                           ops=REFERENCE, settings=DEFAULT_CLIP)
        assert sorted(into.filled) == sorted(list(range(n)) * len(plan.tiles))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_stack_tiles_single_plane_settings_and_plan_check(array_renderer):
    """A one-channel stack with non-default clip settings equals the direct clip with those options (so the
    settings reach the clip); a plan made for other frames or shapes is refused."""
    rng = np.random.default_rng(12)
    data, valid, weight = frame_source(rng, 6, 1, 20, 18)
    plan = plan_tiles(20, 18, 6, 1, 1 << 30, workers=1)
    options = dict(cenfunc="mean", stdfunc="mad_std", sigma_lower=2.0, sigma_upper=2.5, maxiters=3)
    plane = array_renderer(
        lambda k, r0, r1, c0, c1: (data[k, 0, r0:r1, c0:c1], valid[k, r0:r1, c0:c1], weight[k, r0:r1, c0:c1]))
    mean, coverage, rejected = stack_tiles(plan, plane, 6, (1, 20, 18), ops=REFERENCE,
                                           settings=clip_settings(**options))
    direct = sigma_clip_mask_aware(data, valid & np.isfinite(data[:, 0]), weight, **options)
    np.testing.assert_array_equal(mean, direct.mean)
    np.testing.assert_array_equal(coverage, direct.coverage[0])
    np.testing.assert_array_equal(rejected, direct.rejected)
    default = stack_tiles(plan, plane, 6, (1, 20, 18), ops=REFERENCE, settings=DEFAULT_CLIP)
    assert not np.array_equal(default.mean, mean, equal_nan=True)  # other settings, other result
    with pytest.raises(ValueError, match="tile plan"):
        stack_tiles(plan, array_renderer(frames_render(data, valid, weight)), 7, (1, 20, 18), ops=REFERENCE,
                    settings=DEFAULT_CLIP)
    with pytest.raises(ValueError, match="tile plan"):
        stack_tiles(plan, array_renderer(frames_render(data, valid, weight)), 6, (3, 20, 18), ops=REFERENCE,
                    settings=DEFAULT_CLIP)


@pytest.mark.parametrize("channels", [1, 3])
def test_stack_tiles_memory_does_not_grow_with_frames(channels, array_renderer):
    rng = np.random.default_rng(13)
    height, width, budget = 600, 256, 24 << 20
    peaks = {}
    for n in (10, 40):
        source = rng.normal(100.0, 5.0, (n, channels, height, width)).astype(np.float32)
        ones = np.ones((height, width), bool)

        def render(k, row0, row1, col0, col1):
            window = np.s_[row0:row1, col0:col1]
            return (source[k][(slice(None),) + window] + np.float32(0.0), ones[window].copy(),
                    ones[window].astype(np.float32))

        plan = plan_tiles(height, width, n, channels, budget, workers=1)
        tracemalloc.start()
        stack_tiles(plan, array_renderer(render), n, (channels, height, width), ops=REFERENCE,
                    settings=DEFAULT_CLIP)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(plan.tiles) > 1
        assert peaks[n] <= plan.bytes_per_tile + (1 << 20), (n, peaks[n], plan.to_json())
    assert max(peaks.values()) <= budget + (1 << 20)
    assert peaks[40] <= 1.25 * peaks[10]


# ------------------------------------------------------------------------------------------------- cropping


def brute_force_rectangle(ok):
    """Largest all-True axis-aligned rectangle by trying every one."""
    height, width = ok.shape
    best = 0
    for r0 in range(height):
        for r1 in range(r0 + 1, height + 1):
            for c0 in range(width):
                for c1 in range(c0 + 1, width + 1):
                    area = (r1 - r0) * (c1 - c0)
                    if area > best and ok[r0:r1, c0:c1].all():
                        best = area
    return best


def test_crop_to_coverage_matches_brute_force():
    rng = np.random.default_rng(16)
    for trial in range(150):
        height, width = rng.integers(1, 9, 2)
        coverage = rng.integers(0, 4, (height, width))
        if trial % 3 == 0:
            coverage = np.where(rng.random((height, width)) < 0.85, 3, coverage)
        image = rng.random((2, height, width))
        threshold = int(rng.integers(0, 4))
        cropped, (r0, r1, c0, c1) = crop_to_coverage(image, coverage, min_count=threshold)
        expected = brute_force_rectangle(coverage >= threshold)
        assert (r1 - r0) * (c1 - c0) == expected
        assert np.all(coverage[r0:r1, c0:c1] >= threshold)
        np.testing.assert_array_equal(cropped, image[:, r0:r1, c0:c1])


def test_crop_to_coverage_on_a_rotated_footprint():
    height, width = 120, 200
    yy, xx = np.mgrid[:height, :width]
    coverage = np.zeros((height, width), np.int16)
    for angle in np.radians([0.0, 4.0, -3.0, 7.0]):
        u = (xx - 100) * np.cos(angle) + (yy - 60) * np.sin(angle)
        v = -(xx - 100) * np.sin(angle) + (yy - 60) * np.cos(angle)
        coverage += ((np.abs(u) < 90) & (np.abs(v) < 50)).astype(np.int16)
    image = np.arange(height * width, dtype=np.float32).reshape(height, width)
    cropped, (r0, r1, c0, c1) = crop_to_coverage(image, coverage)
    assert np.all(coverage[r0:r1, c0:c1] == 4)
    assert cropped.shape == (r1 - r0, c1 - c0)
    assert (r1 - r0) * (c1 - c0) > 0.5 * 180 * 100
    # a lower threshold never gives a smaller rectangle
    _, box = crop_to_coverage(image, coverage, min_fraction=0.5)
    assert (box[1] - box[0]) * (box[3] - box[2]) >= (r1 - r0) * (c1 - c0)
    # nothing qualifies
    empty, box = crop_to_coverage(image, coverage, min_count=5)
    assert box == (0, 0, 0, 0) and empty.size == 0
    with pytest.raises(ValueError, match="not both"):
        crop_to_coverage(image, coverage, min_fraction=1.0, min_count=4)
    with pytest.raises(ValueError, match="coverage"):
        crop_to_coverage(image, coverage[:-1])
