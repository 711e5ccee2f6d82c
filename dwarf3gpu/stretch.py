"""Display stretches and the quicklook previews of a linear RGB master.

Images are float32 arrays of shape (3, H, W) holding R, G, B, with NaN where there are no data. Statistics ignore
NaN; the previews show it black. A stretch returns a new display-referred image with values in [0, 1]; the linear
data passed in are never modified. Formulas and the reasons behind them are in METHODS.md ("Colour calibration and previews").
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_path
from .robust import MAD_TO_SIGMA
from .color import (
    ColorCalibration,
    apply_color_calibration,
    apply_color_matrix,
    grid_sample,
    require_rgb,
    scnr_green,
)
from .errors import ConfigError, Dwarf3Error

__all__ = [
    "STRETCH_METHODS",
    "percentile_normalise",
    "asinh_stretch",
    "asinh_beta_for",
    "mtf",
    "mtf_midtone",
    "two_stage_stretch",
    "to_uint8",
    "to_uint16",
    "write_preview_png",
    "write_preview_tiff",
    "make_quicklook",
]

STRETCH_METHODS = ("two_stage", "asinh")
#: Range searched for an automatic asinh softening parameter.
BETA_MIN, BETA_MAX = 1e-6, 1e8


def percentile_normalise(
    img: np.ndarray, low: float = 0.25, high: float = 99.9
) -> tuple[np.ndarray, tuple[float, float]]:
    """Map the ``low`` and ``high`` percentiles of all finite values to 0 and 1 and clip to [0, 1].

    The percentiles are taken over all channels together, so one linear map is applied to every channel and the
    colour balance is kept. They equal :func:`numpy.nanpercentile` (linear interpolation).

    Parameters
    ----------
    img : numpy.ndarray
        Image of any shape (an RGB image is (3, H, W)). Not modified.
    low, high : float, optional
        Percentiles, ``0 <= low < high <= 100``.

    Returns
    -------
    normalised : numpy.ndarray
        New float32 array, values in [0, 1]; NaN stays NaN.
    (lo, hi) : tuple of float
        The two percentile values. Without finite values they are (0, 1); when ``hi == lo`` the scale is 1.

    Raises
    ------
    ConfigError
        When the percentiles are out of order or out of range.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    data = np.asarray(img, dtype=np.float32)
    finite = data[np.isfinite(data)]
    lo, hi = (0.0, 1.0) if finite.size == 0 else (float(v) for v in np.percentile(finite, [low, high]))
    scale = hi - lo if hi > lo else 1.0
    out = (data - np.float32(lo)) * np.float32(1.0 / scale)
    np.clip(out, 0.0, 1.0, out=out)
    return out, (lo, hi)


def asinh_stretch(x: np.ndarray, beta: float = 10.0) -> np.ndarray:
    """Inverse hyperbolic sine stretch ``y = asinh(beta x) / asinh(beta)`` of data in [0, 1].

    Monotonic, ``y(0) = 0`` and ``y(1) = 1`` exactly; linear (slope ``beta / asinh(beta)``) for
    ``x << 1 / beta`` and logarithmic above, so a larger ``beta`` lifts faint signal more.

    Parameters
    ----------
    x : array_like
        Data; values are clipped to [0, 1] first, NaN stays NaN.
    beta : float, optional
        Softening parameter, > 0.

    Returns
    -------
    numpy.ndarray
        New float32 array in [0, 1].

    Raises
    ------
    ConfigError
        When ``beta`` is not a finite positive number.
    """
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"asinh beta must be a finite positive number, got {beta}")
    b = np.float32(beta)
    y = np.array(x, dtype=np.float32)
    np.clip(y, 0.0, 1.0, out=y)
    y *= b
    np.arcsinh(y, out=y)
    y /= np.arcsinh(b)
    return y


def asinh_beta_for(background: float, target: float) -> float:
    """The ``beta`` for which :func:`asinh_stretch` maps ``background`` to ``target``.

    ``asinh(beta b) / asinh(beta)`` rises monotonically from ``b`` (``beta -> 0``) towards 1, so the root is
    found by bisection on ``log(beta)`` within [1e-6, 1e8]; a target at or below ``background`` (no lift needed)
    gives 1e-6 (practically linear), an unreachable one 1e8.

    Parameters
    ----------
    background : float
        Input level in [0, 1), typically the normalised sky median.
    target : float
        Output level wanted, in (0, 1).

    Returns
    -------
    float
        ``beta``.

    Raises
    ------
    ConfigError
        When ``target`` is not in (0, 1) or ``background`` not in [0, 1).
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target background must be in (0, 1), got {target}")
    if not 0.0 <= background < 1.0:
        raise ConfigError(f"background must be in [0, 1), got {background}")

    def level(beta: float) -> float:
        return math.asinh(beta * background) / math.asinh(beta)

    if level(BETA_MIN) >= target:
        return BETA_MIN
    if level(BETA_MAX) <= target:
        return BETA_MAX
    lo, hi = math.log(BETA_MIN), math.log(BETA_MAX)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if level(math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def mtf(m: float, x: np.ndarray) -> np.ndarray:
    """Midtones transfer function ``MTF_m(x) = (m - 1) x / ((2m - 1) x - m)`` (PixInsight).

    Monotonic on [0, 1] with ``MTF(0) = 0``, ``MTF(1) = 1`` and ``MTF(m) = 1/2``; ``m = 0.5`` is the identity,
    ``m < 0.5`` brightens.

    Parameters
    ----------
    m : float
        Midtones balance, in (0, 1).
    x : array_like
        Data in [0, 1].

    Returns
    -------
    numpy.ndarray
        ``MTF_m(x)``, float32.
    """
    x = np.asarray(x, dtype=np.float32)
    m32 = np.float32(m)
    # the same float32 operations with two temporaries instead of four (multiplication is commutative)
    den = np.multiply(x, np.float32(2.0) * m32 - np.float32(1.0))
    den -= m32
    out = np.multiply(x, m32 - np.float32(1.0))
    out /= den
    return out


def mtf_midtone(background: float, target: float) -> float:
    """The midtones balance ``m`` with ``MTF_m(background) = target``: ``m = b (t - 1) / (2 t b - t - b)``.

    Parameters
    ----------
    background, target : float
        Input and output levels, both in (0, 1).

    Returns
    -------
    float
        ``m`` in (0, 1).

    Raises
    ------
    ConfigError
        When a level is outside (0, 1).
    """
    if not (0.0 < background < 1.0 and 0.0 < target < 1.0):
        raise ConfigError(f"MTF levels must be in (0, 1), got background={background}, target={target}")
    return background * (target - 1.0) / (2.0 * target * background - target - background)


def two_stage_stretch(
    rgb: np.ndarray,
    *,
    shadows_clip: float = 2.8,
    target_background: float = 0.25,
    first_stage_background: float | None = None,
    sample: int = 250_000,
) -> np.ndarray:
    """Hue-preserving two-stage stretch: an asinh then a midtones transfer function, both on the luminance.

    1. Black and white points, linked over the channels: ``black = median - shadows_clip x 1.4826 MAD`` of all
       channels' values (a grid sample), ``white`` = the highest finite value; ``x_c = clip((v_c - black) /
       (white - black), 0, 1)``. The sky median lands at ``b0``.
    2. Stage 1: ``A(I) = asinh(beta I) / asinh(beta)`` of the luminance ``I = (x_R + x_G + x_B) / 3``, with
       ``beta`` chosen so ``A(b0) = first_stage_background``.
    3. Stage 2: ``T(I) = MTF_m(A(I))`` with ``m`` chosen so ``T(b0) = target_background``.
    4. Every channel is multiplied by the same factor, ``y_c = x_c T(I) / I`` (0 where ``I = 0``), and a pixel
       whose largest channel exceeds 1 is divided by it: each pixel keeps the R:G:B ratios of the linear image.

    Parameters
    ----------
    rgb : numpy.ndarray
        Linear, colour-calibrated image, shape (3, H, W). Not modified.
    shadows_clip : float, optional
        Black point below the median, in noise units (PixInsight's auto-STF uses 2.8).
    target_background : float, optional
        Output level of the sky median, in (0, 1) (auto-STF uses 0.25).
    first_stage_background : float, optional
        Level of the sky median after stage 1, in (0, target_background): how the stretch is split between the
        stages. Default ``0.4 x target_background`` (0.1 for the default target).
    sample : int, optional
        Largest number of grid pixels for the median and MAD.

    Returns
    -------
    numpy.ndarray
        New float32 image in [0, 1]; NaN stays NaN. A blank or constant image comes out black.

    Raises
    ------
    ConfigError
        When the background levels are not ``0 < first_stage_background < target_background < 1``.
    """
    rgb = require_rgb(rgb)
    if first_stage_background is None:
        first_stage_background = 0.4 * target_background
    if not 0.0 < first_stage_background < target_background < 1.0:
        raise ConfigError(
            "need 0 < first_stage_background < target_background < 1, got "
            f"{first_stage_background} and {target_background}"
        )
    values = grid_sample(rgb, sample).ravel()
    data = np.asarray(rgb, dtype=np.float32)
    if values.size == 0:
        return _black(data)
    median = float(np.median(values))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    black = median - shadows_clip * sigma
    white = float(np.nanmax(data))
    if not white > black:
        return _black(data)
    scale = 1.0 / (white - black)
    x = (data - np.float32(black)) * np.float32(scale)
    np.clip(x, 0.0, 1.0, out=x)
    b0 = min(max((median - black) * scale, 0.0), 1.0 - 1e-9)

    beta = asinh_beta_for(b0, first_stage_background)
    m = mtf_midtone(first_stage_background, target_background)
    lum = x.mean(axis=0)
    curve = mtf(m, asinh_stretch(lum, beta))
    factor = np.divide(curve, lum, out=np.zeros_like(lum), where=lum > 0)
    factor[np.isnan(lum)] = np.nan
    x *= factor
    peak = x.max(axis=0)
    np.divide(x, peak, out=x, where=peak > 1.0)
    return x


def _black(data: np.ndarray) -> np.ndarray:
    """A black image of ``data``'s shape that keeps its no-data pixels (any channel NaN) NaN."""
    no_data = np.isnan(data).any(axis=0)
    return np.broadcast_to(np.where(no_data, np.float32(np.nan), np.float32(0.0)), data.shape).copy()


def _to_uint(rgb01: np.ndarray, full_scale: int, dtype: type) -> np.ndarray:
    """(3, H, W) values in [0, 1] to (H, W, 3) integers in [0, full_scale]; NaN -> 0."""
    rgb01 = require_rgb(rgb01)
    x = np.nan_to_num(np.asarray(rgb01, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(x, 0.0, 1.0, out=x)
    x *= np.float32(full_scale)
    np.rint(x, out=x)
    return np.ascontiguousarray(x.astype(dtype).transpose(1, 2, 0))


def to_uint8(rgb01: np.ndarray) -> np.ndarray:
    """Display image (3, H, W) in [0, 1] to an 8-bit (H, W, 3) RGB array: NaN -> 0, clip, ``round(255 v)``."""
    return _to_uint(rgb01, 255, np.uint8)


def to_uint16(rgb01: np.ndarray) -> np.ndarray:
    """Display image (3, H, W) in [0, 1] to a 16-bit (H, W, 3) RGB array: NaN -> 0, clip, ``round(65535 v)``."""
    return _to_uint(rgb01, 65535, np.uint16)


def _write_encoded(
    rgb_hwc: np.ndarray, extension: str, path: str | os.PathLike, params: tuple[int, ...] = ()
) -> Path:
    """Encode an (H, W, 3) RGB array with OpenCV (which expects BGR) and write the bytes atomically."""
    ok, encoded = cv2.imencode(extension, np.ascontiguousarray(rgb_hwc[:, :, ::-1]), list(params))
    if not ok:
        raise Dwarf3Error(f"{path}: OpenCV could not encode the preview as {extension}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return Path(path)


def write_preview_png(rgb01: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a display image (3, H, W) in [0, 1] as an 8-bit RGB PNG, atomically; NaN is black.

    Parameters
    ----------
    rgb01 : numpy.ndarray
        Display-referred image, R, G, B.
    path : str or os.PathLike
        Destination (e.g. ``master_quicklook.png``).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _write_encoded(to_uint8(rgb01), ".png", path)


def write_preview_tiff(rgb01: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a display image (3, H, W) in [0, 1] as an uncompressed 16-bit RGB TIFF, atomically; NaN is black.

    Uncompressed: every reader opens it, and Adobe Deflate took 0.8 s for a 3856x2180 frame (10x the write) for
    a file only about 10-40 % smaller.

    Parameters
    ----------
    rgb01 : numpy.ndarray
        Display-referred image, R, G, B.
    path : str or os.PathLike
        Destination (e.g. ``master_quicklook.tif``).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    uncompressed = (cv2.IMWRITE_TIFF_COMPRESSION, cv2.IMWRITE_TIFF_COMPRESSION_NONE)
    return _write_encoded(to_uint16(rgb01), ".tif", path, uncompressed)


def make_quicklook(
    linear_rgb: np.ndarray,
    calibration: ColorCalibration | None = None,
    *,
    stretch: str = "two_stage",
    scnr_amount: float = 0.0,
    color_matrix: str | np.ndarray = "identity",
    target_background: float = 0.25,
    sample: int = 250_000,
) -> np.ndarray:
    """Display version of a linear master: calibration, colour matrix, SCNR, stretch.

    1. ``calibration`` (gains and offsets) is applied, when given.
    2. ``color_matrix`` mixes the channels (a preset name or a 3 x 3 matrix with rows summing to 1).
    3. SCNR average-neutral green removal with ``scnr_amount`` (skipped at 0).
    4. The stretch: ``"two_stage"`` (:func:`two_stage_stretch`) or ``"asinh"`` (:func:`percentile_normalise` to
       the 0.25 and 99.9 percentiles, then :func:`asinh_stretch` per channel with ``beta`` putting the sky median
       at ``target_background``).

    Parameters
    ----------
    linear_rgb : numpy.ndarray
        Linear master, shape (3, H, W), NaN where there are no data. Not modified.
    calibration : ColorCalibration, optional
        Recorded colour calibration; None leaves the colours as they are.
    stretch : {"two_stage", "asinh"}, optional
        Stretch method.
    scnr_amount : float, optional
        SCNR strength in [0, 1]; 0 (default) leaves green alone.
    color_matrix : str or array_like, optional
        Colour matrix preset name or matrix; ``"identity"`` (default) changes nothing.
    target_background : float, optional
        Display level of the sky median, in (0, 1).
    sample : int, optional
        Largest number of grid pixels for the stretch statistics.

    Returns
    -------
    numpy.ndarray
        New float32 image (3, H, W) in [0, 1]; no-data pixels are 0 (black).

    Raises
    ------
    ConfigError
        For an unknown stretch or matrix name, or parameters out of range.
    """
    if stretch not in STRETCH_METHODS:
        raise ConfigError(f"unknown stretch {stretch!r}; choose one of {', '.join(STRETCH_METHODS)}")
    img = require_rgb(linear_rgb)
    if calibration is not None:
        img = apply_color_calibration(img, calibration)
    img = apply_color_matrix(img, color_matrix)
    if scnr_amount != 0:
        img = scnr_green(img, scnr_amount)
    if stretch == "two_stage":
        out = two_stage_stretch(img, target_background=target_background, sample=sample)
    else:
        out, _ = percentile_normalise(img)
        values = grid_sample(out, sample).ravel()
        background = float(np.median(values)) if values.size else 0.0
        out = asinh_stretch(out, asinh_beta_for(min(background, 1.0 - 1e-9), target_background))
    return np.nan_to_num(out, copy=False, nan=0.0)
