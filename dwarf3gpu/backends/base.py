"""The backend seam: a launch target runs kernels; stage operations are what the pipeline calls.

Two roles, so the pipeline never asks which backend it has:

- :class:`LaunchTarget`: where a kernel of ``kernels/*.cu`` runs. The CPU build
  (:class:`~dwarf3gpu.backends.cpu_build.CpuBuildTarget`: the sources compiled by g++ with OpenMP, loaded
  with ctypes) and CUDA (:class:`~dwarf3gpu.backends.cuda.CudaTarget`: CuPy ``RawModule`` compiled by
  NVRTC). Each knows its array module ``xp`` and its memory.
- :class:`StageOps`: the per-pixel stage operations, generic over ``xp``: upload a raw window, calibrate it,
  debayer and resample it into a tile, normalise, clip a tile, download the results.
  :class:`~dwarf3gpu.backends.stage_ops.KernelStageOps` implements them on any launch target (the same kernel
  sources); :class:`~dwarf3gpu.backends.reference.ReferenceStageOps` in plain NumPy (the reference the
  tests compare with, and the CPU fallback when no C++ compiler exists).

Every render writes into caller-given ``out = (data, valid, weight)`` arrays of ``xp`` (views of the tile
buffer), so on CUDA a frame's contribution to a tile goes from the uploaded raw window to the tile without
visiting the host.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Protocol

import numpy as np

from ..calibrate import DarkCalibration
from ..clip import ClipSettings

Arrays = tuple[Any, Any, Any]
"""``(data, valid, weight)`` arrays of a render: float32 (C, rows, cols), bool and float32 (rows, cols)."""


class LaunchTarget(Protocol):
    """Where a kernel runs.

    Attributes
    ----------
    name : str
        ``cpu`` or ``cuda``.
    xp : module
        Array module of every buffer the target's kernels touch (NumPy or CuPy).
    """

    name: str
    xp: Any

    def launch(self, kernel: str, grid: tuple[int, ...], block: tuple[int, ...], *args: Any) -> None:
        """Run ``kernel`` over ``grid`` blocks of ``block`` threads, arguments checked against its C signature."""

    def to_host(self, array: Any) -> np.ndarray:
        """``array`` as a NumPy array (a download on a device; the array itself on the CPU)."""

    def bind_thread(self) -> None:
        """Make the calling thread allocate and launch on this target's device (nothing on the CPU)."""

    def memory_budget(self) -> int:
        """Default memory budget of the stacking tiles, bytes."""

    def describe(self) -> dict[str, Any]:
        """Device, versions and build, for the manifest."""

    def clip_kernel_max_frames(self, settings: ClipSettings) -> int:
        """Most frames per tile that the clip kernel takes on this target (the reference clips beyond)."""


class StageOps(Protocol):
    """The per-pixel stage operations the pipeline calls; arrays stay on ``xp`` from upload to tile result.

    Attributes
    ----------
    name : str
        Backend name for the manifest and the stack cache key: ``cpu`` or ``cuda``.
    implementation : str
        What runs the operations (the CPU build, CUDA, or the NumPy reference), for the manifest and the cache key.
    fallback_reason : str
        Why ``auto`` did not pick CUDA, or why the CPU build is not used ("" when neither).
    xp : module
        Array module of the tile buffers.
    """

    name: str
    implementation: str
    fallback_reason: str
    xp: Any

    def memory_budget(self) -> int:
        """Default memory budget of the stacking tiles, bytes."""

    def describe(self) -> dict[str, Any]:
        """Name, device, versions, implementation and fallback reason, for the manifest."""

    def upload(self, array: np.ndarray) -> Any:
        """A host array on ``xp`` (the one upload of a raw window; the array itself on the CPU)."""

    def download(self, array: Any) -> np.ndarray:
        """An ``xp`` array on the host."""

    def bind_thread(self) -> None:
        """Make the calling thread work on the operations' device; every thread that calls them does so first."""

    def on_target(self, calibration: DarkCalibration) -> Any:
        """The dark calibration's arrays on ``xp``, made once per run for :meth:`calibrate_window`."""

    def calibrate_window(self, window: Any, origin: tuple[int, int], dark: Any) -> Any:
        """Subtract the dark offset and repair the hot pixels of a raw window; returns the window (float32
        with a dark offset, else as given)."""

    def debayer_bilinear(self, mosaic: Any, pattern: str, origin: tuple[int, int] = (0, 0)) -> Any:
        """(3, H, W) float32 bilinear debayer of a band whose pixel (0, 0) is at ``origin`` in the frame."""

    def debayer_mhc(self, mosaic: Any, pattern: str, origin: tuple[int, int] = (0, 0)) -> Any:
        """(3, H, W) float32 Malvar-He-Cutler debayer of a band at ``origin``."""

    def debayer_superpixel(self, mosaic: Any, pattern: str) -> Any:
        """(3, H / 2, W / 2) float32 superpixel debayer."""

    def warp_affine(self, image: Any, matrix: np.ndarray, out_shape: tuple[int, int], *, out: Arrays | None = None,
                    **options: Any) -> Arrays:
        """Resample an image (or band) into an output tile, bilinear or bicubic."""

    def warp_bayer_planes(self, mosaic: Any, pattern: str, matrix: np.ndarray, out_shape: tuple[int, int], *,
                          out: Arrays | None = None, **options: Any) -> Arrays:
        """Resample a mosaic as its four Bayer planes, re-interleaved (a CFA tile)."""

    def warp_lattice(self, mosaic: Any, pattern: str, matrix: np.ndarray, out_shape: tuple[int, int], *,
                     out: Arrays | None = None, **options: Any) -> Arrays:
        """RGB straight from each colour's CFA lattice (no separate demosaic)."""

    def warp_lattice_chroma(self, mosaic: Any, pattern: str, matrix: np.ndarray, out_shape: tuple[int, int], *,
                            out: Arrays | None = None, **options: Any) -> Arrays:
        """RGB from the CFA lattices with red and blue resampled as colour differences from green."""

    def normalise(self, data: Any, offset: np.ndarray, scale: np.ndarray, pattern: str | None = None,
                  origin: tuple[int, int] = (0, 0)) -> None:
        """``data = data * scale + offset`` in place, per channel of (C, h, w) RGB data, or per CFA colour of a
        (1, h, w) mosaic tile at ``origin`` when ``pattern`` is given."""

    def clip_into(self, stack: Any, valid: Any, weights: Any, frame_weights: np.ndarray | None,
                  settings: ClipSettings, mean: Any, coverage: Any, rejected: Any,
                  executor: Executor | None = None) -> None:
        """Sigma-clip a tile seen as (N, C, L) and write its (C, L) mean, (1 or C, L) coverage and (C, L)
        rejected counts in place (all on ``xp``)."""
