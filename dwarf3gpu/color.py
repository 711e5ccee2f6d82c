"""Colour finishing of a linear RGB master: white balance, Bayer-green compensation, SCNR, colour matrices.

Images are float32 arrays of shape (3, H, W) holding R, G, B, linear, with NaN where no frame contributed. NaN pixels
are ignored by every statistic and stay NaN through every operation here. Nothing in this module changes its input:
every function returns a new array. The linear master that the stacker writes is never colour-corrected; the
calibration measured here is recorded (FITS header cards, ``cache/colour_calibration.json``) and applied to the previews.
Formulas and the reasons behind them are in METHODS.md ("Colour calibration and previews").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, Dwarf3Error
from .robust import MAD_TO_SIGMA

__all__ = [
    "ColorCalibration",
    "background_neutral_gains",
    "apply_color_calibration",
    "apply_bayer_compensation",
    "scnr_green",
    "SCNR_METHODS",
    "saturation_matrix",
    "COLOR_MATRIX_PRESETS",
    "apply_color_matrix",
    "grid_sample",
    "require_rgb",
]

#: Fewest jointly valid pixels for a background estimate.
MIN_BACKGROUND_PIXELS = 100
#: Fewest bright pixels for a white reference; below it the gains stay 1.
MIN_WHITE_PIXELS = 100
SCNR_METHODS = ("average_neutral", "maximum_neutral")
#: Row-sum tolerance of a colour matrix (rows must sum to 1 so grey stays grey).
ROW_SUM_TOLERANCE = 1e-6


def require_rgb(rgb: np.ndarray) -> np.ndarray:
    """Check that ``rgb`` is a (3, H, W) image and return it as an array (no copy when already one).

    Parameters
    ----------
    rgb : array_like
        Candidate image, channel first (R, G, B).

    Returns
    -------
    numpy.ndarray
        The same data as an ndarray.

    Raises
    ------
    ValueError
        When the shape is not (3, H, W) with H, W >= 1.
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"expected an RGB image of shape (3, H, W), got shape {arr.shape}")
    return arr


def grid_sample(rgb: np.ndarray, max_pixels: int) -> np.ndarray:
    """Pixels on a regular grid, at most about ``max_pixels`` of them, that are finite in all three channels.

    A fixed stride in both axes (the same for every call on the same shape) makes statistics deterministic and
    spreads the sample evenly over the frame.

    Parameters
    ----------
    rgb : numpy.ndarray
        Image, shape (3, H, W).
    max_pixels : int
        Upper bound on the grid size before NaN pixels are dropped (>= 1).

    Returns
    -------
    numpy.ndarray
        float64 array of shape (3, N): the sampled pixels' R, G, B values.
    """
    rgb = require_rgb(rgb)
    height, width = rgb.shape[1:]
    stride = max(1, math.ceil(math.sqrt(height * width / max(1, max_pixels))))
    pixels = rgb[:, ::stride, ::stride].reshape(3, -1).astype(np.float64)
    return pixels[:, np.all(np.isfinite(pixels), axis=0)]


@dataclass(frozen=True)
class ColorCalibration:
    """Per-channel affine colour calibration ``out_c = gains_c * in_c + offsets_c`` (green is the reference).

    Attributes
    ----------
    gains : tuple of float
        R, G, B gains; G is 1 when measured. They make the white reference neutral (Bayer-green compensation).
    offsets : tuple of float
        R, G, B offsets; G is 0 when measured. With the gains they move every channel's sky background onto the
        green background level.
    background : tuple of float
        Sky background of R, G, B in the input (sigma-clipped median), input units.
    noise : tuple of float
        Background noise of R, G, B, 1.4826 x MAD of the clipped sample, input units.
    white : tuple of float
        Colour of the white reference relative to green, ``(R/G, 1, B/G)`` of the background-subtracted bright
        pixels (medians); ``(1, 1, 1)`` when there was none.
    method : str
        ``"background+white"`` (offsets and gains measured), ``"background"`` (too few bright pixels: gains 1) or
        ``"manual"`` (given by the user).
    n_background : int
        Pixels the background estimate finally kept.
    n_white : int
        Bright pixels found for the white reference (used when ``method`` is ``"background+white"``).
    """

    gains: tuple[float, float, float]
    offsets: tuple[float, float, float]
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    noise: tuple[float, float, float] = (0.0, 0.0, 0.0)
    white: tuple[float, float, float] = (1.0, 1.0, 1.0)
    method: str = "manual"
    n_background: int = 0
    n_white: int = 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary (floats round-trip exactly through :mod:`json`)."""
        return {
            "gains": list(self.gains),
            "offsets": list(self.offsets),
            "background": list(self.background),
            "noise": list(self.noise),
            "white": list(self.white),
            "method": self.method,
            "n_background": self.n_background,
            "n_white": self.n_white,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ColorCalibration:
        """Inverse of :meth:`to_json`; only ``gains`` and ``offsets`` are required."""
        values: dict[str, Any] = {"gains": _triple(data["gains"]), "offsets": _triple(data["offsets"])}
        for key in ("background", "noise", "white"):
            if key in data:
                values[key] = _triple(data[key])
        for key in ("n_background", "n_white"):
            if key in data:
                values[key] = int(data[key])
        if "method" in data:
            values["method"] = str(data["method"])
        return cls(**values)

    def header_cards(self) -> list[tuple[str, Any, str]]:
        """FITS cards ``(keyword, value, comment)`` that record the calibration in the linear master's header."""
        cards: list[tuple[str, Any, str]] = []
        for name, gain, offset in zip("RGB", self.gains, self.offsets):
            cards.append((f"WBGAIN_{name}", float(gain), f"preview colour gain {name} (data not scaled)"))
            cards.append((f"WBOFFS_{name}", float(offset), f"preview colour offset {name} (data not shifted)"))
        cards.append(("WBMETHOD", self.method, "colour calibration method (dwarf3gpu)"))
        return cards


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    """Three floats from a sequence, checked for length."""
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 values (R, G, B), got {len(out)}")
    return out  # type: ignore[return-value]


def _clipped_background(pixels: np.ndarray, kappa: float, max_iter: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Joint sigma-clipped median and MAD noise of each channel.

    A pixel is kept only while all three channels lie within ``kappa`` noise of their medians, so a star or the
    object, bright in any channel, leaves the sample of every channel.
    """
    keep = np.ones(pixels.shape[1], dtype=bool)
    for _ in range(max_iter):
        kept = pixels[:, keep]
        median = np.median(kept, axis=1)
        sigma = MAD_TO_SIGMA * np.median(np.abs(kept - median[:, None]), axis=1)
        new_keep = np.all(np.abs(pixels - median[:, None]) <= kappa * sigma[:, None], axis=0)
        if not new_keep.any() or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return median, sigma, int(keep.sum())


def background_neutral_gains(
    rgb: np.ndarray,
    *,
    sample: int = 250_000,
    kappa: float = 3.0,
    max_iter: int = 10,
    min_snr: float = 20.0,
    saturation: float | Sequence[float] | None = None,
) -> ColorCalibration:
    """Measure a background-neutral white balance with green as the reference channel.

    1. *Background.* On a regular grid of at most ``sample`` pixels valid in all channels, an iterated joint
       ``kappa``-sigma clip (median +- kappa x 1.4826 MAD, every channel) removes stars and the object; the
       clipped medians are the sky backgrounds ``bg_c``, the clipped MADs the noise ``sigma_c``.
    2. *White reference.* Over the whole image, the pixels whose green stands at least ``min_snr`` x
       ``sigma_G`` above the background and whose channels are all below ``saturation``: the medians of
       ``(R - bg_R) / (G - bg_G)`` and ``(B - bg_B) / (G - bg_G)`` are the colour of the typical bright source
       (stars; the integrated light of a galaxy that fills the frame). Gains make it neutral:
       ``g = (G/R ratio, 1, G/B ratio)``. With fewer than 100 such pixels the gains stay 1.
    3. *Offsets* ``o_c = bg_G - g_c bg_c`` put every channel's background on the green background, which is
       unchanged (``g_G = 1, o_G = 0``).

    Parameters
    ----------
    rgb : numpy.ndarray
        Linear image, shape (3, H, W), NaN where there are no data. Not modified.
    sample : int, optional
        Largest number of grid pixels for the background statistics.
    kappa : float, optional
        Clipping half-width in noise units.
    max_iter : int, optional
        Most clipping iterations (stops earlier when the kept set no longer changes).
    min_snr : float, optional
        Least green signal-to-noise ratio of a white-reference pixel.
    saturation : float or sequence of 3 floats, optional
        Level from which a pixel counts as saturated (any channel) and is left out of the white reference.
        Default: 0.95 x the highest finite value of each channel.

    Returns
    -------
    ColorCalibration
        Gains, offsets and the measurements behind them.

    Raises
    ------
    Dwarf3Error
        When fewer than 100 sampled pixels hold data in all three channels.
    """
    rgb = require_rgb(rgb)
    pixels = grid_sample(rgb, sample)
    if pixels.shape[1] < MIN_BACKGROUND_PIXELS:
        raise Dwarf3Error(
            f"colour calibration needs at least {MIN_BACKGROUND_PIXELS} sampled pixels with data in all three "
            f"channels, the image has {pixels.shape[1]}; is the stack empty?"
        )
    background, noise, n_background = _clipped_background(pixels, kappa, max_iter)

    if saturation is None:
        sat = np.array([0.95 * np.nanmax(rgb[c]) for c in range(3)])
    else:
        sat = np.broadcast_to(np.asarray(saturation, dtype=np.float64), (3,))
    excess_g = rgb[1] - np.float32(background[1])
    bright = excess_g >= min_snr * noise[1]
    for c in range(3):
        bright &= rgb[c] < sat[c]  # NaN compares False: no-data pixels drop out here
    n_white = int(np.count_nonzero(bright))

    gains = np.ones(3)
    white = np.ones(3)
    method = "background"
    if n_white >= MIN_WHITE_PIXELS:
        excess_g_bright = excess_g[bright].astype(np.float64)
        for c in (0, 2):
            white[c] = np.median((rgb[c][bright] - background[c]) / excess_g_bright)
        if white[0] > 0 and white[2] > 0:
            gains = 1.0 / white
            method = "background+white"
        else:
            white = np.ones(3)
    offsets = background[1] - gains * background
    offsets[1] = 0.0
    return ColorCalibration(
        gains=_triple(gains),
        offsets=_triple(offsets),
        background=_triple(background),
        noise=_triple(noise),
        white=_triple(white),
        method=method,
        n_background=n_background,
        n_white=n_white,
    )


def apply_color_calibration(rgb: np.ndarray, calibration: ColorCalibration) -> np.ndarray:
    """Apply ``out_c = gains_c * in_c + offsets_c`` to each channel.

    Parameters
    ----------
    rgb : numpy.ndarray
        Linear image, shape (3, H, W). Not modified.
    calibration : ColorCalibration
        Gains and offsets to apply.

    Returns
    -------
    numpy.ndarray
        New float32 image; NaN stays NaN.
    """
    rgb = require_rgb(rgb)
    gains = np.asarray(calibration.gains, dtype=np.float32)[:, None, None]
    offsets = np.asarray(calibration.offsets, dtype=np.float32)[:, None, None]
    out = np.multiply(rgb, gains, dtype=np.float32)
    out += offsets
    return out


def apply_bayer_compensation(rgb: np.ndarray, gains: Sequence[float] | None = None) -> np.ndarray:
    """Remove the green cast of a one-shot-colour sensor by per-channel gains (multiplication only).

    ``out_c = gains_c * in_c``: a zero signal stays zero, so the result is as linear as the input. Without
    ``gains``, they are measured by :func:`background_neutral_gains` (G = 1, R and B scaled so the typical bright
    source is neutral); the background offsets are not applied (see :func:`apply_color_calibration`).

    Parameters
    ----------
    rgb : numpy.ndarray
        Linear image, shape (3, H, W). Not modified.
    gains : sequence of 3 floats, optional
        Explicit R, G, B gains (finite, > 0), used as given.

    Returns
    -------
    numpy.ndarray
        New float32 image; NaN stays NaN.

    Raises
    ------
    ConfigError
        When explicit gains are not three finite positive numbers.
    """
    rgb = require_rgb(rgb)
    if gains is None:
        gains = background_neutral_gains(rgb).gains
    g = np.asarray(gains, dtype=np.float64)
    if g.shape != (3,) or not np.all(np.isfinite(g)) or not np.all(g > 0):
        raise ConfigError(f"colour gains must be three finite positive numbers (R, G, B), got {list(np.ravel(g))}")
    return np.multiply(rgb, g.astype(np.float32)[:, None, None], dtype=np.float32)


def scnr_green(rgb: np.ndarray, amount: float = 1.0, method: str = "average_neutral") -> np.ndarray:
    """Subtractive chromatic noise reduction of green (PixInsight SCNR, neutral protection).

    ``G' = min(G, N)`` with ``N = (R + B) / 2`` (``"average_neutral"``) or ``N = max(R, B)``
    (``"maximum_neutral"``); the result is ``(1 - amount) G + amount G'``. Red and blue are unchanged. Green can
    only go down, and a pixel whose green does not exceed the neutral level keeps it.

    Parameters
    ----------
    rgb : numpy.ndarray
        Image, shape (3, H, W), linear or stretched. Not modified.
    amount : float, optional
        Strength in [0, 1]; 1 applies ``G'`` fully, 0 returns a copy.
    method : {"average_neutral", "maximum_neutral"}, optional
        Neutral level ``N``.

    Returns
    -------
    numpy.ndarray
        New float32 image; NaN stays NaN.

    Raises
    ------
    ConfigError
        For an amount outside [0, 1] or an unknown method.
    """
    rgb = require_rgb(rgb)
    if not 0.0 <= amount <= 1.0:
        raise ConfigError(f"SCNR amount must be in [0, 1], got {amount}")
    if method not in SCNR_METHODS:
        raise ConfigError(f"unknown SCNR method {method!r}; choose one of {', '.join(SCNR_METHODS)}")
    out = np.array(rgb, dtype=np.float32, copy=True)
    red, green, blue = out
    if method == "average_neutral":
        neutral = (red + blue) * np.float32(0.5)
    else:
        neutral = np.maximum(red, blue)
    limited = np.minimum(green, neutral)
    a = np.float32(amount)
    out[1] = (np.float32(1.0) - a) * green + a * limited
    return out


def saturation_matrix(saturation: float, weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3)) -> np.ndarray:
    """Neutral-preserving saturation matrix ``M = s I + (1 - s) 1 w^T``.

    Each output channel is ``L + s (c - L)`` with the luminance ``L = w . (R, G, B)``: colour differences from
    grey are scaled by ``s`` and grey (``R = G = B``) is unchanged, because every row sums to ``s + (1 - s)
    sum(w) = 1``.

    Parameters
    ----------
    saturation : float
        ``s``; 1 is the identity, > 1 more saturated, 0 grey.
    weights : sequence of 3 floats, optional
        Luminance weights, summing to 1. Equal weights suit white-balanced sensor RGB (the Rec. 709 weights
        belong to sRGB primaries, which a sensor's channels are not).

    Returns
    -------
    numpy.ndarray
        (3, 3) float64 matrix, rows summing to 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (3,) or abs(w.sum() - 1.0) > ROW_SUM_TOLERANCE:
        raise ConfigError(f"luminance weights must be three numbers summing to 1, got {list(np.ravel(w))}")
    return saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), w)


#: Named colour matrices. None is a measured sensor calibration (no published colour matrix is known to us for
#: the DWARF 3 or Seestar sensors): "dwarf3" and "seestar" are the same mild neutral-preserving saturation boost,
#: kept as separate names so a measured matrix can replace either without changing the option.
COLOR_MATRIX_PRESETS: dict[str, np.ndarray] = {
    "identity": np.eye(3),
    "dwarf3": saturation_matrix(1.2),
    "seestar": saturation_matrix(1.2),
}


def _resolve_matrix(matrix: str | np.ndarray) -> np.ndarray:
    """A checked (3, 3) matrix from a preset name or an array."""
    if isinstance(matrix, str):
        if matrix not in COLOR_MATRIX_PRESETS:
            raise ConfigError(
                f"unknown colour matrix {matrix!r}; choose one of {', '.join(COLOR_MATRIX_PRESETS)}"
            )
        return COLOR_MATRIX_PRESETS[matrix]
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3) or not np.all(np.isfinite(m)):
        raise ConfigError(f"a colour matrix must be 3 x 3 and finite, got shape {m.shape}")
    if np.any(np.abs(m.sum(axis=1) - 1.0) > ROW_SUM_TOLERANCE):
        raise ConfigError(
            f"every row of a colour matrix must sum to 1 so grey stays grey; row sums are {list(m.sum(axis=1))}"
        )
    return m


def apply_color_matrix(rgb: np.ndarray, matrix: str | np.ndarray) -> np.ndarray:
    """Mix the channels with a 3 x 3 colour matrix whose rows sum to 1: ``out = M @ (R, G, B)``.

    It is evaluated as ``out_c = in_c + sum_{k != c} M_ck (in_k - in_c)``, equal to ``M @ in`` when the row sums
    are 1 (the diagonal is implied by them). A grey pixel has all differences exactly 0, so it comes out
    bit-for-bit unchanged.

    Parameters
    ----------
    rgb : numpy.ndarray
        Image, shape (3, H, W); apply it to linear, white-balanced data. Not modified.
    matrix : str or array_like
        A name from :data:`COLOR_MATRIX_PRESETS` or a (3, 3) matrix with rows summing to 1 (within 1e-6).

    Returns
    -------
    numpy.ndarray
        New float32 image; NaN stays NaN.

    Raises
    ------
    ConfigError
        For an unknown preset, a matrix of the wrong shape, non-finite entries, or a row not summing to 1.
    """
    rgb = require_rgb(rgb)
    m = _resolve_matrix(matrix).astype(np.float32)
    src = rgb.astype(np.float32, copy=False)
    out = np.empty(src.shape, dtype=np.float32)
    # The same float32 operations, in place and by blocks of rows (the temporaries stay in the cache).
    rows = src.shape[1]
    block = max(1, _BLOCK_VALUES // max(1, src.shape[2]))
    tmp = np.empty((min(block, rows), src.shape[2]), dtype=np.float32)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        t = tmp[: r1 - r0]
        for c in range(3):
            a, b = (k for k in range(3) if k != c)
            o = out[c, r0:r1]
            sc = src[c, r0:r1]
            np.subtract(src[a, r0:r1], sc, out=o)
            o *= m[c, a]
            o += sc  # (src_c + M_ca d_a): IEEE addition is commutative, so this is the expression's first sum
            np.subtract(src[b, r0:r1], sc, out=t)
            t *= m[c, b]
            o += t
    return out


#: Values per block in the blocked element-wise loops (about 1 MiB of float32).
_BLOCK_VALUES = 1 << 18
