"""Colour finishing: background-neutral white balance, Bayer-green compensation, SCNR, colour matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits

from dwarf3gpu.color import (
    COLOR_MATRIX_PRESETS,
    ColorCalibration,
    apply_bayer_compensation,
    apply_color_calibration,
    apply_color_matrix,
    background_neutral_gains,
    saturation_matrix,
    scnr_green,
)
from dwarf3gpu.errors import ConfigError, Dwarf3Error


def true_background_after(cal: ColorCalibration, sky) -> np.ndarray:
    """Where the true sky level of each channel lands after the calibration."""
    return np.asarray(cal.gains) * np.asarray(sky) + np.asarray(cal.offsets)


# --- background-neutral white balance -------------------------------------------------------------------------------


def test_white_balance_neutralises_cast_and_sky(synthetic_sky, sky_levels, raw_star_colour):
    r_over_g, b_over_g = raw_star_colour
    img = synthetic_sky()
    cal = background_neutral_gains(img)
    assert cal.method == "background+white"
    assert cal.gains[1] == 1.0 and cal.offsets[1] == 0.0
    np.testing.assert_allclose(cal.background, sky_levels, rtol=0.01)
    np.testing.assert_allclose(cal.noise, 8.0, rtol=0.05)
    # The median star becomes white: gains are the inverse of its raw colour.
    np.testing.assert_allclose(cal.gains, [1 / r_over_g, 1.0, 1 / b_over_g], rtol=0.03)
    # The sky is neutral afterwards, at the green level (true sky, not the estimate).
    after = true_background_after(cal, sky_levels)
    np.testing.assert_allclose(after, sky_levels[1], rtol=0.01)
    # ... and so is the measured background of the calibrated image.
    calibrated = apply_color_calibration(img, cal)
    again = background_neutral_gains(calibrated)
    np.testing.assert_allclose(again.background, again.background[1], rtol=0.01)
    np.testing.assert_allclose(again.gains, 1.0, rtol=1e-4)


def test_white_balance_ignores_nan_and_leaves_input_alone(synthetic_sky, sky_levels):
    img = synthetic_sky()
    img[:, :, :60] = np.nan
    img[1, 100:120, 200:260] = np.nan
    before = img.copy()
    cal = background_neutral_gains(img)
    assert np.array_equal(img, before, equal_nan=True)
    assert all(np.isfinite(cal.gains)) and all(np.isfinite(cal.offsets))
    np.testing.assert_allclose(true_background_after(cal, sky_levels), sky_levels[1], rtol=0.01)
    out = apply_color_calibration(img, cal)
    assert np.array_equal(np.isnan(out), np.isnan(img))


def test_white_balance_without_bright_sources_equalises_background_only(sky_levels):
    rng = np.random.default_rng(3)
    img = (np.asarray(sky_levels)[:, None, None] + rng.normal(0, 5.0, (3, 200, 200))).astype(np.float32)
    cal = background_neutral_gains(img)
    assert cal.method == "background"
    assert cal.gains == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(true_background_after(cal, sky_levels), sky_levels[1], rtol=0.01)


def test_white_balance_excludes_saturated_pixels(synthetic_sky, raw_star_colour):
    r_over_g, b_over_g = raw_star_colour
    img = synthetic_sky()
    # A block of saturated (clipped, white) pixels would pull the white reference towards grey.
    img[:, 20:80, 20:80] = 60000.0
    cal = background_neutral_gains(img, saturation=59000.0)
    np.testing.assert_allclose(cal.gains, [1 / r_over_g, 1.0, 1 / b_over_g], rtol=0.03)


def test_white_balance_needs_data():
    with pytest.raises(Dwarf3Error, match="pixels with data"):
        background_neutral_gains(np.full((3, 50, 50), np.nan, np.float32))


def test_calibration_json_and_header_round_trip(synthetic_sky):
    cal = background_neutral_gains(synthetic_sky())
    assert ColorCalibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal
    manual = ColorCalibration.from_json({"gains": [1.5, 1, 1.2], "offsets": [0, 0, 0]})
    assert manual.method == "manual" and manual.gains == (1.5, 1.0, 1.2)
    header = fits.Header()
    for key, value, comment in cal.header_cards():
        header[key] = (value, comment)
    assert [header[f"WBGAIN_{c}"] for c in "RGB"] == list(cal.gains)
    assert [header[f"WBOFFS_{c}"] for c in "RGB"] == list(cal.offsets)
    assert header["WBMETHOD"] == cal.method


def test_apply_color_calibration_formula():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1000, (3, 20, 30)).astype(np.float32)
    cal = ColorCalibration(gains=(1.5, 1.0, 0.8), offsets=(-10.0, 0.0, 25.0))
    out = apply_color_calibration(img, cal)
    assert out.dtype == np.float32 and out.shape == img.shape
    expected = np.array(cal.gains)[:, None, None] * img + np.array(cal.offsets)[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# --- Bayer-green compensation ----------------------------------------------------------------------------------------


def test_bayer_compensation_explicit_gains_are_pure_scaling(synthetic_sky, sky_levels):
    img = synthetic_sky() - np.asarray(sky_levels, np.float32)[:, None, None]
    img[:, 0, 0] = 0.0
    before = img.copy()
    out = apply_bayer_compensation(img, gains=(1.6, 1.0, 1.3))
    assert np.array_equal(img, before)
    assert np.array_equal(out[1], img[1])
    assert np.array_equal(out[:, 0, 0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(out[0], 1.6 * img[0], rtol=1e-6)
    np.testing.assert_allclose(out[2], 1.3 * img[2], rtol=1e-6)


def test_bayer_compensation_default_uses_measured_gains(synthetic_sky):
    img = synthetic_sky()
    out = apply_bayer_compensation(img)
    gains = background_neutral_gains(img).gains
    np.testing.assert_allclose(out, np.asarray(gains, np.float32)[:, None, None] * img, rtol=1e-6)


@pytest.mark.parametrize("gains", [(1.0, 1.0), (1.0, -1.0, 1.0), (1.0, np.nan, 1.0)])
def test_bayer_compensation_rejects_bad_gains(gains):
    with pytest.raises(ConfigError):
        apply_bayer_compensation(np.ones((3, 4, 4), np.float32), gains=gains)


# --- SCNR ------------------------------------------------------------------------------------------------------------


def test_scnr_average_neutral_formula_exact():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (3, 40, 50)).astype(np.float32)
    img[:, 0, 0] = np.nan
    out = scnr_green(img, amount=1.0)
    expected_g = np.minimum(img[1], (img[0] + img[2]) * np.float32(0.5))
    assert np.array_equal(out[1], expected_g, equal_nan=True)
    assert np.array_equal(out[0], img[0], equal_nan=True)
    assert np.array_equal(out[2], img[2], equal_nan=True)
    assert np.all(out[1][1:] <= img[1][1:])


def test_scnr_amount_blends_and_maximum_neutral():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, (3, 30, 30)).astype(np.float32)
    assert np.array_equal(scnr_green(img, amount=0.0), img)
    half = scnr_green(img, amount=0.5)
    full = np.minimum(img[1], (img[0] + img[2]) / 2)
    np.testing.assert_allclose(half[1], 0.5 * img[1] + 0.5 * full, rtol=1e-6)
    maxn = scnr_green(img, method="maximum_neutral")
    assert np.array_equal(maxn[1], np.minimum(img[1], np.maximum(img[0], img[2])))


def test_scnr_leaves_grey_and_input_alone():
    img = np.full((3, 5, 5), 0.3, np.float32)
    before = img.copy()
    assert np.array_equal(scnr_green(img), img)
    assert np.array_equal(img, before)


def test_scnr_bias_on_noisy_neutral_background():
    # min(G, (R + B) / 2) of a neutral pixel with independent N(0, sigma) noise per channel lowers the mean green by
    # sigma sqrt(3/2) / sqrt(2 pi) = 0.4886 sigma (documented in METHODS.md).
    rng = np.random.default_rng(6)
    img = (100.0 + rng.normal(0.0, 10.0, (3, 500, 500))).astype(np.float32)
    for amount in (1.0, 0.5):
        shift = scnr_green(img, amount=amount)[1].mean() - img[1].mean()
        assert shift == pytest.approx(-0.4886 * 10.0 * amount, rel=0.02)


@pytest.mark.parametrize("kwargs", [{"amount": 1.5}, {"amount": -0.1}, {"method": "additive_mask"}])
def test_scnr_rejects_bad_options(kwargs):
    with pytest.raises(ConfigError):
        scnr_green(np.ones((3, 2, 2), np.float32), **kwargs)


# --- colour matrices -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COLOR_MATRIX_PRESETS))
def test_color_matrix_presets_keep_grey_exactly(name):
    matrix = COLOR_MATRIX_PRESETS[name]
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    rng = np.random.default_rng(4)
    level = rng.uniform(-50, 60000, (1, 30, 40)).astype(np.float32)
    grey = np.repeat(level, 3, axis=0)
    out = apply_color_matrix(grey, name)
    assert np.array_equal(out, grey)


def test_color_matrix_matches_matrix_product():
    rng = np.random.default_rng(5)
    matrix = rng.uniform(-0.3, 0.6, (3, 3))
    matrix[np.diag_indices(3)] = 0.0
    matrix[np.diag_indices(3)] = 1.0 - matrix.sum(axis=1)
    img = rng.uniform(0, 1, (3, 10, 12)).astype(np.float32)
    img[:, 0, 0] = np.nan
    out = apply_color_matrix(img, matrix)
    expected = np.einsum("ij,jhw->ihw", matrix, img.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.isnan(out[:, 0, 0]))
    grey = np.full((3, 4, 4), 0.37, np.float32)
    assert np.array_equal(apply_color_matrix(grey, matrix), grey)


def test_saturation_matrix_scales_colour_differences():
    assert np.array_equal(saturation_matrix(1.0), np.eye(3))
    pixel = np.array([0.6, 0.3, 0.15], np.float32).reshape(3, 1, 1)
    out = apply_color_matrix(pixel, saturation_matrix(1.5)).ravel()
    mean = pixel.mean()
    np.testing.assert_allclose(out - mean, 1.5 * (pixel.ravel() - mean), rtol=1e-6)


@pytest.mark.parametrize("matrix", ["vivid", np.eye(2), np.full((3, 3), 0.5), [[1, 0, 0], [0, np.inf, 0], [0, 0, 1]]])
def test_color_matrix_rejects_bad_input(matrix):
    with pytest.raises(ConfigError):
        apply_color_matrix(np.ones((3, 2, 2), np.float32), matrix)


def test_color_matrix_blocked_in_place_is_bit_identical_to_the_expression():
    rng = np.random.default_rng(7)
    rgb = rng.normal(100.0, 30.0, (3, 700, 1031)).astype(np.float32)  # rows not a multiple of the block
    rgb[:, :3, :5] = np.nan
    rgb[0, 10, 10] = np.nan
    rgb[1, 11, 11] = np.inf
    rgb[2, 12, 12] = -0.0
    before = rgb.copy()
    custom = np.array([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05], [0.1, -0.3, 1.2]])
    for matrix in [*COLOR_MATRIX_PRESETS, custom]:
        m = np.asarray(COLOR_MATRIX_PRESETS[matrix] if isinstance(matrix, str) else matrix, np.float64)
        m = m.astype(np.float32)
        expected = np.empty_like(rgb)
        with np.errstate(invalid="ignore"):
            for c in range(3):
                a, b = (k for k in range(3) if k != c)
                expected[c] = rgb[c] + m[c, a] * (rgb[a] - rgb[c]) + m[c, b] * (rgb[b] - rgb[c])
            got = apply_color_matrix(rgb, matrix)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(rgb.view(np.uint32), before.view(np.uint32))
