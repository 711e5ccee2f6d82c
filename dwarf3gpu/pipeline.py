"""``stack_session``: one session in, a linear master, previews, a manifest and a report out.

Orchestration only. Stages: discover (``session.py``) -> measure -> select -> register (``analysis.py``) -> dark
calibration (``calibrate.py``) -> background levels and normalisation (``normalise.py``) -> render and clip in
memory-budgeted tiles (``tiles.py`` driving ``render.FrameRenderer`` through the stage operations of
``backends``) -> crop -> colour calibration, master, previews (``products.py``) -> manifest and reports. Every
file goes to ``<output_root>/<session>/`` atomically; nothing is written under the session folder.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .analysis import SessionAnalysis, analyze_session, output_dir_for
from .atomic import check_writable, output_errors, write_json_atomic
from .backends import ReferenceStageOps, StageOps, get_backend
from .cache import STACK_KEYS, cache_path, file_identity, load_stacked_or_discard, save_stacked, settings_hash, stack_cache_dir
from .calibrate import DarkCalibration, prepare_calibration, record_json
from .clip import clip_settings
from .config import StackConfig
from .errors import ConfigError, SessionError
from .geometry import even_pixel_shift
from .normalise import cfa_channel_medians, frame_weights_for, normalisation
from .products import Stacked, calibration_summary, remove_stale_outputs, run_manifest, run_stats, write_outputs
from .render import RENDER_BYTES_PER_PIXEL, FrameRenderer, RawWindowReader, render_paths
from .resources import default_workers
from .session import Session, discover
from .tiles import crop_to_coverage, plan_tiles, stack_tiles

__all__ = ["StackResult", "stack_session", "load_transforms_file", "save_transforms_file"]

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class StackResult:
    """What :func:`stack_session` produced.

    Attributes
    ----------
    kept : list of str
        Names of the frames in the master.
    rejected : list of dict
        ``{"name", "reason", "detail"}`` for every light not in the master.
    outputs : dict of str to pathlib.Path
        ``master_linear``, ``coverage``, ``rejected_map``, ``quicklook_png``, ``quicklook_tif``, ``manifest``,
        ``report_json``, ``report_md`` (those written).
    stats : dict
        Summary numbers (``snr_proxy``, ``noise_gain``, frames, rotation range, timings, ...).
    analysis : SessionAnalysis
        Per-frame measurements and decisions.
    """

    kept: list[str]
    rejected: list[dict[str, str]]
    outputs: dict[str, Path]
    stats: dict[str, Any]
    analysis: SessionAnalysis
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)


def stack_session(
    session: str | os.PathLike,
    output_root: str | os.PathLike = "processedData",
    config: StackConfig = StackConfig(),
    *,
    workers: int | None = None,
    use_cache: bool = True,
    refresh_cache: bool = False,
    frame_list: Sequence[str] | None = None,
    load_transforms: str | os.PathLike | None = None,
    save_transforms: str | os.PathLike | None = None,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
) -> StackResult:
    """Stack one session.

    Parameters
    ----------
    session : str or os.PathLike
        Session folder (read only).
    output_root : str or os.PathLike, default "processedData"
        Outputs go to ``output_root/<session folder name>/``.
    config : StackConfig
        Every setting that shapes the result.
    workers : int, optional
        Worker processes/threads (default: all cores); the output does not depend on it.
    use_cache, refresh_cache : bool
        Use (or rebuild) the caches in ``<out>/cache/``.
    frame_list : sequence of str, optional
        Only these light file names (``--frame-list``); the others are rejected as ``not_in_frame_list``.
    load_transforms, save_transforms : path, optional
        Read transforms instead of matching stars / write the transforms used (JSON, frame -> reference 2x3).
    dry_run : bool
        Measure, select, register and report, but do not stack.
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    StackResult
        Kept and rejected frames, output paths and statistics.

    Raises
    ------
    SessionError
        No usable lights.
    ConfigError
        Invalid settings or output folder.
    """
    t_start = time.perf_counter()
    workers = max(1, workers or default_workers())
    if config.dark not in ("auto", "none") and not Path(config.dark).is_file():
        raise ConfigError(f"{config.dark}: no such file (give a FITS master dark, 'auto' or 'none')", setting="dark")
    ops = get_backend(config.backend, device=config.device)
    found = discover(session, include_failed=config.include_failed)
    out_dir = output_dir_for(found.path, output_root)
    not_listed = _apply_frame_list(found, frame_list)
    if not found.lights:
        raise SessionError(f"no light frames to stack in {found.path}; run 'dwarf3 frames' to see why")
    if config.memory_budget and not dry_run:
        _check_budget(found, config, workers)
    check_writable(out_dir)  # before any work: a run that could not save its results stops at once
    with output_errors(out_dir):  # every write below: one message naming the path, the cause and the fix
        given = load_transforms_file(load_transforms) if load_transforms else None
        analysis = analyze_session(
            found, config.analysis(), out_dir=out_dir, workers=workers, use_cache=use_cache,
            refresh_cache=refresh_cache, progress=progress, given_transforms=given,
        )
        timings = dict(analysis.timings)
        if save_transforms:
            with output_errors(save_transforms, setting="save_transforms"):
                save_transforms_file(analysis, save_transforms)
        kept = analysis.kept
        if not kept:
            raise SessionError("every frame was rejected; see the table (keep a larger fraction or loosen the hard limits)")

        outputs: dict[str, Path] = {}
        stacked = None
        calibration_record: dict[str, Any] = {"setting": config.dark, "used": False, "reason": "not evaluated (dry run)"}
        if not dry_run:
            t0 = time.perf_counter()
            calibration, calibration_record = prepare_calibration(
                found, config.dark, analysis.reference.frame.path, out_dir, use_cache=use_cache, refresh=refresh_cache,
                lights=[r.frame.path for r in kept])
            calibration_record = record_json(calibration_record)
            timings["calibrate"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            stacked = _stack(analysis, config, ops, out_dir, workers, use_cache, refresh_cache, progress,
                             calibration)
            timings["stack"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            outputs.update(write_outputs(stacked, analysis, config, out_dir))
            if use_cache and stacked.colour_calibration is not None:  # a cache: not with use_cache False
                write_json_atomic(cache_path(out_dir, "colour_calibration.json"), stacked.colour_calibration.to_json())
            timings["finish"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start

        rejected = [
            {"name": r.frame.name, "reason": r.decision.reason, "detail": r.decision.detail} for r in analysis.rejected
        ] + not_listed
        remove_stale_outputs(out_dir, outputs, dry_run)
        stats = run_stats(analysis, stacked, timings)
        stats["calibration"] = calibration_summary(calibration_record)
        manifest = run_manifest(found, analysis, config, ops, stacked, stats, outputs, not_listed, workers, dry_run)
        manifest["calibration"] = calibration_record
        outputs["manifest"] = write_json_atomic(out_dir / "run_manifest.json", manifest)
        from .report import write_reports

        outputs.update(write_reports(out_dir, analysis, stats, outputs, rejected, stacked))
        return StackResult([r.frame.name for r in kept], rejected, outputs, stats, analysis, manifest)


def _check_budget(found: Session, config: StackConfig, workers: int) -> None:
    """Refuse a memory budget too small for even one frame before any measuring (the exact plan, for the kept
    frames, comes after the selection)."""
    height, width = found.lights[0].height, found.lights[0].width
    superpixel, cfa = render_paths(config)
    shape = (height // 2, width // 2) if superpixel else (height, width)
    try:
        plan_tiles(*shape, 1, 1 if cfa else 3, config.memory_budget, workers=workers,
                   render_bytes_per_pixel=RENDER_BYTES_PER_PIXEL)
    except ConfigError:  # the message for the session's frames (which need still more)
        plan_tiles(*shape, len(found.lights), 1 if cfa else 3, config.memory_budget, workers=workers,
                   render_bytes_per_pixel=RENDER_BYTES_PER_PIXEL)
        raise


def _apply_frame_list(found: Session, frame_list: Sequence[str] | None) -> list[dict[str, str]]:
    """Keep only the listed lights; return the others as rejections. Unknown names are an error."""
    if frame_list is None:
        return []
    wanted = [name.strip() for name in frame_list if name.strip() and not name.lstrip().startswith("#")]
    names = {f.name for f in found.lights}
    unknown = [n for n in wanted if Path(n).name not in names]
    if unknown:
        raise ConfigError(
            f"names {len(unknown)} file(s) that are not lights of this session, e.g. {unknown[0]!r}", setting="frame_list"
        )
    keep = {Path(n).name for n in wanted}
    dropped = [f for f in found.lights if f.name not in keep]
    found.lights = [f for f in found.lights if f.name in keep]
    return [{"name": f.name, "reason": "not_in_frame_list", "detail": "not named in --frame-list"} for f in dropped]


def load_transforms_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a transforms file written by ``--save-transforms`` (frame name -> 2x3 frame->reference)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        frames = data["frames"]
        out = {name: np.asarray(m, float) for name, m in frames.items() if m is not None}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read transforms from {path}: {exc} (write them with save_transforms)",
                          setting="load_transforms") from exc
    bad = [n for n, m in out.items() if m.shape != (2, 3)]
    if bad:
        raise ConfigError(f"{path}: transform of {bad[0]!r} is not a 2x3 matrix")
    return out


def save_transforms_file(analysis: SessionAnalysis, path: str | os.PathLike) -> Path:
    """Write every frame's transform (None when it failed) with the convention and the reference."""
    frames = {
        r.frame.name: (r.registration.matrix.tolist() if r.registration and r.registration.ok else None)
        for r in analysis.records
    }
    return write_json_atomic(
        path,
        {"convention": analysis.to_json()["transform_convention"], "reference": analysis.reference.frame.name,
         "frames": frames},
    )


# ----------------------------------------------------------------------------------------------- stacking


def _stack(
    analysis: SessionAnalysis, config: StackConfig, ops: StageOps, out_dir: Path, workers: int,
    use_cache: bool, refresh_cache: bool, progress: ProgressCallback | None,
    calibration: DarkCalibration | None = None,
) -> Stacked:
    """Warp and sigma-clip the kept frames in memory-budgeted tiles (or reuse the cached result).

    ``calibration`` (a dark and its hot pixels) is applied to every raw window read.
    """
    kept = analysis.kept
    pattern = analysis.session.metadata.bayer_pattern or "RGGB"
    height, width = kept[0].frame.height, kept[0].frame.width
    matrices = {r.frame.name: _applied_matrix(r.registration.matrix, analysis.align_mode, (width, height)) for r in kept}
    key = settings_hash({
        "version": __version__,
        "stack": {k: v for k, v in config.to_json().items() if k in STACK_KEYS},
        "backend": ops.name,
        "implementation": ops.implementation,  # the clip kernel's means differ from the reference's by rounding
        "frames": [[r.frame.name, file_identity(r.frame.path), matrices[r.frame.name]] for r in kept],
        "reference": analysis.reference.frame.name,
        "dark": calibration.identity if calibration is not None else None,
    })
    cache_dir = stack_cache_dir(out_dir, key)
    if use_cache and not refresh_cache and (cache_dir / "meta.json").is_file():
        cached = load_stacked_or_discard(cache_dir)  # a damaged entry is discarded (with a warning) and recomputed
        if cached is not None:
            return cached

    paths = [r.frame.path for r in kept]
    if progress:
        progress("backgrounds", 0, len(kept))
    backgrounds = {}
    host_reader = RawWindowReader(paths, (height, width), ReferenceStageOps(), calibration)
    with ThreadPoolExecutor(max_workers=workers) as readers:
        levels = readers.map(lambda i: cfa_channel_medians(host_reader.read(i), pattern), range(len(kept)))
        for i, (r, level) in enumerate(zip(kept, levels)):
            backgrounds[r.frame.name] = level
            if progress:
                progress("backgrounds", i + 1, len(kept))
    ref_bg = np.asarray(backgrounds[analysis.reference.frame.name])
    norms = [normalisation(ref_bg, np.asarray(backgrounds[r.frame.name]), config.normalisation) for r in kept]
    frame_weights = frame_weights_for(kept, config.weights)

    superpixel, cfa = render_paths(config)
    channels = 1 if cfa else 3
    out_h, out_w = (height // 2, width // 2) if superpixel else (height, width)
    budget = config.memory_budget or ops.memory_budget()
    plan = plan_tiles(out_h, out_w, len(kept), channels, budget, workers=workers,
                      render_bytes_per_pixel=RENDER_BYTES_PER_PIXEL)
    renderer = FrameRenderer(paths, [matrices[r.frame.name] for r in kept], norms, pattern, config, ops,
                             (height, width), calibration)
    settings = clip_settings(sigma_lower=config.sigma_bounds[0], sigma_upper=config.sigma_bounds[1],
                             maxiters=config.maxiters, cenfunc=config.cenfunc, stdfunc=config.stdfunc)
    ops.bind_thread()
    pool = ThreadPoolExecutor(max_workers=workers, initializer=ops.bind_thread) if workers > 1 else None
    try:
        mean, coverage, rejected = stack_tiles(
            plan, renderer, len(kept), (channels, out_h, out_w), ops=ops, settings=settings,
            frame_weights=frame_weights, executor=pool,
            progress=(lambda done, total: progress("stacking", done, total)) if progress else None,
        )
    finally:
        if pool is not None:
            pool.shutdown()
    ref_index = next((i for i, r in enumerate(kept) if r is analysis.reference), 0)
    single = renderer.render(ref_index, (channels, out_h, out_w))
    crop = None
    if config.crop:
        _, crop = crop_to_coverage(mean[0], coverage, min_count=int(coverage.max()))
        r0, r1, c0, c1 = crop
        if cfa:  # keep the Bayer phase
            r0, c0 = r0 + (r0 % 2), c0 + (c0 % 2)
            crop = (r0, r1, c0, c1)
        mean, coverage = mean[:, r0:r1, c0:c1], coverage[r0:r1, c0:c1]
        rejected = rejected[..., r0:r1, c0:c1]
        single = (single[0][:, r0:r1, c0:c1], single[1][r0:r1, c0:c1])
    rgb = None
    if config.debayer == "bayer-first":
        phase = (crop[0] % 2, crop[2] % 2) if crop else (0, 0)
        rgb = ops.download(ops.debayer_bilinear(ops.upload(np.nan_to_num(mean[0])), pattern, origin=phase))
        rgb[:, ~np.isfinite(mean[0])] = np.nan
    elif not cfa:
        rgb = mean
    tile_plan = {**plan.to_json(), "tile_buffers": "host" if ops.xp is np else "device"}
    stacked = Stacked(mean, coverage, rejected, rgb, cfa, tile_plan, crop, matrices,
                      {k: list(map(float, v)) for k, v in backgrounds.items()}, single=single)
    if use_cache:
        save_stacked(cache_dir, stacked)
    return stacked


def _applied_matrix(matrix: np.ndarray, align_mode: str, size: tuple[int, int]) -> list:
    """The transform used for warping: the full affine, or its even-pixel shift in ``integer`` mode."""
    if align_mode == "integer":
        dx, dy = even_pixel_shift(matrix, centre_xy=((size[0] - 1) / 2, (size[1] - 1) / 2))
        return [[1.0, 0.0, float(dx)], [0.0, 1.0, float(dy)]]
    return np.asarray(matrix, float).tolist()


# ---------------------------------------------------------------------------------------------- intermediates


# ---------------------------------------------------------------------------------------------- outputs
