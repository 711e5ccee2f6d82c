"""Writers and statistics used around stacking: same bytes as astropy's own path, inputs untouched, exact statistics."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from dwarf3gpu.calibrate import uint16_median as _uint16_median
from dwarf3gpu.fitsio import write_fits
from dwarf3gpu.pipeline import _cfa_channel_medians, _robust_noise
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


def test_robust_noise_in_place_equals_the_plain_formula():
    rng = np.random.default_rng(5)
    image = rng.normal(10.0, 2.0, (300, 401)).astype(np.float32)
    image[5, 7] = np.nan
    mask = rng.random(image.shape) > 0.1
    for step in (1, 2):
        diff = image[:, step:] - image[:, :-step]
        d = diff[mask[:, step:] & mask[:, :-step] & np.isfinite(diff)]
        expected = float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))
        assert _robust_noise(image, mask, step) == expected


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
            assert _uint16_median(x) == float(np.nanmedian(x.astype(np.float32)))
    mosaic = rng.integers(0, 65536, (40, 64)).astype(np.uint16)
    as_float = mosaic.astype(np.float32)
    as_float[0, 0] = np.nan
    for pattern in ("RGGB", "GRBG"):
        assert np.array_equal(_cfa_channel_medians(mosaic, pattern), _cfa_channel_medians(mosaic.astype(np.float32), pattern))
        assert np.isfinite(_cfa_channel_medians(as_float, pattern)).all()
