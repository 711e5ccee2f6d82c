"""Stretches, 8/16-bit conversion, preview files and the quicklook."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dwarf3gpu.color import ColorCalibration, apply_color_calibration, background_neutral_gains
from dwarf3gpu.errors import ConfigError
from dwarf3gpu.stretch import (
    asinh_beta_for,
    asinh_stretch,
    make_quicklook,
    mtf,
    mtf_midtone,
    percentile_normalise,
    to_uint8,
    to_uint16,
    two_stage_stretch,
    write_preview_png,
    write_preview_tiff,
)

# --- asinh -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1e-3, 0.5, 10.0, 500.0, 1e6])
def test_asinh_monotonic_with_exact_endpoints(beta):
    x = np.linspace(0.0, 1.0, 10001, dtype=np.float32)
    y = asinh_stretch(x, beta)
    assert y.dtype == np.float32
    assert y[0] == 0.0 and y[-1] == 1.0
    assert np.all(np.diff(y) >= 0)
    assert np.all(np.diff(y.astype(np.float64)[:: 100]) > 0)


def test_asinh_clips_input_and_keeps_nan():
    y = asinh_stretch(np.array([-0.5, np.nan, 2.0], np.float32), 10.0)
    assert y[0] == 0.0 and np.isnan(y[1]) and y[2] == 1.0


def test_asinh_formula_and_input_untouched():
    x = np.array([0.01, 0.1, 0.5], np.float32)
    before = x.copy()
    y = asinh_stretch(x, 20.0)
    np.testing.assert_allclose(y, np.arcsinh(20.0 * before.astype(np.float64)) / np.arcsinh(20.0), rtol=1e-6)
    assert np.array_equal(x, before)


@pytest.mark.parametrize(("background", "target"), [(0.003, 0.25), (0.05, 0.1), (1e-5, 0.25), (0.2, 0.8)])
def test_asinh_beta_for_hits_target(background, target):
    beta = asinh_beta_for(background, target)
    assert float(asinh_stretch(np.float32(background), beta)) == pytest.approx(target, rel=1e-4)


def test_asinh_rejects_bad_parameters():
    with pytest.raises(ConfigError):
        asinh_stretch(np.zeros(3), beta=0.0)
    with pytest.raises(ConfigError):
        asinh_beta_for(0.1, 1.0)


# --- percentile normalisation ----------------------------------------------------------------------------------------


def test_percentile_normalise_matches_nanpercentile():
    rng = np.random.default_rng(7)
    img = rng.lognormal(5, 1, (3, 64, 80)).astype(np.float32)
    img[:, :5] = np.nan
    img[2, 30, 30] = np.nan
    before = img.copy()
    out, (lo, hi) = percentile_normalise(img, 0.25, 99.9)
    expected_lo, expected_hi = np.nanpercentile(img, [0.25, 99.9])
    assert lo == pytest.approx(expected_lo, rel=1e-7) and hi == pytest.approx(expected_hi, rel=1e-7)
    assert np.array_equal(img, before, equal_nan=True)
    assert out.dtype == np.float32
    assert np.array_equal(np.isnan(out), np.isnan(img))
    assert np.nanmin(out) == 0.0 and np.nanmax(out) == 1.0
    inside = (img > lo) & (img < hi)
    np.testing.assert_allclose(out[inside], (img[inside] - lo) / (hi - lo), rtol=1e-5, atol=1e-6)


def test_percentile_normalise_edge_cases():
    out, (lo, hi) = percentile_normalise(np.full((3, 4, 4), 7.0, np.float32))
    assert (lo, hi) == (7.0, 7.0) and np.all(out == 0.0)
    out, (lo, hi) = percentile_normalise(np.full((3, 4, 4), np.nan, np.float32))
    assert (lo, hi) == (0.0, 1.0) and np.all(np.isnan(out))
    with pytest.raises(ConfigError):
        percentile_normalise(np.zeros(4), 50, 10)


# --- midtones transfer function --------------------------------------------------------------------------------------


def test_mtf_properties():
    x = np.linspace(0, 1, 1001, dtype=np.float32)
    for m in (0.01, 0.25, 0.5, 0.9):
        y = mtf(m, x)
        assert y[0] == 0.0 and y[-1] == 1.0
        assert np.all(np.diff(y) >= 0)
        assert float(mtf(m, np.float32(m))) == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(mtf(0.5, x), x, atol=1e-7)
    m = mtf_midtone(0.004, 0.25)
    assert float(mtf(m, np.float32(0.004))) == pytest.approx(0.25, rel=1e-5)
    with pytest.raises(ConfigError):
        mtf_midtone(0.0, 0.25)


# --- two-stage stretch -----------------------------------------------------------------------------------------------


def test_two_stage_puts_background_at_target(synthetic_sky, sky_levels):
    gains = (1 / 0.62, 1.0, 1 / 0.78)
    cal = ColorCalibration(gains=gains, offsets=tuple(sky_levels[1] - g * sky for g, sky in zip(gains, sky_levels)))
    img = apply_color_calibration(synthetic_sky(), cal)
    before = img.copy()
    out = two_stage_stretch(img)
    assert np.array_equal(img, before)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(np.median(out.reshape(3, -1), axis=1), 0.25, atol=0.01)
    out = two_stage_stretch(img, target_background=0.15)
    np.testing.assert_allclose(np.median(out.reshape(3, -1), axis=1), 0.15, atol=0.01)


def test_two_stage_preserves_pixel_ratios():
    # A flat background with one coloured patch: the stretch multiplies all channels of a pixel by one factor.
    rng = np.random.default_rng(8)
    img = (100.0 + rng.normal(0, 2.0, (3, 100, 100))).astype(np.float32)
    img[:, 40:60, 40:60] = np.asarray([3000.0, 1500.0, 700.0], np.float32)[:, None, None]
    out = two_stage_stretch(img)
    stats = np.median(img[:, :30, :30].reshape(3, -1))
    sigma = 1.4826 * np.median(np.abs(img[:, :30, :30] - stats))
    # Stretch input after the black point: value - (median - 2.8 sigma); ratios of those survive.
    black = 100.0 - 2.8 * sigma
    patch_in = np.asarray([3000.0, 1500.0, 700.0]) - black
    patch_out = out[:, 50, 50].astype(np.float64)
    np.testing.assert_allclose(patch_out / patch_out[0], patch_in / patch_in[0], rtol=0.01)
    assert patch_out.max() <= 1.0


def test_two_stage_nan_and_blank_input(synthetic_sky):
    img = synthetic_sky()
    img[:, 10:20, 10:20] = np.nan
    out = two_stage_stretch(img)
    assert np.all(np.isnan(out[:, 10:20, 10:20]))
    assert np.all(np.isfinite(out[:, 30:, 30:]))
    blank = two_stage_stretch(np.full((3, 8, 8), np.nan, np.float32))
    assert np.all(np.isnan(blank))
    flat = two_stage_stretch(np.full((3, 8, 8), 5.0, np.float32))
    assert np.all(flat == 0.0)


# --- integer conversion and preview files ----------------------------------------------------------------------------


def test_to_uint8_and_uint16():
    img = np.array([[[0.0, 0.5, 1.0, np.nan, -1.0, 2.0]]] * 3, np.float32)
    u8, u16 = to_uint8(img), to_uint16(img)
    assert u8.dtype == np.uint8 and u8.shape == (1, 6, 3)
    assert u16.dtype == np.uint16 and u16.shape == (1, 6, 3)
    assert list(u8[0, :, 0]) == [0, 128, 255, 0, 0, 255]
    assert list(u16[0, :, 0]) == [0, 32768, 65535, 0, 0, 65535]


def pure_red(height: int = 12, width: int = 16) -> np.ndarray:
    """Display image: red everywhere except one NaN pixel and one mid-grey pixel."""
    img = np.zeros((3, height, width), np.float32)
    img[0] = 1.0
    img[:, 0, 0] = np.nan
    img[:, 1, 1] = 0.5
    return img


def assert_file_is_red(path) -> None:
    """An independent reader (Pillow, a matplotlib dependency) sees red where the image is red."""
    image = pytest.importorskip("PIL.Image").open(path)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_preview_png_is_8bit_rgb(tmp_path):
    path = write_preview_png(pure_red(), tmp_path / "master_quicklook.png")
    assert [p.name for p in tmp_path.iterdir()] == ["master_quicklook.png"]
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8 and back.shape == (12, 16, 3)
    # OpenCV returns BGR: red is the last channel.
    assert np.all(back[2:, 2:, 2] == 255) and np.all(back[2:, 2:, :2] == 0)
    assert np.all(back[0, 0] == 0)
    assert np.all(back[1, 1] == 128)
    assert_file_is_red(path)


def test_preview_tiff_is_16bit_rgb(tmp_path):
    path = write_preview_tiff(pure_red(), tmp_path / "master_quicklook.tif")
    assert [p.name for p in tmp_path.iterdir()] == ["master_quicklook.tif"]
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.shape == (12, 16, 3)
    assert np.all(back[2:, 2:, 2] == 65535) and np.all(back[2:, 2:, :2] == 0)
    assert np.all(back[0, 0] == 0)
    assert np.all(back[1, 1] == 32768)
    assert_file_is_red(path)


# --- quicklook -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stretch", ["two_stage", "asinh"])
def test_quicklook_neutral_background_and_linear_input_untouched(stretch, synthetic_sky):
    img = synthetic_sky()
    img[:, :8, :] = np.nan
    before = img.copy()
    cal = background_neutral_gains(img)
    out = make_quicklook(img, cal, stretch=stretch, color_matrix="dwarf3")
    assert np.array_equal(img, before, equal_nan=True)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
    assert np.all(out[:, :8, :] == 0.0)
    background = np.median(out[:, 8:, :].reshape(3, -1), axis=1)
    np.testing.assert_allclose(background, 0.25, atol=0.015)
    np.testing.assert_allclose(background, background[1], atol=0.01)


def test_quicklook_scnr_lowers_green(synthetic_sky):
    img = synthetic_sky()
    cal = background_neutral_gains(img)
    plain = make_quicklook(img, cal)
    scnr = make_quicklook(img, cal, scnr_amount=1.0)
    assert np.median(scnr[1]) < np.median(plain[1])


def test_quicklook_without_calibration_shows_the_cast(synthetic_sky):
    img = synthetic_sky()
    out = make_quicklook(img)
    background = np.median(out.reshape(3, -1), axis=1)
    assert background[1] > background[0] + 0.05 and background[1] > background[2] + 0.05


def test_quicklook_rejects_unknown_stretch(synthetic_sky):
    with pytest.raises(ConfigError):
        make_quicklook(synthetic_sky(height=40, width=40, n_stars=5), stretch="log")
