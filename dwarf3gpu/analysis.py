"""Measure, select and register the lights of a session: the stages between discovery and stacking.

Order of work, and why:

1. **Measure** every light (read, detect stars, metrics) in parallel; cached in ``cache/scores.json``.
2. **Preliminary score** without transparency (unknown before registration) and choice of the **reference**
   (best score, or the first frame).
3. **Register** every frame on the reference in parallel (astroalign on flux-sorted star lists, refined);
   cached in ``cache/transforms.json`` together with the transparency (flux of matched stars / reference).
4. **Final score** with transparency, **selection** (failures, hard limits, top ``keep`` fraction) and the
   **align mode** (even-pixel shifts when the session's field rotation stays under 0.1 degree).

Every frame's result depends only on its own file, the reference and the settings, so the outcome is identical
for any number of workers and with or without the cache.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .atomic import check_writable, output_errors
from .cache import FrameCache, cache_path, file_identity
from .errors import ConfigError, FitsReadError, SessionError
from .fitsio import read_raw_window
from .quality import SCORE_METHODS, Decision, FrameMetrics, SelectionLimits, frame_metrics, score_frames, select_frames, transparency
from .geometry import rotation_deg
from .resources import default_workers
from .register import Registration, choose_align_mode, choose_reference, register_frame
from .session import LightFrame, Session
from .stars import StarList, detect_stars, luminance_proxy

__all__ = ["AnalysisConfig", "FrameRecord", "SessionAnalysis", "analyze_session", "output_dir_for", "default_workers"]

ProgressCallback = Callable[[str, int, int], None]
#: Stars kept per frame for registration and transparency (brightest first).
STARS_KEPT = 300
#: Version tag of the registration method in the transforms cache key (change it when the fit changes).
REGISTRATION_METHOD = "astroalign+flux-weighted-refinement-1"
#: Version tag of the star measurement in both cache keys (change it when detected positions or fluxes change).
MEASUREMENT_METHOD = "all-colour-windowed-centroid-1"


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of the measure, select and register stages.

    Attributes
    ----------
    keep : float
        Fraction of the lights to keep (``--keep``), default 0.92.
    score : {"weighted", "classic"}
        Score formula (METHODS.md).
    reference : {"best", "first"}
        Reference frame: the best-scored frame or the first light.
    align_mode : {"auto", "integer", "rgb_affine"}
        Requested alignment mode; ``auto`` measures the field rotation.
    threshold_sigma : float
        Star detection threshold in units of the local noise.
    max_stars : int
        Stars kept per frame.
    saturation : float
        Raw saturation level (ADU).
    limits : SelectionLimits
        Hard selection limits.
    """

    keep: float = 0.92
    score: str = "weighted"
    reference: str = "best"
    align_mode: str = "auto"
    threshold_sigma: float = 5.0
    max_stars: int = STARS_KEPT
    saturation: float = 65535.0
    limits: SelectionLimits = field(default_factory=SelectionLimits)

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise ConfigError(f"must be a fraction in (0, 1], e.g. 0.9; got {self.keep}", setting="keep")
        if self.score not in SCORE_METHODS:
            raise ConfigError(f"must be one of {', '.join(SCORE_METHODS)}; got {self.score!r}", setting="score")
        if self.reference not in ("best", "first"):
            raise ConfigError(f"must be 'best' or 'first'; got {self.reference!r}", setting="reference")
        if self.align_mode not in ("auto", "integer", "rgb_affine"):
            raise ConfigError(f"must be auto, integer or rgb_affine; got {self.align_mode!r}", setting="align_mode")
        if self.threshold_sigma <= 0 or self.max_stars < 10:
            raise ConfigError("the detection threshold must be positive and max_stars at least 10")

    def detection_settings(self) -> dict[str, Any]:
        """Everything the per-frame measurement depends on (the scores cache key)."""
        return {
            "version": __version__,
            "measurement": MEASUREMENT_METHOD,
            "threshold_sigma": self.threshold_sigma,
            "max_stars": self.max_stars,
            "saturation": self.saturation,
        }


@dataclass
class FrameRecord:
    """Everything decided about one light.

    Attributes
    ----------
    frame : LightFrame
        The light (path, times, header values).
    metrics : FrameMetrics or None
        Measured metrics (None when the frame could not be read).
    score : float
        Final score (higher is better).
    decision : Decision
        Kept or rejected, with reason and detail.
    registration : Registration or None
        Transform onto the reference (None when not attempted).
    """

    frame: LightFrame
    metrics: FrameMetrics | None
    score: float
    decision: Decision
    registration: Registration | None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary: file, times, metrics, score, decision, reason and the 2x3 transform."""
        reg = self.registration
        return {
            "name": self.frame.name,
            "path": str(self.frame.path),
            "date_obs": self.frame.to_json()["date_obs"],
            "mid_time": self.frame.to_json()["mid_time"],
            "metrics": self.metrics.to_json() if self.metrics else None,
            "score": self.score,
            "kept": self.decision.kept,
            "reason": self.decision.reason,
            "detail": self.decision.detail,
            "rank": self.decision.rank,
            "transform": reg.matrix.tolist() if reg is not None and reg.matrix is not None else None,
            "registration": reg.to_json() if reg is not None else None,
        }


@dataclass
class SessionAnalysis:
    """Result of :func:`analyze_session`.

    Attributes
    ----------
    session : Session
        The discovered session.
    records : list of FrameRecord
        One per light, observation order.
    reference_index : int
        Index of the reference frame in ``records``.
    align_mode : str
        Chosen alignment mode (``integer`` or ``rgb_affine``).
    rotation_range_deg : float
        Field rotation range over the registered frames.
    config : AnalysisConfig
        Settings used.
    cache : dict
        Cache hits and misses per cache file.
    timings : dict
        Seconds per stage.
    """

    session: Session
    records: list[FrameRecord]
    reference_index: int
    align_mode: str
    rotation_range_deg: float
    config: AnalysisConfig
    cache: dict[str, dict[str, int]]
    timings: dict[str, float]

    @property
    def kept(self) -> list[FrameRecord]:
        """Records of the kept frames."""
        return [r for r in self.records if r.decision.kept]

    @property
    def rejected(self) -> list[FrameRecord]:
        """Records of the rejected frames."""
        return [r for r in self.records if not r.decision.kept]

    @property
    def reference(self) -> FrameRecord:
        """Record of the reference frame."""
        return self.records[self.reference_index]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary (the transform convention is stated in it)."""
        return {
            "session": str(self.session.path),
            "transform_convention": (
                "2x3 affine A mapping a frame pixel (x = column, y = row, origin at the centre of pixel (0, 0)) "
                "to the reference frame's pixel: [x_ref, y_ref] = A[:, :2] @ [x, y] + A[:, 2]"
            ),
            "reference": self.reference.frame.name,
            "reference_mode": self.config.reference,
            "score_method": self.config.score,
            "keep": self.config.keep,
            "align_mode": self.align_mode,
            "align_mode_requested": self.config.align_mode,
            "rotation_range_deg": self.rotation_range_deg,
            "n_kept": len(self.kept),
            "n_rejected": len(self.rejected),
            "frames": [r.to_json() for r in self.records],
            "cache": self.cache,
            "timings_s": self.timings,
        }




def output_dir_for(session: Path, output_root: str | os.PathLike = "processedData") -> Path:
    """``<output_root>/<session folder name>``; refuses any place inside the (read-only) session folder."""
    out = Path(output_root) / Path(session).name
    session_abs, out_abs = Path(session).resolve(), out.resolve()
    if out_abs == session_abs or session_abs in out_abs.parents:
        raise ConfigError(
            f"the output folder {out} is inside the session folder; inputs are never written to. "
            "Choose another output root, e.g. processedData"
        )
    return out


def analyze_session(
    session: Session,
    config: AnalysisConfig = AnalysisConfig(),
    *,
    out_dir: Path,
    workers: int | None = None,
    use_cache: bool = True,
    refresh_cache: bool = False,
    progress: ProgressCallback | None = None,
    given_transforms: dict[str, np.ndarray] | None = None,
) -> SessionAnalysis:
    """Measure, score, register and select the lights of a discovered session.

    Parameters
    ----------
    session : Session
        Result of :func:`dwarf3gpu.session.discover`.
    config : AnalysisConfig
        Stage settings.
    out_dir : pathlib.Path
        ``processedData/<session>``; caches go to ``out_dir/cache``.
    workers : int, optional
        Worker processes (default: all cores). Results do not depend on it.
    use_cache, refresh_cache : bool
        ``--no-cache`` and ``--cache-refresh``.
    progress : callable, optional
        ``progress(stage, done, total)`` after each frame.
    given_transforms : dict, optional
        Frame name -> (2, 3) transform onto the reference (``--load-transforms``): star matching is skipped for
        these frames (the transparency is still measured); frames missing from it are matched as usual.

    Returns
    -------
    SessionAnalysis
        Per-frame records, reference, align mode, cache statistics and timings.

    Raises
    ------
    SessionError
        No lights, or no frame with enough stars to serve as the reference.
    """
    lights = session.lights
    if not lights:
        raise SessionError(f"no light frames in {session.path}; run 'dwarf3 frames' to see why")
    workers = max(1, workers or default_workers())
    timings: dict[str, float] = {}
    if use_cache:  # a cache that cannot be saved fails now, not after the measuring
        check_writable(out_dir)

    t0 = time.perf_counter()
    scores_cache = FrameCache(cache_path(out_dir, "scores.json"), config.detection_settings(), enabled=use_cache, refresh=refresh_cache)
    measured = _run_cached(
        scores_cache, lights, _measure_task, [(str(f.path), f.bayer_pattern, config.detection_settings()) for f in lights],
        workers, "measuring", progress,
    )
    with output_errors(out_dir):
        scores_cache.save()
    timings["measure"] = time.perf_counter() - t0

    metrics = [FrameMetrics.from_json(m["metrics"]) if "metrics" in m else None for m in measured]
    usable = [m is not None and m.n_stars >= config.limits.min_stars for m in metrics]
    prelim = score_frames([m or _EMPTY_METRICS for m in metrics], config.score) * np.array(usable, float)
    if not any(usable):
        raise SessionError(
            f"no frame has at least {config.limits.min_stars} stars, so none can be a reference: "
            "clouds, a closed cap, or a badly out-of-focus session? (lower the minimum star count)"
        )
    ref_scores = [s if ok else float("nan") for s, ok in zip(prelim, usable)]
    ref = choose_reference(ref_scores, config.reference) if config.reference == "best" else _first_usable(usable)

    t0 = time.perf_counter()
    ref_entry = measured[ref]
    given = {name: np.asarray(m, float).tolist() for name, m in (given_transforms or {}).items()}
    reg_settings = {
        "method": REGISTRATION_METHOD,
        "detection": config.detection_settings(),
        "reference": lights[ref].name,
        "reference_identity": file_identity(lights[ref].path),
        "given_transforms": given,
    }
    transforms_cache = FrameCache(cache_path(out_dir, "transforms.json"), reg_settings, enabled=use_cache, refresh=refresh_cache)
    tasks = [
        (i == ref, m.get("stars"), ref_entry["stars"], str(f.path), str(lights[ref].path), f.bayer_pattern,
         given.get(f.name))
        for i, (f, m) in enumerate(zip(lights, measured))
    ]
    registered = _run_cached(transforms_cache, lights, _register_task, tasks, workers, "matching", progress)
    with output_errors(out_dir):
        transforms_cache.save()
    timings["register"] = time.perf_counter() - t0

    registrations: list[Registration | None] = []
    failures: list[str] = []
    final_metrics: list[FrameMetrics | None] = []
    for m, measure, reg in zip(metrics, measured, registered):
        if m is None:
            registrations.append(None)
            failures.append(measure["error"])
            final_metrics.append(None)
            continue
        registration = _registration_from_json(reg["registration"]) if reg.get("registration") else None
        registrations.append(registration)
        failures.append(reg.get("error", ""))
        final_metrics.append(FrameMetrics(**{**m.__dict__, "transparency": reg.get("transparency")}))
    scores = score_frames([m or _EMPTY_METRICS for m in final_metrics], config.score)
    decisions = select_frames(final_metrics, scores, keep=config.keep, limits=config.limits, failures=failures)
    rotations = [r.rotation_deg for r, d in zip(registrations, decisions) if r is not None and r.ok]
    align_mode, rotation_range = choose_align_mode(rotations, config.align_mode)
    records = [
        FrameRecord(f, m, float(s), d, r) for f, m, s, d, r in zip(lights, final_metrics, scores, decisions, registrations)
    ]
    cache = {
        "scores": {"hits": scores_cache.hits, "misses": scores_cache.misses},
        "transforms": {"hits": transforms_cache.hits, "misses": transforms_cache.misses},
    }
    return SessionAnalysis(session, records, ref, align_mode, rotation_range, config, cache, timings)


_EMPTY_METRICS = FrameMetrics(float("nan"), float("nan"), 0.0, 0, float("nan"), float("nan"))


def _first_usable(usable: Sequence[bool]) -> int:
    """Index of the first frame usable as a reference."""
    return next(i for i, ok in enumerate(usable) if ok)


def _run_cached(
    cache: FrameCache,
    lights: Sequence[LightFrame],
    task: Callable[[tuple], dict],
    args: Sequence[tuple],
    workers: int,
    stage: str,
    progress: ProgressCallback | None,
) -> list[dict]:
    """Run ``task`` for every frame missing from ``cache`` (in a process pool when ``workers > 1``)."""
    results: list[dict | None] = [cache.get(f.path) for f in lights]
    todo = [i for i, r in enumerate(results) if r is None]
    done = len(lights) - len(todo)
    if progress:
        progress(stage, done, len(lights))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_pool_context(),
                                 initializer=_worker_init) as pool:
            for i, value in zip(todo, pool.map(task, [args[i] for i in todo])):
                results[i] = value
                done += 1
                if progress:
                    progress(stage, done, len(lights))
    else:
        for i in todo:
            results[i] = task(args[i])
            done += 1
            if progress:
                progress(stage, done, len(lights))
    for i in todo:
        cache.put(lights[i].path, results[i])
    return results  # type: ignore[return-value]


def _pool_context() -> multiprocessing.context.BaseContext:
    """Start workers fresh (forkserver, else spawn), never by forking this process.

    A forked child inherits OpenCV's thread pool in whatever state the parent left it: once the parent has run
    any multi-threaded OpenCV call (a caller that detected stars before, a test suite), ``cv2.setNumThreads`` in
    the child waits forever in ``pthread_cond_destroy`` for pool threads that were not copied. The fork server
    imports this module once, so each pool starts in about 0.1 s instead of re-importing NumPy, OpenCV and
    astroalign per worker.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _worker_init() -> None:
    """Keep each worker process single-threaded: parallelism comes from the pool."""
    import cv2

    cv2.setNumThreads(1)


def _measure_task(args: tuple) -> dict:
    """Worker: read one frame, detect its stars, compute its metrics (JSON-ready)."""
    path, bayer, settings = args
    try:
        mosaic = read_raw_window(path)
    except FitsReadError as exc:
        return {"error": f"unreadable: {exc.problem}"}
    try:
        stars = detect_stars(
            mosaic, bayer, threshold_sigma=settings["threshold_sigma"], max_stars=settings["max_stars"],
            saturation=settings["saturation"],
        )
    except ValueError as exc:  # e.g. an unknown BAYERPAT: this frame only
        return {"error": f"unreadable: {exc}"}
    metrics = frame_metrics(mosaic, stars, saturation=settings["saturation"])
    return {"metrics": metrics.to_json(), "stars": _stars_to_json(stars)}


def _stars_to_json(stars: StarList) -> dict[str, list]:
    """Positions, fluxes and saturation flags (exact float round trip through JSON)."""
    return {
        "x": stars.x.tolist(),
        "y": stars.y.tolist(),
        "flux": stars.flux.tolist(),
        "saturated": stars.saturated.astype(bool).tolist(),
    }


def _register_task(args: tuple) -> dict:
    """Worker: register one frame on the reference and measure its transparency (JSON-ready)."""
    is_reference, stars, ref_stars, path, ref_path, bayer, given = args
    if stars is None:
        return {}
    xy = np.column_stack([stars["x"], stars["y"]]).reshape(-1, 2)
    ref_xy = np.column_stack([ref_stars["x"], ref_stars["y"]]).reshape(-1, 2)
    if given is not None:
        matrix = np.array(given, float)
        reg = Registration(True, matrix, 0, float("nan"), rotation_deg(matrix), "", "loaded", "given")
    elif is_reference:
        identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        reg = Registration(True, identity, len(xy), 0.0, 0.0, "", "reference", "identity")
    else:

        def images() -> tuple[np.ndarray, np.ndarray]:
            return luminance_proxy(read_raw_window(path), bayer), luminance_proxy(read_raw_window(ref_path), bayer)

        # Star fluxes weight the fit (register.pair_variances); a saturated star's flux is only a lower bound but its
        # centroid is good, so it gets the capped weight of the centroid floor (inf).
        flux, ref_flux = (
            np.where(np.asarray(s["saturated"], bool), np.inf, np.asarray(s["flux"], float)).reshape(-1)
            for s in (stars, ref_stars)
        )
        reg = register_frame(xy, ref_xy, frame_flux=flux, ref_flux=ref_flux, images=images, image_bin=2)
    out: dict[str, Any] = {"registration": reg.to_json()}
    if not reg.ok:
        out["error"] = reg.reason
        return out
    good, ref_good = ~np.asarray(stars["saturated"], bool), ~np.asarray(ref_stars["saturated"], bool)
    t, n = transparency(
        xy[good], np.asarray(stars["flux"])[good], ref_xy[ref_good], np.asarray(ref_stars["flux"])[ref_good], reg.matrix
    )
    out["transparency"] = t
    out["transparency_stars"] = n
    return out


def _registration_from_json(data: dict) -> Registration:
    """Inverse of :meth:`Registration.to_json`."""
    nan = float("nan")
    return Registration(
        ok=bool(data["ok"]),
        matrix=None if data["matrix"] is None else np.array(data["matrix"], float),
        n_matches=int(data["n_matches"]),
        rms_px=nan if data["rms_px"] is None else float(data["rms_px"]),
        rotation_deg=nan if data["rotation_deg"] is None else float(data["rotation_deg"]),
        reason=data["reason"],
        attempt=data["attempt"],
        model=data["model"],
    )
