"""Products of a run: the stacking result, the master FITS header, the files written, image statistics, manifest.

:class:`Stacked` is what the stacking produced; :func:`write_outputs` measures the colour calibration and writes the
linear master (with :func:`master_header`), the coverage and rejected maps and the previews; :func:`run_stats` and
:func:`run_manifest` describe the run for the reports and ``run_manifest.json``. The pipeline only orchestrates.
"""

from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits

from . import __version__
from .color import background_neutral_gains
from .fitsio import read_layout, write_fits
from .robust import difference_noise
from .stretch import make_quicklook, write_preview_png, write_preview_tiff

if TYPE_CHECKING:
    from .analysis import SessionAnalysis
    from .backends.base import StageOps
    from .config import StackConfig
    from .session import Session

__all__ = ["Stacked", "OUTPUT_FILES", "remove_stale_outputs", "calibration_summary", "squeeze_plane",
           "master_header", "write_outputs", "run_stats", "run_manifest"]


#: Files a run may write under ``<out>/``; those this run did not write are removed so no stale result remains.
OUTPUT_FILES = {
    "master_linear": "stacked/master_linear.fits",
    "coverage": "stacked/coverage.fits",
    "rejected_map": "stacked/rejected.fits",
    "quicklook_png": "master_quicklook.png",
    "quicklook_tif": "master_quicklook.tif",
}


def remove_stale_outputs(out_dir: Path, written: dict[str, Path], dry_run: bool) -> None:
    """Delete outputs of an earlier run that this run replaces by nothing (e.g. previews after --no-quicklook).

    A dry run leaves the earlier outputs in place: it only re-scores and rewrites the reports.
    """
    if dry_run:
        return
    for key, rel in OUTPUT_FILES.items():
        path = out_dir / rel
        if key not in written and path.exists():
            path.unlink()


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
        (C, H, W) rejected samples per channel and pixel.
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
    colour_calibration : ColorCalibration or None
        Colour calibration measured on the master (recorded in the header, applied to the previews only).
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
    colour_calibration: Any = None
    single: tuple[np.ndarray, np.ndarray] | None = None


def calibration_summary(record: dict[str, Any]) -> dict[str, Any]:
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


def squeeze_plane(a: np.ndarray) -> np.ndarray:
    """Drop a leading axis of length 1 (a CFA plane stored as (1, H, W))."""
    return a[0] if a.ndim == 3 and a.shape[0] == 1 else a


def master_header(analysis: SessionAnalysis, config: StackConfig, stacked: Stacked) -> fits.Header:
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


def write_outputs(stacked: Stacked, analysis: SessionAnalysis, config: StackConfig,
                   out_dir: Path) -> dict[str, Path]:
    """Colour calibration, then the FITS files (in a second thread) beside the previews (``config.quicklook``)."""
    if stacked.rgb is not None:
        stacked.colour_calibration = background_neutral_gains(stacked.rgb)
    with ThreadPoolExecutor(max_workers=1) as writer:
        master = writer.submit(_write_master, stacked, analysis, config, out_dir)
        previews = _write_previews(stacked, config, out_dir) if config.quicklook and stacked.rgb is not None else {}
        return {**master.result(), **previews}


def _write_master(stacked: Stacked, analysis: SessionAnalysis, config: StackConfig, out_dir: Path) -> dict[str, Path]:
    """Write the linear master (with the colour calibration's header cards), coverage and rejected maps."""
    header = master_header(analysis, config, stacked)
    outputs: dict[str, Path] = {}
    if stacked.colour_calibration is not None:
        for key, value, comment in stacked.colour_calibration.header_cards():
            header[key] = (value, comment)
    master = squeeze_plane(stacked.mean) if config.debayer == "none" else stacked.rgb
    stacked_dir = out_dir / "stacked"
    outputs["master_linear"] = write_fits(master, stacked_dir / "master_linear.fits", header)
    cov_header = fits.Header()
    cov_header["BUNIT"] = ("frames", "valid samples per pixel")
    outputs["coverage"] = write_fits(stacked.coverage.astype(np.float32), stacked_dir / "coverage.fits", cov_header)
    rej_header = fits.Header()
    rej_header["BUNIT"] = ("samples", "samples rejected by sigma clipping")
    outputs["rejected_map"] = write_fits(squeeze_plane(np.asarray(stacked.rejected, np.float32)), stacked_dir / "rejected.fits", rej_header)
    return outputs


def _write_previews(stacked: Stacked, config: StackConfig, out_dir: Path) -> dict[str, Path]:
    """8-bit PNG and 16-bit TIFF quicklooks (gains, SCNR, colour matrix and stretch applied to a copy)."""
    rgb01 = make_quicklook(stacked.rgb, stacked.colour_calibration, stretch=config.stretch, scnr_amount=config.scnr,
                           color_matrix=config.color_matrix)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two encoders release the GIL
        png = pool.submit(write_preview_png, rgb01, out_dir / "master_quicklook.png")
        tif = pool.submit(write_preview_tiff, rgb01, out_dir / "master_quicklook.tif")
        return {"quicklook_png": png.result(), "quicklook_tif": tif.result()}


def run_stats(analysis: SessionAnalysis, stacked: Stacked | None, timings: dict[str, float]) -> dict[str, Any]:
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
        noise_f = pool.submit(difference_noise, lum, step, full)
        single_f = None
        if stacked.single is not None:
            data, valid = stacked.single
            single_f = pool.submit(lambda: difference_noise(_luminance(data), step, valid & full))
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




def run_manifest(
    found: Session, analysis: SessionAnalysis, config: StackConfig, backend: StageOps, stacked: Stacked | None,
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
            "colour_calibration": stacked.colour_calibration.to_json() if stacked.colour_calibration is not None else None,
        },
        "stats": stats,
        "outputs": {k: str(v) for k, v in outputs.items()},
    }
