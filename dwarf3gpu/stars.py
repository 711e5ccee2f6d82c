"""Star detection and measurement on raw one-shot-colour (Bayer) mosaics.

Stars are *found* on a half-resolution luminance proxy (the mean of the two green pixels of every 2x2 Bayer
cell) and *measured* on the full-resolution mosaic: positions on every pixel, each colour against its own
local sky; flux and shape on the green pixels. Positions are in full-resolution mosaic pixels with the origin
at the centre of pixel (0, 0) (METHODS.md, "Conventions"). The method, the rejection criteria for hot pixels,
cosmic rays and trails are in METHODS.md, section "Star detection"; speed in benchmarks/RESULTS.md.

Examples
--------
>>> data, header = read_fits(path)  # doctest: +SKIP
>>> stars = detect_stars(data, header["BAYERPAT"])  # doctest: +SKIP
>>> xy = stars.xy(50)  # the 50 brightest stars as an (N, 2) [x, y] array for astroalign  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import cv2
import numpy as np

from .geometry import BAYER_PATTERNS
from .robust import MAD_TO_SIGMA

__all__ = ["StarList", "luminance_proxy", "detect_stars"]

GAUSS_SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))
"""FWHM of a Gaussian in units of its standard deviation (2.3548)."""

DETECT_KERNEL_SIGMA = 1.0
"""Standard deviation (proxy pixels) of the Gaussian matched filter used for detection (7x7 kernel)."""

RING_FRACTION = 0.25
"""Ring test: the 8 proxy neighbours of a peak must together hold at least this fraction of the peak ..."""

RING_SIGMA = 4.0
"""... and be positive at this many sigma of their summed noise (rejects hot pixels and one-pixel hits)."""

TRAIL_MIN_SIGMA = 8.0
"""A detection footprint whose major-axis standard deviation is at least this many proxy pixels (a line
of 28 proxy = 55 full-resolution pixels or longer) ..."""

TRAIL_MAX_AXIS_RATIO = 0.3
"""... whose minor/major axis ratio is at most this ..."""

TRAIL_MAX_WIDTH_SIGMA = 5.0
"""... and whose minor-axis standard deviation is at most this many proxy pixels (a band at most ~17 proxy =
35 full-resolution pixels wide: a satellite trail is as wide as the PSF, an inclined galaxy's footprint is
far wider) is a trail: no star is taken from it, and it counts in ``StarList.n_trails``."""

WINDOW_PER_SIGMA = 1.1
"""Measuring window: Gaussian of this many times the frame's median star sigma (Gaussian-equivalent), at least
:data:`MIN_WINDOW`. Near the noise optimum of a faint star (1 for a Gaussian); a narrower window also takes in
less light of neighbouring stars."""

MIN_WINDOW = 1.5
"""Smallest measuring window, full-resolution pixels: a narrower one samples an undersampled star (FWHM near
2 px) too coarsely (position errors of 0.02-0.06 px that depend on the sub-pixel phase)."""

COLOUR_BALANCE_NOISE = 10.0
"""Centroids use every pixel of a Bayer frame, with the red and blue sites weighted so that their window sums
match (see :func:`_all_colours`). A star's red / blue ratio is taken as ``(S_1 + k n) / (S_2 + k n)``, with
``S_1``, ``S_2`` the window sums of the two colours (negative ones count as 0), ``n`` the noise of one such sum
and ``k`` this value: faint stars, whose ratio is noise, keep equal weights."""

COLOUR_BALANCE_LIMIT = 4.0
"""The red / blue ratio of the balance is clipped to [1/4, 4] (weights 0.5 to 2): beyond, the weaker colour's
noise would cost more than its aliasing."""

SPIKE_RATIO = 6.0
"""Spike test of the centroid pixels (hot pixels, cosmic-ray hits): a pixel above this many times the brightest
of its 8 neighbours (all above the local sky) plus :data:`SPIKE_SIGMA` times the pixel noise is replaced by the
mean of its neighbours. A star of FWHM 2 px or more peaks at most about 4 times its brightest neighbour, whatever
its colour; a hot pixel is a single bright pixel."""

SPIKE_SIGMA = 5.0
"""See :data:`SPIKE_RATIO`."""

RELATIVE_FWHM = (0.5, 2.0)
"""Accepted FWHM range relative to the frame's median (applied once 5 unsaturated stars are accepted)."""

MIN_CORE_SPREAD = 0.1
"""Core test (hot pixels on extended light): the four diagonal neighbours of a star's brightest green pixel
(green too, in every Bayer pattern) must hold on average at least this fraction of that pixel, both above the
local sky. A star of FWHM 2 px centred on the pixel gives 0.25 (Gaussian) to 0.29 (Moffat beta 3); a hot pixel
about 0, even on a galaxy or in the wing of a neighbouring star, where it passes the ring test."""

_PIXEL_VARIANCE = 1.0 / 12.0  # variance of the response of one 1x1 pixel, removed from the moments
_CLIP_SIGMA = 3.0  # sigma clipping of the background boxes
_CLIP_ITERATIONS = 3
_BOX_SAMPLES = 24  # samples per box side used for the background statistics
_INITIAL_WINDOW = 2.0  # full-res px: window sigma of the first measuring pass
_CALIBRATION_STARS = 64  # brightest candidates measured in the first pass to size the window
_CENTROID_ITERATIONS = 12
_PROFILE_STARS = 32  # brightest unsaturated stars pooled into the frame's radial profile
_PROFILE_MIN_STARS = 3
_PROFILE_MIN_PEAK_SIGMA = 20.0  # a pooled star's peak, in units of the pixel noise
_PROFILE_BIN = 0.1  # radial bin of the pooled profile, in units of the star sigma


def _offsets(radius: int, *, exclude_centre: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) offsets of the (2 radius + 1)^2 neighbourhood, optionally without (0, 0)."""
    dr, dc = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    keep = ~((dr == 0) & (dc == 0)) if exclude_centre else np.ones(dr.shape, bool)
    return dr[keep], dc[keep]


_NEIGHBOURS_3 = _offsets(1, exclude_centre=True)
_PATCH_3 = _offsets(1, exclude_centre=False)
_EARLIER = (np.array([-1, -1, -1, 0]), np.array([-1, 0, 1, -1]))  # 3x3 neighbours earlier in raster order


@dataclass(frozen=True)
class StarList:
    """Stars of one frame, sorted by flux (brightest first).

    Attributes
    ----------
    x, y : numpy.ndarray
        float64 centroids in full-resolution mosaic pixels (x = column, y = row, origin at the centre of
        pixel (0, 0)).
    flux : numpy.ndarray
        Background-subtracted aperture flux in green-equivalent ADU summed over full-resolution pixels: the
        green pixels' sum times (pixels in the aperture / green pixels in the aperture); for a mono frame
        the plain sum.
    fwhm : numpy.ndarray
        FWHM in full-resolution pixels: the Gaussian-equivalent ``2.3548 * sqrt((a**2 + b**2) / 2)`` from the
        star's covariance (eigenvalues ``a**2 >= b**2``, pixel response removed), scaled by the frame's
        profile factor so that non-Gaussian (Moffat) stars get their true FWHM (METHODS.md).
    roundness : numpy.ndarray
        Axis ratio ``b / a`` in (0, 1]; 1 is round.
    peak : numpy.ndarray
        Highest background-subtracted green (mono: any) pixel of the star, ADU.
    saturated : numpy.ndarray
        bool; True when a mosaic pixel of any colour inside the aperture reaches the saturation level.
        Flux, peak and FWHM of saturated stars are lower bounds; their centroids remain usable.
    background : float
        Median sky level of the luminance proxy, ADU (NaN when the frame has no valid pixel).
    noise : float
        Median sky noise of one proxy pixel (1.4826 MAD), ADU.
    n_trails : int
        Satellite or aircraft trails seen in the frame (long, thin detection footprints); no star is taken
        from them.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    roundness: np.ndarray
    peak: np.ndarray
    saturated: np.ndarray
    background: float
    noise: float
    n_trails: int = 0

    def __len__(self) -> int:
        """Number of stars."""
        return int(self.x.size)

    def xy(self, n: int | None = None, *, include_saturated: bool = True) -> np.ndarray:
        """Return the brightest stars as an ``(N, 2)`` float64 array of ``[x, y]`` (astroalign's layout).

        Parameters
        ----------
        n : int, optional
            Keep at most the ``n`` brightest stars; all when omitted.
        include_saturated : bool, default True
            Keep saturated stars (their centroids are usable, their fluxes are not).

        Returns
        -------
        numpy.ndarray
            ``(N, 2)`` array, brightest first.
        """
        keep = np.ones(len(self), bool) if include_saturated else ~self.saturated
        xy = np.column_stack([self.x[keep], self.y[keep]])
        return xy if n is None else xy[:n]

    @property
    def eccentricity(self) -> np.ndarray:
        """Eccentricity ``sqrt(1 - (b / a)**2)`` of every star (0 is round)."""
        return np.sqrt(1.0 - self.roundness**2)

    def _reference(self) -> np.ndarray:
        """The unsaturated stars among the brightest half (the faint ones' shapes are noise-dominated)."""
        return ~self.saturated & (np.arange(len(self)) < (len(self) + 1) // 2)

    @property
    def median_fwhm(self) -> float:
        """Median FWHM (full-resolution pixels) of the unsaturated stars among the brightest half of the list.

        NaN when there is none.
        """
        good = self._reference()
        return float(np.median(self.fwhm[good])) if good.any() else float("nan")

    @property
    def median_eccentricity(self) -> float:
        """Median eccentricity of the unsaturated stars among the brightest half of the list; NaN if none."""
        good = self._reference()
        return float(np.median(self.eccentricity[good])) if good.any() else float("nan")

    @classmethod
    def empty(cls, background: float = float("nan"), noise: float = float("nan"), n_trails: int = 0) -> StarList:
        """Return an empty list (a frame without stars)."""
        none = np.zeros(0)
        return cls(none, none, none, none, none, none, np.zeros(0, bool), float(background), float(noise), n_trails)


def _green_offsets(bayer_pattern: str | None) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Return the (row, col) offsets of the two greens in a 2x2 cell, or None for a mono frame."""
    if bayer_pattern is None:
        return None
    pattern = str(bayer_pattern).strip().upper()
    if pattern not in BAYER_PATTERNS:
        raise ValueError(f"unknown Bayer pattern {bayer_pattern!r}: expected one of {', '.join(BAYER_PATTERNS)} "
                         "or None for a mono frame")
    greens = [(r, c) for r in (0, 1) for c in (0, 1) if pattern[2 * r + c] == "G"]
    return greens[0], greens[1]


def luminance_proxy(mosaic: np.ndarray, bayer_pattern: str | None) -> np.ndarray:
    """Half-resolution luminance proxy of a raw frame: the mean of the two greens of every 2x2 cell.

    Proxy pixel ``(i, j)`` is built from mosaic rows ``2i, 2i+1`` and columns ``2j, 2j+1``. In every Bayer
    pattern the two greens lie on a diagonal of the cell, so their mean position, which is the centre of the
    proxy pixel, is the mosaic coordinate ``(x, y) = (2j + 0.5, 2i + 0.5)``. An odd last row or column is
    dropped.

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw frame, uint16 or float.
    bayer_pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'} or None
        Colour filter layout (FITS ``BAYERPAT``, case-insensitive); None for a mono frame, which is binned
        2x2 (mean of the four pixels) so that mono and colour frames share one geometry.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(H // 2, W // 2)``; NaN where an input pixel used is NaN.

    Raises
    ------
    ValueError
        If ``mosaic`` is not 2-D or the pattern is unknown.
    """
    if mosaic.ndim != 2:
        raise ValueError(f"expected a 2-D raw mosaic, got an array of shape {mosaic.shape}")
    greens = _green_offsets(bayer_pattern)
    h, w = (mosaic.shape[0] // 2) * 2, (mosaic.shape[1] // 2) * 2
    cells = [(r, c) for r in (0, 1) for c in (0, 1)] if greens is None else list(greens)
    planes = [mosaic[r:h:2, c:w:2] for r, c in cells]
    out = np.add(planes[0], planes[1], dtype=np.float32)
    for plane in planes[2:]:
        np.add(out, plane, out=out, dtype=np.float32)
    out *= np.float32(1.0 / len(planes))
    return out


def _background(proxy: np.ndarray, box: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Background and noise of the proxy on a coarse grid of boxes, from sigma-clipped statistics.

    The image is cut into boxes of about ``box x box`` pixels; a regular grid of up to 24 x 24 pixels of each
    box is sorted once and clipped three times at ``median +- 3 sigma`` (sigma from the interquartile range
    of the kept values). The box level is the clipped median, the box noise 1.4826 times the clipped median
    absolute deviation. Both grids are median-filtered 3x3 so that a bright star or a small nebula does not
    pull its box. NaN pixels are ignored; a box with fewer than a quarter valid samples takes the median of
    the others. :func:`_to_map` interpolates a grid to every pixel.

    Returns
    -------
    levels, sigmas : numpy.ndarray
        float32 grids of box levels and noises, shape (round(h / box), round(w / box)), at least 1x1.
    background, noise : float
        Medians over the boxes; NaN when the image holds no valid pixel.
    """
    h, w = proxy.shape
    ny, nx = max(1, round(h / box)), max(1, round(w / box))
    sy, sx = min(_BOX_SAMPLES, h // ny), min(_BOX_SAMPLES, w // nx)
    rows = ((np.arange(ny)[:, None] + (np.arange(sy) + 0.5) / sy) * (h / ny)).astype(np.intp)
    cols = ((np.arange(nx)[:, None] + (np.arange(sx) + 0.5) / sx) * (w / nx)).astype(np.intp)
    s = np.sort(proxy[rows[:, None, :, None], cols[None, :, None, :]].reshape(ny * nx, sy * sx), axis=1)
    n_valid = np.count_nonzero(~np.isnan(s), axis=1)  # NaN sorts last
    box_index, rank = np.arange(s.shape[0]), np.arange(s.shape[1])
    lo, hi = np.zeros_like(n_valid), n_valid

    def clipped_median() -> tuple[np.ndarray, np.ndarray]:
        n = np.maximum(hi - lo, 1)
        median = 0.5 * (s[box_index, lo + (n - 1) // 2] + s[box_index, lo + n // 2])
        return median, n

    for _ in range(_CLIP_ITERATIONS):
        median, n = clipped_median()
        sigma = (s[box_index, lo + (3 * n) // 4] - s[box_index, lo + n // 4]) / 1.349
        lo = np.count_nonzero(s < (median - _CLIP_SIGMA * sigma)[:, None], axis=1)
        hi = np.count_nonzero(s <= (median + _CLIP_SIGMA * sigma)[:, None], axis=1)
    median, n = clipped_median()
    kept = (rank >= lo[:, None]) & (rank < hi[:, None])
    dev = np.sort(np.where(kept, np.abs(s - median[:, None]), np.inf), axis=1)
    sigma = MAD_TO_SIGMA * 0.5 * (dev[box_index, (n - 1) // 2] + dev[box_index, n // 2])
    good = n_valid >= max(1, s.shape[1] // 4)
    if not good.any():
        return np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.float32), float("nan"), float("nan")
    levels = np.where(good, median, np.median(median[good])).astype(np.float32).reshape(ny, nx)
    sigmas = np.where(good, sigma, np.median(sigma[good])).astype(np.float32).reshape(ny, nx)
    if ny >= 3 and nx >= 3:
        levels, sigmas = cv2.medianBlur(levels, 3), cv2.medianBlur(sigmas, 3)
    return levels, sigmas, float(np.median(levels)), float(np.median(sigmas))


def _to_map(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of a box grid to every pixel, box centres as nodes (constant beyond them)."""
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def _candidates(resid: np.ndarray, sigmas: np.ndarray, threshold_sigma: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Peaks of the matched-filtered proxy above the threshold that pass the trail and ring tests.

    Parameters
    ----------
    resid : numpy.ndarray
        Background-subtracted proxy (invalid pixels set to 0).
    sigmas : numpy.ndarray
        Grid of the proxy's noise per box (see :func:`_background`).
    threshold_sigma : float
        Detection threshold in units of the filtered image's noise.

    Returns
    -------
    rows, cols : numpy.ndarray
        Proxy-pixel positions, sorted by filtered value (descending; ties by position).
    n_trails : int
        Trail footprints seen in the frame (see :func:`_on_trail`).
    """
    h, w = resid.shape
    kernel = cv2.getGaussianKernel(7, DETECT_KERNEL_SIGMA, cv2.CV_32F)
    kernel_norm = float(np.sum(kernel**2))  # = sqrt(sum of the squared 2-D kernel): noise gain of the filter
    filt = cv2.sepFilter2D(resid, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REPLICATE)
    threshold_map = _to_map(sigmas * np.float32(threshold_sigma * kernel_norm), resid.shape)
    above = filt > threshold_map
    # peaks: the maximum of their 5x5 neighbourhood, the first in raster order on a plateau
    r, c = np.divmod(np.flatnonzero(above & (filt >= cv2.dilate(filt, np.ones((5, 5), np.uint8)))), w)
    inside = (r >= 2) & (r < h - 2) & (c >= 2) & (c < w - 2)
    r, c = r[inside], c[inside]
    value = filt[r, c]
    keep = (filt[r[:, None] + _EARLIER[0], c[:, None] + _EARLIER[1]] != value[:, None]).all(axis=1)
    on_trail, n_trails = _on_trail(above, r, c)
    keep &= ~on_trail
    r, c, value = r[keep], c[keep], value[keep]
    peak = resid[r, c]
    ring = resid[r[:, None] + _NEIGHBOURS_3[0], c[:, None] + _NEIGHBOURS_3[1]].sum(axis=1)
    noise = threshold_map[r, c] / (threshold_sigma * kernel_norm)
    extended = (ring >= RING_FRACTION * peak) & (ring >= RING_SIGMA * np.sqrt(8.0) * noise)
    r, c, value = r[extended], c[extended], value[extended]
    order = np.lexsort((c, r, -value))
    return r[order], c[order], n_trails


def _on_trail(above: np.ndarray, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, int]:
    """Flag the peaks ``(r, c)`` that lie on a satellite or aircraft trail.

    A trail is a connected component (8-connected) of the detection mask ``above`` whose footprint has a
    major-axis standard deviation of at least :data:`TRAIL_MIN_SIGMA`, a minor/major axis ratio of at
    most :data:`TRAIL_MAX_AXIS_RATIO` and a minor-axis standard deviation of at most
    :data:`TRAIL_MAX_WIDTH_SIGMA` (unweighted second moments of its pixels). A peak is on the trail
    when it lies within ``2 sigma_minor + 1.5`` pixels of the footprint's major axis, so a star that only
    touches a trail keeps its place.

    Parameters
    ----------
    above : numpy.ndarray
        bool detection mask of the proxy.
    r, c : numpy.ndarray
        Rows and columns of the peaks.

    Returns
    -------
    on_trail : numpy.ndarray
        bool per peak.
    n_trails : int
        Number of trail footprints in the frame.
    """
    n_labels, labels = cv2.connectedComponents(above.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    rows, cols = np.divmod(np.flatnonzero(above), above.shape[1])
    label = labels[rows, cols]
    n = np.maximum(np.bincount(label, minlength=n_labels), 1).astype(np.float64)
    x, y = cols.astype(np.float64), rows.astype(np.float64)
    mx, my = np.bincount(label, x, n_labels) / n, np.bincount(label, y, n_labels) / n
    vxx = np.bincount(label, x * x, n_labels) / n - mx**2
    vyy = np.bincount(label, y * y, n_labels) / n - my**2
    vxy = np.bincount(label, x * y, n_labels) / n - mx * my
    mean = 0.5 * (vxx + vyy)
    spread = np.sqrt(0.25 * (vxx - vyy) ** 2 + vxy**2)
    major, minor = mean + spread, np.maximum(mean - spread, 0.0)
    trail = (major >= TRAIL_MIN_SIGMA**2) & (minor <= TRAIL_MAX_AXIS_RATIO**2 * major) & (minor <= TRAIL_MAX_WIDTH_SIGMA**2)
    k = labels[r, c]
    angle = 0.5 * np.arctan2(2.0 * vxy[k], vxx[k] - vyy[k])  # direction of the major axis
    distance = np.abs((r - my[k]) * np.cos(angle) - (c - mx[k]) * np.sin(angle))
    return trail[k] & (distance <= 2.0 * np.sqrt(minor[k]) + 1.5), int(np.count_nonzero(trail[1:]))


@dataclass(frozen=True)
class _Stamps:
    """Square mosaic stamps around a set of positions.

    Attributes
    ----------
    rows, cols : numpy.ndarray
        (N, S) mosaic row and column of every stamp row / column (may lie off the frame).
    raw : numpy.ndarray
        (N, S, S) mosaic values (edge-clamped off the frame).
    data : numpy.ndarray
        float32 copy of ``raw``.
    usable : numpy.ndarray
        (N, S, S) bool: on the frame and finite.
    sampled : numpy.ndarray
        (N, S, S) bool: a green pixel (every pixel of a mono frame).
    """

    rows: np.ndarray
    cols: np.ndarray
    raw: np.ndarray
    data: np.ndarray
    usable: np.ndarray
    sampled: np.ndarray

    @classmethod
    def cut(cls, mosaic: np.ndarray, x: np.ndarray, y: np.ndarray, half: int, green_parity: int | None) -> _Stamps:
        """Cut ``(2 half + 1)^2`` stamps centred on the pixels nearest to ``(x, y)``.

        Mosaic pixel (r, c) is green when ``r + c + green_parity`` is even; None samples every pixel.
        """
        height, width = mosaic.shape
        d = np.arange(-half, half + 1)
        rows, cols = np.rint(y).astype(np.intp)[:, None] + d, np.rint(x).astype(np.intp)[:, None] + d
        usable = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        raw = mosaic[np.clip(rows, 0, height - 1)[:, :, None], np.clip(cols, 0, width - 1)[:, None, :]]
        data = raw.astype(np.float32)
        if raw.dtype.kind == "f":
            usable &= np.isfinite(data)
        if green_parity is None:
            sampled = np.ones(data.shape, bool)
        else:
            sampled = (rows[:, :, None] + cols[:, None, :] + green_parity) % 2 == 0
        return cls(rows, cols, raw, data, usable, sampled)


@dataclass(frozen=True)
class _Measurement:
    """Per-candidate results of :func:`_measure` (arrays of one length)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    peak: np.ndarray
    sky: np.ndarray
    saturated: np.ndarray
    cov: np.ndarray  # (N, 3) xx, yy, xy covariance of the sampled star (pixel response included)
    fwhm: np.ndarray  # Gaussian-equivalent, pixel response removed
    fwhm_minor: np.ndarray
    roundness: np.ndarray
    core_spread: np.ndarray  # mean of the 4 diagonal neighbours of the brightest green pixel / that pixel
    ok: np.ndarray  # window converged, shape positive definite, aperture complete, flux positive

    def take(self, index: np.ndarray) -> _Measurement:
        """Rows ``index`` (bool mask or integer array)."""
        return _Measurement(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(parts: list[_Measurement]) -> _Measurement:
        """Concatenate measurements."""
        names = [f.name for f in fields(_Measurement)]
        return _Measurement(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in names})


def _sky(data: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of each stamp's samples where ``use`` is set.

    Parameters
    ----------
    data : numpy.ndarray
        (N, h, w) stamps.
    use : numpy.ndarray
        bool mask broadcastable to ``data``.

    Returns
    -------
    level : numpy.ndarray
        (N,) medians, 0 for a stamp without samples.
    found : numpy.ndarray
        (N,) bool: the stamp had samples.
    """
    n = data.shape[0]
    samples = np.sort(np.where(use, data, np.inf).reshape(n, -1), axis=1)
    count = np.count_nonzero(np.isfinite(samples), axis=1)
    idx = np.arange(n)
    found = count > 0
    level = 0.5 * (samples[idx, np.maximum(count - 1, 0) // 2] + samples[idx, count // 2])
    return np.where(found, level, 0.0), found


def _despike(light: np.ndarray, usable: np.ndarray, pixel_noise: float) -> np.ndarray:
    """Replace single-pixel spikes of sky-subtracted stamps by the mean of their usable neighbours.

    A pixel is a spike when it exceeds ``SPIKE_RATIO * max(brightest neighbour, 0) + SPIKE_SIGMA * pixel_noise``
    (see :data:`SPIKE_RATIO`); its 8 neighbours are taken within the stamp.

    Parameters
    ----------
    light : numpy.ndarray
        (N, S, S) sky-subtracted stamps.
    usable : numpy.ndarray
        (N, S, S) bool: pixels on the frame and finite.
    pixel_noise : float
        Sky noise of one pixel.

    Returns
    -------
    numpy.ndarray
        The stamps with spikes replaced (a new array).
    """
    size = light.shape[1]
    values = np.pad(np.where(usable, light, 0.0), ((0, 0), (1, 1), (1, 1)))
    valid = np.pad(usable, ((0, 0), (1, 1), (1, 1)))
    brightest = np.full(light.shape, -np.inf, np.float32)
    total = np.zeros(light.shape, np.float32)
    count = np.zeros(light.shape, np.float32)
    for dr, dc in zip(*_NEIGHBOURS_3):
        view = (slice(None), slice(1 + dr, 1 + dr + size), slice(1 + dc, 1 + dc + size))
        brightest = np.maximum(brightest, np.where(valid[view], values[view], -np.inf))
        total += values[view]
        count += valid[view]
    spike = usable & (light > SPIKE_RATIO * np.maximum(brightest, 0.0) + SPIKE_SIGMA * pixel_noise)
    return np.where(spike, total / np.maximum(count, 1.0), light)


def _all_colours(
    st: _Stamps, annulus: np.ndarray, x0: np.ndarray, y0: np.ndarray, window: float, green_parity: int,
    pixel_noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel of Bayer stamps, each colour against its own local sky, red and blue balanced.

    Stamp rows (columns) ``a::2`` share one parity, so each of the four sub-grids ``[a::2, b::2]`` holds one
    colour site of the 2x2 cell. Each sub-grid's sky is the median of its samples in ``annulus``. Hot pixels
    and cosmic-ray hits, which the luminance proxy never sees in red and blue, are then removed
    (:func:`_despike`). The two green sub-grids keep weight 1; the other two (red and blue, in either order)
    get ``q**-0.5`` and ``q**0.5``, with ``q`` the ratio of their window sums about ``(x0, y0)`` (see
    :data:`COLOUR_BALANCE_NOISE`, :data:`COLOUR_BALANCE_LIMIT`), so that both contribute equally. Why: each
    colour samples the star on a 2-pixel lattice, whose aliasing moves a windowed centroid by an amount that
    depends on the sub-pixel phase (about 0.01 px at FWHM 2.8). Red and blue sit one pixel apart along both
    axes, as do the two greens, so the aliasing of each pair cancels along x and y when its two members weigh
    the same; what remains is the greens' quincunx term, far smaller.

    Returns
    -------
    light : numpy.ndarray
        (N, S, S) float32 sky-subtracted, weighted stamps (0 where not usable).
    found : numpy.ndarray
        (N,) bool: every sub-grid had sky samples.
    """
    n = st.data.shape[0]
    light = np.zeros(st.data.shape, np.float32)
    found = np.ones(n, bool)
    for a in (0, 1):
        for b in (0, 1):
            cell = (slice(None), slice(a, None, 2), slice(b, None, 2))
            level, has_sky = _sky(st.data[cell], st.usable[cell] & annulus[cell[1:]])
            found &= has_sky
            light[cell] = np.where(st.usable[cell], st.data[cell] - level[:, None, None].astype(np.float32), 0.0)
    light = _despike(light, st.usable, pixel_noise)
    window_sums = []
    for a in (0, 1):
        for b in (0, 1):
            wy = np.exp(-0.5 * ((st.rows[:, a::2] - y0[:, None]) / window) ** 2)
            wx = np.exp(-0.5 * ((st.cols[:, b::2] - x0[:, None]) / window) ** 2)
            window_sums.append(np.einsum("nr,nrc,nc->n", wy, light[:, a::2, b::2], wx))
    # sub-grids (0, 0) and (1, 1) are both green or both not; the other pair is the opposite
    diagonal_green = (st.rows[:, 0] + st.cols[:, 0] + green_parity) % 2 == 0
    first = np.where(diagonal_green, window_sums[1], window_sums[0])  # (0, 1) or (0, 0)
    second = np.where(diagonal_green, window_sums[2], window_sums[3])  # (1, 0) or (1, 1)
    shrink = COLOUR_BALANCE_NOISE * pixel_noise * window * np.sqrt(np.pi) / 2.0  # x noise of a window sum
    ratio = (np.maximum(first, 0.0) + shrink) / (np.maximum(second, 0.0) + shrink)
    ratio = np.clip(ratio, 1.0 / COLOUR_BALANCE_LIMIT, COLOUR_BALANCE_LIMIT)
    w_first, w_second = (ratio**-0.5).astype(np.float32), (ratio**0.5).astype(np.float32)
    one = np.float32(1.0)
    weights = [np.where(diagonal_green, one, w_first), np.where(diagonal_green, w_first, one),
               np.where(diagonal_green, w_second, one), np.where(diagonal_green, one, w_second)]
    for (a, b), weight in zip(((0, 0), (0, 1), (1, 0), (1, 1)), weights):
        light[:, a::2, b::2] *= weight[:, None, None]
    return light, found


def _measure(
    mosaic: np.ndarray, x0: np.ndarray, y0: np.ndarray, window: float, green_parity: int | None,
    saturation: float | None, pixel_noise: float,
) -> _Measurement:
    """Windowed centroids, Gaussian-equivalent shapes and aperture fluxes on the full-resolution mosaic.

    The centroid uses every pixel (:func:`_all_colours`); sky, flux, peak and shape use the green pixels
    (every pixel of a mono frame).

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw frame.
    x0, y0 : numpy.ndarray
        Starting positions, full-resolution pixels.
    window : float
        Standard deviation of the circular Gaussian window, full-resolution pixels; the aperture radius is
        three times this and the local sky is the median of the samples beyond the aperture (+1 px).
    green_parity : int or None
        See :meth:`_Stamps.cut`.
    saturation : float or None
        Saturation level of the raw pixels.
    pixel_noise : float
        Sky noise of one raw pixel (sets the red / blue balance of faint stars, see :func:`_all_colours`).
    """
    r_ap = 3.0 * window
    half = int(np.ceil(r_ap)) + 3
    st = _Stamps.cut(mosaic, x0, y0, half, green_parity)
    valid = st.sampled & st.usable
    n = len(x0)
    d = np.arange(-half, half + 1)
    annulus = (d[:, None] ** 2 + d[None, :] ** 2) > (r_ap + 1.0) ** 2
    sky, ok = _sky(st.data, valid & annulus)
    image = np.where(valid, st.data - sky[:, None, None].astype(np.float32), np.float32(0.0))
    light = image
    if green_parity is not None:
        light, found = _all_colours(st, annulus, x0, y0, window, green_parity, pixel_noise)
        ok &= found

    def window_sums(mu_x: np.ndarray, mu_y: np.ndarray, data: np.ndarray, second: bool) -> tuple[np.ndarray, ...]:
        """Window-weighted sums of I, I dx, I dy (and I dx^2, I dy^2, I dx dy) of ``data`` about (mu_x, mu_y)."""
        dx, dy = st.cols - mu_x[:, None], st.rows - mu_y[:, None]
        wx, wy = np.exp(-0.5 * (dx / window) ** 2), np.exp(-0.5 * (dy / window) ** 2)  # separable window
        a = np.matmul(data, wx[:, :, None])[:, :, 0]  # per stamp row: sum over columns of w_x I
        b = np.matmul(data, (wx * dx)[:, :, None])[:, :, 0]
        sums = [np.sum(wy * a, axis=1), np.sum(wy * b, axis=1), np.sum(wy * dy * a, axis=1)]
        if second:
            c = np.matmul(data, (wx * dx**2)[:, :, None])[:, :, 0]
            sums += [np.sum(wy * c, axis=1), np.sum(wy * dy**2 * a, axis=1), np.sum(wy * dy * b, axis=1)]
        return tuple(sums)

    mu_x, mu_y = x0.astype(np.float64), y0.astype(np.float64)
    for _ in range(_CENTROID_ITERATIONS):
        s0, sx, sy = window_sums(mu_x, mu_y, light, second=False)
        ok &= s0 > 0
        s0 = np.where(ok, s0, 1.0)
        mu_x, mu_y = mu_x + np.where(ok, sx / s0, 0.0), mu_y + np.where(ok, sy / s0, 0.0)
    xc, yc = st.cols[:, half], st.rows[:, half]
    ok &= (np.abs(mu_x - xc) <= half / 2) & (np.abs(mu_y - yc) <= half / 2)
    s0, sx, sy, sxx, syy, sxy = window_sums(mu_x, mu_y, image, second=True)
    ok &= s0 > 0
    s0 = np.where(ok, s0, 1.0)
    mx, my = sx / s0, sy / s0  # the greens' own windowed mean, 0 up to noise: the moments are central
    wxx, wyy, wxy = sxx / s0 - mx**2, syy / s0 - my**2, sxy / s0 - mx * my

    # Remove the window: for a Gaussian star C_windowed^-1 = C_star^-1 + window^-2 * identity.
    det = wxx * wyy - wxy**2
    ok &= det > 0
    det = np.where(ok, det, 1.0)
    pxx, pyy, pxy = wyy / det - window**-2, wxx / det - window**-2, -wxy / det
    det_p = pxx * pyy - pxy**2
    ok &= (det_p > 0) & (pxx > 0)  # otherwise the object is too large for the window
    det_p = np.where(ok, det_p, 1.0)
    cxx, cyy, cxy = pyy / det_p, pxx / det_p, -pxy / det_p
    mean = 0.5 * (cxx + cyy)
    spread = np.sqrt(0.25 * (cxx - cyy) ** 2 + cxy**2)
    major, minor = mean + spread - _PIXEL_VARIANCE, mean - spread - _PIXEL_VARIANCE
    ok &= minor > 0
    major, minor = np.where(ok, major, 1.0), np.where(ok, minor, 1.0)

    dx, dy = st.cols - mu_x[:, None], st.rows - mu_y[:, None]
    aperture = (dx**2)[:, None, :] + (dy**2)[:, :, None] <= r_ap**2
    sampled_ap = st.sampled & aperture
    ok &= ~np.any(sampled_ap & ~st.usable, axis=(1, 2))  # NaN or off-frame samples inside the aperture
    density = 1.0 if green_parity is None else 0.5  # sampled pixels per pixel
    flux = np.sum(np.where(sampled_ap, image, 0.0), axis=(1, 2), dtype=np.float64) / density
    ok &= flux > 0
    in_aperture = np.where(sampled_ap & st.usable, image, -np.inf).reshape(n, -1)
    idx = np.arange(n)
    brightest = np.argmax(in_aperture, axis=1)
    peak = in_aperture[idx, brightest].astype(np.float64)
    # its diagonal neighbours (green too); those off the stamp or off the frame do not count
    size = 2 * half + 1
    pr, pc = np.divmod(brightest, size)
    nr, nc = pr[:, None] + np.array([-1, -1, 1, 1]), pc[:, None] + np.array([-1, 1, -1, 1])
    on_stamp = (nr >= 0) & (nr < size) & (nc >= 0) & (nc < size)
    nr, nc = np.clip(nr, 0, size - 1), np.clip(nc, 0, size - 1)
    nb_ok = on_stamp & st.usable[idx[:, None], nr, nc]
    nb_sum = np.sum(np.where(nb_ok, image[idx[:, None], nr, nc], 0.0), axis=1, dtype=np.float64)
    nb_mean = nb_sum / np.maximum(np.count_nonzero(nb_ok, axis=1), 1)
    core_spread = np.where(peak > 0, nb_mean / np.where(peak > 0, peak, 1.0), 0.0)
    if saturation is None:
        saturated = np.zeros(n, bool)
    else:
        saturated = np.any((st.raw >= saturation) & aperture & st.usable, axis=(1, 2))
    return _Measurement(
        x=mu_x, y=mu_y, flux=flux, peak=peak, sky=sky, saturated=saturated,
        cov=np.column_stack([cxx, cyy, cxy]),
        fwhm=GAUSS_SIGMA_TO_FWHM * np.sqrt(0.5 * (major + minor)),
        fwhm_minor=GAUSS_SIGMA_TO_FWHM * np.sqrt(minor),
        roundness=np.sqrt(minor / major),
        core_spread=core_spread,
        ok=ok,
    )


def _profile_factor(mosaic: np.ndarray, stars: _Measurement, green_parity: int | None) -> float:
    """Ratio of the true FWHM to the Gaussian-equivalent FWHM, from the pooled radial profile of ``stars``.

    The stars of a frame share one PSF. With ``C`` the median covariance of ``stars``, every sample of every
    star is placed at the normalised radius ``rho = sqrt(d^T C^-1 d)`` (``d`` its offset from the star's
    centroid) with the value ``I * 2 pi sqrt(det C) / flux``. The stars sample different sub-pixel phases,
    so the pooled samples trace the profile finely even when each star is undersampled. The profile is
    averaged in bins of 0.1; its central value is the ``rho -> 0`` limit of a fit
    ``p0 + p1 rho^2 + p2 rho^4`` to the bins with ``rho < 1``, and the half-maximum radius is interpolated
    linearly between bins. A Gaussian has ``rho_half = 1.1774`` and a factor of 1.

    Returns
    -------
    float
        The factor ``rho_half / 1.1774``, or 1.0 when it cannot be measured (fewer than 3 stars, too few
        samples in the core, no half-maximum crossing).
    """
    if len(stars.x) < _PROFILE_MIN_STARS:
        return 1.0
    cxx, cyy, cxy = np.median(stars.cov, axis=0)
    det = cxx * cyy - cxy**2
    st = _Stamps.cut(mosaic, stars.x, stars.y, int(np.ceil(3.0 * np.sqrt(max(cxx, cyy)))) + 1, green_parity)
    dx, dy = (st.cols - stars.x[:, None])[:, None, :], (st.rows - stars.y[:, None])[:, :, None]
    rho2 = (cyy * dx**2 + cxx * dy**2 - 2.0 * cxy * dx * dy) / det
    value = (st.data - stars.sky[:, None, None]) * (2.0 * np.pi * np.sqrt(det) / stars.flux)[:, None, None]
    use = st.sampled & st.usable & (rho2 < 9.0)
    bins = (np.sqrt(rho2[use]) / _PROFILE_BIN).astype(np.intp)
    count = np.bincount(bins)
    profile = np.bincount(bins, weights=value[use]) / np.maximum(count, 1)
    centre = (np.arange(count.size) + 0.5) * _PROFILE_BIN
    filled = count >= 3
    core = filled & (centre < 1.0)
    if np.count_nonzero(core) < 4:
        return 1.0
    weight = np.sqrt(count[core])
    basis = np.column_stack([np.ones(weight.size), centre[core] ** 2, centre[core] ** 4]) * weight[:, None]
    p0 = np.linalg.lstsq(basis, profile[core] * weight, rcond=None)[0][0]
    centre, profile = centre[filled], profile[filled]
    below = np.flatnonzero(profile < 0.5 * p0)
    if p0 <= 0 or below.size == 0 or below[0] == 0:
        return 1.0
    k = below[0]
    step = (profile[k - 1] - 0.5 * p0) / (profile[k - 1] - profile[k])
    rho_half = centre[k - 1] + step * (centre[k] - centre[k - 1])
    return float(rho_half / (0.5 * GAUSS_SIGMA_TO_FWHM))


def detect_stars(
    mosaic: np.ndarray,
    bayer_pattern: str | None = "RGGB",
    *,
    threshold_sigma: float = 5.0,
    max_stars: int = 500,
    saturation: float | None = 65535,
    box: int = 64,
    min_roundness: float = 0.5,
    fwhm_limits: tuple[float, float] = (1.0, 25.0),
) -> StarList:
    """Detect and measure the stars of a raw frame.

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw frame, uint16 or float; NaN and infinite pixels are treated as invalid.
    bayer_pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'} or None, default 'RGGB'
        Colour filter layout (FITS ``BAYERPAT``); None for a mono frame.
    threshold_sigma : float, default 5
        Detection threshold: signal-to-noise ratio of a peak of the matched-filtered proxy, in units of the
        local noise of the filtered image.
    max_stars : int, default 500
        Keep at most this many stars (the brightest).
    saturation : float or None, default 65535
        Raw level at which a pixel is saturated; None disables the flag.
    box : int, default 64
        Background box size in proxy pixels (128 full-resolution pixels).
    min_roundness : float, default 0.5
        Smallest accepted axis ratio b/a (rejects trails, cosmic-ray tracks and blended pairs).
    fwhm_limits : tuple of float, default (1.0, 25.0)
        Smallest accepted minor-axis FWHM and largest accepted FWHM (Gaussian-equivalent), full-resolution
        pixels.

    Returns
    -------
    StarList
        Stars sorted by flux (brightest first); empty when the frame shows none.

    Raises
    ------
    ValueError
        If ``mosaic`` is not 2-D, the Bayer pattern is unknown, ``threshold_sigma`` is not positive or ``box``
        is under 4.
    """
    if not threshold_sigma > 0 or box < 4:
        raise ValueError(f"threshold_sigma must be positive and box at least 4, got {threshold_sigma} and {box}")
    mosaic = np.asarray(mosaic)
    proxy = luminance_proxy(mosaic, bayer_pattern)
    greens = _green_offsets(bayer_pattern)
    green_parity = None if greens is None else sum(greens[0]) % 2
    if min(proxy.shape) < 8 or max_stars <= 0:
        return StarList.empty()
    invalid = None
    if mosaic.dtype.kind == "f":
        invalid = ~np.isfinite(proxy)
        if invalid.any():
            proxy[invalid] = np.nan
        else:
            invalid = None
    levels, sigmas, background, noise = _background(proxy, box)
    if not np.isfinite(noise):
        return StarList.empty(background, noise)
    resid = np.subtract(proxy, _to_map(levels, proxy.shape), out=proxy)
    if invalid is not None:
        resid[invalid] = 0.0
    # noise floor: a noiseless (synthetic) sky still needs a finite threshold
    sigmas = np.maximum(sigmas, np.float32(max(0.05 * noise, 1e-6 * max(1.0, abs(background)))))
    r, c, n_trails = _candidates(resid, sigmas, threshold_sigma)
    if r.size == 0:
        return StarList.empty(background, noise, n_trails)
    patch = np.maximum(resid[r[:, None] + _PATCH_3[0], c[:, None] + _PATCH_3[1]], 0.0)
    total = np.maximum(patch.sum(axis=1), np.finfo(np.float32).tiny)
    x0 = 2.0 * (c + (patch * _PATCH_3[1]).sum(axis=1) / total) + 0.5  # proxy -> mosaic coordinates
    y0 = 2.0 * (r + (patch * _PATCH_3[0]).sum(axis=1) / total) + 0.5

    fwhm_min, fwhm_max = fwhm_limits

    def accepted(m: _Measurement) -> np.ndarray:
        return (m.ok & (m.roundness >= min_roundness) & (m.fwhm_minor >= fwhm_min) & (m.fwhm <= fwhm_max)
                & (m.core_spread >= MIN_CORE_SPREAD))

    pixel_noise = noise * (np.sqrt(2.0) if greens is not None else 2.0)
    first = _measure(mosaic, x0[:_CALIBRATION_STARS], y0[:_CALIBRATION_STARS], _INITIAL_WINDOW, green_parity,
                     saturation, pixel_noise)
    calibration = accepted(first) & ~first.saturated
    sigma = float(np.median(np.sqrt(first.cov[calibration, :2].mean(axis=1)))) if calibration.any() else 1.0
    window = float(np.clip(WINDOW_PER_SIGMA * sigma, MIN_WINDOW, fwhm_max))

    chunk = max(max_stars, 256)
    parts: list[_Measurement] = []
    for start in range(0, r.size, chunk):
        m = _measure(mosaic, x0[start : start + chunk], y0[start : start + chunk], window, green_parity, saturation,
                     pixel_noise)
        parts.append(m.take(accepted(m)))
        stars = _Measurement.concat(parts)
        unsaturated = ~stars.saturated
        if np.count_nonzero(unsaturated) >= 5:
            median = np.median(stars.fwhm[unsaturated])
            low, high = RELATIVE_FWHM[0] * median, RELATIVE_FWHM[1] * median
            stars = stars.take((stars.fwhm >= low) & ((stars.fwhm <= high) | stars.saturated))
        if len(stars.x) >= max_stars:
            break
    stars = stars.take(np.argsort(-stars.flux, kind="stable")[:max_stars])
    bright = np.flatnonzero(~stars.saturated & (stars.peak >= _PROFILE_MIN_PEAK_SIGMA * pixel_noise))
    factor = _profile_factor(mosaic, stars.take(bright[:_PROFILE_STARS]), green_parity)
    return StarList(
        x=stars.x, y=stars.y, flux=stars.flux, fwhm=stars.fwhm * factor, roundness=stars.roundness,
        peak=stars.peak, saturated=stars.saturated, background=background, noise=noise, n_trails=n_trails,
    )
