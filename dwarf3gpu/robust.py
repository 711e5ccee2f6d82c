"""Robust statistics shared by the measuring, calibration and reporting stages.

Two MAD scale factors, each with one meaning:

- :data:`MAD_TO_STD` = 1 / Phi^-1(3/4) to double precision, astropy's ``mad_std`` constant: the sigma clip's
  ``stdfunc="mad_std"`` uses it so its bounds equal astropy's bit for bit;
- :data:`MAD_TO_SIGMA` = 1.4826, the four-digit value every measurement uses (sky noise of stars and quality,
  colour and stretch backgrounds, hot-pixel thresholds, dark checks, image statistics). Their results are recorded
  in caches and manifests, so the value is part of those outputs' definition.

:func:`difference_noise` is the one pixel-noise estimator built on neighbour differences.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MAD_TO_STD", "MAD_TO_SIGMA", "difference_noise", "uint16_median"]

MAD_TO_STD = 1.482602218505602
"""``mad_std = MAD_TO_STD x MAD``: 1 / Phi^-1(3/4), the constant of astropy's ``mad_std``."""

MAD_TO_SIGMA = 1.4826
"""Gaussian sigma per unit of median absolute deviation, to four digits: the measurements' robust spread."""


def difference_noise(image: np.ndarray, step: int = 2, mask: np.ndarray | None = None) -> float:
    """Pixel noise from horizontal neighbour differences: ``MAD_TO_SIGMA x MAD(d) / sqrt(2)``.

    ``d = image[:, step:] - image[:, :-step]``: with ``step = 2`` each pair has the same colour on a Bayer mosaic
    (and on every other row of a CFA master), and a smooth background cancels. Both pixels of a pair must be
    ``True`` in ``mask`` (when given) and the difference finite.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) pixels (float32, or any real type, converted to float32).
    step : int, optional
        Distance of the pixels of a pair along the row.
    mask : numpy.ndarray of bool, optional
        (H, W) pixels that may be used.

    Returns
    -------
    float
        The noise of one pixel; NaN when no pair is usable.
    """
    x = np.asarray(image).astype(np.float32, copy=False)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, left out below
        d = x[:, step:] - x[:, :-step]
    if mask is not None or not np.isfinite(d).all():
        good = np.isfinite(d)
        if mask is not None:
            good &= mask[:, step:] & mask[:, :-step]
        d = d[good]
    if d.size == 0:
        return float("nan")
    # median and MAD are order statistics: partition the private array ``d`` in place
    centre = np.median(d, overwrite_input=True)
    np.subtract(d, centre, out=d)
    np.abs(d, out=d)
    return MAD_TO_SIGMA * float(np.median(d, overwrite_input=True)) / math.sqrt(2)


def uint16_median(samples: np.ndarray) -> float:
    """Median of uint16 samples from their histogram: the middle value, or the mean of the two middle values
    (exact in float32, as ``np.median`` of the float32 samples)."""
    if samples.size == 0:
        return float("nan")
    cumulative = np.cumsum(np.bincount(samples.ravel(), minlength=1))
    low, high = np.searchsorted(cumulative, [(samples.size - 1) // 2 + 1, samples.size // 2 + 1])
    return float((np.float32(low) + np.float32(high)) / np.float32(2))
