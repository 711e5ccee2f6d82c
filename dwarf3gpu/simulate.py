"""Synthetic DWARF 3 sessions with ground truth, for the demo and for science-level tests.

:func:`simulate_session` writes a session folder exactly as the device does (names, headers, ``shotsInfo.json``,
``failed_`` frames, device by-products, optionally a ``DWARF_DARK`` set and a ``CALI_FRAME`` dark master) and, next
to it, the ground truth: per-frame transforms and conditions, the star catalogue, a noise-free sky image and the
hot pixels. The model and the truth formats are described in METHODS.md, section "Synthetic sessions".

Everything is deterministic for a seed: the session plan, the sky and the sensor each draw from their own child of
``numpy.random.SeedSequence(seed)``, and every frame's noise from its own spawned child, so a frame's pixels depend
only on the seed and the configuration.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from astropy.io import fits

from .atomic import atomic_path, write_json_atomic, write_text_atomic
from .errors import ConfigError
from .fitsio import write_fits, write_raw_uint16

__all__ = ["SimulationConfig", "SimulatedSession", "simulate_session"]

DARK_FRAMES = 10
"""Raw darks in a ``DWARF_DARK`` set, as the device takes them."""
MASTER_STACK = 8
"""Frames the device averages into a ``CALI_FRAME`` dark master (the ``_stack_8`` in its name)."""
SATURATION_ADU = 65535
"""Digitised values are clipped to the uint16 range."""
FIXED_PATTERN_ADU = 2.0
"""Standard deviation of the per-pixel pedestal pattern (fixed on the sensor, identical in lights and darks)."""
PSF_CUTOFF_ADU = 0.25
"""A star's stamp extends to where its Moffat profile falls below this level (well under the read noise)."""
GALAXY_CUTOFF_ADU = 0.02
"""The galaxy is evaluated inside the circle where both of its components fall below this level."""

_PARITY_CHANNEL = np.array([0, 1, 1, 2], dtype=np.intp)  # (row & 1) * 2 + (col & 1) -> R, G, B for RGGB
_PARITIES = ((0, 0), (0, 1), (1, 0), (1, 1))
_STAMP_RADII = np.array([3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256])
_SERSIC2_B = 3.6708  # b_n of a Sersic n = 2 profile
_CAMERAS = {"TELE": (2.0, 150.0, 0), "WIDE": (2.9, 6.7, 1)}  # pixel size um, focal length mm, CALI_FRAME cam index
_STAR_RESPONSE = (0.62, 1.0, 0.78)  # raw R, G, B response to a B-V = 0.65 star, relative to G (no white balance)
_DISK_COLOUR = (0.55, 1.0, 0.85)
_BULGE_COLOUR = (0.78, 1.0, 0.62)
_TRAIL_COLOUR = (0.65, 1.0, 0.8)
_DEVICE_CARDS = (
    ("DATE-OBS", "Time end of exposure"),
    ("EXPTIME", "[s] Exposure Time"),
    ("GAIN", "Gain"),
    ("RESTACK", "is Mega Stack"),
    ("XBINNING", "binning factor used on X axis"),
    ("YBINNING", "binning factor used on Y axis"),
    ("FILTER", "selected filter"),
    ("CAMERA", "shooting camera"),
    ("XPIXSZ", "[um] pixel size in microns (with binning)"),
    ("YPIXSZ", "[um] pixel size in microns (with binning)"),
    ("FOCALLEN", "[mm] Focal length of telescope in mm"),
    ("DET-TEMP", "Detector temperature in C"),
    ("RA", "[deg] Observe object RA coordinate (J2000)"),
    ("DEC", "[deg] Observe object DEC coordinate (J2000)"),
    ("OBJECT", "Observe object"),
    ("BAYERPAT", "Bayer pattern"),
    ("TELESCOP", "DWARF III telescope"),
    ("INSTRUME", "DWARF III instrument"),
    ("ORIGIN", "DWARF III's creator"),
)
_CROP_CARDS = ("CRTL1", "CRTR1", "CRBR1", "CRBL1", "CRTL2", "CRTR2", "CRBR2", "CRBL2")


def _require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def _parse_start(text: str) -> datetime:
    """Parse the session start as a naive UTC datetime rounded to whole milliseconds."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Every field has a realistic DWARF 3 default; values are checked on creation.

    Attributes
    ----------
    n_frames : int
        Light frames (the ``failed_`` frames come on top).
    width, height : int
        Frame size in pixels (even; DWARF 3 tele: 3856 x 2180).
    mode : str
        ``"altaz"``: field rotation about a point near the frame centre; ``"eq"``: linear drift, no rotation.
    rotation_rate_deg_per_hour : float
        Alt-az field rotation rate (sign = direction).
    exposure_s, gain, filter, target, camera : float, int, str, str, str
        Acquisition settings, written into names and headers as the device does. ``camera`` is TELE or WIDE.
    start : str
        Session start (UTC, ISO 8601), the time in the session folder's name.
    n_failed : int
        Extra complete frames written with the ``failed_`` prefix, interleaved in time.
    n_cloudy, n_trailed, n_bad_seeing : int
        Lights (never the first) hit by clouds, a satellite trail or bad seeing; the three sets are disjoint.
    with_darks : bool
        Also write a ``DWARF_DARK`` set of 10 raw darks and a ``CALI_FRAME`` dark master.
    clutter : bool
        Also write the device by-products (``stacked-16_`` cube and png, jpgs, pngs, tif, ``Thumbnail/``, a
        hash-named FITS).
    seed : int
        Seed of every random draw.
    ra_deg, dec_deg : float
        Pointing written into the headers (degrees) and ``shotsInfo.json`` (RA in hours).
    temperature_c : float
        Detector temperature at the start; it drifts slowly (about -2 C per hour plus a small wave).
    stars_per_megapixel : float
        Star density over the sky area that the session covers.
    star_flux_range : tuple of float
        Smallest and largest total G flux of a star (ADU per exposure at transparency 1).
    star_flux_alpha : float
        Power-law index of the flux distribution, dN/dF ~ F**-alpha (2.5 for a uniform star distribution).
    galaxy : bool
        Add a tilted disk + bulge galaxy near the frame centre.
    galaxy_peak_adu : float
        Central surface brightness of the galaxy disk in G (ADU per pixel per exposure); the bulge adds 2x that.
    galaxy_scale : float
        Disk scale length as a fraction of the smaller frame side.
    sky_adu : tuple of float
        Clear-sky background per channel R, G, B (ADU per pixel per exposure).
    gradient_adu : float
        Change of the G sky level across the frame width (fixed on the sky; R and B scale with ``sky_adu``).
    fwhm_px : float
        Typical seeing FWHM (pixels); frames vary by ~6 %, bad-seeing frames have 1.8-2.3x this value.
    moffat_beta : float
        Typical Moffat beta; frames vary by up to 7 %.
    jitter_px : float
        Tracking jitter, standard deviation per axis (pixels).
    drift_px_per_hour : float
        EQ mode: drift speed of the field on the sensor.
    pedestal_adu : float
        Dark pedestal (bias level) added to every pixel, lights and darks.
    read_noise_adu : float
        Read noise (ADU).
    e_per_adu : float
        Electrons per ADU (sets the shot noise).
    hot_pixels_per_megapixel : float
        Density of hot pixels, fixed on the sensor, 1500-20000 ADU per exposure.
    """

    n_frames: int = 24
    width: int = 3856
    height: int = 2180
    mode: str = "altaz"
    rotation_rate_deg_per_hour: float = 15.0
    exposure_s: float = 15.0
    gain: int = 60
    filter: str = "Astro"
    target: str = "M 31"
    camera: str = "TELE"
    start: str = "2025-10-18T04:51:22.420"
    n_failed: int = 2
    n_cloudy: int = 2
    n_trailed: int = 2
    n_bad_seeing: int = 1
    with_darks: bool = False
    clutter: bool = True
    seed: int = 0
    ra_deg: float = 10.684708
    dec_deg: float = 41.26875
    temperature_c: float = 17.0
    stars_per_megapixel: float = 600.0
    star_flux_range: tuple[float, float] = (1200.0, 2.0e6)
    star_flux_alpha: float = 2.5
    galaxy: bool = True
    galaxy_peak_adu: float = 300.0
    galaxy_scale: float = 0.1
    sky_adu: tuple[float, float, float] = (400.0, 520.0, 380.0)
    gradient_adu: float = 60.0
    fwhm_px: float = 2.8
    moffat_beta: float = 3.0
    jitter_px: float = 0.6
    drift_px_per_hour: float = 90.0
    pedestal_adu: float = 256.0
    read_noise_adu: float = 10.0
    e_per_adu: float = 0.18
    hot_pixels_per_megapixel: float = 60.0

    def __post_init__(self) -> None:
        _check_integers(self)
        _check_session(self)
        _check_sky(self)
        _check_sensor(self)


def _check_integers(config: SimulationConfig) -> None:
    """Counts, sizes, gain and seed: non-negative integers, frames at least one, sizes even and >= 64."""
    for name in ("n_frames", "width", "height", "gain", "n_failed", "n_cloudy", "n_trailed", "n_bad_seeing", "seed"):
        value = getattr(config, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"{name} must be a non-negative integer, got {value!r}")
    _require(config.n_frames >= 1, f"n_frames must be at least 1, got {config.n_frames}")
    for name in ("width", "height"):
        value = getattr(config, name)
        _require(value >= 64 and value % 2 == 0, f"{name} must be an even number >= 64, got {value}")
    n_bad = config.n_cloudy + config.n_trailed + config.n_bad_seeing
    _require(n_bad <= config.n_frames - 1,
             f"n_cloudy + n_trailed + n_bad_seeing = {n_bad} needs at least {n_bad + 1} frames "
             f"(the first light stays clean); raise n_frames or lower the bad-frame counts")


def _check_session(config: SimulationConfig) -> None:
    """Mode, camera, names, start time, pointing and exposure."""
    _require(config.mode in ("altaz", "eq"), f"mode must be 'altaz' or 'eq', got {config.mode!r}")
    _require(config.camera in _CAMERAS, f"camera must be 'TELE' or 'WIDE', got {config.camera!r}")
    for name in ("target", "filter"):
        value = getattr(config, name)
        _require(isinstance(value, str) and value and value.strip() == value and not set(value) & set("/\\_"),
                 f"{name} must be a non-empty name without '/', '\\', '_' or surrounding spaces, got {value!r}")
    try:
        _parse_start(config.start)
    except (TypeError, ValueError):
        raise ConfigError(f"start must be an ISO time such as 2025-10-18T04:51:22.420, got {config.start!r}") from None
    _require(0.0 <= config.ra_deg < 360.0 and -90.0 <= config.dec_deg <= 90.0,
             f"ra_deg must be in [0, 360) and dec_deg in [-90, 90], got {config.ra_deg}, {config.dec_deg}")
    _require(config.exposure_s > 0, f"exposure_s must be positive, got {config.exposure_s}")
    _require(abs(config.rotation_rate_deg_per_hour) <= 3600.0, "rotation_rate_deg_per_hour must be within +-3600")


def _check_sky(config: SimulationConfig) -> None:
    """Star field, galaxy, sky and seeing; stores the tuples as tuples of floats (lists are accepted)."""
    flux_range, sky = tuple(map(float, config.star_flux_range)), tuple(map(float, config.sky_adu))
    _require(len(flux_range) == 2 and 0 < flux_range[0] < flux_range[1],
             f"star_flux_range must be (low, high) with 0 < low < high, got {config.star_flux_range}")
    _require(len(sky) == 3 and min(sky) > 0, f"sky_adu must be 3 positive levels R, G, B, got {config.sky_adu}")
    object.__setattr__(config, "star_flux_range", flux_range)
    object.__setattr__(config, "sky_adu", sky)
    _require(config.star_flux_alpha > 1.0, f"star_flux_alpha must be > 1, got {config.star_flux_alpha}")
    _require(config.fwhm_px >= 1.0, f"fwhm_px must be at least 1 pixel, got {config.fwhm_px}")
    _require(config.moffat_beta >= 1.5, f"moffat_beta must be at least 1.5, got {config.moffat_beta}")
    _require(config.galaxy_scale > 0, f"galaxy_scale must be positive, got {config.galaxy_scale}")
    for name in ("stars_per_megapixel", "galaxy_peak_adu", "gradient_adu", "jitter_px", "drift_px_per_hour"):
        _require(getattr(config, name) >= 0, f"{name} must not be negative, got {getattr(config, name)}")


def _check_sensor(config: SimulationConfig) -> None:
    """Pedestal, noise and hot pixels."""
    _require(config.e_per_adu > 0, f"e_per_adu must be positive, got {config.e_per_adu}")
    for name in ("pedestal_adu", "read_noise_adu", "hot_pixels_per_megapixel"):
        _require(getattr(config, name) >= 0, f"{name} must not be negative, got {getattr(config, name)}")


@dataclass(frozen=True)
class SimulatedSession:
    """Where :func:`simulate_session` wrote a session.

    Attributes
    ----------
    session_dir : pathlib.Path
        ``OUT/rawData/DWARF_RAW_...`` (plays the card's ``Astronomy/`` folder).
    truth_dir : pathlib.Path
        ``OUT/truth/<session folder name>``: ``truth.json``, ``stars.csv``, ``clean_sky.fits``.
    lights : list of pathlib.Path
        Light frames in observation order; ``lights[0]`` is the reference of the truth transforms.
    failed : list of pathlib.Path
        ``failed_`` frames in observation order.
    dark_dir : pathlib.Path or None
        The ``DWARF_DARK/...`` set when ``with_darks``.
    config : SimulationConfig
        The configuration used.
    """

    session_dir: Path
    truth_dir: Path
    lights: list[Path]
    failed: list[Path]
    dark_dir: Path | None
    config: SimulationConfig


@dataclass(frozen=True, eq=False)
class _Shot:
    """One exposure of the session: when, how it is placed on the sky, and under what conditions."""

    kind: str
    index: int
    end_ms: int
    temperature_c: int
    transform: np.ndarray  # 2x3, frame pixel -> reference pixel
    rotation_deg: float
    fwhm: float
    beta: float
    transparency: float
    sky: np.ndarray  # (3,) uniform sky per channel
    cloudy: bool
    bad_seeing: bool
    trail: tuple[tuple[float, float], tuple[float, float]] | None
    trail_peak: float
    seed: np.random.SeedSequence


@dataclass(frozen=True)
class _Galaxy:
    """A tilted exponential disk plus a softened Sersic n = 2 bulge, in reference-frame pixels."""

    xc: float
    yc: float
    pa_deg: float
    axis_ratio: float
    disk_peak: float
    disk_scale: float
    bulge_peak: float
    bulge_re: float
    core: float
    radius: float


@dataclass(frozen=True, eq=False)
class _Scene:
    """Everything fixed on the sky or on the sensor."""

    star_xy: np.ndarray  # (n, 2) reference pixels
    star_flux: np.ndarray  # (n, 3) ADU per exposure at transparency 1
    galaxy: _Galaxy | None
    gradient: tuple[float, float]  # G ADU per pixel along x, y (reference frame)
    pedestal: np.ndarray  # (H, W) float32
    hot_xy: np.ndarray  # (k, 2) int sensor pixels
    hot_adu: np.ndarray  # (k,) ADU per exposure
    rotation_center: tuple[float, float] | None
    drift: tuple[float, float] | None  # px per hour (EQ)
    sky: np.ndarray  # (3,) nominal clear sky


def simulate_session(
    out_dir: str | Path,
    config: SimulationConfig = SimulationConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> SimulatedSession:
    """Write a synthetic DWARF 3 session and its ground truth.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Output root. The session goes to ``out_dir/rawData/DWARF_RAW_...``, darks (``with_darks``) to
        ``out_dir/rawData/DWARF_DARK`` and ``out_dir/rawData/CALI_FRAME``, the truth to ``out_dir/truth/<session>``.
    config : SimulationConfig, optional
        What to simulate.
    progress : callable, optional
        Called as ``progress(done, total)`` after each raw frame is written.

    Returns
    -------
    SimulatedSession
        Paths of what was written.

    Raises
    ------
    ConfigError
        If the session or truth folder already exists.

    Examples
    --------
    >>> sim = simulate_session("demo", SimulationConfig(n_frames=8, width=384, height=256))  # doctest: +SKIP
    >>> sim.lights[0].name  # doctest: +SKIP
    'M 31_15s60_Astro_20251018-045142845_17C.fits'
    """
    out = Path(out_dir)
    start = _parse_start(config.start)
    exp = _format_exposure(config.exposure_s)
    session_name = (f"DWARF_RAW_{config.camera}_{config.target}_EXP_{exp}_GAIN_{config.gain}_"
                    f"{_folder_time(start)}")
    session_dir = out / "rawData" / session_name
    truth_dir = out / "truth" / session_name
    for folder in (session_dir, truth_dir):
        if folder.exists():
            raise ConfigError(f"{folder} already exists; simulate into an empty output folder or remove it first")

    root = np.random.SeedSequence(config.seed)
    plan_seq, sky_seq, sensor_seq, frame_seq, dark_seq = root.spawn(5)
    n_shots = config.n_frames + config.n_failed
    rotation_center, drift, shots = _plan_shots(config, np.random.default_rng(plan_seq), frame_seq.spawn(n_shots))
    scene = _make_scene(config, shots, rotation_center, drift, np.random.default_rng(sky_seq),
                        np.random.default_rng(sensor_seq))

    total = n_shots + (DARK_FRAMES + 1 if config.with_darks else 0)
    report = progress or (lambda done, total: None)
    names = [_light_name(config, start, shot) for shot in shots]
    reference_raw = None
    for done, (shot, name) in enumerate(zip(shots, names), start=1):
        raw = _digitise(_render_frame(config, scene, shot), scene, config, np.random.default_rng(shot.seed))
        write_raw_uint16(raw, session_dir / name, _frame_header(config, start, shot))
        if config.clutter and shot.kind == "light":
            _write_image(session_dir / "Thumbnail" / (Path(name).stem + ".jpg"), _preview_gray(raw, 8))
            reference_raw = raw if shot.index == 0 else reference_raw
        report(done, total)

    lights = [session_dir / n for s, n in zip(shots, names) if s.kind == "light"]
    failed = [session_dir / n for s, n in zip(shots, names) if s.kind == "failed"]
    dark_info = None
    if config.with_darks:
        dark_info = _write_darks(out / "rawData", config, scene, shots, start, dark_seq,
                                 lambda i: report(n_shots + i, total))

    light_shots = [s for s in shots if s.kind == "light"]
    fwhm_med = float(np.median([s.fwhm for s in light_shots]))
    beta_med = float(np.median([s.beta for s in light_shots]))
    clean = _clean_sky(config, scene, fwhm_med, beta_med)
    _write_shots_info(session_dir / "shotsInfo.json", config, shots)
    if config.clutter:
        _write_clutter(session_dir, config, start, shots, names, clean, reference_raw)

    write_fits(clean, truth_dir / "clean_sky.fits", _truth_header("noise-free sky per channel, reference frame"))
    _write_stars_csv(truth_dir / "stars.csv", scene)
    truth = _truth_document(config, start, session_name, scene, shots, names, fwhm_med, beta_med, dark_info)
    write_json_atomic(truth_dir / "truth.json", truth)
    dark_dir = out / "rawData" / "DWARF_DARK" / dark_info["folder"] if dark_info else None
    return SimulatedSession(session_dir, truth_dir, lights, failed, dark_dir, config)


# ----------------------------------------------------------------------------------------------------- planning


def _plan_shots(config: SimulationConfig, rng: np.random.Generator, seeds: list[np.random.SeedSequence]):
    """Draw the timeline, geometry and conditions of every exposure.

    Returns
    -------
    rotation_center : tuple of float or None
        Alt-az rotation centre (sensor pixels).
    drift : tuple of float or None
        EQ drift (pixels per hour).
    shots : list of _Shot
        In observation order; the first is light 0, the reference (identity transform).
    """
    n = len(seeds)
    w, h = config.width, config.height
    failed = np.zeros(n, dtype=bool)
    failed[rng.choice(np.arange(1, n), config.n_failed, replace=False)] = True
    index = np.where(failed, np.cumsum(failed), np.cumsum(~failed)) - 1  # index among the shots of its kind
    ends, mid_h = _timeline(config, rng, n)
    flags = _bad_frame_flags(config, rng)

    center = np.array([(w - 1) / 2, (h - 1) / 2]) + rng.uniform(-0.05, 0.05, 2) * (w, h)
    drift_dir = rng.uniform(0, 2 * np.pi)
    drift = config.drift_px_per_hour * np.array([np.cos(drift_dir), np.sin(drift_dir)])
    jitter = rng.normal(0.0, config.jitter_px, (n, 2))
    slip = rng.normal(0.0, 5.0, (n, 2))  # failed frames: the tracking slip that made the device reject them
    seeing = config.fwhm_px * np.exp(rng.normal(0.0, 0.06, n))
    bad_seeing_fwhm = config.fwhm_px * rng.uniform(1.8, 2.3, n)
    beta = config.moffat_beta * rng.uniform(0.93, 1.07, n)
    clear_t, cloud_t = rng.uniform(0.95, 1.0, n), rng.uniform(0.3, 0.55, n)
    sky_factor, cloud_sky = rng.uniform(0.97, 1.03, n), rng.uniform(1.4, 2.0, n)
    trail_edges = np.array([rng.choice(4, 2, replace=False) for _ in range(n)])
    trail_pos = rng.uniform(0.1, 0.9, (n, 2))
    trail_peak = rng.uniform(1500.0, 4000.0, n)
    temp_phase = rng.uniform(0, 2 * np.pi)
    temps = np.rint(config.temperature_c - 2.0 * ends / 3.6e6
                    + 0.7 * np.sin(2 * np.pi * ends / 1.2e6 + temp_phase)).astype(int)

    shots = []
    for k in range(n):
        cloudy, trailed, bad_seeing = (False, False, False) if failed[k] else flags[index[k]]
        shift = np.zeros(2) if k == 0 else jitter[k] + (slip[k] if failed[k] else 0.0)
        theta = config.rotation_rate_deg_per_hour * mid_h[k] if config.mode == "altaz" else 0.0
        if config.mode == "eq":
            shift = shift + drift * mid_h[k]
        shots.append(_Shot(
            kind="failed" if failed[k] else "light", index=int(index[k]), end_ms=int(ends[k]),
            temperature_c=int(temps[k]), transform=_rigid(theta, center, shift), rotation_deg=float(theta),
            fwhm=float(bad_seeing_fwhm[k] if bad_seeing else seeing[k]), beta=float(beta[k]),
            transparency=float(cloud_t[k] if cloudy else clear_t[k]),
            sky=np.asarray(config.sky_adu) * sky_factor[k] * (cloud_sky[k] if cloudy else 1.0),
            cloudy=bool(cloudy), bad_seeing=bool(bad_seeing),
            trail=_trail_endpoints(trail_edges[k], trail_pos[k], w, h) if trailed else None,
            trail_peak=float(trail_peak[k]), seed=seeds[k],
        ))
    if config.mode == "altaz":
        return (float(center[0]), float(center[1])), None, shots
    return None, (float(drift[0]), float(drift[1])), shots


def _timeline(config: SimulationConfig, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """End of each exposure (ms after the session start) and mid-exposure (hours after the first one's).

    The first exposure starts 2-6 s after the session folder is created; each next one 1-2 s after the end
    of the previous (read-out and storage).
    """
    exp_ms = max(1, round(config.exposure_s * 1000))
    overhead = rng.integers(1000, 2001, n)
    starts = int(rng.integers(2000, 6001)) + np.concatenate([[0], np.cumsum(exp_ms + overhead[:-1])])
    ends = starts + exp_ms
    return ends, (ends - ends[0]) / 3.6e6


def _bad_frame_flags(config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_frames, 3) booleans cloudy, trailed, bad seeing: disjoint sets of lights, never the first."""
    counts = np.cumsum([0, config.n_cloudy, config.n_trailed, config.n_bad_seeing])
    chosen = rng.permutation(np.arange(1, config.n_frames))[: counts[-1]]
    flags = np.zeros((config.n_frames, 3), dtype=bool)
    for column in range(3):
        flags[chosen[counts[column]: counts[column + 1]], column] = True
    return flags


def _rigid(theta_deg: float, center: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """2x3 frame -> reference transform: rotation by ``theta_deg`` about ``center``, then ``shift``."""
    t = np.deg2rad(theta_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return np.hstack([rot, (center - rot @ center + shift)[:, None]])


def _invert(transform: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine transform."""
    full = np.vstack([transform, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def _apply(transform: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map (n, 2) points through a 2x3 affine transform."""
    return xy @ transform[:, :2].T + transform[:, 2]


def _trail_endpoints(edges: np.ndarray, pos: np.ndarray, w: int, h: int):
    """Two points on two different frame edges (frame pixels): a trail crossing the whole frame."""
    def point(edge: int, u: float) -> tuple[float, float]:
        x, y = -0.5 + u * w, -0.5 + u * h
        return [(x, -0.5), (w - 0.5, y), (x, h - 0.5), (-0.5, y)][edge]

    return point(int(edges[0]), float(pos[0])), point(int(edges[1]), float(pos[1]))


# -------------------------------------------------------------------------------------------------------- scene


def _make_scene(config, shots, rotation_center, drift, sky_rng, sensor_rng) -> _Scene:
    """Draw the star catalogue, the galaxy, the gradient direction and the sensor defects."""
    w, h = config.width, config.height
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
    covered = np.vstack([_apply(s.transform, corners) for s in shots])
    lo, hi = covered.min(axis=0) - 32, covered.max(axis=0) + 32
    n_stars = int(round(config.stars_per_megapixel * np.prod(hi - lo) / 1e6))
    star_xy = sky_rng.uniform(lo, hi, (n_stars, 2))
    f_lo, f_hi = config.star_flux_range
    a = 1.0 - config.star_flux_alpha
    flux_g = (f_lo**a + sky_rng.uniform(0, 1, n_stars) * (f_hi**a - f_lo**a)) ** (1.0 / a)
    b_v = np.clip(sky_rng.normal(0.65, 0.35, n_stars), -0.3, 1.8) - 0.65
    ratio = np.stack([10 ** (0.24 * b_v), np.ones(n_stars), 10 ** (-0.36 * b_v)], axis=1)
    star_flux = flux_g[:, None] * ratio * np.asarray(_STAR_RESPONSE)

    galaxy = _make_galaxy(config, sky_rng)
    angle = sky_rng.uniform(0, 2 * np.pi)
    gradient = (config.gradient_adu / w * np.cos(angle), config.gradient_adu / w * np.sin(angle))

    pedestal = sensor_rng.standard_normal((h, w), dtype=np.float32)
    pedestal *= np.float32(FIXED_PATTERN_ADU)
    pedestal += np.float32(config.pedestal_adu)
    n_hot = int(round(config.hot_pixels_per_megapixel * w * h / 1e6))
    flat = np.sort(sensor_rng.choice(w * h, n_hot, replace=False))
    hot_xy = np.stack([flat % w, flat // w], axis=1)
    hot_adu = np.exp(sensor_rng.uniform(np.log(1500.0), np.log(20000.0), n_hot))
    return _Scene(star_xy, star_flux, galaxy, gradient, pedestal, hot_xy, hot_adu, rotation_center, drift,
                  np.asarray(config.sky_adu, dtype=float))


def _make_galaxy(config: SimulationConfig, rng: np.random.Generator) -> _Galaxy | None:
    """Draw a galaxy near the frame centre (drawn even when disabled, so later draws do not depend on it)."""
    w, h = config.width, config.height
    offset = rng.uniform(-0.12, 0.12, 2) * (w, h)
    pa, q = rng.uniform(0, 180), rng.uniform(0.3, 0.5)
    if not config.galaxy or config.galaxy_peak_adu == 0:
        return None
    scale = config.galaxy_scale * min(w, h)
    disk_peak, bulge_peak, bulge_re = config.galaxy_peak_adu, 2.0 * config.galaxy_peak_adu, 0.3 * scale
    radius = max(scale * math.log(disk_peak / GALAXY_CUTOFF_ADU),
                 bulge_re * (math.log(bulge_peak / GALAXY_CUTOFF_ADU) / _SERSIC2_B) ** 2)
    return _Galaxy((w - 1) / 2 + offset[0], (h - 1) / 2 + offset[1], pa, q, disk_peak, scale, bulge_peak, bulge_re,
                   core=max(1.0, 0.05 * bulge_re), radius=radius)


# ---------------------------------------------------------------------------------------------------- rendering


def _render_frame(config: SimulationConfig, scene: _Scene, shot: _Shot) -> np.ndarray:
    """Noise-free signal of one exposure on the RGGB mosaic (ADU, float32, without pedestal)."""
    h, w = config.height, config.width
    signal = np.empty((h, w), dtype=np.float32)
    for dy, dx in _PARITIES:
        c = _PARITY_CHANNEL[dy * 2 + dx]
        xs, ys = np.arange(dx, w, 2), np.arange(dy, h, 2)
        plane = _gradient_plane(scene, config, shot.transform, c, xs, ys)
        plane += np.float32(shot.sky[c])
        signal[dy::2, dx::2] = plane
    if scene.galaxy is not None:
        _add_galaxy_mosaic(signal, scene.galaxy, shot.transform, shot.transparency)
    star_xy = _apply(_invert(shot.transform), scene.star_xy)
    signal += _render_stars(star_xy, scene.star_flux[:, _PARITY_CHANNEL] * shot.transparency, shot.fwhm,
                            shot.beta, (h, w))
    if shot.trail is not None:
        _add_trail(signal, shot)
    signal[scene.hot_xy[:, 1], scene.hot_xy[:, 0]] += scene.hot_adu.astype(np.float32)
    return signal


def _linear_plane(cx: float, cy: float, c0: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """float32 plane ``cx * x + cy * y + c0`` over the grid of columns ``xs`` and rows ``ys``."""
    return (np.float32(cx) * xs.astype(np.float32))[None, :] + (cy * ys + c0).astype(np.float32)[:, None]


def _pullback(transform: np.ndarray, a: float, b: float, c: float) -> tuple[float, float, float]:
    """Coefficients in frame pixels of the linear function ``a * x_ref + b * y_ref + c``."""
    m = transform
    return (a * m[0, 0] + b * m[1, 0], a * m[0, 1] + b * m[1, 1], a * m[0, 2] + b * m[1, 2] + c)


def _gradient_plane(scene, config, transform, channel, xs, ys) -> np.ndarray:
    """Sky gradient of one channel (zero at the reference frame's centre), sampled at frame pixels."""
    gx, gy = scene.gradient
    scale = scene.sky[channel] / scene.sky[1]
    xm, ym = (config.width - 1) / 2, (config.height - 1) / 2
    return _linear_plane(*_pullback(transform, scale * gx, scale * gy, -scale * (gx * xm + gy * ym)), xs, ys)


def _galaxy_planes(gal: _Galaxy, transform, xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """Disk and bulge surface brightness (G, ADU per pixel) at frame pixels given by columns ``xs``, rows ``ys``."""
    cos, sin = math.cos(math.radians(gal.pa_deg)), math.sin(math.radians(gal.pa_deg))
    q = gal.axis_ratio
    u = _linear_plane(*_pullback(transform, cos, sin, -(cos * gal.xc + sin * gal.yc)), xs, ys)
    v = _linear_plane(*_pullback(transform, -sin / q, cos / q, (sin * gal.xc - cos * gal.yc) / q), xs, ys)
    r2 = u * u
    r2 += v * v
    disk = np.sqrt(r2)
    disk *= np.float32(-1.0 / gal.disk_scale)
    np.exp(disk, out=disk)
    disk *= np.float32(gal.disk_peak)
    r2 += np.float32(gal.core**2)
    bulge = np.sqrt(r2, out=r2)
    bulge *= np.float32(1.0 / gal.bulge_re)
    np.sqrt(bulge, out=bulge)
    bulge *= np.float32(-_SERSIC2_B)
    np.exp(bulge, out=bulge)
    bulge *= np.float32(gal.bulge_peak)
    return disk, bulge


def _add_galaxy_mosaic(signal: np.ndarray, gal: _Galaxy, transform: np.ndarray, transparency: float) -> None:
    """Add the galaxy to a mosaic inside the bounding box of its cut-off circle, channel by Bayer parity."""
    h, w = signal.shape
    cx, cy = _apply(_invert(transform), np.array([[gal.xc, gal.yc]]))[0]
    x0, x1 = max(0, int(cx - gal.radius)), min(w, int(cx + gal.radius) + 2)
    y0, y1 = max(0, int(cy - gal.radius)), min(h, int(cy + gal.radius) + 2)
    for dy, dx in _PARITIES:
        c = _PARITY_CHANNEL[dy * 2 + dx]
        xs, ys = np.arange(x0 + (dx - x0) % 2, x1, 2), np.arange(y0 + (dy - y0) % 2, y1, 2)
        if xs.size == 0 or ys.size == 0:
            continue
        disk, bulge = _galaxy_planes(gal, transform, xs, ys)
        disk *= np.float32(_DISK_COLOUR[c] * transparency)
        bulge *= np.float32(_BULGE_COLOUR[c] * transparency)
        disk += bulge
        signal[ys[0]:y1:2, xs[0]:x1:2] += disk


def _moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha for a given FWHM and beta."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _render_stars(xy: np.ndarray, parity_flux: np.ndarray, fwhm: float, beta: float,
                  shape: tuple[int, int]) -> np.ndarray:
    """Render Moffat stars, each pixel taking the flux of the channel given by its Bayer parity.

    The PSF is normalised to unit integral over the plane and sampled at pixel centres. Each star's stamp is
    the smallest of ``_STAMP_RADII`` that reaches the :data:`PSF_CUTOFF_ADU` level; stars are processed in
    groups of equal stamp size and accumulated with one ``np.bincount``, so there is no per-star Python loop.

    Parameters
    ----------
    xy : numpy.ndarray
        (n, 2) star positions in the image's pixels.
    parity_flux : numpy.ndarray
        (n, 4) flux (ADU) given to pixels of parity ``(row & 1) * 2 + (col & 1)``: ``flux[:, [0, 1, 1, 2]]``
        for an RGGB mosaic, ``flux[:, [c, c, c, c]]`` for a full-resolution plane of channel ``c``.
    fwhm, beta : float
        Moffat FWHM (pixels) and beta.
    shape : tuple of int
        (H, W) of the image.

    Returns
    -------
    numpy.ndarray
        float32 (H, W) image of the stars.
    """
    h, w = shape
    alpha = _moffat_alpha(fwhm, beta)
    norm = (beta - 1.0) / (math.pi * alpha**2)
    reach = alpha * np.sqrt(np.maximum((parity_flux.max(axis=1) * norm / PSF_CUTOFF_ADU) ** (1.0 / beta) - 1, 0))
    radius = _STAMP_RADII[np.minimum(np.searchsorted(_STAMP_RADII, reach), len(_STAMP_RADII) - 1)]
    visible = ((xy[:, 0] > -radius) & (xy[:, 0] < w - 1 + radius)
               & (xy[:, 1] > -radius) & (xy[:, 1] < h - 1 + radius))
    flats, weights = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
    for r in np.unique(radius[visible]):
        idx = np.flatnonzero(visible & (radius == r))
        offsets = np.arange(-r, r + 1)
        ix = np.rint(xy[idx, 0]).astype(np.int64)[:, None] + offsets  # (n, k) columns of each stamp
        iy = np.rint(xy[idx, 1]).astype(np.int64)[:, None] + offsets  # (n, k) rows
        qx = (((ix - xy[idx, 0:1]) / alpha) ** 2).astype(np.float32)
        qy = (((iy - xy[idx, 1:2]) / alpha) ** 2 + 1.0).astype(np.float32)
        psf = np.power(qy[:, :, None] + qx[:, None, :], np.float32(-beta))  # (n, k, k)
        psf *= ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :]
        parity = ((iy & 1) * 2)[:, :, None] + (ix & 1)[:, None, :]
        psf *= np.take_along_axis(parity_flux[idx].astype(np.float32), parity.reshape(len(idx), -1), axis=1
                                  ).reshape(psf.shape)
        flats.append(((np.clip(iy, 0, h - 1) * w)[:, :, None] + np.clip(ix, 0, w - 1)[:, None, :]).ravel())
        weights.append(psf.ravel())
    image = np.bincount(np.concatenate(flats), np.concatenate(weights), minlength=h * w)
    image *= norm
    return image.reshape(h, w).astype(np.float32)


def _add_trail(signal: np.ndarray, shot: _Shot) -> None:
    """Add a satellite trail: a straight line with a Gaussian cross-section as wide as the frame's PSF."""
    (x0, y0), (x1, y1) = shot.trail
    length = math.hypot(x1 - x0, y1 - y0)
    nx, ny = -(y1 - y0) / length, (x1 - x0) / length
    sigma = shot.fwhm / 2.3548
    h, w = signal.shape
    for dy, dx in _PARITIES:
        c = _PARITY_CHANNEL[dy * 2 + dx]
        dist = _linear_plane(nx, ny, -(nx * x0 + ny * y0), np.arange(dx, w, 2), np.arange(dy, h, 2))
        dist *= dist
        dist *= np.float32(-0.5 / sigma**2)
        np.exp(dist, out=dist)
        dist *= np.float32(shot.trail_peak * _TRAIL_COLOUR[c])
        signal[dy::2, dx::2] += dist


def _digitise(signal: np.ndarray, scene: _Scene, config: SimulationConfig, rng: np.random.Generator,
              averaged: int = 1) -> np.ndarray:
    """Add shot and read noise, the pedestal, round and clip to uint16 (``signal`` is overwritten).

    Shot noise uses the Gaussian limit of the Poisson law (variance ``signal / e_per_adu`` in ADU^2), exact
    enough for the hundreds of electrons of the sky; ``averaged`` divides the variance (device masters).
    """
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    var = np.maximum(signal, 0.0)
    var *= np.float32(1.0 / (config.e_per_adu * averaged))
    var += np.float32(config.read_noise_adu**2 / averaged)
    np.sqrt(var, out=var)
    noise *= var
    signal += noise
    signal += scene.pedestal
    np.rint(signal, out=signal)
    np.clip(signal, 0, SATURATION_ADU, out=signal)
    return signal.astype(np.uint16)


def _clean_sky(config: SimulationConfig, scene: _Scene, fwhm: float, beta: float) -> np.ndarray:
    """Noise-free (3, H, W) sky in the reference frame: sky level, gradient, galaxy, stars at ``fwhm``, ``beta``."""
    h, w = config.height, config.width
    identity = np.hstack([np.eye(2), np.zeros((2, 1))])
    xs, ys = np.arange(w), np.arange(h)
    galaxy = _galaxy_planes(scene.galaxy, identity, xs, ys) if scene.galaxy is not None else None
    clean = np.empty((3, h, w), dtype=np.float32)
    for c in range(3):
        clean[c] = _gradient_plane(scene, config, identity, c, xs, ys)
        clean[c] += np.float32(scene.sky[c])
        if galaxy is not None:
            clean[c] += galaxy[0] * np.float32(_DISK_COLOUR[c]) + galaxy[1] * np.float32(_BULGE_COLOUR[c])
        clean[c] += _render_stars(scene.star_xy, scene.star_flux[:, [c, c, c, c]], fwhm, beta, (h, w))
    return clean


# ------------------------------------------------------------------------------------------------------ writing


def _format_exposure(seconds: float) -> str:
    """Exposure as the device writes it in names: ``15`` for 15.0, ``0.004`` for 4 ms."""
    return np.format_float_positional(seconds, trim="-")


def _folder_time(dt: datetime) -> str:
    """``YYYY-MM-DD-HH-MM-SS-mmm`` (folder names)."""
    return dt.strftime("%Y-%m-%d-%H-%M-%S-") + f"{dt.microsecond // 1000:03d}"


def _name_time(dt: datetime) -> str:
    """``YYYYMMDD-HHMMSSmmm`` (frame names)."""
    return dt.strftime("%Y%m%d-%H%M%S") + f"{dt.microsecond // 1000:03d}"


def _iso_ms(dt: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmm`` (DATE-OBS)."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def _light_name(config: SimulationConfig, start: datetime, shot: _Shot) -> str:
    """Device file name of a light or failed frame; its time is DATE-OBS (end of exposure)."""
    end = start + timedelta(milliseconds=shot.end_ms)
    name = (f"{config.target}_{_format_exposure(config.exposure_s)}s{config.gain}_{config.filter}_"
            f"{_name_time(end)}_{shot.temperature_c}C.fits")
    return f"failed_{name}" if shot.kind == "failed" else name


def _device_header(config: SimulationConfig, date_obs: str, exptime: float, temperature: int, *,
                   dark: bool = False, extra: list[tuple[str, int, str]] | None = None) -> fits.Header:
    """Header of a device frame with the real dump's keys, order and comments (``extra`` goes before OBJECT)."""
    pixel_um, focal_mm, _ = _CAMERAS[config.camera]
    pointing = config.camera == "TELE" and not dark
    values = {
        "DATE-OBS": date_obs, "EXPTIME": float(exptime), "GAIN": config.gain, "RESTACK": 0, "XBINNING": 1,
        "YBINNING": 1, "FILTER": "" if dark else config.filter, "CAMERA": config.camera, "XPIXSZ": pixel_um,
        "YPIXSZ": pixel_um, "FOCALLEN": focal_mm, "DET-TEMP": int(temperature),
        "RA": config.ra_deg if pointing else 0.0, "DEC": config.dec_deg if pointing else 0.0,
        "OBJECT": "" if dark else config.target, "BAYERPAT": "RGGB", "TELESCOP": "DWARFIII", "INSTRUME": "DWARFIII",
        "ORIGIN": "DWARFLAB",
    }
    header = fits.Header()
    for key, comment in _DEVICE_CARDS:
        if key == "OBJECT":
            for card in extra or []:
                header.append(card)
        header.append((key, values[key], comment))
    return header


def _frame_header(config: SimulationConfig, start: datetime, shot: _Shot) -> fits.Header:
    """Header of a light or failed frame."""
    end = start + timedelta(milliseconds=shot.end_ms)
    return _device_header(config, _iso_ms(end), config.exposure_s, shot.temperature_c)


def _write_shots_info(path: Path, config: SimulationConfig, shots: list[_Shot]) -> None:
    """``shotsInfo.json`` with the real file's keys, types and layout (RA in hours)."""
    temps = [s.temperature_c for s in shots]
    info = {
        "DEC": config.dec_deg, "RA": config.ra_deg / 15.0, "binning": "1*1",
        "exp": _format_exposure(config.exposure_s), "format": "FITS", "gain": config.gain, "ir": config.filter,
        "maxTemp": max(temps), "minTemp": min(temps), "shotsStacked": config.n_frames, "shotsTaken": len(shots),
        "shotsToTake": len(shots), "target": config.target,
    }
    write_text_atomic(path, json.dumps(info, indent=4, sort_keys=True))


def _write_darks(raw_root: Path, config: SimulationConfig, scene: _Scene, shots: list[_Shot], start: datetime,
                 seed: np.random.SeedSequence, on_written: Callable[[int], None]) -> dict:
    """Write a ``DWARF_DARK`` set of raw darks and a ``CALI_FRAME`` master; return their description."""
    temperature = int(np.median([s.temperature_c for s in shots]))
    exp = _format_exposure(config.exposure_s)
    exp_ms = max(1, round(config.exposure_s * 1000))
    set_start = start + timedelta(milliseconds=shots[-1].end_ms + 600_000)
    folder = f"{config.camera.lower()}_exp_{exp}_gain_{config.gain}_bin_1_{_folder_time(set_start)}"
    seeds = seed.spawn(DARK_FRAMES + 1)
    files = []
    for i in range(DARK_FRAMES):
        end = set_start + timedelta(milliseconds=3000 + (i + 1) * exp_ms + i * 1500)
        name = f"raw_{exp}s_{config.gain}_{i:04d}_{_name_time(end)}_{temperature}C.fits"
        raw = _digitise(_dark_signal(config, scene), scene, config, np.random.default_rng(seeds[i]))
        write_raw_uint16(raw, raw_root / "DWARF_DARK" / folder / name,
                         _device_header(config, _iso_ms(end), config.exposure_s, temperature, dark=True))
        files.append(name)
        on_written(i + 1)
    master_name = f"dark_exp_{config.exposure_s:.6f}_gain_{config.gain}_bin_1_{temperature}C_stack_{MASTER_STACK}.fits"
    master_path = raw_root / "CALI_FRAME" / "dark" / f"cam_{_CAMERAS[config.camera][2]}" / master_name
    master = _digitise(_dark_signal(config, scene), scene, config, np.random.default_rng(seeds[-1]), MASTER_STACK)
    header = fits.Header()
    header.append(("BAYERPAT", "RGGB", "Bayer pattern"))
    write_raw_uint16(master, master_path, header)
    on_written(DARK_FRAMES + 1)
    return {"folder": folder, "files": files, "temperature_c": temperature,
            "master": str(master_path.relative_to(raw_root)), "master_stack": MASTER_STACK}


def _dark_signal(config: SimulationConfig, scene: _Scene) -> np.ndarray:
    """Noise-free dark signal above the pedestal: the hot pixels only."""
    signal = np.zeros((config.height, config.width), dtype=np.float32)
    signal[scene.hot_xy[:, 1], scene.hot_xy[:, 0]] = scene.hot_adu
    return signal


def _stretch(image: np.ndarray) -> np.ndarray:
    """8-bit asinh stretch above the 1st percentile, scaled by the median level, for previews."""
    low, mid = np.percentile(image[::4, ::4], [1.0, 50.0])
    out = image.astype(np.float32)
    out -= np.float32(low)
    np.maximum(out, 0, out=out)
    out *= np.float32(1.0 / (3.0 * max(float(mid - low), 1.0)))
    np.arcsinh(out, out=out)
    out *= np.float32(255.0 / np.arcsinh(60.0))
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _preview_gray(raw: np.ndarray, factor: int) -> np.ndarray:
    """Grey 8-bit preview of a mosaic, reduced ``factor`` times."""
    h, w = raw.shape
    small = cv2.resize(raw.astype(np.float32), (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    return _stretch(small)


def _preview_bgr(clean: np.ndarray, factor: int) -> np.ndarray:
    """Colour 8-bit preview (BGR, for OpenCV) of a (3, H, W) image, reduced ``factor`` times."""
    _, h, w = clean.shape
    bgr = np.stack([clean[2], clean[1], clean[0]], axis=-1)
    if factor > 1:
        bgr = cv2.resize(bgr, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    return _stretch(bgr)


def _write_image(path: Path, image: np.ndarray) -> None:
    """Write an image with OpenCV (format from the suffix: jpg, png, tif), atomically."""
    ok, data = cv2.imencode(path.suffix, image)
    if not ok:
        raise OSError(f"OpenCV could not encode {path.name}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def _write_clutter(session_dir: Path, config: SimulationConfig, start: datetime, shots: list[_Shot],
                   names: list[str], clean: np.ndarray, reference_raw: np.ndarray) -> None:
    """Write the device by-products: the live stack cube and its png, previews, a tif, a hash-named FITS."""
    w, h = config.width, config.height
    lights = [s for s in shots if s.kind == "light"]
    first = Path(names[shots.index(lights[0])]).stem.rsplit("_", 1)[0]
    stem = f"stacked-16_{first}"
    last = start + timedelta(milliseconds=lights[-1].end_ms)
    mx, my = round(0.02 * w), round(0.02 * h)
    corners = ((mx, my), (w - 1 - mx, my), (w - 1 - mx, h - 1 - my), (mx, h - 1 - my),
               (0, 0), (w - 1, 0), (w - 1, h - 3), (0, h - 3))
    crop = [card for key, (x, y) in zip(_CROP_CARDS, corners)
            for card in ((f"{key}X", x, "Crop rect coordinate"), (f"{key}Y", y, "Crop rect coordinate"))]
    header = _device_header(config, _iso_ms(last), config.exposure_s * len(lights), lights[-1].temperature_c,
                            extra=crop)
    cube = np.clip(np.rint(clean), 0, SATURATION_ADU).astype(np.uint16)
    write_raw_uint16(cube, session_dir / f"{stem}.fits", header)
    preview = _preview_bgr(clean, 1)
    _write_image(session_dir / f"{stem}.png", preview)
    _write_image(session_dir / "stacked.jpg", preview)
    _write_image(session_dir / "stacked_thumbnail.jpg", _preview_bgr(clean, 8))
    _write_image(session_dir / "img_reference.png", _preview_gray(reference_raw, 2))
    _write_image(session_dir / "img_stacked_all.tif", np.ascontiguousarray(np.moveaxis(cube[::-1], 0, -1)))
    _write_image(session_dir / "img_stacked_counter.png", np.full((h // 4, w // 4), min(len(lights), 255), np.uint8))
    digest = hashlib.md5(f"{session_dir.name}/{config.seed}".encode()).hexdigest()
    tiny = fits.Header()
    tiny.append(("BAYERPAT", "RGGB", "Bayer pattern"))
    write_raw_uint16(cube[1, :64, :64].copy(), session_dir / f"{digest}.fits", tiny)


# -------------------------------------------------------------------------------------------------------- truth


def _truth_header(what: str) -> fits.Header:
    """Small header describing a truth image."""
    header = fits.Header()
    header.append(("BUNIT", "ADU", "per exposure, transparency 1, no pedestal"))
    header.append(("COMMENT", f"dwarf3gpu.simulate ground truth: {what}"))
    return header


def _write_stars_csv(path: Path, scene: _Scene) -> None:
    """Star catalogue: reference-frame position and true flux per channel."""
    lines = ["id,x_ref,y_ref,flux_r,flux_g,flux_b"]
    for i, ((x, y), (r, g, b)) in enumerate(zip(scene.star_xy, scene.star_flux)):
        lines.append(f"{i},{x:.4f},{y:.4f},{r:.3f},{g:.3f},{b:.3f}")
    write_text_atomic(path, "\n".join(lines) + "\n")


def _truth_document(config, start, session_name, scene, shots, names, fwhm_med, beta_med, dark_info) -> dict:
    """The content of ``truth.json``."""
    frames = []
    for shot, name in zip(shots, names):
        end = start + timedelta(milliseconds=shot.end_ms)
        mid_ms = shot.end_ms - config.exposure_s * 500.0
        trail = None
        if shot.trail is not None:
            trail = {"p0": list(shot.trail[0]), "p1": list(shot.trail[1]), "sigma_px": shot.fwhm / 2.3548,
                     "peak_adu": [shot.trail_peak * c for c in _TRAIL_COLOUR]}
        frames.append({
            "file": name, "kind": shot.kind, "index": shot.index, "date_obs": _iso_ms(end),
            "date_mid": (start + timedelta(milliseconds=mid_ms)).isoformat(timespec="microseconds"),
            "t_mid_s": mid_ms / 1000.0, "exptime_s": config.exposure_s, "temperature_c": shot.temperature_c,
            "transform": shot.transform.tolist(), "rotation_deg": shot.rotation_deg, "fwhm_px": shot.fwhm,
            "moffat_beta": shot.beta, "transparency": shot.transparency, "sky_adu": shot.sky.tolist(),
            "cloudy": shot.cloudy, "trailed": shot.trail is not None, "bad_seeing": shot.bad_seeing, "trail": trail,
        })
    lights = [f for f in frames if f["kind"] == "light"]
    gal = scene.galaxy
    return {
        "format": "dwarf3gpu-simulation-truth", "version": 1, "session": session_name, "config": asdict(config),
        "reference": lights[0]["file"], "frames": frames,
        "cloudy": [f["index"] for f in lights if f["cloudy"]],
        "trailed": [f["index"] for f in lights if f["trailed"]],
        "bad_seeing": [f["index"] for f in lights if f["bad_seeing"]],
        "median_fwhm_px": fwhm_med, "median_moffat_beta": beta_med,
        "sky_adu": scene.sky.tolist(),
        "gradient_g_adu_per_px": list(scene.gradient),
        "rotation_center": list(scene.rotation_center) if scene.rotation_center else None,
        "drift_px_per_hour": list(scene.drift) if scene.drift else None,
        "galaxy": None if gal is None else {**asdict(gal), "disk_colour": list(_DISK_COLOUR),
                                            "bulge_colour": list(_BULGE_COLOUR)},
        "sensor": {
            "pedestal_adu": config.pedestal_adu, "fixed_pattern_adu": FIXED_PATTERN_ADU,
            "read_noise_adu": config.read_noise_adu, "e_per_adu": config.e_per_adu,
            "saturation_adu": SATURATION_ADU, "bayer": "RGGB",
            "hot_pixels": [[int(x), int(y), float(a)] for (x, y), a in zip(scene.hot_xy, scene.hot_adu)],
        },
        "darks": dark_info,
        "files": {"stars": "stars.csv", "clean_sky": "clean_sky.fits"},
    }
