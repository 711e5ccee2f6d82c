"""``StackConfig``: every setting of a stacking run, validated, frozen and hashable (the cache key).

Settings that cannot change the output (worker count, cache use, verbosity) are not part of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .analysis import AnalysisConfig
from .cache import settings_hash
from .errors import ConfigError
from .quality import SCORE_METHODS, SelectionLimits

__all__ = ["StackConfig", "DEBAYER_MODES", "DEMOSAIC_METHODS"]

DEBAYER_MODES = ("rgb", "bayer-first", "superpixel", "none")
DEMOSAIC_METHODS = ("lattice", "chroma", "bilinear", "mhc")
#: Settings that cannot change any output byte, left out of :meth:`StackConfig.settings_hash`.
_NOT_HASHED = ("memory_budget", "device")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(options)}; got {value!r}")


@dataclass(frozen=True)
class StackConfig:
    """Settings of :func:`dwarf3gpu.stack_session` (CLI options in brackets).

    Attributes
    ----------
    keep, score, reference, align_mode : see :class:`~dwarf3gpu.analysis.AnalysisConfig`
        Selection and registration (``--keep``, ``--score``, ``--reference``, ``--align-mode``).
    max_fwhm, min_stars, max_eccentricity, min_transparency, max_background : optional hard limits
        See :class:`~dwarf3gpu.quality.SelectionLimits`.
    debayer : {"rgb", "bayer-first", "superpixel", "none"}
        ``rgb``: full-resolution RGB from every frame on the reference grid (strong field rotation; how: see
        ``demosaic``); ``bayer-first``: stack the mosaics, debayer the master; ``superpixel``: half-resolution RGB;
        ``none``: CFA master with BAYERPAT.
    interpolation : {"bilinear", "bicubic"}
        Warp kernel of every mode except ``rgb`` with ``demosaic="lattice"`` or ``"chroma"`` (bicubic is sharper).
    demosaic : {"lattice", "chroma", "bilinear", "mhc"}
        How the ``rgb`` mode makes RGB. ``lattice`` (default): no separate demosaic, each colour is resampled
        straight from its own CFA lattice at the warped position (Lanczos-5 on the green quincunx, Lanczos-3 on the
        red and blue lattices: one interpolation, ``interpolation`` does not apply); ``chroma``: the same, but red
        and blue are resampled as the colour differences R - G and B - G and added to the resampled green, so star
        cores keep one colour instead of ringing (about half the colour fringe, as sharp); ``bilinear`` (normalised
        convolution) or ``mhc`` (Malvar-He-Cutler): demosaic each frame, then warp with ``interpolation``. The
        lattice resampling keeps undersampled stars sharp (master FWHM within 5 % of an ideal stack, against 22 %
        for bilinear + bilinear; see METHODS.md, "Warp").
    sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc : sigma clipping
        astropy ``sigma_clip`` semantics; ``sigma_lower``/``sigma_upper`` default to ``sigma``. The default spread
        is ``mad_std``: with the plain standard deviation one outlier among N samples can never lie more than
        ``(N - 1) / sqrt(N)`` sigma from the others (2.3 for N = 7), so a 3-sigma clip of a short session would
        keep every satellite trail.
    normalisation : {"additive", "multiplicative", "none"}
        Frame normalisation before rejection (background matching).
    weights : {"none", "noise"}
        Per-frame weights of the mean (``noise``: inverse background variance).
    feather_px : float
        Edge feathering width (0: off).
    crop : bool
        Crop the master to the fully covered rectangle.
    memory_budget : int or None
        Bytes for the stacking tiles (None: a safe share of the available RAM).
    include_failed : bool
        Use the device's ``failed_`` frames too.
    quicklook : bool
        Write the previews.
    stretch : {"two_stage", "asinh"}
        Preview stretch.
    scnr : float
        SCNR green removal amount for the preview, 0..1 (off by default: after the colour calibration there is
        no green cast left, and SCNR would tint a noisy grey sky magenta; see METHODS.md).
    color_matrix : str
        Colour-matrix preset for the preview.
    backend : {"auto", "cpu", "cuda"}
        Compute backend.
    device : int
        CUDA device number (not in the settings hash: it never changes a pixel).
    dark : str
        ``"auto"`` (default: the best dark matched by camera, exposure, gain and temperature, when one exists;
        without a usable one, hot pixels found in the lights), ``"none"`` (nothing), or the path of a FITS master
        dark (``--dark``). The dark is subtracted and its hot pixels repaired before warping, unless the check on
        the reference light finds it makes things worse (see METHODS.md, "Dark calibration").
    """

    keep: float = 0.92
    score: str = "weighted"
    reference: str = "best"
    align_mode: str = "auto"
    max_fwhm: float | None = None
    min_stars: int = 8
    max_eccentricity: float | None = None
    min_transparency: float | None = None
    max_background: float | None = None
    debayer: str = "rgb"
    interpolation: str = "bilinear"
    demosaic: str = "lattice"
    sigma: float = 3.0
    sigma_lower: float | None = None
    sigma_upper: float | None = None
    maxiters: int = 5
    cenfunc: str = "median"
    stdfunc: str = "mad_std"
    normalisation: str = "additive"
    weights: str = "none"
    feather_px: float = 0.0
    crop: bool = False
    memory_budget: int | None = None
    include_failed: bool = False
    quicklook: bool = True
    stretch: str = "two_stage"
    scnr: float = 0.0
    color_matrix: str = "identity"
    backend: str = "auto"
    device: int = 0
    dark: str = "auto"

    def __post_init__(self):
        _choice("debayer", self.debayer, DEBAYER_MODES)
        _choice("interpolation", self.interpolation, ("bilinear", "bicubic"))
        _choice("demosaic", self.demosaic, DEMOSAIC_METHODS)
        _choice("cenfunc", self.cenfunc, ("median", "mean"))
        _choice("stdfunc", self.stdfunc, ("std", "mad_std"))
        _choice("normalisation", self.normalisation, ("additive", "multiplicative", "none"))
        _choice("weights", self.weights, ("none", "noise"))
        _choice("stretch", self.stretch, ("two_stage", "asinh"))
        _choice("score", self.score, SCORE_METHODS)
        _choice("backend", self.backend, ("auto", "cpu", "cuda"))
        if not isinstance(self.dark, str) or not self.dark.strip():
            raise ConfigError("must be 'auto', 'none' or the path of a FITS master dark", setting="dark")
        if self.device < 0:
            raise ConfigError(f"must be >= 0; got {self.device}", setting="device")
        for name in ("sigma", "sigma_lower", "sigma_upper"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive; got {value}")
        if self.maxiters < 1:
            raise ConfigError(f"must be at least 1; got {self.maxiters}", setting="maxiters")
        if self.feather_px < 0:
            raise ConfigError(f"must be >= 0 pixels; got {self.feather_px}", setting="feather_px")
        if not 0 <= self.scnr <= 1:
            raise ConfigError(f"must be between 0 and 1; got {self.scnr}", setting="scnr")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError("must be a positive number of bytes", setting="memory_budget")
        self.analysis()  # validates keep, reference, align mode

    def analysis(self) -> AnalysisConfig:
        """The measure/select/register part of the settings."""
        return AnalysisConfig(
            keep=self.keep, score=self.score, reference=self.reference, align_mode=self.align_mode,
            limits=SelectionLimits(self.max_fwhm, self.min_stars, self.max_eccentricity, self.min_transparency,
                                   self.max_background),
        )

    @property
    def sigma_bounds(self) -> tuple[float, float]:
        """(lower, upper) clipping bounds in sigma."""
        return (self.sigma_lower or self.sigma, self.sigma_upper or self.sigma)

    def to_json(self) -> dict[str, Any]:
        """Every setting as plain JSON."""
        return asdict(self)

    def settings_hash(self) -> str:
        """Stable hash of the settings that shape the result (written in the master's header).

        ``memory_budget`` only changes how the output is split into tiles, never a pixel (tested byte for byte),
        and ``device`` only picks which GPU runs; so they are left out: the same stack made with another budget carries the same hash.
        """
        return settings_hash({k: v for k, v in self.to_json().items() if k not in _NOT_HASHED})
