"""Debayering: exact colours, measured samples, band independence, OpenCV agreement, superpixel geometry, MHC."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dwarf3gpu.debayer import debayer_bilinear, debayer_mhc, debayer_rggb, debayer_superpixel
from dwarf3gpu.geometry import (
    BAYER_PATTERNS,
    MONO_CODE,
    apply_transform,
    bayer_offsets,
    cfa_channel_map,
    normalise_pattern,
    pattern_code,
    superpixel_transform,
)

#: Parametrisation values (collection time; the ``bayer_patterns`` fixture holds the same four layouts).
PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")

# OpenCV names a Bayer layout after the 2x2 block starting at pixel (1, 1), so RGGB data needs
# COLOR_BayerBG2RGB; test_opencv_codes_pinned_by_colour_patch pins this table.
CV2_CODES = {
    "RGGB": cv2.COLOR_BayerBG2RGB,
    "GRBG": cv2.COLOR_BayerGB2RGB,
    "GBRG": cv2.COLOR_BayerGR2RGB,
    "BGGR": cv2.COLOR_BayerRG2RGB,
}
COLOUR = (1234.0, 40321.0, 777.0)


def uniform(shape: tuple[int, int], colour=COLOUR) -> np.ndarray:
    return np.stack([np.full(shape, v, np.float32) for v in colour])


def smooth_scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(3, H, W) float64 scene of low-frequency waves, values 10000-30000."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = []
    for _ in range(3):
        p = rng.uniform(0, 2 * np.pi, 3)
        channels.append(
            20000
            + 6000 * np.sin(2 * np.pi * x / 37 + p[0]) * np.cos(2 * np.pi * y / 53 + p[1])
            + 4000 * np.sin(2 * np.pi * (x + 0.6 * y) / 41 + p[2])
        )
    return np.stack(channels)


def test_bayer_offsets():
    assert bayer_offsets("RGGB") == {"R": [(0, 0)], "G": [(0, 1), (1, 0)], "B": [(1, 1)]}
    assert bayer_offsets("grbg") == {"R": [(0, 1)], "G": [(0, 0), (1, 1)], "B": [(1, 0)]}
    assert bayer_offsets("GBRG") == {"R": [(1, 0)], "G": [(0, 0), (1, 1)], "B": [(0, 1)]}
    assert bayer_offsets(" BGGR ") == {"R": [(1, 1)], "G": [(0, 1), (1, 0)], "B": [(0, 0)]}
    with pytest.raises(ValueError, match="Bayer pattern"):
        bayer_offsets("RGBG")


def test_pattern_codes_are_the_kernels_numbering():
    """The kernels number the layouts 0..3 in this order and a mono mosaic -1; names are case- and space-blind."""
    assert BAYER_PATTERNS == PATTERNS
    assert [pattern_code(p) for p in ("RGGB", "GRBG", "GBRG", "BGGR")] == [0, 1, 2, 3]
    assert pattern_code("bggr") == 3 and pattern_code(" grbg ") == 1
    assert pattern_code(None) == MONO_CODE == -1
    assert normalise_pattern(" gbrg") == "GBRG"
    for bad in ("RGBG", "", "RGGBX"):
        with pytest.raises(ValueError, match="Bayer pattern"):
            pattern_code(bad)


def test_cfa_channel_map_exact():
    """Channel (0 R, 1 G, 2 B) of each pixel of a tile at an absolute origin: the pattern's 2x2 cell, shifted by
    the origin's parity."""
    assert np.array_equal(cfa_channel_map("RGGB", (0, 0), (2, 3)), [[0, 1, 0], [1, 2, 1]])
    assert np.array_equal(cfa_channel_map("RGGB", (1, 0), (2, 3)), [[1, 2, 1], [0, 1, 0]])
    assert np.array_equal(cfa_channel_map("RGGB", (0, 1), (2, 3)), [[1, 0, 1], [2, 1, 2]])
    assert np.array_equal(cfa_channel_map("RGGB", (1, 1), (2, 2)), [[2, 1], [1, 0]])
    assert np.array_equal(cfa_channel_map("GRBG", (0, 0), (2, 2)), [[1, 0], [2, 1]])
    assert np.array_equal(cfa_channel_map("GBRG", (0, 0), (2, 2)), [[1, 2], [0, 1]])
    assert np.array_equal(cfa_channel_map("bggr", (0, 0), (2, 2)), [[2, 1], [1, 0]])
    assert np.array_equal(cfa_channel_map("BGGR", (3, 5), (3, 1)), [[0], [1], [0]])
    # large odd origins: only the parity matters; the map agrees with bayer_offsets everywhere
    for pattern in PATTERNS:
        for origin in ((0, 0), (1, 0), (0, 1), (1, 1), (1001, 2046)):
            got = cfa_channel_map(pattern, origin, (5, 7))
            assert got.shape == (5, 7) and got.dtype.kind == "i"
            want = np.empty((5, 7), int)
            for k, colour in enumerate("RGB"):
                for r, c in bayer_offsets(pattern)[colour]:
                    want[(r - origin[0]) % 2::2, (c - origin[1]) % 2::2] = k
            assert np.array_equal(got, want), (pattern, origin)
    with pytest.raises(ValueError, match="Bayer pattern"):
        cfa_channel_map("RGBG", (0, 0), (2, 2))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("origin", [(0, 0), (0, 1), (1, 0), (1, 1), (6, 3)])
def test_uniform_colour_is_exact_bilinear(pattern, origin, mosaic_of):
    mosaic = mosaic_of(uniform((11, 14)), pattern, origin)
    out = debayer_bilinear(mosaic, pattern, origin=origin)
    assert out.dtype == np.float32 and out.shape == (3, 11, 14)
    for k, value in enumerate(COLOUR):
        assert np.all(out[k] == np.float32(value)), (pattern, origin, k)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_uniform_colour_is_exact_superpixel(pattern, mosaic_of):
    mosaic = mosaic_of(uniform((11, 14)), pattern)
    out = debayer_superpixel(mosaic, pattern)
    assert out.dtype == np.float32 and out.shape == (3, 5, 7)
    for k, value in enumerate(COLOUR):
        assert np.all(out[k] == np.float32(value))
    assert np.array_equal(debayer_rggb(mosaic, pattern, "superpixel"), out)
    assert np.array_equal(debayer_rggb(mosaic, pattern), debayer_bilinear(mosaic, pattern))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_measured_pixels_keep_their_values(pattern):
    mosaic = np.random.default_rng(3).integers(0, 65536, (23, 30)).astype(np.uint16)
    out = debayer_bilinear(mosaic, pattern)
    for k, colour in enumerate("RGB"):
        for r, c in bayer_offsets(pattern)[colour]:
            assert np.array_equal(out[k, r::2, c::2], mosaic[r::2, c::2].astype(np.float32))


def test_interior_is_bilinear_interpolation():
    """Inside the frame each missing value is the mean of its 2 or 4 nearest samples of that colour."""
    mosaic = np.random.default_rng(4).integers(0, 4096, (12, 16)).astype(np.float32)
    out = debayer_bilinear(mosaic, "RGGB")
    m = mosaic.astype(np.float64)
    # red at a green site of a red row, at a green site of a blue row, at a blue site
    assert out[0, 4, 5] == np.float32((m[4, 4] + m[4, 6]) / 2)
    assert out[0, 5, 4] == np.float32((m[4, 4] + m[6, 4]) / 2)
    assert out[0, 5, 5] == pytest.approx((m[4, 4] + m[4, 6] + m[6, 4] + m[6, 6]) / 4, rel=1e-6)
    # green at a red site (cross), blue at a red site (diagonal)
    assert out[1, 4, 4] == pytest.approx((m[3, 4] + m[5, 4] + m[4, 3] + m[4, 5]) / 4, rel=1e-6)
    assert out[2, 4, 4] == pytest.approx((m[3, 3] + m[3, 5] + m[5, 3] + m[5, 5]) / 4, rel=1e-6)
    # edges: only the samples present (corner (0, 0) is red in RGGB; its only blue is (1, 1))
    assert out[2, 0, 0] == m[1, 1]
    assert out[1, 0, 0] == np.float32((m[0, 1] + m[1, 0]) / 2)


def test_linear_ramp_is_exact_inside(mosaic_of):
    y, x = np.mgrid[0:20, 0:24]
    ramp = (4 * x + 8 * y + 100).astype(np.float32)
    out = debayer_bilinear(mosaic_of(np.stack([ramp] * 3), "GBRG"), "GBRG")
    for k in range(3):
        assert np.array_equal(out[k, 1:-1, 1:-1], ramp[1:-1, 1:-1])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_band_with_margin_is_bit_identical_to_full_frame(pattern):
    full_mosaic = np.random.default_rng(5).integers(0, 65536, (64, 70)).astype(np.uint16)
    full = debayer_bilinear(full_mosaic, pattern)
    margin = 2
    for row0, row1, col0, col1 in [(0, 17, 0, 70), (17, 40, 0, 70), (33, 64, 5, 52), (9, 10, 31, 33), (21, 50, 3, 70)]:
        r_lo, r_hi = max(row0 - margin, 0), min(row1 + margin, 64)
        c_lo, c_hi = max(col0 - margin, 0), min(col1 + margin, 70)
        band = debayer_bilinear(full_mosaic[r_lo:r_hi, c_lo:c_hi], pattern, origin=(r_lo, c_lo))
        inner = band[:, row0 - r_lo : row1 - r_lo, col0 - c_lo : col1 - c_lo]
        assert np.array_equal(inner, full[:, row0:row1, col0:col1]), (row0, row1, col0, col1)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_opencv_codes_pinned_by_colour_patch(pattern, mosaic_of):
    mosaic = mosaic_of(uniform((8, 10), (100.0, 200.0, 300.0)), pattern).astype(np.uint16)
    rgb = cv2.cvtColor(mosaic, CV2_CODES[pattern])
    assert np.all(rgb[2:-2, 2:-2] == np.array([100, 200, 300], np.uint16))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_opencv_bilinear_inside(pattern, mosaic_of):
    """OpenCV's uint16 bilinear demosaic agrees within its integer rounding (0.5 ADU) off the 1-px border."""
    mosaic = np.round(mosaic_of(smooth_scene(96, 128), pattern)).astype(np.uint16)
    ours = debayer_bilinear(mosaic, pattern)
    theirs = cv2.cvtColor(mosaic, CV2_CODES[pattern]).transpose(2, 0, 1).astype(np.float32)
    assert np.abs(ours - theirs)[:, 1:-1, 1:-1].max() <= 0.5


def test_superpixel_centre_and_transform(bayer_patterns, mosaic_of):
    """A linear ramp sampled through the CFA: superpixel G is the ramp at (2j + 0.5, 2i + 0.5)."""
    y, x = np.mgrid[0:10, 0:14]
    ramp = (3 * x + 5 * y).astype(np.float32)
    for pattern in bayer_patterns:
        g = debayer_superpixel(mosaic_of(np.stack([ramp] * 3), pattern), pattern)[1]
        i, j = np.mgrid[0:5, 0:7]
        assert np.array_equal(g, 3 * (2 * j + 0.5) + 5 * (2 * i + 0.5))
    theta = np.radians(33.0)
    A = np.array([[np.cos(theta), -np.sin(theta), 17.25], [np.sin(theta), np.cos(theta), -8.5]])
    points_sp = np.array([[0.0, 0.0], [10.0, 3.0], [-4.5, 200.25]])
    expected = (apply_transform(A, 2 * points_sp + 0.5) - 0.5) / 2
    assert np.allclose(apply_transform(superpixel_transform(A), points_sp), expected, atol=1e-12)


def test_odd_size_and_errors():
    mosaic = np.ones((7, 9), np.uint16)
    assert debayer_superpixel(mosaic, "RGGB").shape == (3, 3, 4)
    assert debayer_bilinear(mosaic, "RGGB").shape == (3, 7, 9)
    with pytest.raises(ValueError, match="2-D"):
        debayer_bilinear(np.ones((2, 4, 4)), "RGGB")
    with pytest.raises(ValueError, match="method"):
        debayer_rggb(mosaic, "RGGB", "vng")


# ------------------------------------------------------------------------------------------ Malvar-He-Cutler

# The MHC (2004) 5x5 filters, x 8, indexed [dr + 2, dc + 2].
MHC_G_AT_RB = np.array([[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1], [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]], float)
MHC_AT_G_ROW = np.array([[0, 0, 0.5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1], [0, -1, 0, -1, 0], [0, 0, 0.5, 0, 0]])
MHC_AT_G_COL = MHC_AT_G_ROW.T
MHC_RB_AT_BR = np.array([[0, 0, -1.5, 0, 0], [0, 2, 0, 2, 0], [-1.5, 0, 6, 0, -1.5], [0, 2, 0, 2, 0], [0, 0, -1.5, 0, 0]])


def correlated_scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(3, H, W) float64: one smooth luminance with fine detail plus a constant colour per channel (MHC's model:
    constant colour differences), values 5000-35000."""
    luminance = smooth_scene(h, w, seed)[0]
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    luminance += 3000 * np.sin(2 * np.pi * x / 9.0) * np.sin(2 * np.pi * y / 11.0)
    return np.stack([luminance - 3000, luminance, luminance + 2000])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("origin", [(0, 0), (0, 1), (1, 0), (1, 1), (6, 3)])
def test_uniform_colour_is_exact_mhc(pattern, origin, mosaic_of):
    """Colour patches: exact everywhere, the bilinear border included, for every pattern and band phase."""
    for shape in ((11, 14), (5, 5), (23, 18)):
        mosaic = mosaic_of(uniform(shape), pattern, origin)
        out = debayer_mhc(mosaic, pattern, origin=origin)
        assert out.dtype == np.float32 and out.shape == (3,) + shape
        for k, value in enumerate(COLOUR):
            assert np.all(out[k] == np.float32(value)), (pattern, origin, shape, k)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_mhc_measured_pixels_keep_their_values(pattern):
    mosaic = np.random.default_rng(3).integers(0, 65536, (23, 30)).astype(np.uint16)
    out = debayer_mhc(mosaic, pattern)
    for k, colour in enumerate("RGB"):
        for r, c in bayer_offsets(pattern)[colour]:
            assert np.array_equal(out[k, r::2, c::2], mosaic[r::2, c::2].astype(np.float32))


def test_mhc_interior_filters_and_bilinear_border():
    """Inside: the published 5x5 filters (float64 reference); the 2-pixel border: exactly debayer_bilinear."""
    mosaic = np.random.default_rng(4).integers(0, 65536, (16, 18)).astype(np.float32)
    out = debayer_mhc(mosaic, "RGGB")
    m = mosaic.astype(np.float64)

    def apply(kernel, r, c):
        return float((kernel * m[r - 2 : r + 3, c - 2 : c + 3]).sum() / 8)

    # RGGB: (even, even) R, (even, odd) G in a red row, (odd, even) G in a blue row, (odd, odd) B
    for r, c, channel, kernel in [(4, 4, 1, MHC_G_AT_RB), (4, 4, 2, MHC_RB_AT_BR), (5, 7, 1, MHC_G_AT_RB),
                                  (5, 7, 0, MHC_RB_AT_BR), (4, 5, 0, MHC_AT_G_ROW), (4, 5, 2, MHC_AT_G_COL),
                                  (5, 6, 2, MHC_AT_G_ROW), (5, 6, 0, MHC_AT_G_COL)]:
        assert out[channel, r, c] == pytest.approx(apply(kernel, r, c), abs=1e-2), (r, c, channel)
    border = np.ones(mosaic.shape, bool)
    border[2:-2, 2:-2] = False
    assert np.array_equal(out[:, border], debayer_bilinear(mosaic, "RGGB")[:, border])
    assert np.array_equal(debayer_mhc(mosaic[:4, :7], "RGGB"), debayer_bilinear(mosaic[:4, :7], "RGGB"))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_mhc_band_with_margin_is_bit_identical_to_full_frame(pattern):
    """A band with a 3-pixel margin (2 suffices) on each side that is not a frame edge: bit-identical pixels."""
    full_mosaic = np.random.default_rng(5).integers(0, 65536, (64, 70)).astype(np.uint16)
    full = debayer_mhc(full_mosaic, pattern)
    for margin in (2, 3):
        for row0, row1, col0, col1 in [(0, 17, 0, 70), (17, 40, 0, 70), (33, 64, 5, 52), (9, 10, 31, 33),
                                       (21, 50, 3, 70), (1, 63, 1, 69)]:
            r_lo, r_hi = max(row0 - margin, 0), min(row1 + margin, 64)
            c_lo, c_hi = max(col0 - margin, 0), min(col1 + margin, 70)
            band = debayer_mhc(full_mosaic[r_lo:r_hi, c_lo:c_hi], pattern, origin=(r_lo, c_lo))
            inner = band[:, row0 - r_lo : row1 - r_lo, col0 - c_lo : col1 - c_lo]
            assert np.array_equal(inner, full[:, row0:row1, col0:col1]), (margin, row0, row1, col0, col1)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_mhc_linear_ramp_exact_and_smooth_scene_closer_than_bilinear(pattern, mosaic_of):
    """Independent linear ramps per channel are exact off the border; on a scene of correlated colours (one
    luminance, constant colour differences) MHC's RMS error is below 0.85 x bilinear's in every channel."""
    y, x = np.mgrid[0:20, 0:24]
    ramps = np.stack([4 * x + 8 * y + 100, 200 - 2 * x + 6 * y, 3 * x - 5 * y + 900]).astype(np.float32)
    out = debayer_mhc(mosaic_of(ramps, pattern), pattern)
    assert np.array_equal(out[:, 2:-2, 2:-2], ramps[:, 2:-2, 2:-2])

    scene = correlated_scene(96, 128)
    mosaic = mosaic_of(scene, pattern)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    err_mhc = np.sqrt(((debayer_mhc(mosaic, pattern) - scene)[inner] ** 2).mean(axis=(1, 2)))
    err_bil = np.sqrt(((debayer_bilinear(mosaic, pattern) - scene)[inner] ** 2).mean(axis=(1, 2)))
    assert np.all(err_mhc < 0.85 * err_bil), (err_mhc, err_bil)


def test_mhc_errors():
    with pytest.raises(ValueError, match="2-D"):
        debayer_mhc(np.ones((2, 8, 8)), "RGGB")
    with pytest.raises(ValueError, match="Bayer pattern"):
        debayer_mhc(np.ones((8, 8)), "RGBX")
