"""``stack_session``: one session in, a linear master, previews, a manifest and a report out.

Stages: discover -> measure -> select -> register (``analysis.py``) -> calibrate (dark + hot pixels,
``calibrate.py``) -> warp + stack in tiles (through the backend) -> finish (colour calibration recorded,
previews) -> write. Every file goes to ``<output_root>/<session>/`` atomically; nothing is written under the
session folder.
"""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from astropy.io import fits

from . import __version__
from .analysis import SessionAnalysis, analyze_session, default_workers, output_dir_for
from .atomic import write_json_atomic
from .backends import Backend, get_backend
from .cache import file_identity, settings_hash
from .calibrate import HOT_REACH, DarkCalibration, calibrate_window, prepare_calibration, record_json, uint16_median
from .color import background_neutral_gains
from .config import StackConfig
from .debayer import bayer_offsets, debayer_mhc, superpixel_transform
from .errors import ConfigError, SessionError
from .fitsio import read_fits, read_layout, read_raw_uint16, write_fits
from .register import even_pixel_shift
from .session import Session, discover
from .stack import crop_to_coverage, normalisation, plan_tiles, stack_tiles
from .stretch import make_quicklook, write_preview_png, write_preview_tiff
from .warp import LATTICE_MARGIN, source_window, window_margin

__all__ = ["StackResult", "stack_session", "load_transforms_file", "save_transforms_file"]

ProgressCallback = Callable[[str, int, int], None]
#: Extra source margin for a debayered band: interior pixels then equal a full-frame debayer bit for bit.
DEBAYER_MARGIN = 3


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
        raise ConfigError(f"--dark {config.dark}: no such file (give a FITS master dark, 'auto' or 'none')")
    backend = get_backend(config.backend, device=config.device)
    found = discover(session, include_failed=config.include_failed)
    out_dir = output_dir_for(found.path, output_root)
    not_listed = _apply_frame_list(found, frame_list)
    if not found.lights:
        raise SessionError(f"no light frames to stack in {found.path}; run 'dwarf3 frames' to see why")
    given = load_transforms_file(load_transforms) if load_transforms else None
    analysis = analyze_session(
        found, config.analysis(), out_dir=out_dir, workers=workers, use_cache=use_cache,
        refresh_cache=refresh_cache, progress=progress, given_transforms=given,
    )
    timings = dict(analysis.timings)
    if save_transforms:
        save_transforms_file(analysis, save_transforms)
    kept = analysis.kept
    if not kept:
        raise SessionError("every frame was rejected; see the table (loosen --keep or the hard limits)")

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
        stacked = _stack(analysis, config, backend, out_dir, workers, use_cache, refresh_cache, progress,
                         calibration)
        timings["stack"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs.update(_write_outputs(stacked, analysis, config, out_dir))
        timings["finish"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    rejected = [
        {"name": r.frame.name, "reason": r.decision.reason, "detail": r.decision.detail} for r in analysis.rejected
    ] + not_listed
    _remove_stale_outputs(out_dir, outputs, dry_run)
    stats = _stats(analysis, stacked, timings)
    stats["calibration"] = _calibration_summary(calibration_record)
    manifest = _manifest(found, analysis, config, backend, stacked, stats, outputs, not_listed, workers, dry_run)
    manifest["calibration"] = calibration_record
    outputs["manifest"] = write_json_atomic(out_dir / "run_manifest.json", manifest)
    from .report import write_reports

    outputs.update(write_reports(out_dir, analysis, stats, outputs, rejected, stacked))
    return StackResult([r.frame.name for r in kept], rejected, outputs, stats, analysis, manifest)


#: Files a run may write under ``<out>/``; those this run did not write are removed so no stale result remains.
_OUTPUT_FILES = {
    "master_linear": "stacked/master_linear.fits",
    "coverage": "stacked/coverage.fits",
    "rejected_map": "stacked/rejected.fits",
    "quicklook_png": "master_quicklook.png",
    "quicklook_tif": "master_quicklook.tif",
}


def _remove_stale_outputs(out_dir: Path, written: dict[str, Path], dry_run: bool) -> None:
    """Delete outputs of an earlier run that this run replaces by nothing (e.g. previews after --no-quicklook).

    A dry run leaves the earlier outputs in place: it only re-scores and rewrites the reports.
    """
    if dry_run:
        return
    for key, rel in _OUTPUT_FILES.items():
        path = out_dir / rel
        if key not in written and path.exists():
            path.unlink()


def _apply_frame_list(found: Session, frame_list: Sequence[str] | None) -> list[dict[str, str]]:
    """Keep only the listed lights; return the others as rejections. Unknown names are an error."""
    if frame_list is None:
        return []
    wanted = [name.strip() for name in frame_list if name.strip() and not name.lstrip().startswith("#")]
    names = {f.name for f in found.lights}
    unknown = [n for n in wanted if Path(n).name not in names]
    if unknown:
        raise ConfigError(
            f"--frame-list names {len(unknown)} file(s) that are not lights of this session, e.g. {unknown[0]!r}"
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
        raise ConfigError(f"cannot read transforms from {path}: {exc} (write one with --save-transforms)") from exc
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


@dataclass
class Stacked:
    """The stacking result, before it is written.

    Attributes
    ----------
    mean : numpy.ndarray
        (C, H, W) clipped mean (C = 3 RGB, or 1 CFA mosaic).
    coverage : numpy.ndarray
        (H, W) valid samples per pixel.
    rejected : numpy.ndarray
        Rejected samples per pixel (see stack.py for the shape).
    rgb : numpy.ndarray or None
        (3, H, W) colour master (the CFA master debayered for ``bayer-first``; None for ``none``).
    is_cfa : bool
        True when ``mean`` is a CFA mosaic.
    tile_plan : dict
        The tile plan used.
    crop : tuple or None
        (row0, row1, col0, col1) when cropped.
    matrices : dict
        Frame name -> transform actually applied (after the align mode).
    backgrounds : dict
        Frame name -> per-channel background level used for normalisation.
    from_cache : bool
        True when the stack came from the intermediate cache.
    calibration : ColorCalibration or None
        Colour calibration measured on the master (recorded, not applied).
    single : tuple or None
        (data, valid) of the reference frame alone, rendered like every frame: the noise reference.
    """

    mean: np.ndarray
    coverage: np.ndarray
    rejected: np.ndarray
    rgb: np.ndarray | None
    is_cfa: bool
    tile_plan: dict[str, Any]
    crop: tuple[int, int, int, int] | None
    matrices: dict[str, list]
    backgrounds: dict[str, list]
    from_cache: bool = False
    calibration: Any = None
    single: tuple[np.ndarray, np.ndarray] | None = None


def _stack(
    analysis: SessionAnalysis, config: StackConfig, backend: Backend, out_dir: Path, workers: int,
    use_cache: bool, refresh_cache: bool, progress: ProgressCallback | None,
    calibration: DarkCalibration | None = None,
) -> Stacked:
    """Warp and sigma-clip the kept frames in memory-budgeted tiles (or reuse the cached result).

    ``calibration`` (a dark and its hot pixels) is applied to every raw window read, here and in the renderer.
    """
    kept = analysis.kept
    pattern = analysis.session.metadata.bayer_pattern or "RGGB"
    height, width = kept[0].frame.height, kept[0].frame.width
    matrices = {r.frame.name: _applied_matrix(r.registration.matrix, analysis.align_mode, (width, height)) for r in kept}
    key = settings_hash({
        "version": __version__,
        "stack": {k: v for k, v in config.to_json().items() if k in _STACK_KEYS},
        "backend": backend.name,
        "cpu_kernels": backend.describe().get("cpu_kernels"),  # the clip's means differ by float32 rounding
        "frames": [[r.frame.name, file_identity(r.frame.path), matrices[r.frame.name]] for r in kept],
        "reference": analysis.reference.frame.name,
        "dark": calibration.identity if calibration is not None else None,
    })
    cache_dir = out_dir / "cache" / "stack" / key
    if use_cache and not refresh_cache and (cache_dir / "meta.json").is_file():
        return _load_stacked(cache_dir)

    if progress:
        progress("backgrounds", 0, len(kept))
    backgrounds = {}
    with ThreadPoolExecutor(max_workers=workers) as readers:
        levels = readers.map(lambda r: _cfa_channel_medians(_read_window(r.frame.path, calibration), pattern), kept)
        for i, (r, level) in enumerate(zip(kept, levels)):
            backgrounds[r.frame.name] = level
            if progress:
                progress("backgrounds", i + 1, len(kept))
    ref_bg = np.asarray(backgrounds[analysis.reference.frame.name])
    norms = [normalisation(ref_bg, np.asarray(backgrounds[r.frame.name]), config.normalisation) for r in kept]
    frame_weights = _frame_weights(kept, config.weights)

    superpixel = config.debayer == "superpixel"
    cfa = config.debayer in ("bayer-first", "none")
    channels = 1 if cfa else 3
    out_h, out_w = (height // 2, width // 2) if superpixel else (height, width)
    budget = config.memory_budget or backend.memory_budget()
    plan = plan_tiles(out_h, out_w, len(kept), channels, budget, workers=workers,
                      render_bytes_per_pixel=RENDER_BYTES_PER_PIXEL)
    renderer = _FrameRenderer(kept, matrices, norms, pattern, config, backend, (height, width), superpixel, cfa,
                              calibration)
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        mean, coverage, rejected = stack_tiles(
            plan, renderer, len(kept), (channels, out_h, out_w),
            frame_weights=frame_weights,
            sigma_lower=config.sigma_bounds[0], sigma_upper=config.sigma_bounds[1], maxiters=config.maxiters,
            cenfunc=config.cenfunc, stdfunc=config.stdfunc, executor=pool,
            progress=(lambda done, total: progress("stacking", done, total)) if progress else None,
            clip=getattr(backend, "clip_into", None), xp=backend.xp,
        )
    finally:
        if pool is not None:
            pool.shutdown()
    ref_index = next((i for i, r in enumerate(kept) if r is analysis.reference), 0)
    single_data, single_valid, _ = renderer(ref_index, 0, out_h, 0, out_w)
    single = (single_data if single_data.ndim == 3 else single_data[None], single_valid)
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
        rgb = backend.debayer_bilinear(np.nan_to_num(mean[0]), pattern, origin=phase)
        rgb[:, ~np.isfinite(mean[0])] = np.nan
    elif not cfa:
        rgb = mean
    tile_plan = {**plan.to_json(), "tile_buffers": "host" if backend.xp is np else "device"}
    stacked = Stacked(mean, coverage, rejected, rgb, cfa, tile_plan, crop, matrices,
                      {k: list(map(float, v)) for k, v in backgrounds.items()}, single=single)
    if use_cache:
        _save_stacked(cache_dir, stacked)
    return stacked


#: Scratch memory of one frame render per output pixel, beyond the render itself (which the planner counts): the
#: raw window (2 bytes), its float32 copy (4) and its debayered RGB (12) per source pixel, times 2 for the source
#: window of a tile of a rotated frame (at most twice the tile's area for a square tile), plus slack. The default
#: lattice path needs less: the raw window (2) and its colour planes (about 6) per source pixel.
RENDER_BYTES_PER_PIXEL = 40

#: Settings that change the stacked pixels (the intermediate cache key).
_STACK_KEYS = ("debayer", "interpolation", "demosaic", "sigma", "sigma_lower", "sigma_upper", "maxiters", "cenfunc", "stdfunc",
               "normalisation", "weights", "feather_px", "crop")


class _FrameRenderer:
    """``render(frame_index, row0, row1, col0, col1)``: one frame's contribution to an output tile (data, valid,
    weight)."""

    def __init__(self, kept, matrices, norms, pattern, config, backend, frame_size, superpixel, cfa,
                 calibration: DarkCalibration | None = None):
        self.kept, self.matrices, self.norms = kept, matrices, norms
        self.pattern, self.config, self.backend = pattern, config, backend
        self.frame_size, self.superpixel, self.cfa = frame_size, superpixel, cfa
        self.calibration = calibration

    def render_into(self, index: int, row0: int, row1: int, col0: int, col1: int, data: np.ndarray,
                    valid: np.ndarray, weight: np.ndarray) -> None:
        """Render into the given arrays ((C, rows, cols) float32, (rows, cols) bool and float32, C-contiguous; on
        the host or, with a GPU backend, on the device): the lattice resampler writes there directly, the other
        paths are copied."""
        results = self(index, row0, row1, col0, col1, out=(data, valid, weight))
        for target, result in zip((data, valid, weight), results):
            if result is not target:
                target[...] = self.backend.xp.asarray(result).reshape(target.shape)

    def __call__(self, index: int, row0: int, row1: int, col0: int, col1: int,
                 out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        """(data, valid, weight) of frame ``index`` on the tile; ``out`` as for :func:`warp.warp_lattice` (used
        by the lattice path only)."""
        record = self.kept[index]
        A = np.asarray(self.matrices[record.frame.name], float)
        height, width = self.frame_size
        method = self.config.interpolation
        offset, scale = self.norms[index]
        out_shape, out_origin = (row1 - row0, col1 - col0), (row0, col0)
        if self.superpixel:  # a half-resolution source window, debayered 2x2 cell by cell
            A = superpixel_transform(A)
            half = (height // 2, width // 2)
            r0, r1, c0, c1 = source_window(A, out_shape, out_origin, half, window_margin(method))
            cells = _read_window(record.frame.path, self.calibration, (2 * r0, 2 * r1, 2 * c0, 2 * c1))
            warped, valid, weight = self.backend.warp_affine(
                self.backend.debayer_superpixel(cells, self.pattern), A, out_shape, out_origin=out_origin,
                src_origin=(r0, c0), method=method, feather_px=self.config.feather_px / 2, src_size=half,
            )
            return _normalise(warped, offset, scale), valid, weight
        lattice = not self.cfa and self.config.demosaic == "lattice"
        margin = (LATTICE_MARGIN if lattice
                  else window_margin(method, bayer_planes=self.cfa) + (0 if self.cfa else DEBAYER_MARGIN))
        r0, r1, c0, c1 = source_window(A, out_shape, out_origin, (height, width), margin)
        band = _read_window(record.frame.path, self.calibration, (r0, r1, c0, c1))
        common = dict(out_origin=out_origin, src_origin=(r0, c0), src_size=(height, width), method=method,
                      feather_px=self.config.feather_px)
        if lattice:  # each colour straight from its own CFA lattice: no separate demosaic (METHODS.md, "Warp")
            del common["method"]  # the lattice resampler has its own kernels; it takes the raw uint16 as read
            warped, valid, weight = self.backend.warp_lattice(band, self.pattern, A, out_shape, out=out, **common)
            return _normalise(warped, offset, scale, self.backend.xp if out is not None else np), valid, weight
        band = band.astype(np.float32, copy=False)
        if self.cfa:
            warped, valid, weight = self.backend.warp_bayer_planes(band, self.pattern, A, out_shape, **common)
            channel = _cfa_channel_map(self.pattern, out_origin, out_shape)
            return _normalise(warped[None], offset[channel], scale[channel]), valid, weight
        if self.config.demosaic == "mhc":
            rgb = debayer_mhc(band, self.pattern, origin=(r0, c0))
        else:
            rgb = self.backend.debayer_bilinear(band, self.pattern, origin=(r0, c0))
        warped, valid, weight = self.backend.warp_affine(rgb, A, out_shape, **common)
        return _normalise(warped, offset, scale), valid, weight


def _normalise(data: np.ndarray, offset, scale, xp: Any = np) -> np.ndarray:
    """``data * scale + offset`` per channel (arrays broadcast over (C, h, w) or per-pixel maps), in place on a
    float32 ``data`` (a fresh render: no band-sized temporary); ``xp``: the array module of ``data``."""
    offset, scale = xp.asarray(offset, xp.float32), xp.asarray(scale, xp.float32)
    if offset.ndim == 1:
        offset, scale = offset[:, None, None], scale[:, None, None]
    if data.dtype != np.float32 or not getattr(data.flags, "writeable", True):  # CuPy arrays have no such flag
        return data * scale + offset
    data *= scale
    data += offset
    return data


def _cfa_channel_map(pattern: str, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) channel index (0 R, 1 G, 2 B) of each pixel of a CFA tile at absolute ``origin`` (row, col)."""
    offsets = bayer_offsets(pattern)
    cell = np.zeros((2, 2), np.intp)
    for c, name in enumerate("RGB"):
        for dr, dc in offsets[name]:
            cell[dr, dc] = c
    r = (np.arange(origin[0], origin[0] + shape[0]) % 2)[:, None]
    col = (np.arange(origin[1], origin[1] + shape[1]) % 2)[None, :]
    return cell[r, col]


def _applied_matrix(matrix: np.ndarray, align_mode: str, size: tuple[int, int]) -> list:
    """The transform used for warping: the full affine, or its even-pixel shift in ``integer`` mode."""
    if align_mode == "integer":
        dx, dy = even_pixel_shift(matrix, centre_xy=((size[0] - 1) / 2, (size[1] - 1) / 2))
        return [[1.0, 0.0, float(dx)], [0.0, 1.0, float(dy)]]
    return np.asarray(matrix, float).tolist()


def _read_mosaic(path: Path, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> np.ndarray:
    """Raw frame (or its window ``rows[0]:rows[1]``, ``cols[0]:cols[1]``) as uint16 (fast path: only those rows
    are read, only the window decoded) or float32."""
    layout = read_layout(path)
    if layout.is_raw_uint16:
        return read_raw_uint16(path, layout, rows, cols)[0]
    data = read_fits(path).data
    data = data if rows is None else data[rows[0]:rows[1]]
    return data if cols is None else data[:, cols[0]:cols[1]]


def _read_window(path: Path, calibration: DarkCalibration | None,
                 window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Raw pixels ``window`` = (row0, row1, col0, col1) (default: the whole frame): as stored, or calibrated
    when ``calibration`` is given (float32 with a dark; as stored with hot pixels only, see ``calibrate_window``).

    The window is read ``HOT_REACH`` pixels larger on every side (within the frame), calibrated, then cut back: a
    hot pixel near its edge is repaired from the same neighbours as in the full frame, so the pixels do not depend
    on the tiling.
    """
    if calibration is None:  # as stored (uint16 on the fast path)
        return _read_mosaic(path) if window is None else _read_mosaic(path, window[:2], window[2:])
    height, width = calibration.hot.shape
    r0, r1, c0, c1 = window if window is not None else (0, height, 0, width)
    e0, e1 = max(0, r0 - HOT_REACH), min(height, r1 + HOT_REACH)
    f0, f1 = max(0, c0 - HOT_REACH), min(width, c1 + HOT_REACH)
    band = _read_mosaic(path, (e0, e1), (f0, f1))
    if calibration.offset is not None or not np.issubdtype(band.dtype, np.integer):
        band = band.astype(np.float32)
    calibrate_window(band, (e0, f0), calibration)
    return band[r0 - e0:r1 - e0, c0 - f0:c1 - f0]


def _calibration_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The calibration in a few numbers for report.json: dark used (path, kind), hot pixels (from the dark or
    the lights), check, or why no dark."""
    dark = record.get("dark") or {}
    check = record.get("check") or {}
    return {
        "dark_used": bool(record.get("used")), "dark_path": dark.get("path"), "dark_kind": dark.get("kind"),
        "hot_pixels": record.get("hot_pixels"), "reason": record.get("reason"),
        "hot_pixels_from_lights": bool(record.get("hot_pixels_from_lights")),
        "outliers_without": (check.get("without") or {}).get("outliers"),
        "outliers_with": (check.get("with") or {}).get("outliers"),
        "noise_without_adu": (check.get("without") or {}).get("noise_adu"),
        "noise_with_adu": (check.get("with") or {}).get("noise_adu"),
    }


def _cfa_channel_medians(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """Median of each colour's raw pixels (every 2nd cell sampled: plenty for a background level), as
    ``np.nanmedian`` of the float32 samples gives it; uint16 mosaics by counting (exact, no sort)."""
    offsets = bayer_offsets(pattern)
    out = []
    for name in "RGB":
        samples = np.concatenate([mosaic[dr::4, dc::4].ravel() for dr, dc in offsets[name]])
        out.append(uint16_median(samples) if samples.dtype == np.uint16 else
                   float(np.nanmedian(samples.astype(np.float32))))
    return np.array(out)


def _frame_weights(kept, mode: str) -> np.ndarray:
    """Per-frame weights of the mean: 1, or 1 / noise^2 normalised to a mean of 1."""
    if mode == "none":
        return np.ones(len(kept), np.float32)
    noise = np.array([r.metrics.noise for r in kept], float)
    w = 1.0 / noise**2
    return (w / w.mean()).astype(np.float32)


# ---------------------------------------------------------------------------------------------- intermediates


def _image(a: np.ndarray) -> np.ndarray:
    """Drop a leading axis of length 1 (a CFA plane stored as (1, H, W))."""
    return a[0] if a.ndim == 3 and a.shape[0] == 1 else a


def _save_stacked(folder: Path, stacked: Stacked) -> None:
    """Cache the stacked arrays (FITS) and their description (meta.json, written last)."""
    write_fits(_image(stacked.mean), folder / "mean.fits")
    write_fits(stacked.coverage.astype(np.float32), folder / "coverage.fits")
    write_fits(_image(np.asarray(stacked.rejected, np.float32)), folder / "rejected.fits")
    if stacked.rgb is not None and stacked.is_cfa:
        write_fits(stacked.rgb, folder / "rgb.fits")
    if stacked.single is not None:
        write_fits(_image(stacked.single[0]), folder / "single.fits")
        write_fits(stacked.single[1].astype(np.float32), folder / "single_valid.fits")
    meta = {k: getattr(stacked, k) for k in ("is_cfa", "tile_plan", "crop", "matrices", "backgrounds")}
    write_json_atomic(folder / "meta.json", meta)


def _load_stacked(folder: Path) -> Stacked:
    """Inverse of :func:`_save_stacked`."""
    meta = json.loads((folder / "meta.json").read_text())
    mean = read_fits(folder / "mean.fits").data
    if mean.ndim == 2:
        mean = mean[None]
    rgb = None
    if (folder / "rgb.fits").is_file():
        rgb = read_fits(folder / "rgb.fits").data
    elif not meta["is_cfa"]:
        rgb = mean
    coverage = read_fits(folder / "coverage.fits").data.astype(np.int32)
    rejected = read_fits(folder / "rejected.fits").data.astype(np.int32)
    crop = tuple(meta["crop"]) if meta["crop"] else None
    single = None
    if (folder / "single.fits").is_file():
        data = read_fits(folder / "single.fits").data
        single = (data if data.ndim == 3 else data[None], read_fits(folder / "single_valid.fits").data > 0.5)
    return Stacked(mean, coverage, rejected, rgb, meta["is_cfa"], meta["tile_plan"], crop, meta["matrices"],
                   meta["backgrounds"], from_cache=True, single=single)


# ---------------------------------------------------------------------------------------------- outputs


def _master_header(analysis: SessionAnalysis, config: StackConfig, stacked: Stacked) -> fits.Header:
    """FITS header of the linear master: provenance, times, pointing, settings hash and history."""
    meta = analysis.session.metadata
    kept = analysis.kept
    h = fits.Header()
    ref = kept[0].frame
    for key, value, comment in (
        ("OBJECT", meta.target, "target"),
        ("TELESCOP", _first_header_value(ref.path, "TELESCOP"), "telescope of the lights"),
        ("INSTRUME", _first_header_value(ref.path, "INSTRUME"), "instrument of the lights"),
        ("FILTER", meta.filter, "filter"),
        ("GAIN", meta.gain, "sensor gain of the lights"),
        ("RA", meta.ra_deg, "[deg] pointing (J2000)"),
        ("DEC", meta.dec_deg, "[deg] pointing (J2000)"),
    ):
        if value is not None:
            h[key] = (value, comment)
    exposures = [r.frame.exposure_s or 0.0 for r in kept]
    h["NCOMBINE"] = (len(kept), "frames combined")
    h["EXPTIME"] = (float(sum(exposures)), "[s] total exposure of the combined frames")
    h["EXPOSURE"] = (float(sum(exposures)), "[s] total exposure of the combined frames")
    starts = [r.frame.mid_time - timedelta(seconds=(r.frame.exposure_s or 0) / 2) for r in kept if r.frame.mid_time]
    ends = [r.frame.mid_time + timedelta(seconds=(r.frame.exposure_s or 0) / 2) for r in kept if r.frame.mid_time]
    mids = [r.frame.mid_time for r in kept if r.frame.mid_time]
    if starts:
        h["DATE-OBS"] = (min(starts).isoformat(timespec="milliseconds"), "start of the first combined exposure (UTC)")
        h["DATE-END"] = (max(ends).isoformat(timespec="milliseconds"), "end of the last combined exposure (UTC)")
        mean_mid = min(mids) + sum((m - min(mids) for m in mids), timedelta()) / len(mids)
        h["DATE-AVG"] = (mean_mid.isoformat(timespec="milliseconds"), "mean mid-exposure time (UTC)")
    if stacked.is_cfa:
        pattern = meta.bayer_pattern or "RGGB"
        if stacked.crop and (stacked.crop[0] % 2 or stacked.crop[2] % 2):
            raise AssertionError("CFA crops keep the Bayer phase")
        if config.debayer == "none":  # bayer-first writes the debayered RGB master: no Bayer pattern to declare
            h["BAYERPAT"] = (pattern, "Bayer pattern of the CFA master")
    h["SWCREATE"] = (f"dwarf3gpu {__version__}", "software that made this file")
    h["D3SETHSH"] = (config.settings_hash(), "dwarf3gpu settings hash")
    h["D3REF"] = (analysis.reference.frame.name[:68], "reference frame")
    h["D3DEBAYR"] = (config.debayer, "debayer mode")
    h["D3ALIGN"] = (analysis.align_mode, "align mode")
    h["HISTORY"] = f"dwarf3gpu {__version__}: {len(analysis.records)} lights measured, {len(kept)} kept"
    h["HISTORY"] = f"registered on {analysis.reference.frame.name} ({analysis.align_mode})"
    h["HISTORY"] = (
        f"normalisation {config.normalisation}; sigma clip {config.sigma_bounds[0]:g}/{config.sigma_bounds[1]:g} "
        f"maxiters {config.maxiters} {config.cenfunc}/{config.stdfunc}; weights {config.weights}"
    )
    if config.debayer == "bayer-first":
        h["HISTORY"] = "stacked in the Bayer domain, master debayered (bilinear)"
    if stacked.crop:
        h["HISTORY"] = f"cropped to full coverage rows {stacked.crop[0]}:{stacked.crop[1]} cols {stacked.crop[2]}:{stacked.crop[3]}"
    h["HISTORY"] = "linear data: colour gains are recorded (WBGAIN_*, WBOFFS_*), not applied"
    return h


def _first_header_value(path: Path, key: str) -> Any:
    """A header value of a light (None when absent)."""
    value = read_layout(path).header.get(key)
    return value.strip() if isinstance(value, str) else value


def _write_outputs(stacked: Stacked, analysis: SessionAnalysis, config: StackConfig,
                   out_dir: Path) -> dict[str, Path]:
    """Colour calibration, then the FITS files (in a second thread) beside the previews (``config.quicklook``)."""
    if stacked.rgb is not None:
        stacked.calibration = background_neutral_gains(stacked.rgb)
        write_json_atomic(out_dir / "cache" / "calibration.json", stacked.calibration.to_json())
    with ThreadPoolExecutor(max_workers=1) as writer:
        master = writer.submit(_write_master, stacked, analysis, config, out_dir)
        previews = _write_previews(stacked, config, out_dir) if config.quicklook and stacked.rgb is not None else {}
        return {**master.result(), **previews}


def _write_master(stacked: Stacked, analysis: SessionAnalysis, config: StackConfig, out_dir: Path) -> dict[str, Path]:
    """Write the linear master (with the colour calibration's header cards), coverage and rejected maps."""
    header = _master_header(analysis, config, stacked)
    outputs: dict[str, Path] = {}
    if stacked.calibration is not None:
        for key, value, comment in stacked.calibration.header_cards():
            header[key] = (value, comment)
    master = _image(stacked.mean) if config.debayer == "none" else stacked.rgb
    stacked_dir = out_dir / "stacked"
    outputs["master_linear"] = write_fits(master, stacked_dir / "master_linear.fits", header)
    cov_header = fits.Header()
    cov_header["BUNIT"] = ("frames", "valid samples per pixel")
    outputs["coverage"] = write_fits(stacked.coverage.astype(np.float32), stacked_dir / "coverage.fits", cov_header)
    rej_header = fits.Header()
    rej_header["BUNIT"] = ("samples", "samples rejected by sigma clipping")
    outputs["rejected_map"] = write_fits(_image(np.asarray(stacked.rejected, np.float32)), stacked_dir / "rejected.fits", rej_header)
    return outputs


def _write_previews(stacked: Stacked, config: StackConfig, out_dir: Path) -> dict[str, Path]:
    """8-bit PNG and 16-bit TIFF quicklooks (gains, SCNR, colour matrix and stretch applied to a copy)."""
    rgb01 = make_quicklook(stacked.rgb, stacked.calibration, stretch=config.stretch, scnr_amount=config.scnr,
                           color_matrix=config.color_matrix)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two encoders release the GIL
        png = pool.submit(write_preview_png, rgb01, out_dir / "master_quicklook.png")
        tif = pool.submit(write_preview_tiff, rgb01, out_dir / "master_quicklook.tif")
        return {"quicklook_png": png.result(), "quicklook_tif": tif.result()}


def _stats(analysis: SessionAnalysis, stacked: Stacked | None, timings: dict[str, float]) -> dict[str, Any]:
    """Summary numbers for report.json and the CLI."""
    kept = analysis.kept
    reasons: dict[str, int] = {}
    for r in analysis.rejected:
        reasons[r.decision.reason] = reasons.get(r.decision.reason, 0) + 1
    fwhm = [r.metrics.fwhm for r in kept if r.metrics and np.isfinite(r.metrics.fwhm)]
    bg = [r.metrics.background for r in kept if r.metrics]
    stats: dict[str, Any] = {
        "frames_total": len(analysis.records),
        "frames_kept": len(kept),
        "frames_rejected": len(analysis.rejected),
        "rejected_by_reason": reasons,
        "reference": analysis.reference.frame.name,
        "align_mode": analysis.align_mode,
        "rotation_range_deg": analysis.rotation_range_deg,
        "fwhm_median_px": float(np.median(fwhm)) if fwhm else None,
        "background_median_adu": float(np.median(bg)) if bg else None,
        "total_exposure_s": float(sum(r.frame.exposure_s or 0 for r in kept)),
        "timings_s": timings,
        "seconds_per_frame": timings["total"] / max(1, len(analysis.records)),
    }
    if stacked is not None:
        stats.update(_image_quality(stacked, analysis))
    return stats


def _image_quality(stacked: Stacked, analysis: SessionAnalysis) -> dict[str, Any]:
    """``snr_proxy``, master noise and ``noise_gain`` over the fully covered area.

    ``snr_proxy`` = (99.5th percentile - median) / noise of the master's luminance (mean of the channels; the
    green sites of a CFA master): how far the bright signal stands above the background noise. ``noise_gain`` =
    noise of the reference frame rendered through the same pipeline / noise of the master, both measured the same
    way (sqrt of the frames kept for independent noise and no interpolation; warping smooths noise a little more).
    """
    step = 2 if stacked.is_cfa else 1
    lum = _luminance(stacked.mean)
    full = stacked.coverage >= max(1, int(stacked.coverage.max()))
    # The three order statistics (median and 99.5th percentile of the master, the noise of the master and of
    # the single frame) are independent: two threads (NumPy's partition releases the GIL). Exact, not sampled.
    with ThreadPoolExecutor(max_workers=2) as pool:
        noise_f = pool.submit(_robust_noise, lum, full, step)
        single_f = None
        if stacked.single is not None:
            data, valid = stacked.single
            single_f = pool.submit(lambda: _robust_noise(_luminance(data), valid & full, step))
        values = lum[full & np.isfinite(lum)]
        if values.size < 100:
            return {"snr_proxy": None, "noise_gain": None, "master_noise_adu": None}
        # order statistics do not depend on the order of the elements: partition in place, no copies
        median = float(np.median(values, overwrite_input=True))
        high = float(np.percentile(values, 99.5, overwrite_input=True))
        noise = noise_f.result()
        single = single_f.result() if single_f is not None else None
    out = {
        "snr_proxy": (high - median) / noise if noise > 0 else None,
        "master_noise_adu": noise,
        "single_frame_noise_adu": None,
        "noise_gain": None,
    }
    if single is not None:
        out["single_frame_noise_adu"] = single
        out["noise_gain"] = single / noise if noise > 0 else None
    return out


def _luminance(data: np.ndarray) -> np.ndarray:
    """Mean of three channels, or the single CFA plane."""
    return data.mean(axis=0) if data.shape[0] == 3 else data[0]


def _robust_noise(image: np.ndarray, mask: np.ndarray, step: int = 1) -> float:
    """Pixel noise from neighbour differences (``step`` = 2 pairs same-colour CFA pixels): 1.4826 MAD / sqrt(2)."""
    diff = image[:, step:] - image[:, :-step]
    good = mask[:, step:] & mask[:, :-step]
    good &= np.isfinite(diff)
    d = diff[good]
    del diff, good
    if d.size == 0:
        return float("nan")
    # median and MAD are order statistics: partition the private copy ``d`` in place (same values as with copies)
    centre = np.median(d, overwrite_input=True)
    np.subtract(d, centre, out=d)
    np.abs(d, out=d)
    return float(1.4826 * np.median(d, overwrite_input=True) / np.sqrt(2))


def _manifest(
    found: Session, analysis: SessionAnalysis, config: StackConfig, backend: Backend, stacked: Stacked | None,
    stats: dict, outputs: dict[str, Path], not_listed: list[dict], workers: int, dry_run: bool,
) -> dict[str, Any]:
    """Everything decided in this run, for traceability."""
    import astroalign
    import astropy
    import cv2

    return {
        "software": {
            "dwarf3gpu": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "astropy": astropy.__version__, "astroalign": astroalign.__version__, "opencv": cv2.__version__,
        },
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "session": found.to_json(),
        "settings": config.to_json(),
        "settings_hash": config.settings_hash(),
        "workers": workers,
        "dry_run": dry_run,
        "backend": backend.describe(),
        "analysis": analysis.to_json(),
        "frame_list_rejections": not_listed,
        "stack": None if stacked is None else {
            "tile_plan": stacked.tile_plan, "crop": stacked.crop, "applied_transforms": stacked.matrices,
            "backgrounds": stacked.backgrounds, "from_cache": stacked.from_cache,
            "colour_calibration": stacked.calibration.to_json() if stacked.calibration is not None else None,
        },
        "stats": stats,
        "outputs": {k: str(v) for k, v in outputs.items()},
    }
