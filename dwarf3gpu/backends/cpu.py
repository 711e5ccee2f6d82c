"""CPU backend: NumPy implementations of the per-pixel stages (OpenCV where it gives the same answer)."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from .. import debayer, stack, warp


class CpuBackend:
    """Runs every per-pixel stage with NumPy on the CPU.

    Parameters
    ----------
    fallback_reason : str, optional
        Why ``auto`` fell back to the CPU (recorded in the manifest and shown to the user).
    """

    name = "cpu"

    def __init__(self, fallback_reason: str = ""):
        self.fallback_reason = fallback_reason

    def describe(self) -> dict[str, Any]:
        """Name, processor, NumPy and OpenCV versions and the fallback reason."""
        import cv2

        return {
            "name": self.name,
            "device": platform.processor() or platform.machine(),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "fallback_reason": self.fallback_reason,
        }

    def debayer_bilinear(self, mosaic, pattern, origin=(0, 0)):
        """See :func:`dwarf3gpu.debayer.debayer_bilinear`."""
        return debayer.debayer_bilinear(mosaic, pattern, origin=origin)

    def debayer_superpixel(self, mosaic, pattern):
        """See :func:`dwarf3gpu.debayer.debayer_superpixel`."""
        return debayer.debayer_superpixel(mosaic, pattern)

    def warp_affine(self, image, matrix, out_shape, **kwargs):
        """See :func:`dwarf3gpu.warp.warp_affine`."""
        return warp.warp_affine(image, matrix, out_shape, **kwargs)

    def warp_bayer_planes(self, mosaic, pattern, matrix, out_shape, **kwargs):
        """See :func:`dwarf3gpu.warp.warp_bayer_planes`."""
        return warp.warp_bayer_planes(mosaic, pattern, matrix, out_shape, **kwargs)

    def shift_integer(self, image, dx, dy, out_shape):
        """See :func:`dwarf3gpu.warp.shift_integer`."""
        return warp.shift_integer(image, dx, dy, out_shape)

    def sigma_clip(self, stack_, valid, weights, frame_weights, **kwargs):
        """See :func:`dwarf3gpu.stack.sigma_clip_mask_aware`."""
        return stack.sigma_clip_mask_aware(stack_, valid, weights, frame_weights, **kwargs)
