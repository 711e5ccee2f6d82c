"""Frame registration: star-list matching, transform refinement and transform helpers.

Every transform here follows the single project convention (see METHODS.md): a 2x3 float64
affine ``A`` maps a frame pixel ``(x, y)`` (x = column, y = row, origin at the centre of
pixel (0, 0), full-resolution mosaic pixels) to the reference frame's pixel::

    [x_ref, y_ref] = A[:, :2] @ [x, y] + A[:, 2]

:func:`register_frame` finds ``A`` for one frame from two flux-sorted star lists. astroalign's
``find_transform`` (triangle invariants + RANSAC) supplies a first similarity transform from
the brightest stars; :func:`refine_transform` then re-matches *all* detected stars by nearest
neighbour and refits by least squares with outlier rejection, which is where the accuracy
comes from; :func:`select_model` keeps a full affine only where the stars call for one. When
the callers pass the stars' fluxes, each pair is weighted by the inverse of its centroid
variance, modelled from the fluxes (:func:`pair_variances`), and outliers are judged on
normalised residuals. Every function is pure (no module state), so callers may run them in a
process pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import astroalign
import numpy as np
from scipy.optimize import nnls
from scipy.spatial import cKDTree

from .errors import ConfigError, SessionError
from .geometry import apply_transform, compose, invert_transform, rotation_deg, scale

__all__ = [
    "Registration",
    "register_frame",
    "refine_transform",
    "fit_transform",
    "pair_variances",
    "select_model",
    "central_stars",
    "transform_rms_error",
    "choose_reference",
    "choose_align_mode",
    "rotation_range_deg",
]

STAR_COUNTS = (30, 50)
"""Brightest-star counts tried in turn with astroalign before the image attempt.

Larger counts rarely help and astroalign's RANSAC costs O(matches^2) when it fails: measured
0.3 s at 30 stars, 1 s at 50, 15 s at 100 and about 6 min at 200 on unrelated fields.
"""

IMAGE_SETTINGS = ((50, 5.0, 5), (100, 3.0, 3))
"""(max_control_points, detection_sigma, min_area) tried in turn for the image attempt."""

INITIAL_RADIUS_PX = 3.0
"""Nearest-neighbour match radius around the astroalign transform (first refinement pass)."""

MIN_RADIUS_PX = 0.5
"""Floor of the outlier cut and of the later match radii, in pixels."""

CLIP_SIGMA = 4.0
"""Outlier cut in units of the robust per-axis residual sigma."""

MAX_REFINE_ITERATIONS = 10
"""Refinement passes at most; it normally converges (same match set twice) in 2 to 4."""

CENTROID_FLOOR_PX = 0.01
"""Smallest per-axis centroid error assumed for any star, in pixels (see :func:`pair_variances`).

It caps the weight of the brightest and of saturated stars. Measured on the simulator's full frames: the
brightest unsaturated stars have 0.01-0.02 px, saturated ones 0.006-0.009 px of error per axis.
"""

VARIANCE_PASSES = 2
"""Rounds of (variance model from residuals, weighted refit) per weighted fit."""

MIN_WEIGHTED_PAIRS = 10
"""Fewer pairs than this are fitted without weights (too few to estimate the variance model)."""

_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))
_MODELS = ("affine", "similarity")
_MIN_PAIRS = 4
_ALIGN_MODES = ("integer", "rgb_affine", "auto")
_REFERENCE_MODES = ("best", "first")


@dataclass(frozen=True)
class Registration:
    """Outcome of registering one frame onto the reference.

    Attributes
    ----------
    ok : bool
        True when a transform was found and passed the checks.
    matrix : numpy.ndarray or None
        (2, 3) float64 affine, frame pixel -> reference pixel; None when ``ok`` is False.
    n_matches : int
        Star pairs used in the final fit (0 on failure).
    rms_px : float
        RMS distance between the matched reference stars and the transformed frame stars,
        in pixels (NaN on failure).
    rotation_deg : float
        Rotation of ``matrix`` in degrees, see :func:`rotation_deg` (NaN on failure).
    reason : str
        Empty on success; ``"alignment_failed: <why>"`` on failure.
    attempt : str
        The attempt that succeeded (``"centre30"``, ``"stars30"``, ..., ``"image"``); empty
        on failure.
    model : str
        Model of ``matrix``, "similarity" or "affine"; empty on failure.
    """

    ok: bool
    matrix: np.ndarray | None
    n_matches: int
    rms_px: float
    rotation_deg: float
    reason: str
    attempt: str
    model: str

    def to_json(self) -> dict:
        """Return the result as plain JSON-compatible values (NaN becomes None).

        Returns
        -------
        dict
            Keys are the attribute names; ``matrix`` is a list of two rows or None.
        """
        return {
            "ok": self.ok,
            "matrix": None if self.matrix is None else self.matrix.tolist(),
            "n_matches": int(self.n_matches),
            "rms_px": _json_float(self.rms_px),
            "rotation_deg": _json_float(self.rotation_deg),
            "reason": self.reason,
            "attempt": self.attempt,
            "model": self.model,
        }


def _json_float(value: float) -> float | None:
    """Return ``value`` as a float, or None when it is not finite."""
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------- transform helpers














def transform_rms_error(
    A_est: np.ndarray, A_true: np.ndarray, width: int, height: int, grid: int = 16
) -> float:
    """Return the RMS distance between two transforms over a grid covering the frame.

    Parameters
    ----------
    A_est, A_true : numpy.ndarray
        (2, 3) affines to compare.
    width, height : int
        Frame size in pixels; the grid spans pixel centres 0..width-1 and 0..height-1.
    grid : int, optional
        Points per axis (``grid * grid`` points in all).

    Returns
    -------
    float
        RMS of ``|A_est(p) - A_true(p)|`` over the grid points, in pixels.
    """
    gx, gy = np.meshgrid(np.linspace(0.0, width - 1.0, grid), np.linspace(0.0, height - 1.0, grid))
    points = np.column_stack([gx.ravel(), gy.ravel()])
    diff = apply_transform(A_est, points) - apply_transform(A_true, points)
    return float(np.sqrt(np.mean(np.sum(diff * diff, axis=1))))


# --------------------------------------------------------------------------- fitting and matching


def fit_transform(
    src: np.ndarray, dst: np.ndarray, model: str = "affine", weights: np.ndarray | None = None
) -> np.ndarray:
    """Least-squares transform mapping ``src`` points onto ``dst`` points.

    Parameters
    ----------
    src, dst : numpy.ndarray
        (N, 2) corresponding points [x, y]; N >= 3 for "affine", N >= 2 for "similarity".
    model : {"affine", "similarity"}
        "affine": 6 free parameters (rotation, scale, shear, anisotropic scale, shift);
        "similarity": rotation, one scale and shift (4 parameters).
    weights : numpy.ndarray, optional
        (N,) positive weight of each pair, the same for x and y (1 / per-axis variance); the fit
        minimises ``sum(w * |A(src) - dst|**2)``. None weighs every pair equally.

    Returns
    -------
    numpy.ndarray
        (2, 3) float64 affine.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if model not in _MODELS:
        raise ConfigError(f"unknown transform model {model!r}; use one of {_MODELS}")
    if weights is None:
        src_mean = src.mean(axis=0)
        dst_mean = dst.mean(axis=0)
        w = None
    else:
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        src_mean = w @ src
        dst_mean = w @ dst
    s = src - src_mean
    d = dst - dst_mean
    if model == "affine":
        if w is None:
            linear = np.linalg.lstsq(s, d, rcond=None)[0].T
        else:
            root = np.sqrt(w)[:, None]
            linear = np.linalg.lstsq(s * root, d * root, rcond=None)[0].T
    else:
        ws = s if w is None else s * w[:, None]
        norm = float(np.sum(ws * s))
        a = float(np.sum(ws * d)) / norm
        b = float(np.sum(ws[:, 0] * d[:, 1] - ws[:, 1] * d[:, 0])) / norm
        linear = np.array([[a, -b], [b, a]])
    return np.hstack([linear, (dst_mean - linear @ src_mean)[:, None]])


def pair_variances(
    resid: np.ndarray, frame_inv_flux: np.ndarray, ref_inv_flux: np.ndarray, start: np.ndarray | None = None
) -> np.ndarray:
    """Per-axis variance of each star pair's residual, from a flux model fitted to the residuals.

    The centroid error of a star of flux ``F`` (per axis) follows
    ``sigma^2 = s^2 / SNR^2 + floor^2`` with ``SNR = F / sqrt(F / g + B)`` (``s`` the PSF's Gaussian sigma,
    ``g`` the gain, ``B`` the sky variance summed over the star's pixels), i.e.
    ``sigma^2(F) = alpha / F^2 + beta / F + gamma``. A pair's residual adds the frame star's error (mapped
    through the transform, whose scale is 1 within 5 %) and the reference star's, so its per-axis variance
    is ``alpha (1/F_f^2 + 1/F_r^2) + beta (1/F_f + 1/F_r) + 2 gamma``. The lists carry fluxes only, so the
    coefficients (which depend on the frame's sky, seeing and clouds) are fitted to the residuals
    themselves: non-negative least squares of ``|r|^2 / 2`` on the three terms, iteratively reweighted by
    the model variance, pairs beyond ``9 x`` their variance (about 4.2 sigma) left out of the fit, and
    ``gamma`` at least :data:`CENTROID_FLOOR_PX` squared. The weights are the same for frame and reference
    terms: when the flux ratio is about constant (one transparency) only their sum can be told apart.

    Parameters
    ----------
    resid : numpy.ndarray
        (N,) residual lengths ``|A(frame star) - reference star|`` in pixels.
    frame_inv_flux, ref_inv_flux : numpy.ndarray
        (N,) ``1 / flux`` of each pair's frame and reference star; 0 for a star whose centroid error is
        the floor alone (saturated: its flux is a lower bound, its centroid is good).
    start : numpy.ndarray, optional
        (N,) variances to start the reweighting from; None starts from the robust scatter of ``resid``
        (``median / sqrt(2 ln 2)``) for every pair.

    Returns
    -------
    numpy.ndarray
        (N,) per-axis variances in px^2, all at least ``2 * CENTROID_FLOOR_PX**2``.
    """
    resid = np.asarray(resid, dtype=np.float64)
    inv_f = np.asarray(frame_inv_flux, dtype=np.float64)
    inv_r = np.asarray(ref_inv_flux, dtype=np.float64)
    terms = np.column_stack([inv_f**2 + inv_r**2, inv_f + inv_r, np.ones(resid.size)])
    scales = terms.max(axis=0)
    scales[scales <= 0.0] = 1.0
    terms = terms / scales  # columns of order 1 for the solver (the variances do not depend on it)
    floor = 2.0 * CENTROID_FLOOR_PX**2
    half_r2 = 0.5 * resid * resid
    if start is None:
        sigma = float(np.median(resid)) / _RAYLEIGH_MEDIAN
        var = np.full(resid.size, max(sigma * sigma, floor))
    else:
        var = np.maximum(np.asarray(start, dtype=np.float64), floor)
    for _ in range(4):
        use = half_r2 <= 9.0 * var
        if np.count_nonzero(use) < terms.shape[1]:
            break
        inv = 1.0 / var[use]
        coef = nnls(terms[use] * inv[:, None], half_r2[use] * inv)[0]
        coef[2] = max(coef[2], floor)
        var = terms @ coef
    return np.maximum(var, floor)


def _match_nearest(
    src: np.ndarray, tree: cKDTree, A: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour pairs between transformed ``src`` and the tree's points.

    Parameters
    ----------
    src : numpy.ndarray
        (N, 2) frame points.
    tree : scipy.spatial.cKDTree
        Tree over the reference points.
    A : numpy.ndarray
        (2, 3) current frame -> reference transform.
    radius : float
        Largest accepted distance in reference pixels.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Index arrays into ``src`` and into the reference points, sorted by ``src`` index.
        When several frame stars claim one reference star only the closest keeps it.
    """
    dist, ref_idx = tree.query(apply_transform(A, src), k=1, distance_upper_bound=radius)
    src_idx = np.flatnonzero(np.isfinite(dist))
    ref_idx = ref_idx[src_idx]
    order = np.lexsort((dist[src_idx], ref_idx))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ref_idx[order][1:] != ref_idx[order][:-1]
    keep = np.sort(order[first])
    return src_idx[keep], ref_idx[keep]


def _fit_clipped(
    src: np.ndarray, dst: np.ndarray, model: str, inv_flux: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """Fit, drop pairs beyond the robust outlier cut, refit.

    Without fluxes every pair has the same weight and the cut is ``max(CLIP_SIGMA * sigma,
    MIN_RADIUS_PX)`` with ``sigma`` the robust per-axis scatter of the residuals. With fluxes the
    fit is weighted by ``1 / variance`` from :func:`pair_variances` (re-estimated from the weighted
    fit's residuals :data:`VARIANCE_PASSES` times) and the cut of each pair is
    ``max(CLIP_SIGMA * sigma_n * sqrt(variance), MIN_RADIUS_PX)``, ``sigma_n`` being the robust
    scatter of the normalised residuals ``|r| / sqrt(variance)`` (about 1 when the model holds).

    Parameters
    ----------
    src, dst : numpy.ndarray
        (N, 2) candidate pairs.
    model : str
        See :func:`fit_transform`.
    inv_flux : tuple of numpy.ndarray, optional
        ``(1 / frame flux, 1 / reference flux)`` of each pair (see :func:`pair_variances`); None
        for an unweighted fit.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, float, numpy.ndarray or None)
        The refitted transform, the boolean inlier mask, the largest cut used (pixels) and the
        per-pair variances (None when unweighted).
    """
    A = fit_transform(src, dst, model)
    resid = np.linalg.norm(apply_transform(A, src) - dst, axis=1)
    if inv_flux is None or len(src) < MIN_WEIGHTED_PAIRS:
        sigma = float(np.median(resid)) / _RAYLEIGH_MEDIAN
        cut = max(CLIP_SIGMA * sigma, MIN_RADIUS_PX)
        inliers = resid <= cut
        if _MIN_PAIRS <= inliers.sum() < inliers.size:
            A = fit_transform(src[inliers], dst[inliers], model)
        return A, inliers, cut, None
    var = None
    for _ in range(VARIANCE_PASSES):
        var = pair_variances(resid, inv_flux[0], inv_flux[1], start=var)
        A = fit_transform(src, dst, model, weights=1.0 / var)
        resid = np.linalg.norm(apply_transform(A, src) - dst, axis=1)
    sigma = float(np.median(resid / np.sqrt(var))) / _RAYLEIGH_MEDIAN
    cuts = np.maximum(CLIP_SIGMA * sigma * np.sqrt(var), MIN_RADIUS_PX)
    inliers = resid <= cuts
    if _MIN_PAIRS <= inliers.sum() < inliers.size:
        A = fit_transform(src[inliers], dst[inliers], model, weights=1.0 / var[inliers])
    return A, inliers, float(cuts.max()), var


def select_model(src: np.ndarray, dst: np.ndarray) -> str:
    """Choose between a similarity and a full affine for matched pairs (BIC).

    The affine has two more parameters (shear and anisotropic scale, e.g. the differential
    atmospheric refraction that changes with altitude). It is kept only when it lowers the
    Bayesian information criterion ``n ln(RSS / n) + k ln(n)`` (``n`` = 2 x pairs), i.e. when
    the data show a real departure from a similarity; otherwise its extra freedom only adds
    noise where the matched stars do not cover the frame.

    Parameters
    ----------
    src, dst : numpy.ndarray
        (N, 2) matched pairs, N >= 4.

    Returns
    -------
    str
        "affine" or "similarity".
    """
    n_obs = 2 * len(src)
    rss = {}
    for model in _MODELS:
        resid = apply_transform(fit_transform(src, dst, model), src) - dst
        rss[model] = max(float(np.sum(resid * resid)), 1e-300)
    gain = n_obs * math.log(rss["similarity"] / rss["affine"])
    return "affine" if gain > 2.0 * math.log(n_obs) else "similarity"


def refine_transform(
    frame_xy: np.ndarray,
    ref_xy: np.ndarray,
    A0: np.ndarray,
    model: str = "auto",
    radius: float = INITIAL_RADIUS_PX,
    *,
    frame_flux: np.ndarray | None = None,
    ref_flux: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str] | None:
    """Refine a rough transform by nearest-neighbour re-matching of all stars.

    Each pass matches every frame star to its nearest reference star under the current
    transform (one-to-one, within the radius), fits by least squares, rejects pairs beyond
    ``max(CLIP_SIGMA * sigma, MIN_RADIUS_PX)`` (sigma from the median residual) and refits.
    The next pass matches within twice that cut (never more than ``radius``). It stops when a
    pass keeps the same pairs as the previous one, so the answer depends only on that final
    match set and not on the random sampling behind ``A0``. With ``model="auto"`` the passes
    fit an affine and :func:`select_model` picks the final model on the final pairs.

    With both fluxes given, every fit is weighted by the inverse variance of each pair
    (:func:`pair_variances`, a flux model fitted to that pass's residuals) and the outlier cut
    applies to normalised residuals, per pair (see :func:`_fit_clipped`); the model choice
    stays unweighted (see METHODS.md). Without fluxes the result is that of the unweighted fit.

    Parameters
    ----------
    frame_xy, ref_xy : numpy.ndarray
        (N, 2) and (M, 2) star positions [x, y] in the frame and in the reference.
    A0 : numpy.ndarray
        (2, 3) starting transform, frame -> reference.
    model : {"auto", "affine", "similarity"}
        Transform fitted, see :func:`fit_transform` and :func:`select_model`.
    radius : float, optional
        Match radius of the first pass, in reference pixels.
    frame_flux, ref_flux : numpy.ndarray, optional
        (N,) and (M,) star fluxes (any unit, the same for both lists; ``inf`` marks a star whose
        centroid error is the floor alone, e.g. a saturated star). Both or neither.

    Returns
    -------
    tuple or None
        ``(A, frame_idx, ref_idx, model)``: the refined transform, the indices of the pairs
        used in its fit and the model fitted; None when fewer than 4 pairs were found.

    Raises
    ------
    ValueError
        If only one flux list is given or its length differs from its star list's.
    """
    pass_model = "affine" if model == "auto" else model
    inv_f, inv_r = _inverse_fluxes(frame_flux, ref_flux, len(frame_xy), len(ref_xy))
    if min(len(frame_xy), len(ref_xy)) < _MIN_PAIRS:
        return None
    tree = cKDTree(ref_xy)
    A = np.asarray(A0, dtype=np.float64)
    previous = None
    var = None
    for _ in range(MAX_REFINE_ITERATIONS):
        src_idx, dst_idx = _match_nearest(frame_xy, tree, A, radius)
        if src_idx.size < _MIN_PAIRS:
            return None
        inv_flux = None if inv_f is None else (inv_f[src_idx], inv_r[dst_idx])
        A, inliers, cut, var = _fit_clipped(frame_xy[src_idx], ref_xy[dst_idx], pass_model, inv_flux)
        src_idx, dst_idx = src_idx[inliers], dst_idx[inliers]
        if var is not None:
            var = var[inliers]
        if src_idx.size < _MIN_PAIRS:
            return None
        pairs = (src_idx.tobytes(), dst_idx.tobytes())
        if pairs == previous:
            break
        previous = pairs
        radius = min(radius, 2.0 * cut)
    src, dst = frame_xy[src_idx], ref_xy[dst_idx]
    final_model = select_model(src, dst) if model == "auto" else model
    if final_model != pass_model:
        A = fit_transform(src, dst, final_model, weights=None if var is None else 1.0 / var)
    return A, src_idx, dst_idx, final_model


def _inverse_fluxes(
    frame_flux: np.ndarray | None, ref_flux: np.ndarray | None, n_frame: int, n_ref: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``1 / flux`` of both lists for :func:`pair_variances` (None, None without fluxes).

    ``inf`` gives 0 (floor only). A flux that is NaN or not positive says nothing about the star,
    so it gets the faintest valid flux of its list (the largest variance).
    """
    if frame_flux is None and ref_flux is None:
        return None, None
    if frame_flux is None or ref_flux is None:
        raise ValueError("give both frame_flux and ref_flux, or neither")
    out = []
    for flux, n, name in ((frame_flux, n_frame, "frame_flux"), (ref_flux, n_ref, "ref_flux")):
        flux = np.asarray(flux, dtype=np.float64).reshape(-1)
        if flux.size != n:
            raise ValueError(f"{name} has {flux.size} values for {n} stars")
        valid = flux > 0.0  # False for NaN
        inv = np.zeros(n)
        np.divide(1.0, flux, out=inv, where=valid)
        finite = valid & np.isfinite(flux)
        inv[~valid] = float(inv[finite].max()) if finite.any() else 0.0
        out.append(inv)
    return out[0], out[1]


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class _Checks:
    """Acceptance limits of a refined transform (see :func:`register_frame`)."""

    model: str
    min_matches: int
    max_rms_px: float
    max_scale_error: float


def _accept(
    frame_xy: np.ndarray,
    ref_xy: np.ndarray,
    A0: np.ndarray,
    checks: _Checks,
    attempt: str,
    fluxes: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Registration | None, str]:
    """Refine ``A0`` and return a successful Registration, or None and why it was refused."""
    if abs(scale(A0) - 1.0) > checks.max_scale_error:
        return None, f"scale {scale(A0):.4f} from astroalign is implausible"
    frame_flux, ref_flux = fluxes if fluxes is not None else (None, None)
    refined = refine_transform(frame_xy, ref_xy, A0, checks.model, frame_flux=frame_flux, ref_flux=ref_flux)
    if refined is None:
        return None, "too few star pairs within the match radius"
    A, src_idx, dst_idx, model = refined
    n = int(src_idx.size)
    if n < checks.min_matches:
        return None, f"only {n} star pairs (need {checks.min_matches})"
    resid = apply_transform(A, frame_xy[src_idx]) - ref_xy[dst_idx]
    rms = float(np.sqrt(np.mean(np.sum(resid * resid, axis=1))))
    if rms > checks.max_rms_px:
        return None, f"residual {rms:.3f} px RMS exceeds {checks.max_rms_px} px"
    if abs(scale(A) - 1.0) > checks.max_scale_error:
        return None, f"refined scale {scale(A):.4f} is implausible"
    return Registration(True, A, n, rms, rotation_deg(A), "", attempt, model), ""


def central_stars(xy: np.ndarray, count: int) -> np.ndarray:
    """Return the brightest ``count`` stars inside the central disk of a star list.

    The disk is centred on the middle of the list's bounding box (about the frame centre)
    with a radius of half its smaller side. Alt-az field rotation turns the field about the
    tracked target at the frame centre, so this disk shows the same stars at any rotation,
    while the brightest stars of the whole frame may lie outside the common area.

    Parameters
    ----------
    xy : numpy.ndarray
        (N, 2) positions, brightest first.
    count : int
        Stars returned at most.

    Returns
    -------
    numpy.ndarray
        (M, 2) positions, M <= count, still brightest first.
    """
    low, high = xy.min(axis=0), xy.max(axis=0)
    radius = 0.5 * float(np.min(high - low))
    inside = np.linalg.norm(xy - 0.5 * (low + high), axis=1) <= radius
    return xy[inside][:count]


def _find_transform(source: np.ndarray, target: np.ndarray, **settings) -> tuple[tuple | None, str]:
    """Call astroalign.find_transform, turning any failure into a reason.

    Parameters
    ----------
    source, target : numpy.ndarray
        (N, 2) star lists or 2-D images, frame first.
    **settings
        Keyword arguments of ``astroalign.find_transform``.

    Returns
    -------
    (tuple or None, str)
        ``((A, source_matched, target_matched), "")`` with ``A`` the (2, 3) similarity, or
        ``(None, reason)``. Every exception counts as a failure (MaxIterError, ValueError for
        too few stars, TypeError or others on degenerate lists), as alignment must not raise.
    """
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            transform, (src, dst) = astroalign.find_transform(source, target, **settings)
    except Exception as exc:  # third-party boundary: every failure is a reason, see docstring
        return None, f"{type(exc).__name__}: {exc}"
    A = np.asarray(transform.params[:2], dtype=np.float64)
    if not np.all(np.isfinite(A)):
        return None, "astroalign returned a non-finite transform"
    return (A, src, dst), ""


def _brightest(xy: np.ndarray, count: int) -> np.ndarray:
    """Return the first ``count`` rows of a flux-sorted star list."""
    return xy[:count]


def _star_attempts(
    frame_xy: np.ndarray,
    ref_xy: np.ndarray,
    counts: Sequence[int],
    checks: _Checks,
    fluxes: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Registration | None, list[str]]:
    """astroalign on the brightest stars (central disk, then whole frame) per count; refine."""
    reasons = []
    tried = []
    for count in counts:
        for region, select in (("centre", central_stars), ("stars", _brightest)):
            attempt = f"{region}{count}"
            frame_pts, ref_pts = select(frame_xy, count), select(ref_xy, count)
            if any(np.array_equal(frame_pts, f) and np.array_equal(ref_pts, r) for f, r in tried):
                continue
            tried.append((frame_pts, ref_pts))
            found, why = _find_transform(
                frame_pts, ref_pts, max_control_points=max(len(frame_pts), len(ref_pts))
            )
            if found is None:
                reasons.append(f"{attempt}: {why}")
                continue
            result, why = _accept(frame_xy, ref_xy, found[0], checks, attempt, fluxes)
            if result is not None:
                return result, reasons
            reasons.append(f"{attempt}: {why}")
    return None, reasons


def _image_attempt(
    frame_xy: np.ndarray,
    ref_xy: np.ndarray,
    images: Callable[[], tuple[np.ndarray, np.ndarray]],
    image_bin: int,
    checks: _Checks,
    fluxes: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Registration | None, list[str]]:
    """Let astroalign detect stars in the images, then refine on the star lists or its pairs.

    ``fluxes`` (of the star lists) weight the refinement on the lists; astroalign's own pairs
    carry no flux and are refined unweighted.
    """
    frame_img, ref_img = images()
    reasons = []
    for max_points, sigma, area in IMAGE_SETTINGS:
        found, why = _find_transform(
            frame_img, ref_img, max_control_points=max_points, detection_sigma=sigma, min_area=area
        )
        if found is None:
            reasons.append(f"image: {why}")
            continue
        A_binned, src, dst = found
        A0 = _unbin_transform(A_binned, image_bin)
        src_full, dst_full = _unbin_points(src, image_bin), _unbin_points(dst, image_bin)
        for frame_pts, ref_pts, pair_fluxes in ((frame_xy, ref_xy, fluxes), (src_full, dst_full, None)):
            result, why = _accept(frame_pts, ref_pts, A0, checks, "image", pair_fluxes)
            if result is not None:
                return result, reasons
        reasons.append(f"image: {why}")
    return None, reasons


def _unbin_points(xy: np.ndarray, image_bin: int) -> np.ndarray:
    """Convert pixel centres of a ``image_bin`` x ``image_bin`` binned image to full-res pixels."""
    return np.asarray(xy, dtype=np.float64) * image_bin + (image_bin - 1) / 2.0


def _unbin_transform(A_binned: np.ndarray, image_bin: int) -> np.ndarray:
    """Express a transform between binned images in full-resolution pixels."""
    offset = (image_bin - 1) / 2.0
    to_full = np.array([[image_bin, 0.0, offset], [0.0, image_bin, offset]])
    return compose(to_full, compose(A_binned, invert_transform(to_full)))


def _as_points(
    xy: np.ndarray, name: str, flux: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``xy`` as a finite (N, 2) float64 array, dropping non-finite rows, and ``flux`` with them."""
    points = np.asarray(xy, dtype=np.float64)
    if points.size == 0:
        points = points.reshape(0, 2)
    elif points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of [x, y], got shape {points.shape}")
    keep = np.all(np.isfinite(points), axis=1)
    if flux is not None:
        flux = np.asarray(flux, dtype=np.float64).reshape(-1)
        if flux.size != len(points):
            raise ValueError(f"the flux list of {name} has {flux.size} values for {len(points)} stars")
        flux = flux[keep]
    return points[keep], flux


def register_frame(
    frame_xy: np.ndarray,
    ref_xy: np.ndarray,
    *,
    frame_flux: np.ndarray | None = None,
    ref_flux: np.ndarray | None = None,
    model: str = "auto",
    counts: Sequence[int] = STAR_COUNTS,
    images: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
    image_bin: int = 1,
    min_matches: int = 8,
    max_rms_px: float = 1.0,
    max_scale_error: float = 0.05,
) -> Registration:
    """Find the transform mapping a frame's pixels onto the reference frame's pixels.

    Attempts, in order, until one passes the checks: for each ``n`` in ``counts``,
    astroalign ``find_transform`` on the brightest ``n`` stars inside the central disk of
    both lists (``"centre<n>"``, see :func:`central_stars`), then on the brightest ``n`` of
    the whole lists (``"stars<n>"``), arrays in, never images; then, when ``images`` is given,
    astroalign on the images with the settings in :data:`IMAGE_SETTINGS` ("image"). Each
    astroalign similarity is refined by :func:`refine_transform` over all stars and accepted
    when at least ``min_matches`` pairs remain, their RMS residual is at most ``max_rms_px``
    and the scale is within ``max_scale_error`` of 1. Alignment failures never raise.

    With ``frame_flux`` and ``ref_flux`` the refinement weights each star pair by the inverse of
    its centroid variance, modelled from the two stars' fluxes (:func:`pair_variances`), and
    rejects outliers on normalised residuals; without them every pair weighs the same. The
    astroalign attempts and the acceptance checks (``rms_px`` is the unweighted RMS) are the
    same either way.

    Parameters
    ----------
    frame_xy, ref_xy : numpy.ndarray
        (N, 2) and (M, 2) star positions [x, y] in full-resolution pixels, brightest first.
    frame_flux, ref_flux : numpy.ndarray, optional
        (N,) and (M,) fluxes of those stars, in one unit for both lists (e.g. the detector's
        background-subtracted aperture flux, ADU). ``inf`` marks a star whose centroid is good
        but whose flux is unknown (saturated): it gets the capped weight of the centroid floor.
        Give both or neither.
    model : {"auto", "affine", "similarity"}, optional
        Transform refined. "auto" fits an affine and keeps it only when the stars show a
        significant departure from a similarity (see :func:`select_model` and METHODS.md).
    counts : sequence of int, optional
        Brightest-star counts handed to astroalign, tried in order.
    images : callable, optional
        Called (only if every star attempt failed) with no argument; returns
        ``(frame_image, reference_image)`` 2-D luminance arrays. Errors it raises propagate.
    image_bin : int, optional
        Binning of those images relative to full resolution (2 for a half-resolution proxy).
    min_matches : int, optional
        Fewest refined star pairs accepted.
    max_rms_px : float, optional
        Largest accepted RMS residual of the refined pairs, in pixels.
    max_scale_error : float, optional
        Largest accepted ``|scale - 1|``; frames of one session share the optics.

    Returns
    -------
    Registration
        ``ok=True`` with the matrix, or ``ok=False`` with ``reason`` starting
        ``"alignment_failed: "``.

    Raises
    ------
    ValueError
        If a star list is not an (N, 2) array, a flux list does not match its star list, or
        only one flux list is given.
    ConfigError
        If ``model`` is unknown.
    """
    if model not in ("auto",) + _MODELS:
        raise ConfigError(f"unknown transform model {model!r}; use auto or one of {_MODELS}")
    if (frame_flux is None) != (ref_flux is None):
        raise ValueError("give both frame_flux and ref_flux, or neither")
    frame_xy, frame_flux = _as_points(frame_xy, "frame_xy", frame_flux)
    ref_xy, ref_flux = _as_points(ref_xy, "ref_xy", ref_flux)
    fluxes = None if frame_flux is None else (frame_flux, ref_flux)
    checks = _Checks(model, min_matches, max_rms_px, max_scale_error)
    reasons = []
    if min(len(frame_xy), len(ref_xy)) >= max(_MIN_PAIRS, min_matches):
        result, reasons = _star_attempts(frame_xy, ref_xy, counts, checks, fluxes)
        if result is not None:
            return result
    else:
        reasons.append(f"too few stars (frame {len(frame_xy)}, reference {len(ref_xy)})")
    if images is not None:
        result, image_reasons = _image_attempt(frame_xy, ref_xy, images, image_bin, checks, fluxes)
        if result is not None:
            return result
        reasons.extend(image_reasons)
    return Registration(
        False, None, 0, math.nan, math.nan, "alignment_failed: " + "; ".join(reasons), "", ""
    )


# --------------------------------------------------------------------------- session decisions


def choose_reference(scores: Sequence[float], mode: str = "best") -> int:
    """Pick the reference frame index.

    Parameters
    ----------
    scores : sequence of float
        One quality score per frame, higher is better; NaN marks an unusable frame.
    mode : {"best", "first"}
        "best": the highest score, the earliest index on ties; "first": the earliest frame
        with a finite score.

    Returns
    -------
    int
        Index into ``scores``.

    Raises
    ------
    ConfigError
        If ``mode`` is unknown.
    SessionError
        If no frame has a finite score.
    """
    if mode not in _REFERENCE_MODES:
        raise ConfigError(f"unknown reference mode {mode!r}; use one of {_REFERENCE_MODES}")
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    usable = np.flatnonzero(np.isfinite(values))
    if usable.size == 0:
        raise SessionError("no frame with a usable score to serve as the reference")
    if mode == "first":
        return int(usable[0])
    return int(usable[np.argmax(values[usable])])


def rotation_range_deg(rotations_deg: Sequence[float]) -> float:
    """Return the smallest arc, in degrees, containing every rotation angle.

    Angles are taken modulo 360, so -179 and +179 are 2 degrees apart. Non-finite values
    (failed frames) are ignored.

    Parameters
    ----------
    rotations_deg : sequence of float
        Per-frame rotations relative to the reference.

    Returns
    -------
    float
        ``max - min`` of the angles on the circle, 0 for fewer than two angles.
    """
    angles = np.asarray(rotations_deg, dtype=np.float64).reshape(-1)
    angles = np.sort(np.mod(angles[np.isfinite(angles)], 360.0))
    if angles.size < 2:
        return 0.0
    gaps = np.diff(np.concatenate([angles, [angles[0] + 360.0]]))
    return float(360.0 - gaps.max())


def choose_align_mode(
    rotations_deg: Sequence[float], requested: str = "auto", threshold_deg: float = 0.1
) -> tuple[str, float]:
    """Decide between Bayer-safe even-pixel shifts and full RGB affine resampling.

    Parameters
    ----------
    rotations_deg : sequence of float
        Per-frame rotation angles relative to the reference (see :func:`rotation_deg`).
    requested : {"auto", "integer", "rgb_affine"}
        "auto" picks "integer" when the session's rotation range is below ``threshold_deg``
        and "rgb_affine" otherwise; the other values are returned as given.
    threshold_deg : float, optional
        Rotation range under which even-pixel shifts are used.

    Returns
    -------
    (str, float)
        The mode ("integer" or "rgb_affine") and the measured rotation range in degrees.

    Raises
    ------
    ConfigError
        If ``requested`` is unknown.
    """
    if requested not in _ALIGN_MODES:
        raise ConfigError(f"unknown align mode {requested!r}; use one of {_ALIGN_MODES}")
    spread = rotation_range_deg(rotations_deg)
    if requested != "auto":
        return requested, spread
    return ("integer" if spread < threshold_deg else "rgb_affine"), spread


