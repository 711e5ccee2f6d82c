"""CPU backend: the per-pixel stages on the CPU.

Debayer, warps and the sigma clip of the stacking run on the CPU build of ``kernels/*.cu`` (g++ + OpenMP; see
METHODS.md "Kernels") when a C++ compiler is available, and on NumPy otherwise. Debayer and warps are bit-identical
to the NumPy reference; the clip makes the reference's decisions (coverage, kept set, rejected counts) with means
within float32 rounding, and is used for tiles of up to ``KERNEL_CLIP_MAX_FRAMES`` frames, where it measured faster
than NumPy (1.8-3.9x at 40 frames); NumPy clips larger tiles.
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
        ``auto`` uses the CPU build of the CUDA kernels for debayer, warps and the stacking's sigma clip when it
        can be built (the reason is recorded otherwise); ``numpy`` always uses the NumPy reference.
    """

    name = "cpu"
    xp = np

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

    def memory_budget(self) -> int:
        """See :func:`dwarf3gpu.stack.default_memory_budget` (a share of the available RAM)."""
        from ..stack import default_memory_budget

        return default_memory_budget()

    def describe(self) -> dict[str, Any]:
        """Name, processor, NumPy and OpenCV versions and the fallback reason."""
        import cv2

        return {
            "name": self.name,
            "device": platform.processor() or platform.machine(),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "fallback_reason": self.fallback_reason,
            "cpu_kernels": "g++/OpenMP build of kernels/*.cu (debayer, warps, sigma clip)" if self._native
            else f"NumPy ({self.native_reason})",
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

    def warp_lattice(self, mosaic, pattern, matrix, out_shape, **kwargs):
        """See :func:`dwarf3gpu.warp.warp_lattice`."""
        if self._native is not None:
            return self._native.warp_lattice(mosaic, pattern, matrix, out_shape, **kwargs)
        return warp.warp_lattice(mosaic, pattern, matrix, out_shape, **kwargs)

    def shift_integer(self, image, dx, dy, out_shape):
        """See :func:`dwarf3gpu.warp.shift_integer`."""
        return warp.shift_integer(image, dx, dy, out_shape)

    def sigma_clip(self, stack_, valid, weights, frame_weights, **kwargs):
        """See :func:`dwarf3gpu.stack.sigma_clip_mask_aware`."""
        return stack.sigma_clip_mask_aware(stack_, valid, weights, frame_weights, **kwargs)

    def clip_into(self, stack_, valid, weights, frame_weights, cfg, *args, **kwargs) -> None:
        """The clipping step of :func:`dwarf3gpu.stack.stack_tiles` (its ``clip`` argument, the arguments of
        ``stack._clip_into``): the CPU build's :meth:`~dwarf3gpu.backends.kernel_ops.KernelOps.clip_into` up to
        :func:`kernel_clip_max_frames` frames, the NumPy reference step beyond or without the build. Either
        way each pixel's result depends only on its samples, so tiles and threads never change the output."""
        if self._native is not None and stack_.shape[0] <= kernel_clip_max_frames(cfg.median, cfg.mad_std):
            return self._native.clip_into(stack_, valid, weights, frame_weights, cfg, *args, **kwargs)
        return stack._clip_into(stack_, valid, weights, frame_weights, cfg, *args, **kwargs)


#: Most frames per tile for which :meth:`CpuBackend.clip_into` uses the CPU build: up to these counts it measured
#: faster than the NumPy reference on one core (METHODS.md, "Kernels"). The kernel's time is its per-pixel gather
#: and sort whatever the options; NumPy sorts many pixels at once with SIMD and pays most for the MAD, so with a
#: std spread or a mean centre it catches up at fewer frames.
KERNEL_CLIP_MAX_FRAMES = {"median/mad_std": 256, "other": 128}


def kernel_clip_max_frames(median: bool, mad_std: bool) -> int:
    """Most frames the CPU backend clips with the CPU build for these options (see ``KERNEL_CLIP_MAX_FRAMES``)."""
    return KERNEL_CLIP_MAX_FRAMES["median/mad_std" if median and mad_std else "other"]
