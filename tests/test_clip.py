"""Stacking: sigma clipping against astropy, weights and masks, normalisation, tiling, memory, cropping."""

from __future__ import annotations

import itertools
import json
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from astropy.stats import sigma_clip

from dwarf3gpu import stack as stk
from dwarf3gpu.errors import ConfigError
from dwarf3gpu.stack import (
    clip_bounds,
    crop_to_coverage,
    default_memory_budget,
    normalisation,
    normalise_frames,
    parse_memory,
    plan_tiles,
    sigma_clip_mask_aware,
    sigma_clip_mask_aware_rgb,
    stack_tiles,
)


def random_stack(rng, n, shape, *, outliers=0.02, masked=0.05, nans=0.01, integer=False):
    """Gaussian sky (1000 ADU, sigma 20) with outliers, a random validity mask and NaN samples."""
    x = rng.normal(1000.0, 20.0, (n,) + shape).astype(np.float32)
    hit = rng.random(x.shape) < outliers
    x[hit] += rng.normal(0.0, 400.0, hit.sum()).astype(np.float32)
    if integer:
        x = np.round(x)
    x[rng.random(x.shape) < nans] = np.nan
    valid = rng.random(x.shape) >= masked
    return x, valid


def astropy_clip(x, valid, **kwargs):
    """astropy's kept mask (valid, finite, not clipped) and bounds for a masked stack, axis 0."""
    data = np.ma.MaskedArray(x, ~valid) if valid is not None else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped, lower, upper = sigma_clip(data, axis=0, return_bounds=True, **kwargs)
    return ~np.ma.getmaskarray(clipped), lower, upper


def kept_mask(x, valid, lower, upper):
    """Samples our bounds keep."""
    ok = np.isfinite(x) & (True if valid is None else valid)
    with np.errstate(invalid="ignore"):
        return ok & (x >= lower) & (x <= upper)


CONFIGS = [
    dict(cenfunc="median", stdfunc="std"),
    dict(cenfunc="median", stdfunc="mad_std"),
    dict(cenfunc="mean", stdfunc="std"),
    dict(cenfunc="mean", stdfunc="mad_std"),
    dict(cenfunc="median", stdfunc="std", sigma_lower=2.0, sigma_upper=4.0),
    dict(cenfunc="mean", stdfunc="std", sigma_lower=4.0, sigma_upper=1.5),
    dict(cenfunc="median", stdfunc="mad_std", sigma_lower=1.5, sigma_upper=2.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("maxiters", [1, 2, 3, 5, 10, None])
def test_matches_astropy_sigma_clip(config, maxiters):
    rng = np.random.default_rng(abs(hash((tuple(config.items()), maxiters))) % 2**32)
    x, valid = random_stack(rng, 31, (40, 50))
    kept_a, lower_a, upper_a = astropy_clip(x, valid, maxiters=maxiters, **config)
    lower, upper = clip_bounds(x, valid, maxiters=maxiters, **config)
    result = sigma_clip_mask_aware(x, valid, maxiters=maxiters, **config)
    kept = kept_mask(x, valid, lower, upper)
    # Identical kept samples in every pixel (measured: 100 % over all configurations and seeds tried).
    identical = np.all(kept == kept_a, axis=0).mean()
    assert identical == 1.0
    if config["cenfunc"] == "median" and config["stdfunc"] == "mad_std":
        # order statistics only: the bounds are astropy's bit for bit
        np.testing.assert_array_equal(lower, lower_a)
        np.testing.assert_array_equal(upper, upper_a)
    else:
        np.testing.assert_allclose(lower, lower_a, rtol=1e-12, atol=0)
        np.testing.assert_allclose(upper, upper_a, rtol=1e-12, atol=0)
    ok = np.isfinite(x) & valid
    np.testing.assert_array_equal(result.coverage, ok.sum(0))
    np.testing.assert_array_equal(result.rejected, (ok & ~kept_a).sum(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = np.ma.MaskedArray(x.astype(np.float64), ~kept_a).mean(axis=0).filled(np.nan)
    np.testing.assert_array_equal(np.isnan(result.mean), np.isnan(expected))
    np.testing.assert_allclose(result.mean, expected, rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_matches_astropy_on_small_counts_and_ties(seed):
    """Few frames, integer-valued data (exact ties), aggressive bounds (1 sigma: two samples sit exactly on
    mean +- std) and unlimited iterations: the structural ties astropy resolves by exact arithmetic."""
    rng = np.random.default_rng(100 + seed)
    for n_frames in (1, 2, 3, 4, 6, 10):
        x, valid = random_stack(rng, n_frames, (15, 17), outliers=0.1, masked=0.2, integer=True)
        for cenfunc, stdfunc, sigma, maxiters in itertools.product(
                ("median", "mean"), ("std", "mad_std"), (0.5, 1.0, 3.0), (1, 3, None)):
            kwargs = dict(cenfunc=cenfunc, stdfunc=stdfunc, sigma=sigma, maxiters=maxiters)
            kept_a, _, _ = astropy_clip(x, valid, **kwargs)
            lower, upper = clip_bounds(x, valid, **kwargs)
            np.testing.assert_array_equal(kept_mask(x, valid, lower, upper), kept_a, err_msg=str(kwargs))
            result = sigma_clip_mask_aware(x, valid, **kwargs)
            np.testing.assert_array_equal(result.rejected, (np.isfinite(x) & valid & ~kept_a).sum(0))


def test_unmasked_stack_matches_astropy_on_plain_array():
    rng = np.random.default_rng(7)
    x, _ = random_stack(rng, 24, (30, 40), nans=0.0)
    for config in CONFIGS:
        kept_a, _, _ = astropy_clip(x, None, **config)
        lower, upper = clip_bounds(x, **config)
        np.testing.assert_array_equal(kept_mask(x, None, lower, upper), kept_a)


def test_trail_is_rejected():
    rng = np.random.default_rng(1)
    n, sky, noise = 20, 1000.0, 10.0
    x = (sky + noise * rng.standard_normal((n, 64, 64))).astype(np.float32)
    rows = np.arange(64)
    x[7, rows, (rows * 0.7 + 5).astype(int)] += 600.0  # a satellite trail in frame 7
    on_trail = np.zeros((64, 64), bool)
    on_trail[rows, (rows * 0.7 + 5).astype(int)] = True
    result = sigma_clip_mask_aware(x)
    assert np.all(result.rejected[on_trail] >= 1)
    # the trail pixels are back to the sky within the noise of a 19-frame mean
    assert np.all(np.abs(result.mean[on_trail] - sky) < 4.5 * noise / np.sqrt(n - 1))
    assert abs(result.mean[on_trail].mean() - sky) < 3 * noise / np.sqrt((n - 1) * on_trail.sum())


def test_noise_of_the_mean_is_sigma_over_sqrt_n():
    rng = np.random.default_rng(2)
    n, sigma = 25, 7.0
    x = (300.0 + sigma * rng.standard_normal((n, 256, 256))).astype(np.float32)
    result = sigma_clip_mask_aware(x)
    measured = result.mean.std()
    assert measured == pytest.approx(sigma / np.sqrt(n), rel=0.05)
    assert result.rejected.mean() < 0.1  # about 0.27 % of the samples of a Gaussian are beyond 3 sigma


def test_masked_samples_never_contribute():
    rng = np.random.default_rng(3)
    x, valid = random_stack(rng, 30, (20, 30))
    garbage = x.copy()
    garbage[~valid] = rng.choice(np.array([1e30, -1e30, np.nan, np.inf, -np.inf, 0.0], np.float32),
                                 (~valid).sum())
    a = sigma_clip_mask_aware(x, valid)
    b = sigma_clip_mask_aware(garbage, valid)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)
    # a frame masked over a region is the same as leaving that frame out there
    half = np.zeros((30, 20, 30), bool)
    half[:10, :, :15] = True
    finite = np.nan_to_num(x, nan=1000.0)
    full = sigma_clip_mask_aware(finite, ~half)
    subset = sigma_clip_mask_aware(finite[10:])
    np.testing.assert_array_equal(full.mean[:, :15], subset.mean[:, :15])
    np.testing.assert_array_equal(full.rejected[:, :15], subset.rejected[:, :15])
    np.testing.assert_array_equal(full.coverage[:, :15], 20)


def test_all_masked_pixel_gives_nan_and_zero_coverage():
    rng = np.random.default_rng(4)
    x, _ = random_stack(rng, 12, (5, 6), nans=0.0)
    valid = np.ones(x.shape, bool)
    valid[:, 2, 3] = False
    x[:, 4, 4] = np.nan  # all-NaN pixel
    for config in CONFIGS:
        result = sigma_clip_mask_aware(x, valid, **config)
        assert np.isnan(result.mean[2, 3]) and np.isnan(result.mean[4, 4])
        assert result.coverage[2, 3] == 0 and result.rejected[2, 3] == 0
        assert result.coverage[4, 4] == 0 and result.rejected[4, 4] == 0
        assert np.all(result.coverage[valid[0] & np.isfinite(x[0])] == 12)
        lower, upper = clip_bounds(x, valid, **config)
        assert np.isnan(lower[2, 3]) and np.isnan(upper[4, 4])


def test_weighted_mean_is_exact():
    rng = np.random.default_rng(5)
    n = 9
    levels = rng.uniform(90.0, 110.0, n).astype(np.float32)
    x = np.broadcast_to(levels[:, None, None], (n, 4, 5)).copy()
    weights = rng.uniform(0.1, 1.0, (n, 4, 5)).astype(np.float32)
    frame_weights = rng.uniform(0.5, 2.0, n)
    result = sigma_clip_mask_aware(x, None, weights, frame_weights, sigma=100.0)
    w = weights.astype(np.float64) * frame_weights[:, None, None]
    expected = (w * levels[:, None, None]).sum(0) / w.sum(0)
    np.testing.assert_allclose(result.mean, expected, rtol=1e-7)
    assert np.all(result.rejected == 0)
    # an outlier is rejected and drops out of numerator and denominator
    x[4] = 5000.0
    result = sigma_clip_mask_aware(x, None, weights, frame_weights)
    keep = np.arange(n) != 4
    expected = (w[keep] * levels[keep, None, None]).sum(0) / w[keep].sum(0)
    np.testing.assert_allclose(result.mean, expected, rtol=1e-7)
    assert np.all(result.rejected == 1)
    # unit weights give the unweighted mean; zero weight on every kept sample gives NaN
    plain = sigma_clip_mask_aware(x)
    unit = sigma_clip_mask_aware(x, None, np.ones_like(weights), np.ones(n))
    np.testing.assert_allclose(unit.mean, plain.mean, rtol=1e-7)
    zero = sigma_clip_mask_aware(x, None, None, np.where(keep, 0.0, 1.0))
    assert np.isnan(zero.mean).all() and np.all(zero.rejected == 1)


def test_per_pixel_weights_follow_the_valid_shapes():
    rng = np.random.default_rng(6)
    x, valid = random_stack(rng, 15, (3, 8, 9))
    shared_valid = valid[:, 0]
    shared_weight = rng.uniform(0.0, 1.0, shared_valid.shape).astype(np.float32)
    rgb = sigma_clip_mask_aware_rgb(x, shared_valid[:, None], shared_weight[:, None])
    same = sigma_clip_mask_aware(x, shared_valid, shared_weight)
    full = sigma_clip_mask_aware(x, np.repeat(shared_valid[:, None], 3, 1), np.repeat(shared_weight[:, None], 3, 1))
    for c in range(3):
        per_channel = sigma_clip_mask_aware(x[:, c], shared_valid, shared_weight)
        for outputs in (rgb, same, full):
            for left, right in zip(outputs, per_channel):
                np.testing.assert_array_equal(left[c], right)
    assert sigma_clip_mask_aware_rgb is sigma_clip_mask_aware


def test_results_do_not_depend_on_chunks_or_threads(monkeypatch):
    rng = np.random.default_rng(8)
    x, valid = random_stack(rng, 23, (2, 21, 19))
    weights = rng.uniform(0.2, 1.0, valid[:, 0].shape).astype(np.float32)
    frame_weights = rng.uniform(0.5, 1.5, 23)
    configs = [dict(), dict(cenfunc="mean"), dict(stdfunc="mad_std"), dict(cenfunc="mean", stdfunc="mad_std")]
    reference = [(sigma_clip_mask_aware(x, valid, **c), sigma_clip_mask_aware(x, valid[:, 0], weights, frame_weights,
                                                                              **c), clip_bounds(x, valid, **c))
                 for c in configs]
    for chunk, workers in ((23, 1), (46, 2), (23 * 5, 3), (1 << 18, 2)):
        monkeypatch.setattr(stk, "CHUNK_SAMPLES", chunk)  # 1, 2, 5 pixels per chunk ... whole stack
        for c, (plain, weighted, bounds) in zip(configs, reference):
            again = (sigma_clip_mask_aware(x, valid, workers=workers, **c),
                     sigma_clip_mask_aware(x, valid[:, 0], weights, frame_weights, workers=workers, **c),
                     clip_bounds(x, valid, workers=workers, **c))
            for left, right in zip((plain, weighted, bounds), again):
                for a, b in zip(left, right):
                    np.testing.assert_array_equal(a, b)
    # a sub-image gives the same pixels as the whole
    part = sigma_clip_mask_aware(x[:, :, 3:11, 2:], valid[:, :, 3:11, 2:])
    for a, b in zip(part, reference[0][0]):
        np.testing.assert_array_equal(a, b[:, 3:11, 2:])


@pytest.mark.parametrize("p", [1, 2, 3, 5, 64, 9000])
def test_frame_sum_adds_frames_in_order(p):
    rng = np.random.default_rng(p)
    big = (rng.standard_normal((37, 3 * p)) * 10.0 ** rng.uniform(-6, 6, (37, 3 * p))).astype(np.float32)
    for a in (big[:, :p], big[:, p:2 * p], np.ascontiguousarray(big[:, ::3][:, :p])):
        expected = np.zeros(p)
        for row in a:
            expected += row
        np.testing.assert_array_equal(stk._frame_sum(a), expected)


def test_bad_arguments_are_refused():
    x = np.zeros((5, 4, 4), np.float32)
    with pytest.raises(ValueError, match="cenfunc"):
        sigma_clip_mask_aware(x, cenfunc="mode")
    with pytest.raises(ValueError, match="stdfunc"):
        sigma_clip_mask_aware(x, stdfunc="iqr")
    with pytest.raises(ValueError, match="maxiters"):
        sigma_clip_mask_aware(x, maxiters=0)
    with pytest.raises(ValueError, match="sigma_lower"):
        sigma_clip_mask_aware(x, sigma_lower=-1.0)
    with pytest.raises(ValueError, match="valid has shape"):
        sigma_clip_mask_aware(x, np.ones((5, 4), bool))
    with pytest.raises(ValueError, match="bool"):
        sigma_clip_mask_aware(x, np.ones((5, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="frame_weights"):
        sigma_clip_mask_aware(x, frame_weights=np.ones(4))
    with pytest.raises(ValueError, match="frame_weights"):
        sigma_clip_mask_aware(x, frame_weights=-np.ones(5))
    with pytest.raises(ValueError, match="weights must be finite"):
        sigma_clip_mask_aware(x, None, np.full((5, 4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="at least one frame"):
        sigma_clip_mask_aware(np.zeros((0, 3), np.float32))


def test_integer_and_float64_stacks_are_converted():
    rng = np.random.default_rng(9)
    x = rng.integers(0, 65535, (11, 6, 7)).astype(np.uint16)
    a = sigma_clip_mask_aware(x)
    b = sigma_clip_mask_aware(x.astype(np.float32))
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)
    assert a.mean.dtype == np.float32 and a.coverage.dtype == np.int16


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
    with pytest.raises(ConfigError, match="too small") as info:
        plan_tiles(2180, 3856, 500, 3, 64 << 20, workers=2)
    assert "--memory-budget" in str(info.value)
    with pytest.raises(ConfigError, match="too small"):
        plan_tiles(2180, 3856, 40, 3, 1 << 30, workers=1, tile_shape=(2180, 3856))
    with pytest.raises(ValueError):
        plan_tiles(0, 10, 1, 1, 1 << 30)


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
    assert 0 < budget <= stk.DEFAULT_BUDGET_CAP
    assert budget <= stk._available_memory()


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


def renderer(data, valid, weight):
    """``render_tile`` over in-memory frames (fresh arrays, as a real warp would return)."""
    def render(k, row0, row1, col0, col1):
        window = np.s_[row0:row1, col0:col1]
        return data[k][(slice(None),) + window].copy(), valid[k][window].copy(), weight[k][window].copy()
    return render


def test_stack_tiles_is_independent_of_the_tile_size():
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
        results.append(stack_tiles(plan, renderer(data, valid, weight), n, (channels, height, width),
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
        threaded = stack_tiles(plan, renderer(data, valid, weight), n, (channels, height, width),
                               frame_weights=frame_weights, executor=pool)
    for a, b in zip(results[-1], threaded):
        np.testing.assert_array_equal(a, b)


class IntoRenderer:
    """A renderer with ``render_into``: it writes straight into the tile buffer's views (as the pipeline's lattice
    path does); calling it as a function would fail, so stack_tiles must use ``render_into``."""

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


def test_stack_tiles_render_into_gives_the_same_result():
    """Rendering into the tile buffer's own views (every tile size, NaN samples still invalid) gives the bytes of the
    copying path."""
    rng = np.random.default_rng(12)
    n, channels, height, width = 9, 3, 37, 29
    data, valid, weight = frame_source(rng, n, channels, height, width)
    for shape in ((16, 16), (37, 29)):
        plan = plan_tiles(height, width, n, channels, 1 << 30, workers=1, tile_shape=shape)
        into = IntoRenderer(data, valid, weight)
        got = stack_tiles(plan, into, n, (channels, height, width))
        want = stack_tiles(plan, renderer(data, valid, weight), n, (channels, height, width))
        assert sorted(into.filled) == sorted(list(range(n)) * len(plan.tiles))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_stack_tiles_accepts_a_single_plane_and_checks_shapes():
    rng = np.random.default_rng(12)
    data, valid, weight = frame_source(rng, 6, 1, 20, 18)
    plan = plan_tiles(20, 18, 6, 1, 1 << 30, workers=1)
    mean, coverage, rejected = stack_tiles(
        plan, lambda k, r0, r1, c0, c1: (data[k, 0, r0:r1, c0:c1], valid[k, r0:r1, c0:c1], weight[k, r0:r1, c0:c1]),
        6, (1, 20, 18),
        cenfunc="mean", stdfunc="mad_std", sigma_lower=2.0, sigma_upper=2.5, maxiters=3)
    direct = sigma_clip_mask_aware(data, valid & np.isfinite(data[:, 0]), weight, cenfunc="mean",
                                   stdfunc="mad_std", sigma_lower=2.0, sigma_upper=2.5, maxiters=3)
    np.testing.assert_array_equal(mean, direct.mean)
    with pytest.raises(ValueError, match="tile plan"):
        stack_tiles(plan, renderer(data, valid, weight), 7, (1, 20, 18))
    with pytest.raises(ValueError, match="render_tile"):
        stack_tiles(plan, lambda k, r0, r1, c0, c1: (data[k, :, r0:r1, 1:], valid[k], weight[k]), 6, (1, 20, 18))


@pytest.mark.parametrize("channels", [1, 3])
def test_stack_tiles_memory_does_not_grow_with_frames(channels):
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
        stack_tiles(plan, render, n, (channels, height, width))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(plan.tiles) > 1
        assert peaks[n] <= plan.bytes_per_tile + (1 << 20), (n, peaks[n], plan.to_json())
    assert max(peaks.values()) <= budget + (1 << 20)
    assert peaks[40] <= 1.25 * peaks[10]


def test_clip_temporaries_stay_within_the_planner_allowance():
    rng = np.random.default_rng(14)
    x, valid = random_stack(rng, 40, (20, 4096), nans=0.0)
    weights = valid.astype(np.float32)
    out = 3 * x[0].size * 4  # mean + coverage + rejected (int16 x 2)
    for config in CONFIGS[:4]:
        tracemalloc.start()
        sigma_clip_mask_aware(x, valid, weights, np.ones(40), workers=1, **config)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak - out <= stk.CHUNK_SAMPLES * stk.CLIP_BYTES_PER_SAMPLE, config


@pytest.mark.slow
def test_memory_and_speed_against_astropy():
    """A tenth of astropy's extra memory at most; faster. (Timings are reported in METHODS.md.)"""
    rng = np.random.default_rng(15)
    x, valid = random_stack(rng, 40, (512, 2048), nans=0.0)
    masked = np.ma.MaskedArray(x, ~valid)
    tracemalloc.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma_clip(masked, axis=0)
    astropy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tracemalloc.start()
    sigma_clip_mask_aware(x, valid, workers=2)
    ours = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ours <= 0.1 * astropy_peak


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
