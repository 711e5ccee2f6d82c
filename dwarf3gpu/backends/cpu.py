"""CPU backend: the per-pixel stages on the CPU.

Debayer and warps run on the CPU build of ``kernels/*.cu`` (g++ + OpenMP, bit-identical to the NumPy
reference: see METHODS.md "Kernels") when a C++ compiler is available, and on NumPy otherwise; sigma clipping
stays on NumPy, which measured as fast as the CPU build (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from .. import debayer, stack, warp


class CpuBackend:
    """Runs every per-pixel stage on the CPU.

    Parameters
    ----------
    fallback_reason : str, optional
        Why ``auto`` fell back to the CPU (recorded in the manifest and shown to the user).
    kernels : {"auto", "numpy"}, default "auto"
        ``auto`` uses the CPU build of the CUDA kernels for debayer and warps when it can be built (the reason
        is recorded otherwise); ``numpy`` always uses the NumPy reference.
    """

    name = "cpu"

    def __init__(self, fallback_reason: str = "", kernels: str = "auto"):
        self.fallback_reason = fallback_reason
        self._native = None
        self.native_reason = "NumPy reference requested"
        if kernels == "auto":
            from ..errors import BackendUnavailableError
            from .native import native_ops

            try:
                self._native = native_ops()
                self.native_reason = ""
            except BackendUnavailableError as exc:
                self.native_reason = str(exc)

    def describe(self) -> dict[str, Any]:
        """Name, processor, NumPy and OpenCV versions and the fallback reason."""
        import cv2

        return {
            "name": self.name,
            "device": platform.processor() or platform.machine(),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "fallback_reason": self.fallback_reason,
            "cpu_kernels": "g++/OpenMP build of kernels/*.cu" if self._native else f"NumPy ({self.native_reason})",
        }

    def debayer_bilinear(self, mosaic, pattern, origin=(0, 0)):
        """See :func:`dwarf3gpu.debayer.debayer_bilinear`."""
        if self._native is not None:
            return self._native.debayer_bilinear(mosaic, pattern, origin=origin)
        return debayer.debayer_bilinear(mosaic, pattern, origin=origin)

    def debayer_superpixel(self, mosaic, pattern):
        """See :func:`dwarf3gpu.debayer.debayer_superpixel`."""
        return debayer.debayer_superpixel(mosaic, pattern)

    def warp_affine(self, image, matrix, out_shape, **kwargs):
        """See :func:`dwarf3gpu.warp.warp_affine`."""
        if self._native is not None:
            return self._native.warp_affine(image, matrix, out_shape, **kwargs)
        return warp.warp_affine(image, matrix, out_shape, **kwargs)

    def warp_bayer_planes(self, mosaic, pattern, matrix, out_shape, **kwargs):
        """See :func:`dwarf3gpu.warp.warp_bayer_planes`."""
        if self._native is not None:
            return self._native.warp_bayer_planes(mosaic, pattern, matrix, out_shape, **kwargs)
        return warp.warp_bayer_planes(mosaic, pattern, matrix, out_shape, **kwargs)

    def shift_integer(self, image, dx, dy, out_shape):
        """See :func:`dwarf3gpu.warp.shift_integer`."""
        return warp.shift_integer(image, dx, dy, out_shape)

    def sigma_clip(self, stack_, valid, weights, frame_weights, **kwargs):
        """See :func:`dwarf3gpu.stack.sigma_clip_mask_aware`."""
        return stack.sigma_clip_mask_aware(stack_, valid, weights, frame_weights, **kwargs)
