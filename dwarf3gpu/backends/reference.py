"""The stage operations in plain NumPy: the reference the kernels are tested against.

:class:`ReferenceStageOps` implements :class:`~dwarf3gpu.backends.base.StageOps` with the reference functions of
:mod:`dwarf3gpu.debayer`, :mod:`dwarf3gpu.warp`, :mod:`dwarf3gpu.calibrate`, :mod:`dwarf3gpu.normalise` and
:mod:`dwarf3gpu.clip`. The CPU backend uses it when the CPU build of the kernels cannot be made (no C++
compiler), and the tests compare every kernel with it.
"""

from __future__ import annotations

import platform
from concurrent.futures import Executor
from typing import Any

import numpy as np

from .. import debayer, warp
from ..calibrate import DarkCalibration, calibrate_window
from ..clip import ClipSettings, clip_into
from ..normalise import apply_normalisation
from ..resources import default_memory_budget
from .base import Arrays

__all__ = ["ReferenceStageOps"]


def _into(results: Arrays, out: Arrays | None) -> Arrays:
    """``results``, or copied into ``out`` (returned) when given."""
    if out is None:
        return results
    for target, result in zip(out, results):
        np.copyto(target, np.reshape(result, target.shape))
    return out


class ReferenceStageOps:
    """Every per-pixel stage in NumPy, on the host.

    Parameters
    ----------
    fallback_reason : str, optional
        Why the kernels are not used (recorded in the manifest and shown to the user).
    """

    name = "cpu"
    implementation = "NumPy reference"
    xp = np

    def __init__(self, fallback_reason: str = ""):
        self.fallback_reason = fallback_reason

    def memory_budget(self) -> int:
        """See :func:`dwarf3gpu.resources.default_memory_budget`."""
        return default_memory_budget()

    def describe(self) -> dict[str, Any]:
        """Name, processor, NumPy and OpenCV versions, the implementation and the fallback reason."""
        import cv2

        return {"name": self.name, "device": platform.processor() or platform.machine(), "numpy": np.__version__,
                "opencv": cv2.__version__, "implementation": self.implementation,
                "fallback_reason": self.fallback_reason}

    def upload(self, array: np.ndarray) -> np.ndarray:
        """``array`` itself (the host is the target)."""
        return np.asarray(array)

    def download(self, array: np.ndarray) -> np.ndarray:
        """``array`` itself."""
        return np.asarray(array)

    def bind_thread(self) -> None:
        """Nothing: the host has no device to choose."""

    def on_target(self, calibration: DarkCalibration) -> DarkCalibration:
        """``calibration`` itself."""
        return calibration

    def calibrate_window(self, window: np.ndarray, origin: tuple[int, int], dark: DarkCalibration) -> np.ndarray:
        """See :func:`dwarf3gpu.calibrate.calibrate_window`."""
        return calibrate_window(window, origin, dark)

    def normalise(self, data: np.ndarray, offset: np.ndarray, scale: np.ndarray, pattern: str | None = None,
                  origin: tuple[int, int] = (0, 0)) -> None:
        """See :func:`dwarf3gpu.normalise.apply_normalisation`."""
        apply_normalisation(data, offset, scale, pattern, origin)

    def debayer_bilinear(self, mosaic: np.ndarray, pattern: str, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """See :func:`dwarf3gpu.debayer.debayer_bilinear`."""
        return debayer.debayer_bilinear(mosaic, pattern, origin=origin)

    def debayer_mhc(self, mosaic: np.ndarray, pattern: str, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """See :func:`dwarf3gpu.debayer.debayer_mhc`."""
        return debayer.debayer_mhc(mosaic, pattern, origin=origin)

    def debayer_superpixel(self, mosaic: np.ndarray, pattern: str) -> np.ndarray:
        """See :func:`dwarf3gpu.debayer.debayer_superpixel`."""
        return debayer.debayer_superpixel(mosaic, pattern)

    def warp_affine(self, image: np.ndarray, matrix: np.ndarray, out_shape: tuple[int, int], *,
                    out: Arrays | None = None, **options: Any) -> Arrays:
        """See :func:`dwarf3gpu.warp.warp_affine`; ``out``: arrays to copy the result into (returned)."""
        return _into(warp.warp_affine(image, matrix, out_shape, **options), out)

    def warp_bayer_planes(self, mosaic: np.ndarray, pattern: str, matrix: np.ndarray, out_shape: tuple[int, int], *,
                          out: Arrays | None = None, **options: Any) -> Arrays:
        """See :func:`dwarf3gpu.warp.warp_bayer_planes`; ``out`` as for :meth:`warp_affine`."""
        return _into(warp.warp_bayer_planes(mosaic, pattern, matrix, out_shape, **options), out)

    def warp_lattice(self, mosaic: np.ndarray, pattern: str, matrix: np.ndarray, out_shape: tuple[int, int], *,
                     out: Arrays | None = None, **options: Any) -> Arrays:
        """See :func:`dwarf3gpu.warp.warp_lattice` (which writes into ``out`` itself)."""
        return warp.warp_lattice(mosaic, pattern, matrix, out_shape, out=out, **options)

    def warp_lattice_chroma(self, mosaic: np.ndarray, pattern: str, matrix: np.ndarray, out_shape: tuple[int, int], *,
                            out: Arrays | None = None, **options: Any) -> Arrays:
        """See :func:`dwarf3gpu.warp.warp_lattice_chroma` (which writes into ``out`` itself)."""
        return warp.warp_lattice_chroma(mosaic, pattern, matrix, out_shape, out=out, **options)

    def clip_into(self, stack: np.ndarray, valid: np.ndarray | None, weights: np.ndarray | None,
                  frame_weights: np.ndarray | None, settings: ClipSettings, mean: np.ndarray, coverage: np.ndarray,
                  rejected: np.ndarray, executor: Executor | None = None) -> None:
        """See :func:`dwarf3gpu.clip.clip_into` (chunks of pixels in ``executor``'s threads)."""
        clip_into(stack, valid, weights, frame_weights, settings, mean, coverage, rejected, None, executor)
