"""The backend interface: the per-pixel operations the pipeline needs."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    """Operations a compute backend provides (CPU: NumPy; CUDA: CuPy + kernels).

    Attributes
    ----------
    name : str
        ``cpu`` or ``cuda``.
    fallback_reason : str
        Why ``auto`` did not pick CUDA (empty when it was not asked or it did).
    xp : module
        Array module where the stacking tiles live: NumPy, or CuPy (tiles kept on the GPU).
    """

    name: str
    fallback_reason: str
    xp: Any

    def memory_budget(self) -> int:
        """Default memory budget of the stacking tiles, bytes (a share of free RAM, or of free GPU memory)."""

    def describe(self) -> dict[str, Any]:
        """Name, device, library versions and fallback reason, for the manifest."""

    def debayer_bilinear(self, mosaic: np.ndarray, pattern: str, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """(3, H, W) float32 bilinear debayer of a band whose top-left is at ``origin`` in the frame."""

    def debayer_superpixel(self, mosaic: np.ndarray, pattern: str) -> np.ndarray:
        """(3, H/2, W/2) float32 superpixel debayer."""

    def warp_affine(self, image: np.ndarray, matrix: np.ndarray, out_shape: tuple[int, int], **kwargs):
        """Warp into an output tile; returns (warped, valid, weight)."""

    def warp_bayer_planes(self, mosaic: np.ndarray, pattern: str, matrix: np.ndarray, out_shape: tuple[int, int], **kwargs):
        """Warp the four Bayer planes separately and re-interleave; returns (warped, valid, weight)."""

    def warp_lattice(self, mosaic: np.ndarray, pattern: str, matrix: np.ndarray, out_shape: tuple[int, int], **kwargs):
        """RGB straight from each colour's CFA lattice (no separate demosaic); returns (warped, valid, weight)."""

    def shift_integer(self, image: np.ndarray, dx: int, dy: int, out_shape: tuple[int, int]):
        """Exact integer shift; returns (shifted, valid)."""

    def sigma_clip(self, stack: np.ndarray, valid: np.ndarray, weights: np.ndarray, frame_weights: np.ndarray, **kwargs):
        """Mask- and weight-aware sigma clipping over axis 0; returns a ClipResult."""
