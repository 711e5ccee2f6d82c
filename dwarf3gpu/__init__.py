"""dwarf3gpu: GPU-first, reproducible stacking of DWARF 3 smart-telescope raw FITS sessions.

The public API is listed in ``__all__``; the CLI ``dwarf3`` is a thin layer over it. Names are imported on first
use (``dwarf3gpu.stack_session`` imports the pipeline then), so ``import dwarf3gpu`` and ``dwarf3 --version`` stay
fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ConfigError": "errors",
    "Dwarf3Error": "errors",
    "FitsReadError": "errors",
    "SessionError": "errors",
    "FitsImage": "fitsio",
    "read_fits": "fitsio",
    "read_header": "fitsio",
    "read_raw_uint16": "fitsio",
    "write_fits": "fitsio",
    "write_raw_uint16": "fitsio",
    "CalibrationCandidate": "session",
    "ExcludedFile": "session",
    "LightFrame": "session",
    "Session": "session",
    "discover": "session",
    "list_lights": "session",
    "SimulatedSession": "simulate",
    "SimulationConfig": "simulate",
    "simulate_session": "simulate",
    "StarList": "stars",
    "detect_stars": "stars",
    "luminance_proxy": "stars",
    "FrameMetrics": "quality",
    "SelectionLimits": "quality",
    "score_frames": "quality",
    "select_frames": "quality",
    "apply_transform": "geometry",
    "invert_transform": "geometry",
    "Registration": "register",
    "register_frame": "register",
    "AnalysisConfig": "analysis",
    "SessionAnalysis": "analysis",
    "analyze_session": "analysis",
    "debayer_bilinear": "debayer",
    "debayer_rggb": "debayer",
    "debayer_superpixel": "debayer",
    "warp_affine": "warp",
    "warp_bayer_planes": "warp",
    "ClipSettings": "clip",
    "clip_settings": "clip",
    "sigma_clip_mask_aware": "clip",
    "sigma_clip_mask_aware_rgb": "clip",
    "crop_to_coverage": "tiles",
    "ColorCalibration": "color",
    "apply_bayer_compensation": "color",
    "background_neutral_gains": "color",
    "scnr_green": "color",
    "asinh_stretch": "stretch",
    "make_quicklook": "stretch",
    "two_stage_stretch": "stretch",
    "StackConfig": "config",
    "StackResult": "pipeline",
    "stack_session": "pipeline",
}
"""Public name -> the module that defines it (imported on first use)."""

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


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names and every public name, imported or not."""
    return sorted(set(globals()) | set(__all__))
