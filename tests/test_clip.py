"""Sigma clipping (dwarf3gpu.clip): against astropy, weights and masks, chunk and thread independence, settings,
the clipping step of one tile, memory."""

from __future__ import annotations

import itertools
import math
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from astropy.stats import sigma_clip

from dwarf3gpu import clip as clip_module
from dwarf3gpu.clip import (
    CENFUNCS,
    CHUNK_SAMPLES,
    CLIP_BYTES_PER_SAMPLE,
    STDFUNCS,
    ClipSettings,
    clip_bounds,
    clip_into,
    clip_settings,
    count_dtype,
    sigma_clip_mask_aware,
    sigma_clip_mask_aware_rgb,
)
from dwarf3gpu.robust import MAD_TO_STD


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
        monkeypatch.setattr(clip_module, "CHUNK_SAMPLES", chunk)  # 1, 2, 5 pixels per chunk ... whole stack
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
def test_mean_adds_frames_in_order_for_any_chunk(p, monkeypatch):
    """Nothing clipped (sigma 1e30): every pixel's mean is float32(float64 sum in frame order / N), whatever the
    chunking (1, 2, 3, 5 pixels per chunk ... the whole stack: the single-pixel chunk included) and for strided
    input. The data make the order matter: a +2^40 and a -2^40 sample around small ones, so the exact sum (and a
    pairwise one) differs from the sequential one in (nearly) every pixel (checked below: the test can fail)."""
    n = 37
    rng = np.random.default_rng(p)
    big = rng.uniform(-1.0, 1.0, (n, 3 * p)).astype(np.float32)
    columns = np.arange(3 * p)
    big[rng.integers(0, n // 2, 3 * p), columns] = np.float32(2.0**40)
    big[rng.integers(n // 2, n, 3 * p), columns] = np.float32(-(2.0**40))
    for a in (big[:, :p], big[:, p:2 * p], big[:, ::3][:, :p]):
        total = np.zeros(p)
        for row in a:
            total += row.astype(np.float64)
        expected = (total / n).astype(np.float32)
        exact = (np.array([math.fsum(column) for column in a.T.astype(np.float64)]) / n).astype(np.float32)
        assert np.mean(exact != expected) >= 0.99  # the order matters for these data
        for chunk in (n, 2 * n, 3 * n, 5 * n, 1 << 18):
            monkeypatch.setattr(clip_module, "CHUNK_SAMPLES", chunk)
            result = sigma_clip_mask_aware(a, sigma=1e30, workers=1)
            assert np.all(result.rejected == 0) and np.all(result.coverage == n)
            np.testing.assert_array_equal(result.mean, expected)


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
        assert peak - out <= CHUNK_SAMPLES * CLIP_BYTES_PER_SAMPLE, config


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


# ------------------------------------------------------------------------------------- settings, one tile's clip


def test_clip_settings_validate_and_default_like_astropy():
    """sigma_lower/sigma_upper default to sigma; centre and spread become flags; bad options are refused."""
    assert CENFUNCS == ("median", "mean") and STDFUNCS == ("std", "mad_std")
    assert clip_settings() == ClipSettings(3.0, 3.0, 5, True, False)
    assert clip_settings(2.5, sigma_upper=4, maxiters=None, cenfunc="mean", stdfunc="mad_std") == ClipSettings(
        2.5, 4.0, None, False, True)
    assert clip_settings(sigma_lower=1.0) == ClipSettings(1.0, 3.0, 5, True, False)
    assert clip_settings(0.0).sigma_upper == 0.0
    for kwargs, match in ((dict(cenfunc="mode"), "cenfunc"), (dict(stdfunc="iqr"), "stdfunc"),
                          (dict(maxiters=0), "maxiters"), (dict(maxiters=2.5), "maxiters"),
                          (dict(sigma_lower=-1.0), "sigma_lower"), (dict(sigma_upper=float("inf")), "sigma_upper"),
                          (dict(sigma=float("nan")), "sigma_lower")):
        with pytest.raises(ValueError, match=match):
            clip_settings(**kwargs)
    assert MAD_TO_STD == 1.482602218505602
    assert count_dtype(32767) is np.int16 and count_dtype(32768) is np.int32


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_clip_into_writes_what_sigma_clip_mask_aware_returns(config):
    """clip_into over an (N, C, P) stack with a shared (N, 1, P) valid mask and weights writes the same (C, P)
    mean and rejected counts, the (1, P) coverage and the bounds of clip_bounds; with a thread pool too."""
    rng = np.random.default_rng(17)
    x, valid = random_stack(rng, 19, (3, 11, 13))
    shared = valid[:, 0]
    weights = rng.uniform(0.1, 1.0, shared.shape).astype(np.float32)
    frame_weights = rng.uniform(0.5, 1.5, 19)
    settings = clip_settings(**config)
    want = sigma_clip_mask_aware(x, shared, weights, frame_weights, **config)
    lower, upper = clip_bounds(x, shared, **config)
    stack3 = x.reshape(19, 3, -1)
    for executor in (None, ThreadPoolExecutor(2)):
        mean = np.full((3, 11 * 13), -1.0, np.float32)
        coverage = np.full((1, 11 * 13), -1, np.int16)
        rejected = np.full((3, 11 * 13), -1, np.int16)
        bounds = (np.empty((3, 11 * 13)), np.empty((3, 11 * 13)))
        clip_into(stack3, shared.reshape(19, 1, -1), weights.reshape(19, 1, -1), frame_weights, settings, mean,
                  coverage, rejected, bounds, executor)
        if executor is not None:
            executor.shutdown()
        np.testing.assert_array_equal(mean.reshape(3, 11, 13), want.mean)
        np.testing.assert_array_equal(rejected.reshape(3, 11, 13), want.rejected)
        np.testing.assert_array_equal(coverage.reshape(11, 13), want.coverage[0])
        np.testing.assert_array_equal(bounds[0].reshape(3, 11, 13), lower)
        np.testing.assert_array_equal(bounds[1].reshape(3, 11, 13), upper)
