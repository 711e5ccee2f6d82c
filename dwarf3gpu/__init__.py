"""dwarf3gpu: GPU-first, reproducible stacking of DWARF 3 smart-telescope raw FITS sessions.

The public API is listed in ``__all__``; the CLI ``dwarf3`` is a thin layer over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError, Dwarf3Error, FitsReadError, SessionError
from .fitsio import FitsImage, read_fits, read_header, read_raw_uint16, write_fits, write_raw_uint16
from .session import CalibrationCandidate, ExcludedFile, LightFrame, Session, discover, list_lights
from .simulate import SimulatedSession, SimulationConfig, simulate_session
from .stars import StarList, detect_stars, luminance_proxy
from .quality import FrameMetrics, SelectionLimits, score_frames, select_frames
from .geometry import apply_transform, invert_transform
from .register import Registration, register_frame
from .analysis import AnalysisConfig, SessionAnalysis, analyze_session
from .debayer import debayer_bilinear, debayer_rggb, debayer_superpixel
from .warp import warp_affine, warp_bayer_planes
from .clip import ClipSettings, clip_settings, sigma_clip_mask_aware, sigma_clip_mask_aware_rgb
from .tiles import crop_to_coverage
from .color import ColorCalibration, apply_bayer_compensation, background_neutral_gains, scnr_green
from .stretch import asinh_stretch, make_quicklook, two_stage_stretch
from .config import StackConfig
from .pipeline import StackResult, stack_session

__all__ = [
    "__version__",
    # errors
    "Dwarf3Error",
    "FitsReadError",
    "SessionError",
    "ConfigError",
    # FITS
    "FitsImage",
    "read_fits",
    "read_header",
    "read_raw_uint16",
    "write_fits",
    "write_raw_uint16",
    # discovery
    "Session",
    "LightFrame",
    "ExcludedFile",
    "CalibrationCandidate",
    "discover",
    "list_lights",
    # synthetic sessions
    "SimulationConfig",
    "SimulatedSession",
    "simulate_session",
    # measure, select, register
    "StarList",
    "detect_stars",
    "luminance_proxy",
    "FrameMetrics",
    "SelectionLimits",
    "score_frames",
    "select_frames",
    "Registration",
    "register_frame",
    "apply_transform",
    "invert_transform",
    "AnalysisConfig",
    "SessionAnalysis",
    "analyze_session",
    # warp and stack
    "debayer_rggb",
    "debayer_bilinear",
    "debayer_superpixel",
    "warp_affine",
    "warp_bayer_planes",
    "ClipSettings",
    "clip_settings",
    "sigma_clip_mask_aware",
    "sigma_clip_mask_aware_rgb",
    "crop_to_coverage",
    # finishing
    "ColorCalibration",
    "background_neutral_gains",
    "apply_bayer_compensation",
    "scnr_green",
    "asinh_stretch",
    "two_stage_stretch",
    "make_quicklook",
    # the main job
    "StackConfig",
    "StackResult",
    "stack_session",
]
