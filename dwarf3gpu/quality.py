"""Per-frame metrics, the two frame scores, and explainable selection.

Metrics come from the star detection on the green luminance proxy (see ``stars.py``): background, robust noise,
star count, median FWHM and eccentricity; plus the saturated fraction of the raw mosaic and, once the frame is
registered, its transparency (flux of matched stars relative to the reference). Formulas and the reasons behind
them are in METHODS.md ("Frame metrics, scores and selection").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .geometry import apply_transform
from .stars import StarList

__all__ = [
    "FrameMetrics",
    "SelectionLimits",
    "Decision",
    "frame_metrics",
    "transparency",
    "score_frames",
    "select_frames",
    "SCORE_METHODS",
]

SCORE_METHODS = ("weighted", "classic")
#: Matching radius (full-resolution px) used to pair frame and reference stars for the transparency.
TRANSPARENCY_MATCH_RADIUS_PX = 2.0
#: Brightest unsaturated stars used for the transparency.
TRANSPARENCY_STARS = 100
#: Fewest matched stars for a transparency value.
TRANSPARENCY_MIN_STARS = 5


@dataclass(frozen=True)
class FrameMetrics:
    """What one frame looks like, in numbers.

    Attributes
    ----------
    background : float
        Median sky level of the green luminance proxy, ADU.
    noise : float
        Robust sky noise of one proxy pixel, 1.4826 x MAD, ADU.
    saturated_fraction : float
        Fraction of mosaic pixels at or above the saturation level.
    n_stars : int
        Stars detected (after hot-pixel, cosmic-ray and trail rejection; capped by ``max_stars``).
    fwhm : float
        Median FWHM of the unsaturated stars, full-resolution px (NaN without stars).
    eccentricity : float
        Median eccentricity of the unsaturated stars, 0 is round (NaN without stars).
    n_trails : int
        Linear trails (satellites, aircraft) seen by the detector.
    transparency : float or None
        Median flux ratio frame / reference over matched stars; None until registered (or too few matches).
    """

    background: float
    noise: float
    saturated_fraction: float
    n_stars: int
    fwhm: float
    eccentricity: float
    n_trails: int = 0
    transparency: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary (NaN becomes None)."""
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrameMetrics:
        """Inverse of :meth:`to_json`."""
        values = dict(data)
        for key in ("background", "noise", "fwhm", "eccentricity"):
            values[key] = float("nan") if values.get(key) is None else float(values[key])
        return cls(**values)


@dataclass(frozen=True)
class SelectionLimits:
    """Hard limits a frame must pass before ranking (None disables a limit).

    Attributes
    ----------
    max_fwhm : float or None
        Largest median FWHM, full-resolution px.
    min_stars : int
        Fewest detected stars (below this a frame cannot be registered reliably).
    max_eccentricity : float or None
        Largest median star eccentricity (tracking or wind trouble).
    min_transparency : float or None
        Smallest transparency relative to the reference (clouds).
    max_background : float or None
        Largest background relative to the session median (twilight, moon, dew).
    """

    max_fwhm: float | None = None
    min_stars: int = 8
    max_eccentricity: float | None = None
    min_transparency: float | None = None
    max_background: float | None = None


@dataclass(frozen=True)
class Decision:
    """Whether a frame is kept, and why not when it is not.

    Attributes
    ----------
    kept : bool
        True when the frame goes into the stack.
    reason : str
        Empty when kept; otherwise a machine-readable reason (``low_score``, ``too_few_stars``,
        ``fwhm_above_limit``, ``eccentricity_above_limit``, ``transparency_below_limit``,
        ``background_above_limit``, ``alignment_failed``, ``unreadable``).
    detail : str
        The numbers behind the reason, for people.
    rank : int or None
        1-based rank by score among the frames that passed the hard limits.
    """

    kept: bool
    reason: str = ""
    detail: str = ""
    rank: int | None = None


def frame_metrics(mosaic: np.ndarray, stars: StarList, *, saturation: float | None = 65535) -> FrameMetrics:
    """Metrics of one frame from its raw mosaic and its detected stars.

    Parameters
    ----------
    mosaic : numpy.ndarray
        The raw frame (uint16 or float).
    stars : StarList
        Result of :func:`dwarf3gpu.stars.detect_stars` on that frame.
    saturation : float or None, default 65535
        Raw saturation level; None gives a saturated fraction of 0.

    Returns
    -------
    FrameMetrics
        Transparency is None here; it comes with registration (:func:`transparency`).
    """
    saturated = 0.0
    if saturation is not None and mosaic.size:
        level = _level_for(mosaic.dtype, saturation)
        saturated = float(np.count_nonzero(mosaic >= level)) / mosaic.size
    return FrameMetrics(
        background=float(stars.background),
        noise=float(stars.noise),
        saturated_fraction=saturated,
        n_stars=len(stars),
        fwhm=stars.median_fwhm,
        eccentricity=stars.median_eccentricity,
        n_trails=stars.n_trails,
    )


def transparency(
    frame_xy: np.ndarray, frame_flux: np.ndarray, ref_xy: np.ndarray, ref_flux: np.ndarray, matrix: np.ndarray
) -> tuple[float | None, int]:
    """Median flux ratio frame / reference over stars matched through the frame's transform.

    Parameters
    ----------
    frame_xy, ref_xy : numpy.ndarray
        (N, 2) unsaturated star positions [x, y], brightest first.
    frame_flux, ref_flux : numpy.ndarray
        Their fluxes.
    matrix : numpy.ndarray
        (2, 3) frame -> reference transform.

    Returns
    -------
    ratio : float or None
        Median of ``flux_frame / flux_ref`` over pairs closer than ``TRANSPARENCY_MATCH_RADIUS_PX``;
        None when fewer than ``TRANSPARENCY_MIN_STARS`` pairs exist.
    n_pairs : int
        Number of pairs used.
    """
    frame_xy, frame_flux = frame_xy[:TRANSPARENCY_STARS], frame_flux[:TRANSPARENCY_STARS]
    ref_xy, ref_flux = ref_xy[:TRANSPARENCY_STARS], ref_flux[:TRANSPARENCY_STARS]
    if len(frame_xy) == 0 or len(ref_xy) == 0:
        return None, 0
    mapped = apply_transform(matrix, frame_xy)
    d2 = ((mapped[:, None, :] - ref_xy[None, :, :]) ** 2).sum(axis=-1)
    nearest = d2.argmin(axis=1)
    close = d2[np.arange(len(mapped)), nearest] <= TRANSPARENCY_MATCH_RADIUS_PX**2
    # one reference star may pair with one frame star only: keep the closest claim
    pairs = {}
    for i in np.flatnonzero(close):
        j = int(nearest[i])
        if j not in pairs or d2[i, j] < d2[pairs[j], j]:
            pairs[j] = int(i)
    if len(pairs) < TRANSPARENCY_MIN_STARS:
        return None, len(pairs)
    ref_idx = np.array(sorted(pairs))
    frame_idx = np.array([pairs[j] for j in ref_idx])
    good = (ref_flux[ref_idx] > 0) & (frame_flux[frame_idx] > 0)
    if good.sum() < TRANSPARENCY_MIN_STARS:
        return None, int(good.sum())
    ratio = frame_flux[frame_idx][good] / ref_flux[ref_idx][good]
    return float(np.median(ratio)), int(good.sum())


def score_frames(metrics: Sequence[FrameMetrics], method: str = "weighted") -> np.ndarray:
    """Score every frame of a session; higher is better.

    ``classic``: ``(1 + stars) / (noise * (1 + 10 * sat) * (1 + bg_norm))`` with ``bg_norm`` the background
    divided by the session median.

    ``weighted`` (default): the frame's relative point-source signal-to-noise ratio squared, i.e. the weight an
    optimal stack gives it, ``(T / (noise_n * fwhm_n))**2 / ((1 + 10 * sat) * (1 + trails))``, with ``T`` the
    transparency (1 when unknown), ``noise_n`` and ``fwhm_n`` divided by their session medians. A faint star's
    flux scales with ``T``; the noise in its aperture with ``noise * fwhm``. See METHODS.md for why.

    Parameters
    ----------
    metrics : sequence of FrameMetrics
        One per frame.
    method : {"weighted", "classic"}
        Score formula.

    Returns
    -------
    numpy.ndarray
        float64 scores; 0 for a frame whose metrics are not finite (no stars, no valid pixel).
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}; use one of {', '.join(SCORE_METHODS)}")
    if not metrics:
        return np.zeros(0)
    noise = np.array([m.noise for m in metrics], float)
    background = np.array([m.background for m in metrics], float)
    fwhm = np.array([m.fwhm for m in metrics], float)
    sat = np.array([m.saturated_fraction for m in metrics], float)
    stars = np.array([m.n_stars for m in metrics], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "classic":
            bg_norm = background / _median_positive(background)
            score = (1 + stars) / (noise * (1 + 10 * sat) * (1 + bg_norm))
        else:
            t = np.array([1.0 if m.transparency is None else m.transparency for m in metrics], float)
            trails = np.array([m.n_trails for m in metrics], float)
            noise_n = noise / _median_positive(noise)
            fwhm_n = fwhm / _median_positive(fwhm)
            score = (np.clip(t, 0, None) / (noise_n * fwhm_n)) ** 2 / ((1 + 10 * sat) * (1 + trails))
    return np.where(np.isfinite(score) & (score > 0), score, 0.0)


def select_frames(
    metrics: Sequence[FrameMetrics | None],
    scores: Sequence[float],
    *,
    keep: float = 0.92,
    limits: SelectionLimits = SelectionLimits(),
    failures: Sequence[str] = (),
) -> list[Decision]:
    """Decide which frames to keep: failures first, then hard limits, then the top ``keep`` fraction by score.

    Parameters
    ----------
    metrics : sequence of FrameMetrics or None
        One per frame, in observation order (None for a frame that could not be measured).
    scores : sequence of float
        Scores from :func:`score_frames` (same order).
    keep : float, default 0.92
        Fraction of all frames to keep, rounded half up, at least one; frames rejected by a failure or a limit
        count against it (they are never replaced by lower-ranked frames beyond the fraction).
    limits : SelectionLimits
        Hard limits.
    failures : sequence of str, optional
        Per-frame failure reason from earlier stages (e.g. ``"alignment_failed: ..."``), empty when none.

    Returns
    -------
    list of Decision
        One per frame. Ties in score go to the earlier frame, so the result is deterministic.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n = len(metrics)
    failures = list(failures) + [""] * (n - len(failures))
    median_bg = _median_positive(np.array([m.background for m in metrics if m is not None], float))
    decisions: list[Decision | None] = [None] * n
    for i, m in enumerate(metrics):
        rejection = _hard_rejection(m, failures[i], limits, median_bg)
        if rejection:
            decisions[i] = Decision(False, *rejection)
    candidates = [i for i in range(n) if decisions[i] is None]
    order = sorted(candidates, key=lambda i: (-float(scores[i]), i))
    n_keep = max(1, math.floor(keep * n + 0.5))
    for rank, i in enumerate(order, start=1):
        if rank <= n_keep:
            decisions[i] = Decision(True, rank=rank)
        else:
            detail = f"score {scores[i]:.3g}, rank {rank} of {len(order)}; keeping the best {n_keep} of {n} (keep {keep:g})"
            decisions[i] = Decision(False, "low_score", detail, rank)
    return decisions  # type: ignore[return-value]


def _hard_rejection(
    m: FrameMetrics | None, failure: str, limits: SelectionLimits, median_bg: float
) -> tuple[str, str] | None:
    """(reason, detail) when a frame fails before ranking, else None."""
    if failure:
        reason, _, detail = failure.partition(":")
        return reason.strip(), detail.strip()
    if m is None:
        return "unreadable", "the frame could not be measured"
    if m.n_stars < limits.min_stars:
        return "too_few_stars", f"{m.n_stars} stars detected, at least {limits.min_stars} needed"
    if limits.max_fwhm is not None and not (m.fwhm <= limits.max_fwhm):
        return "fwhm_above_limit", f"FWHM {m.fwhm:.2f} px > {limits.max_fwhm:g} px"
    if limits.max_eccentricity is not None and not (m.eccentricity <= limits.max_eccentricity):
        return "eccentricity_above_limit", f"eccentricity {m.eccentricity:.2f} > {limits.max_eccentricity:g}"
    if limits.min_transparency is not None and (m.transparency is None or m.transparency < limits.min_transparency):
        shown = "unknown" if m.transparency is None else f"{m.transparency:.2f}"
        return "transparency_below_limit", f"transparency {shown} < {limits.min_transparency:g}"
    if limits.max_background is not None and m.background > limits.max_background * median_bg:
        return (
            "background_above_limit",
            f"background {m.background:.1f} ADU > {limits.max_background:g} x session median {median_bg:.1f}",
        )
    return None


def _level_for(dtype: np.dtype, level: float):
    """``level`` in the array's own integer type when exact (avoids a float64 copy of a uint16 frame)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if float(level).is_integer() and info.min <= level <= info.max:
            return dtype.type(level)
    return level


def _median_positive(values: np.ndarray) -> float:
    """Median of the finite positive values (1 when there are none, so ratios stay defined)."""
    good = values[np.isfinite(values) & (values > 0)]
    return float(np.median(good)) if good.size else 1.0


def _finite_or_none(value: Any) -> Any:
    """NaN/inf floats become None for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
