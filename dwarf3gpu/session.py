"""Session discovery: which files of a session folder are light frames, and what the session is.

A DWARF 3 session folder (``DWARF_RAW_TELE_<target>_EXP_<exp>_GAIN_<gain>_<timestamp>``) holds raw lights,
``failed_`` lights the device's live stack rejected, the device's own stack and by-products. Discovery is
strict: a file is a light only when its *name* follows the device's light pattern (or its header says
``IMAGETYP = 'Light'``, for Seestar and other smart telescopes) *and* its header describes a 2-D light of this
session. Everything else is listed with a reason. Nothing is ever written under the session folder.

Metadata comes from three sources, read leniently (a missing key or a wrong type is a recorded warning):
the folder name, the light headers and ``shotsInfo.json`` (whose RA is in hours).
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from astropy.io import fits

from .errors import FitsReadError, SessionError
from .fitsio import read_layout
from .geometry import BAYER_PATTERNS

__all__ = [
    "LightFrame",
    "ExcludedFile",
    "CalibrationCandidate",
    "SessionMetadata",
    "Session",
    "discover",
    "list_lights",
    "parse_session_folder_name",
    "parse_light_name",
]

FITS_SUFFIXES = (".fits", ".fit", ".fts")
BY_PRODUCT_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".txt", ".xml", ".mp4")
SHOTS_INFO = "shotsInfo.json"
#: Header keys that must agree with the session majority (``header_mismatch`` otherwise).
CONSISTENCY_KEYS = ("width", "height", "xbinning", "ybinning", "bayer_pattern", "exposure_s")

_TS_FOLDER = r"(?P<ts>\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d{3})"
_FOLDER_RE = re.compile(
    r"^DWARF_RAW_(?P<camera>TELE|WIDE)_(?:(?P<target>.+?)_)?EXP_(?P<exp>\d+(?:\.\d+)?)_GAIN_(?P<gain>\d+)_" + _TS_FOLDER + r"$"
)
_LIGHT_RE = re.compile(
    r"^(?:(?P<target>.*)_)?(?P<exp>\d+(?:\.\d+)?)s(?P<gain>\d+)_(?P<filter>[^_]*)_"
    r"(?P<ts>\d{8}-\d{9})_(?P<temp>-?\d+)C\.fits?$",
    re.IGNORECASE,
)
_DARK_SET_RE = re.compile(
    r"^(?P<camera>tele|wide)_exp_(?P<exp>\d+(?:\.\d+)?)_gain_(?P<gain>\d+)_bin_(?P<bin>\d+)_" + _TS_FOLDER + r"$",
    re.IGNORECASE,
)
_RAW_DARK_RE = re.compile(r"^raw_.*_(?P<temp>-?\d+)C\.fits?$", re.IGNORECASE)
_MASTER_DARK_RE = re.compile(
    r"^dark_exp_(?P<exp>\d+(?:\.\d+)?)_gain_(?P<gain>\d+)_bin_(?P<bin>\d+)_(?P<temp>-?\d+)C(?:_stack_(?P<n>\d+))?\.fits?$",
    re.IGNORECASE,
)
_MASTER_BIAS_RE = re.compile(r"^bias_gain_(?P<gain>\d+)_bin_(?P<bin>\d+)\.fits?$", re.IGNORECASE)
_MASTER_FLAT_RE = re.compile(r"^flat_gain_(?P<gain>\d+)_bin_(?P<bin>\d+)_ir_(?P<ir>\d+)\.fits?$", re.IGNORECASE)
_FLAT_IR = {0: "VIS", 1: "Astro", 2: "Duo-Band"}
_CAM_FOLDER = {"cam_0": "TELE", "cam_1": "WIDE"}
_DWARF_TELESCOPES = ("DWARFIII", "DWARF 3", "DWARF3")
_BY_PRODUCT_DIRS = ("Thumbnail",)
#: Dark temperature tolerance (deg C) for a calibration match.
DARK_TEMPERATURE_TOLERANCE_C = 3.0


@dataclass(frozen=True)
class LightFrame:
    """One light frame and the header values the pipeline uses.

    Attributes
    ----------
    path : pathlib.Path
        The FITS file.
    date_obs : datetime or None
        DATE-OBS as written (UTC, naive).
    mid_time : datetime or None
        Mid-exposure time: DATE-OBS - EXPTIME/2 on DWARF 3 (DATE-OBS is the END of exposure there),
        DATE-OBS + EXPTIME/2 on devices that write the start.
    exposure_s, gain, temperature_c : float or None
        EXPTIME, GAIN and sensor temperature (DET-TEMP or CCD-TEMP, else the file name's ``_<t>C``).
    filter, camera, bayer_pattern, object : str or None
        FILTER, CAMERA, BAYERPAT and OBJECT.
    width, height, xbinning, ybinning : int
        Frame size (NAXIS1, NAXIS2) and binning.
    ra_deg, dec_deg : float or None
        Pointing from the header (degrees).
    """

    path: Path
    date_obs: datetime | None
    mid_time: datetime | None
    exposure_s: float | None
    gain: float | None
    temperature_c: float | None
    filter: str | None
    camera: str | None
    bayer_pattern: str | None
    object: str | None
    width: int
    height: int
    xbinning: int
    ybinning: int
    ra_deg: float | None
    dec_deg: float | None

    @property
    def name(self) -> str:
        """File name."""
        return self.path.name

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary (times as ISO 8601 strings)."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["name"] = self.name
        for key in ("date_obs", "mid_time"):
            out[key] = _iso(out[key])
        return out


@dataclass(frozen=True)
class ExcludedFile:
    """A file of the session folder that is not used as a light.

    Attributes
    ----------
    path : pathlib.Path
        The file or folder.
    reason : str
        Machine-readable reason: ``device_failed``, ``device_stack``, ``device_by_product``, ``metadata``,
        ``not_a_light``, ``foreign_target``, ``unreadable``, ``header_mismatch`` or ``not_fits``.
    detail : str
        The numbers or words behind the reason, for people.
    """

    path: Path
    reason: str
    detail: str

    def to_json(self) -> dict[str, str]:
        """Plain JSON-ready dictionary."""
        return {"path": str(self.path), "name": self.path.name, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class CalibrationCandidate:
    """A dark set or device master found next to the session, with how well it matches the lights.

    Attributes
    ----------
    kind : str
        ``raw_dark_set`` (a ``DWARF_DARK`` folder), ``master_dark``, ``master_bias`` or ``master_flat``.
    path : pathlib.Path
        Folder (raw dark set) or file (master).
    camera : str or None
        TELE or WIDE.
    exposure_s, gain, temperature_c : float or None
        From the folder or file name (darks); None where the name does not carry it.
    binning : int or None
        Binning factor.
    filter : str or None
        Filter of a flat (from ``ir_<n>``).
    n_frames : int
        Frames in a raw dark set, frames stacked in a master (1 when unknown).
    matches : bool
        True when every checked property agrees with the session.
    mismatches : tuple of str
        What differs, in words.
    """

    kind: str
    path: Path
    camera: str | None
    exposure_s: float | None
    gain: float | None
    temperature_c: float | None
    binning: int | None
    filter: str | None
    n_frames: int
    matches: bool
    mismatches: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["mismatches"] = list(self.mismatches)
        return out


@dataclass
class SessionMetadata:
    """What is known about a session, and from where.

    Attributes
    ----------
    folder : str
        Session folder name.
    device : str
        ``DWARF 3``, ``DWARF II``, ``Seestar`` or ``generic``.
    date_obs_marks : str
        ``end`` (DWARF 3) or ``start``: what DATE-OBS means for this device.
    target, camera, filter, bayer_pattern : str or None
        Session values (folder name, then majority header, then shotsInfo.json).
    exposure_s, gain : float or None
        Exposure and gain.
    width, height : int or None
        Majority frame size.
    temperature_min_c, temperature_max_c : float or None
        Sensor temperature range over the lights.
    ra_deg, dec_deg : float or None
        Pointing in degrees (shotsInfo.json RA is converted from hours).
    start, end : datetime or None
        First and last mid-exposure times of the lights.
    shots_info : dict
        shotsInfo.json as read (empty when absent).
    warnings : list of str
        Soft problems met while reading (missing keys, wrong types, disagreements).
    """

    folder: str
    device: str = "generic"
    date_obs_marks: str = "start"
    target: str | None = None
    camera: str | None = None
    filter: str | None = None
    bayer_pattern: str | None = None
    exposure_s: float | None = None
    gain: float | None = None
    width: int | None = None
    height: int | None = None
    temperature_min_c: float | None = None
    temperature_max_c: float | None = None
    ra_deg: float | None = None
    dec_deg: float | None = None
    start: datetime | None = None
    end: datetime | None = None
    shots_info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary."""
        out = asdict(self)
        out["start"], out["end"] = _iso(self.start), _iso(self.end)
        return out


@dataclass
class Session:
    """Result of :func:`discover`.

    Attributes
    ----------
    path : pathlib.Path
        The session folder.
    lights : list of LightFrame
        Light frames in observation order (mid-exposure time, then file name).
    excluded : list of ExcludedFile
        Every other entry of the folder, with its reason.
    metadata : SessionMetadata
        Session metadata and warnings.
    calibration : list of CalibrationCandidate
        Dark sets and device masters found next to the session.
    """

    path: Path
    lights: list[LightFrame]
    excluded: list[ExcludedFile]
    metadata: SessionMetadata
    calibration: list[CalibrationCandidate]

    @property
    def best_dark(self) -> CalibrationCandidate | None:
        """The matching dark (raw set preferred over a master) closest in temperature, or None."""
        darks = [c for c in self.calibration if c.matches and c.kind in ("raw_dark_set", "master_dark")]
        if not darks:
            return None
        t = _middle(self.metadata.temperature_min_c, self.metadata.temperature_max_c)

        def key(c: CalibrationCandidate) -> tuple[float, int, str]:
            dt = abs(c.temperature_c - t) if (c.temperature_c is not None and t is not None) else 1e9
            return (dt, 0 if c.kind == "raw_dark_set" else 1, str(c.path))

        return min(darks, key=key)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary of the whole discovery result."""
        best = self.best_dark
        return {
            "session": str(self.path),
            "metadata": self.metadata.to_json(),
            "lights": [f.to_json() for f in self.lights],
            "excluded": [e.to_json() for e in self.excluded],
            "calibration": [c.to_json() for c in self.calibration],
            "best_dark": str(best.path) if best else None,
        }


def list_lights(session: str | os.PathLike, *, include_failed: bool = False) -> list[Path]:
    """Return the light frames of a session folder, in observation order.

    Parameters
    ----------
    session : str or os.PathLike
        A DWARF session folder (``DWARF_RAW_...``) or a plain folder of one-shot-colour FITS lights.
    include_failed : bool, default False
        Also use the ``failed_`` frames the device's live stack rejected (they are complete frames).

    Returns
    -------
    list of pathlib.Path
        Paths of the lights; see :func:`discover` for what was excluded and why.

    Examples
    --------
    >>> list_lights("Astronomy/DWARF_RAW_TELE_M 31_EXP_15_GAIN_60_2025-10-18-04-51-22-420")  # doctest: +SKIP
    [PosixPath('.../M 31_15s60_Astro_20251018-045137420_16C.fits'), ...]
    """
    return [f.path for f in discover(session, include_failed=include_failed).lights]


def discover(session: str | os.PathLike, *, include_failed: bool = False) -> Session:
    """Classify every entry of a session folder and gather the session metadata.

    Parameters
    ----------
    session : str or os.PathLike
        Session folder. Only read, never written.
    include_failed : bool, default False
        Treat ``failed_`` frames as lights (they still pass every light check).

    Returns
    -------
    Session
        Lights in observation order, excluded files with reasons, metadata and calibration candidates.
        A folder without lights is returned with ``lights == []``; deciding that this is fatal is the caller's.

    Raises
    ------
    SessionError
        The path does not exist or is not a folder.
    """
    root = Path(session)
    if not root.exists():
        raise SessionError(f"session folder not found: {root} (check the path; quote it if it contains spaces)")
    if not root.is_dir():
        raise SessionError(f"{root} is a file; pass the session folder that contains the light frames")
    meta = SessionMetadata(folder=root.name)
    folder_info = parse_session_folder_name(root.name)
    meta.shots_info = _read_shots_info(root / SHOTS_INFO, meta.warnings)

    candidates: list[tuple[LightFrame, Path]] = []
    excluded: list[ExcludedFile] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        verdict = _classify(entry, include_failed, folder_info, meta.warnings)
        if isinstance(verdict, ExcludedFile):
            excluded.append(verdict)
        else:
            candidates.append((verdict, entry))

    lights = [light for light, _ in candidates]
    lights, mismatched = _drop_header_mismatches(lights)
    excluded.extend(mismatched)
    lights.sort(key=lambda f: (f.mid_time or datetime.max, f.name))
    _fill_metadata(meta, folder_info, lights)
    if not lights:
        sessions = sorted(p.name for p in root.iterdir() if _looks_like_session(p))
        if sessions:
            meta.warnings.append(
                "this folder holds session folders, not lights; pass one of: " + ", ".join(sessions[:5])
            )
    calibration = find_calibration(root, meta)
    return Session(root, lights, sorted(excluded, key=lambda e: e.path.name), meta, calibration)


def _looks_like_session(path: Path) -> bool:
    """True for a subfolder that is a DWARF session or holds FITS files (used for a helpful hint)."""
    if not path.is_dir():
        return False
    return path.name.startswith("DWARF_RAW_") or any(p.suffix.lower() in FITS_SUFFIXES for p in path.iterdir())


def parse_session_folder_name(name: str) -> dict[str, Any]:
    """Parse ``DWARF_RAW_{TELE|WIDE}[_<target>]_EXP_<exp>_GAIN_<gain>_<YYYY-MM-DD-HH-MM-SS-mmm>``.

    Returns
    -------
    dict
        ``camera``, ``target`` (None when absent; ``MOSAIC_`` prefix removed and ``mosaic`` set), ``exposure_s``,
        ``gain`` and ``start`` (datetime); an empty dict when the name does not follow the pattern.
    """
    m = _FOLDER_RE.match(name)
    if not m:
        return {}
    target = m["target"]
    mosaic = bool(target and target.startswith("MOSAIC_"))
    if mosaic:
        target = target[len("MOSAIC_") :] or None
    return {
        "camera": m["camera"],
        "target": target,
        "mosaic": mosaic,
        "exposure_s": float(m["exp"]),
        "gain": float(m["gain"]),
        "start": datetime.strptime(m["ts"], "%Y-%m-%d-%H-%M-%S-%f"),
    }


def parse_light_name(name: str) -> dict[str, Any]:
    """Parse a DWARF light name ``<target>_<exp>s<gain>_<filter>_<YYYYMMDD-HHMMSSmmm>_<temp>C.fits``.

    Returns
    -------
    dict
        ``target``, ``exposure_s``, ``gain``, ``filter``, ``time`` (datetime, equal to DATE-OBS) and
        ``temperature_c``; an empty dict when the name does not follow the pattern.
    """
    m = _LIGHT_RE.match(name)
    if not m:
        return {}
    return {
        "target": m["target"],
        "exposure_s": float(m["exp"]),
        "gain": float(m["gain"]),
        "filter": m["filter"],
        "time": datetime.strptime(m["ts"], "%Y%m%d-%H%M%S%f"),
        "temperature_c": float(m["temp"]),
    }


def _classify(entry: Path, include_failed: bool, folder_info: dict, warnings: list[str]) -> LightFrame | ExcludedFile:
    """Decide what one folder entry is; return a LightFrame candidate or an ExcludedFile."""
    name = entry.name
    lower = name.lower()
    if entry.is_dir():
        if name in _BY_PRODUCT_DIRS:
            return ExcludedFile(entry, "device_by_product", "device thumbnails folder")
        return ExcludedFile(entry, "not_a_light", "subfolder (only the session folder itself is scanned)")
    if name == SHOTS_INFO:
        return ExcludedFile(entry, "metadata", "session metadata (read)")
    if lower.startswith("stacked-") and lower.endswith(FITS_SUFFIXES):
        return ExcludedFile(entry, "device_stack", "the device's own live stack; never an input")
    if not lower.endswith(FITS_SUFFIXES):
        kind = "device_by_product" if lower.endswith(BY_PRODUCT_SUFFIXES) else "not_fits"
        detail = "device preview or by-product image" if kind == "device_by_product" else "not a FITS file"
        return ExcludedFile(entry, kind, detail)
    failed = lower.startswith("failed_")
    if failed and not include_failed:
        return ExcludedFile(entry, "device_failed", "rejected by the device's live stack (use --include-failed to try it)")
    try:
        layout = read_layout(entry)
    except FitsReadError as exc:
        return ExcludedFile(entry, "unreadable", exc.problem)
    header = layout.header
    light_name = parse_light_name(name[len("failed_") :] if failed else name)
    imagetyp = _header_str(header, "IMAGETYP")
    if imagetyp is not None and "light" not in imagetyp.lower():
        return ExcludedFile(entry, "not_a_light", f"IMAGETYP = '{imagetyp}'")
    if imagetyp is None and not light_name:
        return ExcludedFile(
            entry, "not_a_light", "name does not follow the DWARF light pattern and the header has no IMAGETYP"
        )
    if len(layout.shape) != 2:
        return ExcludedFile(entry, "not_a_light", f"{len(layout.shape)}-D data (a light is a 2-D Bayer mosaic)")
    frame = _light_from_header(entry, header, light_name, warnings)
    target = folder_info.get("target")
    if target and frame.object and _norm(frame.object) != _norm(target):
        return ExcludedFile(entry, "foreign_target", f"OBJECT = '{frame.object}', session target '{target}'")
    return frame


def _light_from_header(path: Path, header: fits.Header, light_name: dict, warnings: list[str]) -> LightFrame:
    """Build a LightFrame from a header, falling back on the file name; record soft problems."""
    where = path.name
    exposure = _header_float(header, "EXPTIME", where, warnings, fallback=_header_float(header, "EXPOSURE", where, warnings))
    if exposure is None:
        exposure = light_name.get("exposure_s")
    date_obs = _header_time(header, where, warnings)
    if date_obs is None:
        date_obs = light_name.get("time")
    marks_end = _date_obs_marks_end(header)
    mid = None
    if date_obs is not None and exposure is not None:
        half = timedelta(seconds=exposure / 2)
        mid = date_obs - half if marks_end else date_obs + half
    temperature = _header_float(header, "DET-TEMP", where, warnings)
    if temperature is None:
        temperature = _header_float(header, "CCD-TEMP", where, warnings)
    if temperature is None:
        temperature = light_name.get("temperature_c")
    bayer = _header_str(header, "BAYERPAT")
    if bayer is not None:
        bayer = bayer.upper()
        if bayer not in BAYER_PATTERNS:
            warnings.append(f"{where}: BAYERPAT = '{bayer}' is not one of {', '.join(BAYER_PATTERNS)}")
    gain = _header_float(header, "GAIN", where, warnings)
    return LightFrame(
        path=path,
        date_obs=date_obs,
        mid_time=mid,
        exposure_s=exposure,
        gain=gain if gain is not None else light_name.get("gain"),
        temperature_c=temperature,
        filter=_header_str(header, "FILTER") or light_name.get("filter"),
        camera=_header_str(header, "CAMERA"),
        bayer_pattern=bayer,
        object=_header_str(header, "OBJECT"),
        width=int(header["NAXIS1"]),
        height=int(header["NAXIS2"]),
        xbinning=int(_header_float(header, "XBINNING", where, warnings) or 1),
        ybinning=int(_header_float(header, "YBINNING", where, warnings) or 1),
        ra_deg=_header_float(header, "RA", where, warnings),
        dec_deg=_header_float(header, "DEC", where, warnings),
    )


def _drop_header_mismatches(lights: list[LightFrame]) -> tuple[list[LightFrame], list[ExcludedFile]]:
    """Exclude frames whose size, binning, Bayer pattern or exposure differ from the session majority.

    The majority of each key is its most common value; ties go to the value of the earliest frame in
    file-name order, so the decision is deterministic.
    """
    if not lights:
        return [], []
    ordered = sorted(lights, key=lambda f: f.name)
    majority = {}
    for key in CONSISTENCY_KEYS:
        counts = Counter(getattr(f, key) for f in ordered)
        top = max(counts.values())
        majority[key] = next(getattr(f, key) for f in ordered if counts[getattr(f, key)] == top)
    kept, dropped = [], []
    for f in lights:
        diffs = [f"{k} {getattr(f, k)!r} vs {majority[k]!r}" for k in CONSISTENCY_KEYS if getattr(f, k) != majority[k]]
        if diffs:
            dropped.append(ExcludedFile(f.path, "header_mismatch", "; ".join(diffs) + " (session majority)"))
        else:
            kept.append(f)
    return kept, dropped


def _fill_metadata(meta: SessionMetadata, folder: dict, lights: list[LightFrame]) -> None:
    """Merge folder name, majority headers and shotsInfo.json into ``meta`` (first source that has a value wins)."""
    shots = meta.shots_info
    first = lights[0] if lights else None

    def header_majority(key: str) -> Any:
        return _majority([getattr(f, key) for f in lights])

    meta.device = _device_name(lights)
    meta.date_obs_marks = "end" if meta.device == "DWARF 3" else "start"
    meta.target = folder.get("target") or header_majority("object") or _shots_str(shots, "target", meta.warnings)
    meta.camera = folder.get("camera") or header_majority("camera")
    meta.filter = header_majority("filter") or _shots_str(shots, "ir", meta.warnings)
    meta.bayer_pattern = first.bayer_pattern if first else None
    meta.exposure_s = first.exposure_s if first else folder.get("exposure_s")
    if meta.exposure_s is None:
        meta.exposure_s = _shots_float(shots, "exp", meta.warnings)
    meta.gain = header_majority("gain")
    if meta.gain is None:
        meta.gain = folder.get("gain") if folder else _shots_float(shots, "gain", meta.warnings)
    if first:
        meta.width, meta.height = first.width, first.height
    temps = [f.temperature_c for f in lights if f.temperature_c is not None]
    if temps:
        meta.temperature_min_c, meta.temperature_max_c = min(temps), max(temps)
    else:
        meta.temperature_min_c = _shots_float(shots, "minTemp", meta.warnings)
        meta.temperature_max_c = _shots_float(shots, "maxTemp", meta.warnings)
    meta.ra_deg, meta.dec_deg = _pointing(lights, shots, meta.warnings)
    times = [f.mid_time for f in lights if f.mid_time is not None]
    if times:
        meta.start, meta.end = min(times), max(times)
    if folder and first and first.exposure_s is not None and abs(first.exposure_s - folder["exposure_s"]) > 1e-6:
        meta.warnings.append(f"folder name says EXP {folder['exposure_s']:g} s, the lights say {first.exposure_s:g} s")
    if not folder and meta.folder.startswith("DWARF_RAW_"):
        meta.warnings.append(f"folder name '{meta.folder}' does not follow the DWARF_RAW_..._EXP_..._GAIN_... pattern")


def _pointing(lights: list[LightFrame], shots: dict, warnings: list[str]) -> tuple[float | None, float | None]:
    """RA/DEC in degrees: majority header value, else shotsInfo.json (RA there is in HOURS)."""
    ra = _majority([f.ra_deg for f in lights])
    dec = _majority([f.dec_deg for f in lights])
    shots_ra_h = _shots_float(shots, "RA", warnings)
    shots_dec = _shots_float(shots, "DEC", warnings)
    if shots_ra_h is not None:
        shots_ra = shots_ra_h * 15.0
        if ra is None:
            ra = shots_ra
        elif abs(((ra - shots_ra + 180.0) % 360.0) - 180.0) > 0.01:
            warnings.append(f"header RA {ra:.5f} deg disagrees with shotsInfo.json RA {shots_ra_h:.6f} h = {shots_ra:.5f} deg")
    if dec is None:
        dec = shots_dec
    return ra, dec


def _device_name(lights: list[LightFrame]) -> str:
    """Guess the device from the light names and headers (DWARF 3 names and TELESCOP, Seestar INSTRUME)."""
    if not lights:
        return "generic"
    header = read_layout(lights[0].path).header
    telescope = (_header_str(header, "TELESCOP") or "").upper()
    instrument = (_header_str(header, "INSTRUME") or "").upper()
    if telescope in _DWARF_TELESCOPES or instrument in _DWARF_TELESCOPES:
        return "DWARF 3"
    if "DWARF" in telescope or "DWARF" in instrument:
        return "DWARF II"
    if "SEESTAR" in telescope or "SEESTAR" in instrument:
        return "Seestar"
    return "generic"


def _date_obs_marks_end(header: fits.Header) -> bool:
    """True when this device writes DATE-OBS at the END of exposure (DWARF 3 only)."""
    telescope = (_header_str(header, "TELESCOP") or "").upper()
    instrument = (_header_str(header, "INSTRUME") or "").upper()
    return telescope in _DWARF_TELESCOPES or instrument in _DWARF_TELESCOPES


def find_calibration(session: Path, meta: SessionMetadata) -> list[CalibrationCandidate]:
    """Find ``DWARF_DARK`` raw dark sets and ``CALI_FRAME`` masters next to a session and match them.

    The folders are looked for in the session's parent folder and in its parent. A dark matches when camera,
    exposure, gain, binning and frame size agree and the temperature is within
    ``DARK_TEMPERATURE_TOLERANCE_C`` of the lights' range; a bias when camera and binning agree; a flat when
    camera, binning and filter agree.

    Parameters
    ----------
    session : pathlib.Path
        The session folder.
    meta : SessionMetadata
        Metadata of the session (camera, exposure, gain, temperatures, size).

    Returns
    -------
    list of CalibrationCandidate
        Every candidate found, matching or not, sorted by kind and path.
    """
    found: list[CalibrationCandidate] = []
    roots = []
    for root in (session.parent, session.parent.parent):
        if root not in roots:
            roots.append(root)
    for root in roots:
        dark_root = root / "DWARF_DARK"
        if dark_root.is_dir():
            for folder in sorted(dark_root.iterdir()):
                m = _DARK_SET_RE.match(folder.name)
                if m and folder.is_dir():
                    found.append(_raw_dark_set(folder, m, meta))
        cali = root / "CALI_FRAME"
        if cali.is_dir():
            found.extend(_device_masters(cali, meta))
    return sorted(found, key=lambda c: (c.kind, str(c.path)))


def _raw_dark_set(folder: Path, m: re.Match, meta: SessionMetadata) -> CalibrationCandidate:
    """Describe and match one ``DWARF_DARK/<camera>_exp_<e>_gain_<g>_bin_<b>_<ts>`` folder."""
    frames = sorted(p for p in folder.iterdir() if _RAW_DARK_RE.match(p.name))
    temps = [float(_RAW_DARK_RE.match(p.name)["temp"]) for p in frames]
    temperature = statistics.median(temps) if temps else None
    size = _frame_size(frames[0]) if frames else None
    return _matched(
        "raw_dark_set", folder, m["camera"].upper(), float(m["exp"]), float(m["gain"]), temperature,
        int(m["bin"]), None, len(frames), size, meta,
    )


def _device_masters(cali: Path, meta: SessionMetadata) -> list[CalibrationCandidate]:
    """Describe and match the masters under ``CALI_FRAME/{dark,bias,flat}/cam_{0,1}/``."""
    out = []
    for kind, pattern in (("dark", _MASTER_DARK_RE), ("bias", _MASTER_BIAS_RE), ("flat", _MASTER_FLAT_RE)):
        for cam_dir in sorted((cali / kind).glob("cam_*")):
            camera = _CAM_FOLDER.get(cam_dir.name)
            for path in sorted(cam_dir.iterdir()):
                m = pattern.match(path.name)
                if not m:
                    continue
                g = m.groupdict()
                out.append(
                    _matched(
                        f"master_{kind}", path, camera,
                        float(g["exp"]) if g.get("exp") else None,
                        float(g["gain"]),
                        float(g["temp"]) if g.get("temp") else None,
                        int(g["bin"]),
                        _FLAT_IR.get(int(g["ir"])) if g.get("ir") else None,
                        int(g["n"]) if g.get("n") else 1,
                        _frame_size(path),
                        meta,
                    )
                )
    return out


def _matched(
    kind: str, path: Path, camera: str | None, exposure: float | None, gain: float | None,
    temperature: float | None, binning: int | None, filt: str | None, n_frames: int,
    size: tuple[int, int] | None, meta: SessionMetadata,
) -> CalibrationCandidate:
    """Compare a calibration candidate's properties with the session and build the candidate."""
    problems = []
    if camera and meta.camera and camera != meta.camera:
        problems.append(f"camera {camera} vs {meta.camera}")
    if size and meta.width and size != (meta.width, meta.height):
        problems.append(f"size {size[0]}x{size[1]} vs {meta.width}x{meta.height}")
    if binning is not None and binning != 1:
        problems.append(f"binning {binning} vs 1")
    if kind in ("raw_dark_set", "master_dark"):
        if exposure is not None and meta.exposure_s is not None and abs(exposure - meta.exposure_s) > 1e-6:
            problems.append(f"exposure {exposure:g} s vs {meta.exposure_s:g} s")
        if gain is not None and meta.gain is not None and gain != meta.gain:
            problems.append(f"gain {gain:g} vs {meta.gain:g}")
        lo, hi = meta.temperature_min_c, meta.temperature_max_c
        if temperature is not None and lo is not None and hi is not None:
            tol = DARK_TEMPERATURE_TOLERANCE_C
            if not (lo - tol <= temperature <= hi + tol):
                problems.append(f"temperature {temperature:g} C vs lights {lo:g}..{hi:g} C (tolerance {tol:g} C)")
        if kind == "raw_dark_set" and n_frames == 0:
            problems.append("no raw_*.fits frames in the folder")
    if kind == "master_flat" and filt and meta.filter and _norm(filt) != _norm(meta.filter):
        problems.append(f"filter {filt} vs {meta.filter}")
    return CalibrationCandidate(
        kind, path, camera, exposure, gain, temperature, binning, filt, n_frames, not problems, tuple(problems)
    )


def _frame_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a FITS image, or None when it cannot be read."""
    try:
        shape = read_layout(path).shape
    except FitsReadError:
        return None
    return (shape[-1], shape[-2]) if len(shape) >= 2 else None


def _read_shots_info(path: Path, warnings: list[str]) -> dict[str, Any]:
    """Read shotsInfo.json leniently: absent -> {}, unreadable -> {} plus a warning."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.append(f"{SHOTS_INFO} cannot be read ({exc}); ignored")
        return {}
    if not isinstance(data, dict):
        warnings.append(f"{SHOTS_INFO} is not a JSON object; ignored")
        return {}
    return data


def _shots_float(shots: dict, key: str, warnings: list[str]) -> float | None:
    """A number from shotsInfo.json, accepting numbers and numeric strings; a warning otherwise."""
    if key not in shots:
        return None
    value = shots[key]
    try:
        return float(value)
    except (TypeError, ValueError):
        warnings.append(f"{SHOTS_INFO}: {key} = {value!r} is not a number; ignored")
        return None


def _shots_str(shots: dict, key: str, warnings: list[str]) -> str | None:
    """A string from shotsInfo.json; non-strings are converted with a warning."""
    if key not in shots or shots[key] in (None, ""):
        return None
    value = shots[key]
    if not isinstance(value, str):
        warnings.append(f"{SHOTS_INFO}: {key} = {value!r} is not a string; used as {str(value)!r}")
    return str(value)


def _header_str(header: fits.Header, key: str) -> str | None:
    """A header string value stripped of padding; None when absent or empty."""
    value = header.get(key)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _header_float(header: fits.Header, key: str, where: str, warnings: list[str] | None, fallback=None) -> float | None:
    """A header number; a non-numeric value is recorded in ``warnings`` (when given) and ignored."""
    if key not in header:
        return fallback
    value = header[key]
    if isinstance(value, bool):
        value = None
    try:
        return float(value)
    except (TypeError, ValueError):
        if warnings is not None:
            warnings.append(f"{where}: {key} = {value!r} is not a number; ignored")
        return fallback


def _header_time(header: fits.Header, where: str, warnings: list[str]) -> datetime | None:
    """DATE-OBS as a naive UTC datetime; a warning when absent or malformed."""
    text = _header_str(header, "DATE-OBS")
    if text is None:
        warnings.append(f"{where}: no DATE-OBS; the file name's time is used when it has one")
        return None
    try:
        return datetime.fromisoformat(text.rstrip("Z"))
    except ValueError:
        warnings.append(f"{where}: DATE-OBS = {text!r} is not an ISO 8601 time; ignored")
        return None


def _majority(values: list) -> Any:
    """Most common non-None value (ties go to the first seen), or None."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    counts = Counter(values)
    top = max(counts.values())
    return next(v for v in values if counts[v] == top)


def _middle(lo: float | None, hi: float | None) -> float | None:
    """Midpoint of a range, or None."""
    return None if lo is None or hi is None else (lo + hi) / 2


def _norm(text: str) -> str:
    """Normalise a target or filter name for comparison (case and spaces ignored)."""
    return re.sub(r"[\s_-]+", "", text).lower()


def _iso(value: datetime | None) -> str | None:
    """ISO 8601 with milliseconds, or None."""
    return value.isoformat(timespec="milliseconds") if value is not None else None
