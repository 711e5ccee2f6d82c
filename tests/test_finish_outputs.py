"""Writers and statistics used around stacking: same bytes as astropy's own path, inputs untouched, exact statistics
(difference noise, background medians)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits

from dwarf3gpu.fitsio import write_fits
from dwarf3gpu.normalise import cfa_channel_medians
from dwarf3gpu.robust import MAD_TO_SIGMA, difference_noise, uint16_median
from dwarf3gpu.stretch import mtf


def test_write_fits_same_bytes_as_astropy_and_leaves_data_alone(tmp_path):
    rng = np.random.default_rng(3)
    for data in (rng.normal(0, 1, (37, 53)).astype(np.float32), rng.normal(0, 1, (3, 20, 31)).astype(np.float32)):
        before = data.copy()
        header = fits.Header()
        header["BUNIT"] = ("frames", "x")
        ours = write_fits(data, tmp_path / "ours.fits", header)
        hdu = fits.PrimaryHDU(data.copy(), header=header.copy())
        if data.ndim == 3:
            hdu.header["CTYPE3"] = ("RGB", "colour planes R, G, B")
        hdu.writeto(tmp_path / "astropy.fits", overwrite=True, output_verify="silentfix")
        assert ours.read_bytes() == (tmp_path / "astropy.fits").read_bytes()
        assert np.array_equal(data, before) and data.dtype == np.float32 and data.dtype.isnative


def _plain_difference_noise(image, step, mask=None):
    """The documented formula, step by step on copies: MAD_TO_SIGMA x MAD(d) / sqrt(2) of the usable pairs'
    differences (float32 differences and MAD, scaled in float64)."""
    x = np.asarray(image).astype(np.float32)
    diff = x[:, step:] - x[:, :-step]
    good = np.isfinite(diff)
    if mask is not None:
        good &= mask[:, step:] & mask[:, :-step]
    d = diff[good]
    return MAD_TO_SIGMA * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2)


def test_difference_noise_in_place_equals_the_plain_formula():
    """In-place partitioning gives the plain formula's value exactly (with and without mask, NaN pairs dropped,
    the default step 2 included) and leaves the image alone."""
    rng = np.random.default_rng(5)
    image = rng.normal(10.0, 2.0, (300, 401)).astype(np.float32)
    image[5, 7] = np.nan
    mask = rng.random(image.shape) > 0.1
    before = image.copy()
    for step in (1, 2, 3):
        assert difference_noise(image, step, mask) == _plain_difference_noise(image, step, mask)
        assert difference_noise(image, step) == _plain_difference_noise(image, step)
    assert difference_noise(image) == difference_noise(image, 2) == _plain_difference_noise(image, 2)
    assert difference_noise(image, mask=mask) == _plain_difference_noise(image, 2, mask)
    finite = np.nan_to_num(image, nan=10.0)
    assert difference_noise(finite, 2) == _plain_difference_noise(finite, 2)  # the all-finite path
    assert np.array_equal(image, before, equal_nan=True)
    assert MAD_TO_SIGMA == 1.4826


def test_difference_noise_measures_a_known_gaussian_sigma():
    """A Gaussian noise field of sigma 7 ADU on a sky with a gradient and a different level on each Bayer site:
    the same-colour (step 2) estimate is within 1 % of 7 (statistical error of a MAD over ~1e6 pairs: ~0.1 %).
    Pixels outside the mask do not matter; no usable pair gives NaN; integer images are accepted (their MAD is a
    multiple of 0.5 ADU, so the tolerance adds that quantum)."""
    rng = np.random.default_rng(9)
    sigma, h, w = 7.0, 1000, 1002
    y, x = np.mgrid[0:h, 0:w]
    sky = 1000.0 + 0.05 * x + 0.03 * y
    sky += np.array([[0.0, 250.0], [250.0, -120.0]])[y % 2, x % 2]  # per-site levels (a CFA background)
    image = (sky + rng.normal(0.0, sigma, (h, w))).astype(np.float32)
    assert difference_noise(image) == pytest.approx(sigma, rel=0.01)
    # step 1 pairs different sites here: the site levels dominate, so the estimate is far above sigma
    assert difference_noise(image, 1) > 5 * sigma
    mask = rng.random((h, w)) > 0.3
    garbage = image.copy()
    garbage[~mask] = rng.choice(np.array([0.0, 65535.0, np.nan, np.inf], np.float32), (~mask).sum())
    with np.errstate(invalid="ignore"):  # inf - inf in masked pairs: NaN, dropped
        assert difference_noise(garbage, 2, mask) == difference_noise(image, 2, mask)
        assert difference_noise(garbage, 2, mask) == pytest.approx(sigma, rel=0.01)
    assert math.isnan(difference_noise(image, 2, np.zeros((h, w), bool)))
    assert math.isnan(difference_noise(np.full((4, 6), np.nan, np.float32)))
    as_int = np.clip(np.rint(image), 0, 65535).astype(np.uint16)
    assert difference_noise(as_int) == difference_noise(as_int.astype(np.float32))
    # integer differences make the MAD a multiple of 0.5 ADU: the estimate may be off by that quantum as well
    assert abs(difference_noise(as_int) - sigma) <= 0.01 * sigma + MAD_TO_SIGMA * 0.5 / math.sqrt(2)


def test_mtf_equals_the_formula_bitwise():
    x = np.linspace(0.0, 1.0, 10001, dtype=np.float32)
    for m in (0.05, 0.3, 0.5, 0.9):
        m32 = np.float32(m)
        expected = (m32 - np.float32(1.0)) * x / ((np.float32(2.0) * m32 - np.float32(1.0)) * x - m32)
        assert np.array_equal(mtf(m, x).view(np.uint32), expected.view(np.uint32))


def test_background_medians_by_counting_equal_numpy():
    """The backgrounds pass takes uint16 medians from a histogram: same values as np.nanmedian of the float32
    samples (odd and even counts, ties, tiny and full 16-bit ranges), and the float path is np.nanmedian."""
    rng = np.random.default_rng(8)
    for n in (1, 2, 3, 10, 11, 1000, 1001):
        for top in (3, 100, 65536):
            x = rng.integers(0, top, n).astype(np.uint16)
            assert uint16_median(x) == float(np.nanmedian(x.astype(np.float32)))
    mosaic = rng.integers(0, 65536, (40, 64)).astype(np.uint16)
    as_float = mosaic.astype(np.float32)
    as_float[0, 0] = np.nan
    for pattern in ("RGGB", "GRBG"):
        assert np.array_equal(cfa_channel_medians(mosaic, pattern),
                              cfa_channel_medians(mosaic.astype(np.float32), pattern))
        assert np.isfinite(cfa_channel_medians(as_float, pattern)).all()
