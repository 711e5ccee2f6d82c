"""Calibration of the raw lights: dark subtraction and hot-pixel (cosmetic) correction.

The stage sits between decode and warp: every raw window the stacker reads is calibrated in place by
:func:`calibrate_window` before it is resampled, and so is every frame of the background-level pass. The analysis
stage (stars, scores, transforms) is not changed.

- :func:`build_master_dark` makes the master dark of a matched calibration candidate (per-pixel median of a raw
  ``DWARF_DARK`` set, or a device ``CALI_FRAME`` master read as it is), cached under
  ``<out>/cache/dark/<key>/`` where ``key`` hashes the dark files' identities; nothing is written next to
  the darks or under the session folder.
- :func:`hot_pixel_map` flags the pixels of the master dark far above their Bayer site's level.
- :func:`check_dark` measures, on the reference light, whether subtracting the dark helps (fewer same-colour
  outliers, noise not worse); :func:`prepare_calibration` applies the rule and records the decision.
- Without a usable dark, :func:`hot_pixels_from_lights` finds the hot pixels in the per-pixel minimum of a few
  lights (fixed on the sensor while the sky moves) as single-pixel spikes, and they are repaired the same way.

Formulas, thresholds and why: METHODS.md, section "Dark calibration".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import median_filter

from . import __version__
from .atomic import write_json_atomic
from .cache import cache_path, discard_damaged, file_identity, settings_hash
from .errors import ConfigError, FitsReadError
from .fitsio import read_fits, read_layout, read_raw_window, write_fits
from .robust import MAD_TO_SIGMA, difference_noise, uint16_median
from .session import CalibrationCandidate, Session

__all__ = [
    "DarkCalibration", "HOT_SIGMA", "HOT_FLOOR_ADU", "HOT_REACH", "OUTLIER_SIGMA", "MAX_NOISE_INCREASE",
    "LIGHT_HOT_FRAMES", "SPIKE_RATIO", "build_master_dark", "hot_pixel_map", "hot_pixels_from_lights",
    "calibrate_window", "check_dark", "prepare_calibration",
]

#: A pixel of the master dark is hot when it lies more than HOT_SIGMA robust sigmas above its Bayer site's median...
HOT_SIGMA = 8.0
#: ... and more than HOT_FLOOR_ADU above it (guards against a near-zero spread, e.g. a quantised master).
HOT_FLOOR_ADU = 25.0
#: Same-colour neighbours are 2 pixels away: a hot pixel's repair reads up to this far around it.
HOT_REACH = 2
#: Outliers of the "does it help" check: |pixel - median of its 8 same-colour neighbours| above this many sigmas.
OUTLIER_SIGMA = 10.0
#: The dark is not used when it raises the reference light's robust noise by more than this factor.
MAX_NOISE_INCREASE = 1.10
#: Without a dark: hot pixels are looked for in the per-pixel minimum of up to this many lights (spread in time).
LIGHT_HOT_FRAMES = 9
#: ... as pixels whose excess over their same-colour neighbours is this many times that of each of their 8
#: nearest neighbours (a star, even an undersampled one, lifts its nearest neighbours; a hot pixel does not).
SPIKE_RATIO = 4.0
#: The 8 same-colour neighbours (row, col offsets) of a Bayer pixel.
_NEIGHBOURS = tuple((dr, dc) for dr in (-2, 0, 2) for dc in (-2, 0, 2) if (dr, dc) != (0, 0))
_FOOTPRINT = np.zeros((5, 5), bool)
for _dr, _dc in _NEIGHBOURS:
    _FOOTPRINT[_dr + 2, _dc + 2] = True


@dataclass
class DarkCalibration:
    """A master dark ready to apply.

    Attributes
    ----------
    offset : numpy.ndarray or None
        (H, W) float32 ``master - median of its Bayer site``: what is subtracted from every light (the per-site
        dark level is kept, so the sky pedestal of the data stays positive and the levels keep their meaning);
        None when the hot pixels come from the lights (nothing is subtracted).
    hot : numpy.ndarray
        (H, W) bool hot-pixel map.
    identity : str
        Hash of the dark files' identities (and the thresholds): part of the stack cache key.
    record : dict
        What is written to the manifest (path, kind, match, check numbers, hot-pixel count).
    """

    offset: np.ndarray | None
    hot: np.ndarray
    identity: str
    record: dict[str, Any]

    def __post_init__(self) -> None:
        self._hot_rows, self._hot_cols = np.nonzero(self.hot)  # row-major: sorted by row

    def hot_in(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        """Hot pixels of the window ``[row0, row1) x [col0, col1)`` as window (rows, cols), by a binary search
        of the sorted rows instead of a scan of the window's map."""
        i0, i1 = np.searchsorted(self._hot_rows, [row0, row1])
        rows, cols = self._hot_rows[i0:i1], self._hot_cols[i0:i1]
        inside = (cols >= col0) & (cols < col1)
        return rows[inside] - row0, cols[inside] - col0


def _dark_files(source: CalibrationCandidate | Path) -> tuple[str, list[Path]]:
    """(kind, files) of a candidate or an explicit master-dark path."""
    if isinstance(source, CalibrationCandidate):
        if source.kind == "raw_dark_set":
            files = sorted(p for p in source.path.iterdir()
                           if p.name.startswith("raw_") and p.suffix.lower() in (".fits", ".fit"))
            return source.kind, files
        return source.kind, [source.path]
    return "master_dark_file", [Path(source)]


def build_master_dark(
    source: CalibrationCandidate | Path, cache_root: Path | None, *, shape: tuple[int, int],
    refresh: bool = False,
) -> tuple[np.ndarray, str]:
    """The master dark of a raw dark set (per-pixel median, float32) or of a master file (read as it is).

    Parameters
    ----------
    source : CalibrationCandidate or pathlib.Path
        A ``raw_dark_set`` / ``master_dark`` candidate, or the path of a FITS master dark.
    cache_root : pathlib.Path or None
        ``<out>/cache/dark``: the master is cached in ``<cache_root>/<key>/`` (None: no cache).
    shape : tuple of int
        (H, W) of the lights; another size is an error.
    refresh : bool
        Rebuild even when cached.

    Returns
    -------
    master : numpy.ndarray
        (H, W) float32.
    key : str
        Hash of the dark files' names and identities (size, mtime).

    Raises
    ------
    ConfigError
        Missing, unreadable or wrongly sized dark.
    """
    kind, files = _dark_files(source)
    if not files:
        raise ConfigError(f"no dark frames in {getattr(source, 'path', source)}")
    try:
        key = settings_hash({"version": __version__, "kind": kind,
                             "files": [[str(p.resolve()), file_identity(p)] for p in files]})
    except OSError as exc:
        raise ConfigError(f"cannot read the dark {exc.filename}: {exc.strerror}") from None
    folder = cache_root / key if cache_root is not None else None
    if folder is not None and not refresh and (folder / "meta.json").is_file():
        try:
            master = read_fits(folder / "master_dark.fits").data
            if master.shape == shape:
                return master.astype(np.float32, copy=False), key
        except (FitsReadError, OSError) as exc:
            discard_damaged(folder, str(exc))  # a damaged cache entry is rebuilt
    try:
        if kind == "raw_dark_set":
            frames = np.stack([_checked(read_raw_window(p), p, shape) for p in files])
            master = np.empty(shape, np.float32)
            for r in range(0, shape[0], 256):  # row blocks bound the float64 temporary of np.median
                master[r:r + 256] = np.median(frames[:, r:r + 256], axis=0)
        else:
            master = _checked(read_raw_window(files[0]), files[0], shape).astype(np.float32)
    except FitsReadError as exc:
        raise ConfigError(f"cannot read the dark: {exc}") from None
    if folder is not None:
        write_fits(master, folder / "master_dark.fits")
        write_json_atomic(folder / "meta.json", {"kind": kind, "files": [str(p) for p in files]})
    return master, key


def _checked(data: np.ndarray, path: Path, shape: tuple[int, int]) -> np.ndarray:
    """``data`` when it is a 2-D frame of ``shape``; a ConfigError otherwise."""
    if data.shape != shape:
        raise ConfigError(f"dark {path} is {'x'.join(map(str, data.shape[::-1]))}, the lights are "
                          f"{shape[1]}x{shape[0]}: not a master dark of this camera")
    return data


def _site_medians(image: np.ndarray) -> np.ndarray:
    """(2, 2) median of each Bayer site (row parity, column parity)."""
    return np.array([[np.median(image[dr::2, dc::2]) for dc in (0, 1)] for dr in (0, 1)], np.float32)


def dark_offset(master: np.ndarray) -> np.ndarray:
    """``master - median of its Bayer site`` (float32): the part of the dark that varies from pixel to pixel."""
    offset = master.astype(np.float32, copy=True)
    med = _site_medians(master)
    for dr in (0, 1):
        for dc in (0, 1):
            offset[dr::2, dc::2] -= med[dr, dc]
    return offset


def hot_pixel_map(master: np.ndarray, k: float = HOT_SIGMA, floor: float = HOT_FLOOR_ADU) -> np.ndarray:
    """Hot pixels of a master dark.

    Per Bayer site (R, G1, G2, B), a pixel is hot when ``master - m > max(k * s, floor)``, with ``m`` the site's
    median and ``s = MAD_TO_SIGMA * MAD`` its robust spread.

    Parameters
    ----------
    master : numpy.ndarray
        (H, W) master dark.
    k : float, default HOT_SIGMA
        Threshold in robust sigmas.
    floor : float, default HOT_FLOOR_ADU
        Minimum excess in ADU.

    Returns
    -------
    numpy.ndarray
        (H, W) bool.
    """
    hot = np.zeros(master.shape, bool)
    for dr in (0, 1):
        for dc in (0, 1):
            site = master[dr::2, dc::2].astype(np.float32)
            m = float(np.median(site))
            s = MAD_TO_SIGMA * float(np.median(np.abs(site - m)))
            hot[dr::2, dc::2] = site - m > max(k * s, floor)
    return hot


def calibrate_window(window: np.ndarray, origin: tuple[int, int], calibration: DarkCalibration) -> np.ndarray:
    """Calibrate a raw window in place: subtract the dark offset, then repair the hot pixels.

    A hot pixel becomes the median of its 8 same-colour neighbours (2 pixels away) that lie inside the window and
    are not hot themselves; one without any such neighbour keeps its dark-subtracted value. A window read
    ``HOT_REACH`` pixels larger than needed (clamped to the frame) therefore gives the same pixels as the
    calibrated full frame, whatever the tiling. Without a dark offset an integer window stays integer: the
    repaired value is that median rounded to the nearest integer (half to even).

    Parameters
    ----------
    window : numpy.ndarray
        (h, w) raw pixels, modified in place: float32, or (only without a dark offset) uint16.
    origin : tuple of int
        (row0, col0) of the window in the frame.
    calibration : DarkCalibration
        The dark to apply.

    Returns
    -------
    numpy.ndarray
        ``window``.
    """
    r0, c0 = origin
    h, w = window.shape
    if calibration.offset is not None:
        window -= calibration.offset[r0:r0 + h, c0:c0 + w]
    hot = calibration.hot[r0:r0 + h, c0:c0 + w]
    rows, cols = calibration.hot_in(r0, r0 + h, c0, c0 + w)
    if rows.size == 0:
        return window
    values = np.full((len(_NEIGHBOURS), rows.size), np.nan, np.float32)
    for k, (dr, dc) in enumerate(_NEIGHBOURS):
        rr, cc = rows + dr, cols + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        rr, cc = rr[inside], cc[inside]
        good = ~hot[rr, cc]
        idx = np.flatnonzero(inside)[good]
        values[k, idx] = window[rr[good], cc[good]]
    has = np.isfinite(values).any(axis=0)
    repaired = np.full(rows.size, np.nan, np.float32)
    if has.any():
        repaired[has] = np.nanmedian(values[:, has], axis=0)
    if np.issubdtype(window.dtype, np.integer):
        repaired = np.rint(repaired)  # half to even
    window[rows[has], cols[has]] = repaired[has]
    return window




def _neighbour_excess(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``image - median of its 8 same-colour neighbours`` (float32) at the given pixels (each at least 2 px from
    the edges)."""
    neighbours = np.stack([image[rows + dr, cols + dc] for dr, dc in _NEIGHBOURS]).astype(np.float32)
    return image[rows, cols].astype(np.float32) - np.median(neighbours, axis=0)


def hot_pixels_from_lights(paths: list[Path], shape: tuple[int, int]) -> tuple[np.ndarray, dict[str, Any]]:
    """Hot pixels found in the lights themselves (for sessions without a usable dark).

    The per-pixel minimum ``M`` of the lights keeps what is fixed on the sensor and drops most stars, which move
    with the field (rotation, drift). A pixel of ``M`` is hot when (1) its excess over the median of its 8
    same-colour neighbours exceeds ``max(HOT_SIGMA x noise, HOT_FLOOR_ADU)``, ``noise`` the robust noise of ``M``
    (as :func:`check_dark` measures it), and (2) that excess is at least ``SPIKE_RATIO`` times the same excess of
    every one of its 8 nearest neighbours (other colours included): a star that did not move, even an
    undersampled one, lifts the pixels next to its peak, a hot pixel is alone. Pixels closer than 3 px to the
    edge are never flagged (the resampled frames do not use them).

    Parameters
    ----------
    paths : list of pathlib.Path
        The lights to use (e.g. up to :data:`LIGHT_HOT_FRAMES`, spread over the session).
    shape : tuple of int
        (H, W) of the frames.

    Returns
    -------
    hot : numpy.ndarray
        (H, W) bool.
    record : dict
        ``frames`` (names), ``noise_adu``, ``threshold_adu``, ``candidates`` (pixels passing (1)), ``hot_pixels``.
    """
    minimum = None
    for path in paths:
        frame = _checked(read_raw_window(path), path, shape)
        minimum = frame.copy() if minimum is None else np.minimum(minimum, frame, out=minimum)
    # noise as check_dark measures it, on every 4th row (half a million differences are plenty)
    noise = difference_noise(minimum[::4])
    threshold = max(HOT_SIGMA * noise, HOT_FLOOR_ADU)
    # candidates first, cheaply (well above their Bayer site's median level: loose, the sky may be darker there),
    # then the exact tests on those few; the edge band of 3 px is never flagged
    candidate = np.zeros(minimum.shape, bool)
    for dr in (0, 1):
        for dc in (0, 1):
            site = minimum[dr::2, dc::2]
            level = uint16_median(site) if site.dtype == np.uint16 else float(np.median(site))
            candidate[dr::2, dc::2] = site > level + 0.5 * threshold
    candidate[:3], candidate[-3:], candidate[:, :3], candidate[:, -3:] = False, False, False, False
    rows, cols = np.nonzero(candidate)
    excess = _neighbour_excess(minimum, rows, cols)
    keep = excess > threshold
    rows, cols, excess = rows[keep], cols[keep], excess[keep]
    nearest = np.stack([_neighbour_excess(minimum, rows + dr, cols + dc)
                        for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)])
    spike = np.all(SPIKE_RATIO * nearest <= excess, axis=0)
    hot = np.zeros(minimum.shape, bool)
    hot[rows[spike], cols[spike]] = True
    record = {"frames": [p.name for p in paths], "noise_adu": noise, "threshold_adu": threshold,
              "candidates": int(rows.size), "hot_pixels": int(spike.sum()), "spike_ratio": SPIKE_RATIO}
    return hot, record


def _defect_stats(mosaic: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """Robust noise and same-colour outliers of a raw frame.

    ``noise`` = :func:`~dwarf3gpu.robust.difference_noise` (same-colour horizontal differences); ``outliers`` = pixels whose distance
    to the median of their 8 same-colour neighbours exceeds ``threshold`` (default ``OUTLIER_SIGMA`` x the robust
    spread of that distance).
    """
    x = mosaic.astype(np.float32, copy=False)
    noise = difference_noise(x)
    resid = x - median_filter(x, footprint=_FOOTPRINT, mode="mirror")
    if threshold is None:
        threshold = OUTLIER_SIGMA * MAD_TO_SIGMA * float(np.median(np.abs(resid - np.median(resid))))
    return {"noise_adu": noise, "outliers": int(np.count_nonzero(np.abs(resid) > threshold)),
            "outlier_threshold_adu": float(threshold)}


def check_dark(light: np.ndarray, offset: np.ndarray) -> dict[str, Any]:
    """Does subtracting the dark help on this light? Numbers without and with it, and the verdict.

    Both measures use the uncalibrated light's outlier threshold. The dark helps when it leaves no more
    same-colour outliers than before and raises the robust noise by at most ``MAX_NOISE_INCREASE``.

    Parameters
    ----------
    light : numpy.ndarray
        (H, W) raw reference light.
    offset : numpy.ndarray
        (H, W) dark offset (:func:`dark_offset`).

    Returns
    -------
    dict
        ``without``, ``with`` (``noise_adu``, ``outliers``, ``outlier_threshold_adu``), ``helps`` (bool) and
        ``reason`` (why not, or None).
    """
    before = _defect_stats(light)
    after = _defect_stats(light.astype(np.float32) - offset, before["outlier_threshold_adu"])
    reason = None
    if after["outliers"] > before["outliers"]:
        reason = f"the dark adds same-colour outliers ({before['outliers']} -> {after['outliers']})"
    elif after["noise_adu"] > MAX_NOISE_INCREASE * before["noise_adu"]:
        reason = (f"the dark raises the noise by more than {MAX_NOISE_INCREASE - 1:.0%} "
                  f"({before['noise_adu']:.2f} -> {after['noise_adu']:.2f} ADU)")
    return {"without": before, "with": after, "helps": reason is None, "reason": reason,
            "rule": f"use when outliers do not increase and noise rises by <= {MAX_NOISE_INCREASE - 1:.0%}"}


def prepare_calibration(
    session: Session, setting: str, reference: Path, out_dir: Path, *, use_cache: bool = True,
    refresh: bool = False, lights: list[Path] | None = None,
) -> tuple[DarkCalibration | None, dict[str, Any]]:
    """Choose, build and check the dark of a session; without a usable dark under ``auto``, find the hot pixels
    in ``lights`` (:func:`hot_pixels_from_lights`) instead.

    Parameters
    ----------
    session : Session
        The discovered session (its ``best_dark``).
    setting : str
        ``"auto"`` (the best matched dark, if any), ``"none"``, or the path of a FITS master dark.
    reference : pathlib.Path
        The reference light (the check runs on it).
    out_dir : pathlib.Path
        ``<output_root>/<session>``: the master is cached in ``out_dir/cache/dark/``.
    use_cache, refresh : bool
        Cache use.
    lights : list of pathlib.Path, optional
        The kept lights in time order: with ``auto`` and no usable dark, up to :data:`LIGHT_HOT_FRAMES` of them,
        spread over the list, give the hot pixels.

    Returns
    -------
    calibration : DarkCalibration or None
        None when nothing is applied.
    record : dict
        For the manifest: ``used`` (a dark), ``setting``, the dark's description, the check, ``hot_pixels``,
        ``reason`` (why no dark), ``hot_pixels_from_lights`` (when the lights gave them).

    Raises
    ------
    ConfigError
        An explicit dark path that is missing, unreadable or of another size.
    """
    record: dict[str, Any] = {"setting": setting, "used": False, "dark": None, "check": None, "hot_pixels": None,
                              "reason": None}
    if setting == "none":
        record["reason"] = "--dark none"
        return None, record
    if setting == "auto":
        candidate = session.best_dark
        if candidate is None:
            found = [c for c in session.calibration if c.kind in ("raw_dark_set", "master_dark")]
            record["reason"] = ("no dark found next to the session" if not found else
                                f"no matching dark ({found[0].path.name}: {'; '.join(found[0].mismatches)})")
            return _from_lights(lights, reference, record)
        source: CalibrationCandidate | Path = candidate
        record["dark"] = candidate.to_json()
    else:
        path = Path(setting)
        if not path.is_file():
            raise ConfigError(f"{setting}: no such file (give a FITS master dark, 'auto' or 'none')", setting="dark")
        source = path
        record["dark"] = {"kind": "master_dark_file", "path": str(path)}
    layout_shape = read_layout(reference).shape
    shape = (int(layout_shape[-2]), int(layout_shape[-1]))
    cache_root = cache_path(out_dir, "dark") if use_cache else None
    master, key = build_master_dark(source, cache_root, shape=shape, refresh=refresh)
    offset = dark_offset(master)
    check = check_dark(read_raw_window(reference), offset)
    record["check"] = check
    record["check"]["reference"] = reference.name
    if not check["helps"]:
        record["reason"] = f"dark not used: {check['reason']}"
        return _from_lights(lights, reference, record) if setting == "auto" else (None, record)
    hot = hot_pixel_map(master)
    record.update(used=True, hot_pixels=int(hot.sum()), master_median_adu=float(np.median(master)),
                  thresholds={"hot_sigma": HOT_SIGMA, "hot_floor_adu": HOT_FLOOR_ADU})
    identity = settings_hash({"dark": key, "hot_sigma": HOT_SIGMA, "hot_floor_adu": HOT_FLOOR_ADU})
    record["identity"] = identity
    return DarkCalibration(offset, hot, identity, record), record


def _from_lights(lights: list[Path] | None, reference: Path,
                 record: dict[str, Any]) -> tuple[DarkCalibration | None, dict[str, Any]]:
    """The hot pixels of :func:`hot_pixels_from_lights` as a calibration without a dark (None without lights)."""
    if not lights:
        return None, record
    count = min(LIGHT_HOT_FRAMES, len(lights))
    chosen = [lights[i] for i in sorted({round(k * (len(lights) - 1) / max(count - 1, 1)) for k in range(count)})]
    layout_shape = read_layout(reference).shape
    hot, found = hot_pixels_from_lights(chosen, (int(layout_shape[-2]), int(layout_shape[-1])))
    record.update(hot_pixels=found["hot_pixels"], hot_pixels_from_lights=found)
    identity = settings_hash({"lights": [file_identity(p) for p in chosen], "hot_sigma": HOT_SIGMA,
                              "hot_floor_adu": HOT_FLOOR_ADU, "spike_ratio": SPIKE_RATIO})
    record["identity"] = identity
    return DarkCalibration(None, hot, identity, record), record


def record_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` made JSON-safe (numpy numbers to Python)."""
    return json.loads(json.dumps(record, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
