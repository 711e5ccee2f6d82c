"""Star detection against planted truth: synthetic Bayer frames with stars of known position, flux and PSF.

The frames are rendered here from first principles (pixel-integrated Gaussian or Moffat profiles, per-pixel
colour from the Bayer pattern, Poisson + read noise, uint16 clipping); nothing is taken from the code
under test, and the tolerances are those of the project's requirements, not fitted to the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest

from dwarf3gpu.geometry import BAYER_PATTERNS
from dwarf3gpu.stars import StarList, detect_stars, luminance_proxy

SKY = 500.0
READ_NOISE = 5.0
SUPERSAMPLE = 7  # sub-pixels per pixel side when integrating a profile over a pixel


def _channel_index(shape: tuple[int, int], pattern: str | None) -> np.ndarray:
    """Colour index (0 = R, 1 = G, 2 = B) of every mosaic pixel; all 1 for a mono frame."""
    index = np.ones(shape, np.intp)
    if pattern is not None:
        for r in (0, 1):
            for c in (0, 1):
                index[r::2, c::2] = "RGB".index(pattern[2 * r + c])
    return index


def _render(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    *,
    pattern: str | None = "RGGB",
    beta: float | None = None,
    colour: np.ndarray | None = None,
    axis_ratio: float = 1.0,
    noise: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Float image of stars on a flat sky: each star's profile is integrated over every pixel.

    ``flux`` is the total flux a pixel of colour G collects; ``colour`` (N, 3) scales R, G, B. The profile is
    a Gaussian of the given FWHM, or a Moffat of index ``beta``; ``axis_ratio`` < 1 squeezes it along y.
    Pixel (r, c) covers [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5].
    """
    image = np.full(shape, SKY)
    channel = _channel_index(shape, pattern)
    colour = np.ones((len(x), 3)) if colour is None else colour
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    half = int(np.ceil(5 * fwhm)) + 2
    for x0, y0, f, col in zip(x, y, flux, colour):
        xc, yc = int(round(x0)), int(round(y0))
        r0, r1 = max(0, yc - half), min(shape[0], yc + half + 1)
        c0, c1 = max(0, xc - half), min(shape[1], xc + half + 1)
        yy = (np.arange(r0, r1)[:, None] + sub).ravel() - y0
        xx = (np.arange(c0, c1)[:, None] + sub).ravel() - x0
        r2 = xx[None, :] ** 2 + (yy[:, None] / axis_ratio) ** 2
        if beta is None:
            sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
            density = np.exp(-0.5 * r2 / sigma**2) / (2 * np.pi * sigma**2)
        else:
            alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
            density = (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** -beta
        density /= axis_ratio
        pixels = density.reshape(r1 - r0, SUPERSAMPLE, c1 - c0, SUPERSAMPLE).mean(axis=(1, 3))
        image[r0:r1, c0:c1] += f * pixels * col[channel[r0:r1, c0:c1]]
    if noise:
        rng = np.random.default_rng(seed)
        image = rng.poisson(image).astype(float) + rng.normal(0.0, READ_NOISE, shape)
    return image


def _to_uint16(image: np.ndarray) -> np.ndarray:
    """Digitise like the camera: round and clip to 0..65535."""
    return np.clip(np.rint(image), 0, 65535).astype(np.uint16)


def _grid_stars(shape, spacing, rng, offset=None, margin=24):
    """Star positions on a grid (well separated), with random or given sub-pixel offsets."""
    gy, gx = np.mgrid[margin : shape[0] - margin : spacing, margin : shape[1] - margin : spacing]
    x, y = gx.ravel().astype(float), gy.ravel().astype(float)
    if offset is None:
        x += rng.uniform(-4, 4, x.size)
        y += rng.uniform(-4, 4, y.size)
    else:  # odd integer + the given fraction, to pin the half-resolution -> full-resolution mapping
        x = 2 * np.floor(x / 2) + 1 + offset[0]
        y = 2 * np.floor(y / 2) + 1 + offset[1]
    return x, y


def _match(stars: StarList, x: np.ndarray, y: np.ndarray, radius: float = 1.5):
    """Index of the nearest true star for each detection, and whether it lies within ``radius``."""
    d = np.hypot(stars.x[:, None] - x[None, :], stars.y[:, None] - y[None, :])
    nearest = d.argmin(axis=1) if d.size else np.zeros(0, np.intp)
    return nearest, (d.min(axis=1) < radius) if d.size else np.zeros(0, bool)


# ----------------------------------------------------------------------------------------- luminance proxy


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_proxy_is_mean_of_the_two_greens(pattern):
    rng = np.random.default_rng(3)
    mosaic = rng.integers(0, 65536, (9, 13), dtype=np.uint16)  # odd sizes: last row/column dropped
    channel = _channel_index(mosaic.shape, pattern)
    proxy = luminance_proxy(mosaic, pattern)
    assert proxy.shape == (4, 6) and proxy.dtype == np.float32
    for i in range(4):
        for j in range(6):
            cell, colours = mosaic[2 * i : 2 * i + 2, 2 * j : 2 * j + 2], channel[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            assert proxy[i, j] == pytest.approx(cell[colours == 1].astype(float).mean(), abs=1e-3)
    assert np.array_equal(luminance_proxy(mosaic.astype(np.float32), pattern.lower()), proxy)


def test_proxy_mono_bins_2x2_and_bad_input_raises():
    mosaic = np.arange(24, dtype=np.float32).reshape(4, 6)
    expected = mosaic.reshape(2, 2, 3, 2).mean(axis=(1, 3))
    assert np.array_equal(luminance_proxy(mosaic, None), expected)
    with pytest.raises(ValueError, match="Bayer pattern"):
        luminance_proxy(mosaic, "RGBG")
    with pytest.raises(ValueError, match="2-D"):
        luminance_proxy(np.zeros((3, 4, 4)), "RGGB")
    with pytest.raises(ValueError, match="threshold_sigma"):
        detect_stars(np.zeros((64, 64)), "RGGB", threshold_sigma=0)


# ----------------------------------------------------------------------------------------- positions


@pytest.mark.parametrize("pattern", [*BAYER_PATTERNS, None])
@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.5, 0.5), (0.25, -0.75), (1.0, 0.5)])
def test_centroids_in_full_resolution_coordinates(pattern, offset):
    rng = np.random.default_rng(11)
    shape = (384, 512)
    x, y = _grid_stars(shape, 52, rng, offset)
    flux = rng.uniform(3e4, 2.5e5, x.size)  # bright: peak 40x to 400x the sky noise, none saturated
    colour = np.column_stack([rng.uniform(0.4, 1.6, x.size), np.ones(x.size), rng.uniform(0.4, 1.6, x.size)])
    image = _to_uint16(_render(shape, x, y, flux, 2.8, pattern=pattern, colour=colour, seed=5))
    stars = detect_stars(image, pattern)
    nearest, ok = _match(stars, x, y)
    assert ok.all(), "every detection is a planted star"
    assert len(stars) == x.size, "every planted star is found"
    dx, dy = stars.x - x[nearest], stars.y - y[nearest]
    assert np.sqrt(np.mean(dx**2)) < 0.05 and np.sqrt(np.mean(dy**2)) < 0.05
    assert abs(dx.mean()) < 0.02 and abs(dy.mean()) < 0.02  # a half-pixel mapping error would show here
    assert not stars.saturated.any()


def test_flux_order_and_aperture_flux():
    rng = np.random.default_rng(2)
    shape = (384, 512)
    x, y = _grid_stars(shape, 72, rng)
    flux = 2e5 * 0.9 ** np.arange(x.size)  # distinct fluxes, 10 % apart, down to about 6000
    rng.shuffle(flux)
    stars = detect_stars(_to_uint16(_render(shape, x, y, flux, 3.0, seed=8)), "GRBG")
    nearest, ok = _match(stars, x, y)
    assert ok.all() and len(stars) == x.size
    assert stars.n_trails == 0  # stars alone never look like a trail
    assert np.all(np.diff(stars.flux) <= 0), "sorted by measured flux, brightest first"
    bright = flux[nearest] > 2e4  # aperture-flux noise (about 350 ADU) is far below the 10 % steps
    order = np.argsort(-flux)
    assert np.array_equal(nearest[bright], order[flux[order] > 2e4]), "the order is that of the planted fluxes"
    assert np.all(np.abs(stars.flux[bright] / flux[nearest][bright] - 1) < 0.05)


# ----------------------------------------------------------------------------------------- shape


@pytest.mark.parametrize("pattern", ["RGGB", None])
@pytest.mark.parametrize(
    "fwhm, beta",
    [(2.2, None), (3.0, None), (4.5, None), (2.8, 3.0), (3.5, 4.0), (4.0, 2.5)],
    ids=["gauss2.2", "gauss3.0", "gauss4.5", "moffat2.8b3", "moffat3.5b4", "moffat4.0b2.5"],
)
def test_fwhm_of_gaussian_and_moffat_stars(pattern, fwhm, beta):
    rng = np.random.default_rng(4)
    shape = (384, 512)
    x, y = _grid_stars(shape, 64, rng)
    flux = rng.uniform(3e4, 2e5, x.size)
    stars = detect_stars(_to_uint16(_render(shape, x, y, flux, fwhm, pattern=pattern, beta=beta, seed=9)), pattern)
    assert len(stars) == x.size
    assert stars.median_fwhm == pytest.approx(fwhm, rel=0.10)
    assert np.all(np.abs(stars.fwhm / fwhm - 1) < 0.15)
    assert np.median(stars.roundness) > 0.9 and stars.median_eccentricity < 0.45


def test_roundness_of_elongated_stars():
    rng = np.random.default_rng(6)
    shape = (384, 512)
    x, y = _grid_stars(shape, 64, rng)
    flux = rng.uniform(5e4, 2e5, x.size)
    image = _render(shape, x, y, flux, 4.0, axis_ratio=0.7, seed=10)  # sigma_y = 0.7 sigma_x
    stars = detect_stars(_to_uint16(image), "RGGB")
    assert len(stars) == x.size
    assert np.median(stars.roundness) == pytest.approx(0.7, abs=0.05)
    assert stars.median_eccentricity == pytest.approx(np.sqrt(1 - 0.7**2), abs=0.05)


# ----------------------------------------------------------------------------------------- rejection


def _junk_frame(pattern: str, seed: int):
    """Stars plus hot pixels (all colours), cosmic rays (single hits, pairs, tracks) and a satellite trail."""
    rng = np.random.default_rng(seed)
    shape = (384, 512)
    x, y = _grid_stars(shape, 56, rng)
    flux = 10 ** rng.uniform(3.7, 5.3, x.size)
    colour = np.column_stack([rng.uniform(0.5, 1.5, x.size), np.ones(x.size), rng.uniform(0.5, 1.5, x.size)])
    image = _render(shape, x, y, flux, 2.8, pattern=pattern, beta=3.0, colour=colour, seed=seed)

    def far_from_stars(px, py, distance):
        return np.min(np.hypot(x - px, y - py)) >= distance

    junk = []
    while len(junk) < 200:  # hot pixels, 100 ADU (4 sigma) to saturated, in every colour
        px, py = int(rng.integers(2, shape[1] - 2)), int(rng.integers(2, shape[0] - 2))
        if far_from_stars(px, py, 14):
            image[py, px] += 10 ** rng.uniform(2, 5)
            junk.append((px, py))
    for kind in ["single", "pair", "pair", "track", "track", "track"]:  # cosmic rays
        while True:
            px, py = rng.uniform(20, shape[1] - 20), rng.uniform(20, shape[0] - 20)
            if far_from_stars(px, py, 24):
                break
        length = {"single": 0, "pair": 1, "track": rng.uniform(6, 16)}[kind]
        angle = rng.uniform(0, np.pi)
        for t in np.linspace(0, length, int(2 * length) + 1):
            cx, cy = int(round(px + t * np.cos(angle))), int(round(py + t * np.sin(angle)))
            image[cy, cx] += 10 ** rng.uniform(3, 4.5)
            junk.append((cx, cy))
    # satellite trail across the frame, Gaussian cross-section, with hot pixels sitting on it
    y_start, slope = rng.uniform(80, 300), rng.uniform(-0.3, 0.3)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    distance = ((rows - y_start) - slope * cols) / np.sqrt(1 + slope**2)
    image += rng.uniform(150, 1500) * np.exp(-0.5 * (distance / 1.3) ** 2)
    for cx in rng.integers(10, shape[1] - 10, 5):
        cy = int(round(y_start + slope * cx))
        if 0 <= cy < shape[0]:
            image[cy, cx] += 3000.0
            junk.append((cx, cy))
    return _to_uint16(image), x, y, flux, np.array(junk, float), (y_start, slope)


@pytest.mark.parametrize("seed", range(8))
def test_hot_pixels_cosmic_rays_and_trails_never_listed(seed):
    pattern = BAYER_PATTERNS[seed % 4]
    image, x, y, flux, junk, (y_start, slope) = _junk_frame(pattern, seed)
    stars = detect_stars(image, pattern)
    nearest, ok = _match(stars, x, y, radius=1.0)
    assert ok.all(), "only planted stars are listed"
    to_junk = np.hypot(stars.x[:, None] - junk[None, :, 0], stars.y[:, None] - junk[None, :, 1]).min(axis=1)
    assert np.all(to_junk > 3.0)
    to_trail = np.abs((stars.y - y_start) - slope * stars.x) / np.sqrt(1 + slope**2)
    assert np.all(to_trail > 3.0)
    assert stars.n_trails == 1  # the satellite trail is seen (and counted for the frame score)
    # the bright stars away from the trail are all still there
    clear = (flux > 3e4) & (np.abs((y - y_start) - slope * x) / np.sqrt(1 + slope**2) > 25)
    assert set(np.flatnonzero(clear)) <= set(nearest)


def test_saturated_star_listed_once_and_flagged():
    shape = (256, 256)
    x, y = np.array([100.3, 180.6]), np.array([90.7, 170.2])
    image = _to_uint16(_render(shape, x, y, np.array([5e6, 8e4]), 3.0, seed=1))
    assert (image == 65535).sum() > 4
    stars = detect_stars(image, "RGGB")
    assert len(stars) == 2
    assert list(stars.saturated) == [True, False]
    assert np.hypot(stars.x[0] - x[0], stars.y[0] - y[0]) < 0.1
    assert stars.xy(include_saturated=False).tolist() == [[stars.x[1], stars.y[1]]]
    assert len(detect_stars(image, "RGGB", saturation=None)) == 2
    assert not detect_stars(image, "RGGB", saturation=None).saturated.any()


# ----------------------------------------------------------------------------------------- degenerate frames


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((128, 160), np.uint16),
        np.full((128, 160), 1000, np.uint16),
        np.full((128, 160), 65535, np.uint16),
        np.full((128, 160), np.nan, np.float32),
        np.zeros((6, 6), np.uint16),
        np.zeros((0, 0), np.float32),
        _render((128, 160), np.zeros(0), np.zeros(0), np.zeros(0), 3.0, seed=3).astype(np.float32),
    ],
    ids=["zeros", "constant", "saturated", "all-nan", "tiny", "empty", "sky-only"],
)
def test_frames_without_stars_give_an_empty_list(image):
    stars = detect_stars(image, "RGGB")
    assert isinstance(stars, StarList) and len(stars) == 0
    assert stars.xy().shape == (0, 2)
    assert np.isnan(stars.median_fwhm) and np.isnan(stars.median_eccentricity)


def test_nan_pixels_are_invalid_not_fatal():
    rng = np.random.default_rng(7)
    shape = (384, 512)
    x, y = _grid_stars(shape, 64, rng)
    image = _render(shape, x, y, rng.uniform(3e4, 2e5, x.size), 3.0, seed=4).astype(np.float32)
    image[:, :150] = np.nan  # a masked stripe
    image[300, 400] = np.inf
    image[rng.integers(0, shape[0], 50), rng.integers(150, shape[1], 50)] = np.nan  # scattered bad pixels
    stars = detect_stars(image, "RGGB")
    nearest, ok = _match(stars, x, y, radius=0.5)
    assert ok.all()
    assert np.all(stars.x > 150)
    assert np.count_nonzero(x > 170) - len(stars) <= 3  # only stars touching a NaN pixel may be lost
    assert np.all(np.isfinite(stars.x)) and np.isfinite(stars.background) and np.isfinite(stars.noise)


# ----------------------------------------------------------------------------------------- API


def test_deterministic_and_dtype_independent():
    rng = np.random.default_rng(9)
    shape = (384, 512)
    x, y = _grid_stars(shape, 48, rng)
    image = _to_uint16(_render(shape, x, y, 10 ** rng.uniform(3.5, 5.3, x.size), 2.8, beta=3.0, seed=2))
    original = image.copy()
    first, second = detect_stars(image, "BGGR"), detect_stars(image.copy(), "BGGR")
    as_float = detect_stars(image.astype(np.float32), "BGGR")
    assert np.array_equal(image, original), "the input is not modified"
    assert len(first) > 20
    for other in (second, as_float):
        for name in ("x", "y", "flux", "fwhm", "roundness", "peak", "saturated"):
            assert np.array_equal(getattr(first, name), getattr(other, name)), name
        assert (first.background, first.noise) == (other.background, other.noise)


def test_max_stars_keeps_the_brightest_and_xy_layout():
    rng = np.random.default_rng(12)
    shape = (384, 512)
    x, y = _grid_stars(shape, 48, rng)
    flux = 10 ** rng.uniform(3.8, 5.3, x.size)
    image = _to_uint16(_render(shape, x, y, flux, 2.8, seed=6))
    everything = detect_stars(image, "RGGB")
    top = detect_stars(image, "RGGB", max_stars=10)
    assert len(top) == 10 and len(everything) > 10
    assert np.array_equal(top.xy(), everything.xy(10))
    xy = top.xy(5)
    assert xy.shape == (5, 2) and xy.dtype == np.float64
    assert np.array_equal(xy[:, 0], top.x[:5]) and np.array_equal(xy[:, 1], top.y[:5])
    nearest, _ = _match(top, x, y)
    assert np.array_equal(np.sort(nearest), np.sort(np.argsort(-flux)[:10]))
    assert top.background == pytest.approx(SKY, rel=0.01) and top.noise == pytest.approx(
        np.sqrt((SKY + READ_NOISE**2) / 2), rel=0.1
    )


@pytest.mark.slow
def test_full_size_frame():
    rng = np.random.default_rng(13)
    shape = (2180, 3856)
    x, y = rng.uniform(20, shape[1] - 20, 400), rng.uniform(20, shape[0] - 20, 400)
    flux = 10 ** rng.uniform(3.5, 5.5, x.size)
    stars = detect_stars(_to_uint16(_render(shape, x, y, flux, 2.8, beta=3.0, seed=14)), "RGGB")
    nearest, ok = _match(stars, x, y)
    assert ok.all()
    assert len(stars) >= 0.9 * x.size
    assert stars.median_fwhm == pytest.approx(2.8, rel=0.1)
