"""The stage operations on the kernels of ``kernels/*.cu``, for any launch target.

:class:`KernelStageOps` implements :class:`~dwarf3gpu.backends.base.StageOps` with the semantics of the NumPy
reference (:class:`~dwarf3gpu.backends.reference.ReferenceStageOps`: :mod:`dwarf3gpu.debayer`,
:mod:`dwarf3gpu.warp`, :mod:`dwarf3gpu.calibrate`, :mod:`dwarf3gpu.clip`): it validates the inputs, converts
them on the target's array module, allocates or checks the outputs, computes the launch geometry and the typed
scalar arguments, launches, and checks what the kernels report. It needs only a launch target (``xp`` and
``launch``), so the CPU build (NumPy arrays) and CUDA (CuPy arrays) run the same code and the same kernel sources.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..calibrate import DarkCalibration
from ..clip import CHUNK_SAMPLES, ClipSettings, check_frame_weights, clip_into
from ..geometry import invert_transform, pattern_code, plane_transform
from ..normalise import apply_normalisation
from ..warp import LATTICE_LOBES, WARP_METHODS, check_method, frame_size, lanczos_table, lattice_layout
from .base import Arrays, LaunchTarget
from .kernel_source import BLOCK_1D, grid_1d, grid_2d

__all__ = ["KernelStageOps", "DarkOnTarget"]

_INT32_MAX = 2**31 - 1


def _i32(value: int, what: str) -> np.int32:
    """``value`` as numpy.int32, or ValueError when it does not fit."""
    value = int(value)
    if not -_INT32_MAX - 1 <= value <= _INT32_MAX:
        raise ValueError(f"{what} = {value} does not fit the kernels' 32-bit int (tile the work)")
    return np.int32(value)


@dataclass(frozen=True)
class DarkOnTarget:
    """A dark calibration's arrays on a launch target (uploaded once per run).

    Attributes
    ----------
    offset : array or None
        (H, W) float32 dark offset on the target.
    hot : array
        (H, W) uint8 hot-pixel map on the target.
    hot_rows, hot_cols : array
        int32 frame positions of the hot pixels on the target, sorted by row.
    rows_on_host : numpy.ndarray
        The same rows on the host, for the binary search of a window's range.
    """

    offset: Any
    hot: Any
    hot_rows: Any
    hot_cols: Any
    rows_on_host: np.ndarray


class KernelStageOps:
    """Per-pixel stage operations running the kernels on a launch target.

    Parameters
    ----------
    target : LaunchTarget
        The CPU build (:class:`~dwarf3gpu.backends.cpu_build.CpuBuildTarget`) or CUDA
        (:class:`~dwarf3gpu.backends.cuda.CudaTarget`).
    fallback_reason : str, optional
        Why ``auto`` did not pick CUDA (recorded in the manifest and shown to the user).
    """

    def __init__(self, target: LaunchTarget, fallback_reason: str = ""):
        self.target = target
        self.name = target.name
        self.xp = target.xp
        self.implementation = f"{target.name} kernels"
        self.fallback_reason = fallback_reason
        self._launch = target.launch
        self._scratch = threading.local()
        self._lattice_tables: tuple[Any, Any] | None = None
        self._tables_lock = threading.Lock()

    def memory_budget(self) -> int:
        """The launch target's default stacking budget."""
        return self.target.memory_budget()

    def describe(self) -> dict[str, Any]:
        """The launch target's description, the implementation and the fallback reason."""
        return {**self.target.describe(), "implementation": self.implementation,
                "fallback_reason": self.fallback_reason}

    # ------------------------------------------------------------------------------------------ helpers

    def upload(self, array: np.ndarray) -> Any:
        """``array`` on the target, C-contiguous (a copy to the device on CUDA)."""
        return self.xp.ascontiguousarray(self.xp.asarray(array))

    def download(self, array: Any) -> np.ndarray:
        """``array`` on the host."""
        return self.target.to_host(array)

    def bind_thread(self) -> None:
        """See :meth:`~dwarf3gpu.backends.base.LaunchTarget.bind_thread`."""
        self.target.bind_thread()

    def _f32(self, array: Any) -> Any:
        """C-contiguous float32 copy or view of ``array`` on the target."""
        return self.xp.ascontiguousarray(self.xp.asarray(array), dtype=self.xp.float32)

    def _mosaic(self, mosaic: Any) -> Any:
        """2-D float32 mosaic (uint16 values are exact), or ValueError."""
        data = self._f32(mosaic)
        if data.ndim != 2:
            raise ValueError(f"expected a 2-D raw mosaic, got an array of shape {data.shape}")
        return data

    def _dummy(self, dtype: Any) -> Any:
        """One-element array for a pointer argument the kernel does not read."""
        return self.xp.zeros(1, dtype)

    # --------------------------------------------------------------------------------- dark calibration

    def on_target(self, calibration: DarkCalibration) -> DarkOnTarget:
        """The dark offset, hot-pixel map and hot-pixel list on the target (one upload per run)."""
        rows, cols = np.nonzero(calibration.hot)
        return DarkOnTarget(
            None if calibration.offset is None else self._f32(calibration.offset),
            self.upload(calibration.hot.view(np.uint8)), self.upload(rows.astype(np.int32)),
            self.upload(cols.astype(np.int32)), rows)

    def calibrate_window(self, window: Any, origin: tuple[int, int], dark: DarkOnTarget) -> Any:
        """Subtract the dark offset and repair the hot pixels of a raw window in place (``d3_repair_hot``); see
        :func:`dwarf3gpu.calibrate.calibrate_window`, bit-identical.

        Parameters
        ----------
        window : array
            (h, w) C-contiguous raw pixels on the target: float32, or uint16 when there is no dark offset.
        origin : tuple of int
            (row0, col0) of the window in the frame.
        dark : DarkOnTarget
            From :meth:`on_target`.

        Returns
        -------
        array
            ``window``.
        """
        r0, c0 = int(origin[0]), int(origin[1])
        h, w = window.shape
        if not window.flags.c_contiguous:
            raise ValueError("the window must be C-contiguous")
        if dark.offset is not None:
            window -= dark.offset[r0:r0 + h, c0:c0 + w]
        first, last = (int(i) for i in np.searchsorted(dark.rows_on_host, [r0, r0 + h]))
        if last > first:
            kernel = "d3_repair_hot_u16" if window.dtype == self.xp.uint16 else "d3_repair_hot"
            if kernel == "d3_repair_hot" and window.dtype != self.xp.float32:
                raise ValueError(f"the window must be float32 or uint16, got {window.dtype}")
            grid, block = grid_1d(last - first)
            self._launch(kernel, grid, block, window, _i32(h, "rows"), _i32(w, "columns"), _i32(r0, "row"),
                         _i32(c0, "column"), dark.hot, _i32(dark.hot.shape[1], "frame columns"), dark.hot_rows,
                         dark.hot_cols, _i32(first, "first"), _i32(last - first, "count"))
        return window

    def normalise(self, data: Any, offset: np.ndarray, scale: np.ndarray, pattern: str | None = None,
                  origin: tuple[int, int] = (0, 0)) -> None:
        """See :func:`dwarf3gpu.normalise.apply_normalisation` (array operations on the target, scalars only)."""
        apply_normalisation(data, offset, scale, pattern, origin)

    # ------------------------------------------------------------------------------------------ debayer

    def _debayer(self, kernel: str, mosaic: Any, pattern: str, origin: tuple[int, int]) -> Any:
        """Run a full-resolution debayer kernel on a band at ``origin``: (3, H, W) float32."""
        data = self._mosaic(mosaic)
        code = pattern_code(pattern)
        h, w = data.shape
        out = self.xp.empty((3, h, w), self.xp.float32)
        if h and w:
            grid, block = grid_2d(h, w)
            self._launch(kernel, grid, block, data, _i32(h, "rows"), _i32(w, "columns"),
                         _i32(origin[0], "origin row"), _i32(origin[1], "origin column"), np.int32(code), out)
        return out

    def debayer_bilinear(self, mosaic: Any, pattern: str, origin: tuple[int, int] = (0, 0)) -> Any:
        """Bilinear debayer by normalised convolution (``d3_debayer_bilinear``); see
        :func:`dwarf3gpu.debayer.debayer_bilinear`, bit-identical: (3, H, W) float32, R, G, B."""
        return self._debayer("d3_debayer_bilinear", mosaic, pattern, origin)

    def debayer_mhc(self, mosaic: Any, pattern: str, origin: tuple[int, int] = (0, 0)) -> Any:
        """Malvar-He-Cutler debayer (``d3_debayer_mhc``); see :func:`dwarf3gpu.debayer.debayer_mhc`,
        bit-identical: (3, H, W) float32, R, G, B."""
        return self._debayer("d3_debayer_mhc", mosaic, pattern, origin)

    def debayer_superpixel(self, mosaic: Any, pattern: str) -> Any:
        """One RGB pixel per 2x2 cell (``d3_debayer_superpixel``); see
        :func:`dwarf3gpu.debayer.debayer_superpixel`, bit-identical: (3, H // 2, W // 2) float32."""
        data = self._mosaic(mosaic)
        h, w = data.shape
        out = self.xp.empty((3, h // 2, w // 2), self.xp.float32)
        if h // 2 and w // 2:
            grid, block = grid_2d(h // 2, w // 2)
            self._launch("d3_debayer_superpixel", grid, block, data, _i32(h, "rows"), _i32(w, "columns"),
                         np.int32(pattern_code(pattern)), out)
        return out

    # --------------------------------------------------------------------------------------------- warp

    def _warp_buffers(self, image_shape: tuple[int, ...], rows: int, cols: int) -> tuple[Any, Any, Any]:
        """Uninitialised outputs of a warp kernel: float32 image, uint8 validity and float32 weight (rows, cols)."""
        xp = self.xp
        return (xp.empty(image_shape, xp.float32), xp.empty((rows, cols), xp.uint8),
                xp.empty((rows, cols), xp.float32))

    def _thread_scratch(self, sizes: Sequence[int]) -> list[Any]:
        """Uninitialised float32 arrays of ``sizes`` elements, owned by the calling thread and reused by its next
        call (one growing buffer: no fresh pages per call). Valid until this thread's next call."""
        total = int(sum(sizes))
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.size < total:
            buffer = self._scratch.buffer = self.xp.empty(total, self.xp.float32)
        parts, start = [], 0
        for size in sizes:
            parts.append(buffer[start:start + size])
            start += size
        return parts

    def _out_buffers(self, out: tuple[Any, Any, Any] | None, image_shape: tuple[int, ...], rows: int,
                     cols: int) -> tuple[Any, Any, Any]:
        """The caller's output arrays (checked; bool ``valid`` is written through a uint8 view) or fresh ones."""
        if out is None:
            return self._warp_buffers(image_shape, rows, cols)
        image, valid, weight = out
        expected = ((image, image_shape, self.xp.float32), (valid, (rows, cols), self.xp.bool_),
                    (weight, (rows, cols), self.xp.float32))
        for array, shape, dtype in expected:
            if tuple(array.shape) != tuple(shape) or array.dtype != dtype or not array.flags.c_contiguous:
                raise ValueError(f"out arrays must be C-contiguous {[(tuple(s), np.dtype(d).name) for _, s, d in expected]}")
        return image, valid.view(self.xp.uint8), weight

    def _finish_warp(self, valid: Any, what: str) -> Any:
        """Raise when a kernel flagged a tap outside the band (2), else the mask as bool."""
        if bool((valid == 2).any()):
            raise ValueError(f"{what}: the source band lacks taps needed by valid output pixels; cut it with "
                             "warp.source_window() and warp.window_margin()")
        return valid.view(self.xp.bool_)

    def warp_affine(self, image: Any, A: Any, out_shape: tuple[int, int], *, out_origin: tuple[int, int] = (0, 0),
                    src_origin: tuple[int, int] = (0, 0), method: str = "bilinear", feather_px: float = 0.0,
                    src_size: tuple[int, int] | None = None, out: Arrays | None = None) -> Arrays:
        """Resample a frame (or a band of it) into a reference tile (``d3_warp_affine``); see
        :func:`dwarf3gpu.warp.warp_affine`. ``out``: ``(warped, valid, weight)`` arrays on the target of the
        returned shapes and types, C-contiguous, to write into (views of a tile buffer).

        Returns
        -------
        warped, valid, weight : array
            float32 (rows, cols) or (C, rows, cols), bool and float32 (rows, cols); bit-identical to the
            reference.

        Raises
        ------
        ValueError
            As the reference: unknown method, negative feather, bad shapes, or a band lacking taps.
        """
        xp = self.xp
        check_method(method)
        if not feather_px >= 0.0:
            raise ValueError(f"feather_px must be >= 0, got {feather_px}")
        data = self._f32(image)
        if data.ndim not in (2, 3):
            raise ValueError(f"expected an (H, W) or (C, H, W) image, got shape {data.shape}")
        planes = data if data.ndim == 3 else data[None]
        channels, band_h, band_w = planes.shape
        src_origin = (int(src_origin[0]), int(src_origin[1]))
        frame_h, frame_w = frame_size((band_h, band_w), src_origin, src_size)
        rows, cols = int(out_shape[0]), int(out_shape[1])
        given = out
        if given is not None and data.ndim == 2:
            given = (given[0].reshape(1, rows, cols),) + tuple(given[1:])
        out, valid, weight = self._out_buffers(given, (channels, rows, cols), rows, cols)
        if rows and cols:
            grid, block = grid_2d(rows, cols)
            inverse = xp.asarray(invert_transform(A).ravel())
            self._launch("d3_warp_affine", grid, block, planes, _i32(channels, "channels"), _i32(band_h, "band rows"),
                         _i32(band_w, "band columns"), _i32(src_origin[0], "src row"), _i32(src_origin[1], "src column"),
                         _i32(frame_h, "frame rows"), _i32(frame_w, "frame columns"), inverse, _i32(rows, "rows"),
                         _i32(cols, "columns"), _i32(out_origin[0], "out row"), _i32(out_origin[1], "out column"),
                         np.int32(WARP_METHODS.index(method)), np.float64(feather_px), out, valid, weight)
        valid = self._finish_warp(valid, "warp_affine")
        return (out if data.ndim == 3 else out[0]), valid, weight

    def warp_bayer_planes(self, mosaic: Any, pattern: str, A: Any, out_shape: tuple[int, int], *,
                          out_origin: tuple[int, int] = (0, 0), src_origin: tuple[int, int] = (0, 0),
                          src_size: tuple[int, int] | None = None, method: str = "bilinear",
                          feather_px: float = 0.0, out: Arrays | None = None) -> Arrays:
        """Warp a mosaic as its four Bayer planes (``d3_warp_bayer_planes``); see
        :func:`dwarf3gpu.warp.warp_bayer_planes`. ``out`` as for :meth:`warp_affine`.

        Returns
        -------
        warped_mosaic, valid, weight : array
            float32, bool and float32 (rows, cols); bit-identical to the reference.

        Raises
        ------
        ValueError
            As the reference.
        """
        xp = self.xp
        check_method(method)
        pattern_code(pattern)
        if not feather_px >= 0.0:
            raise ValueError(f"feather_px must be >= 0, got {feather_px}")
        data = self._mosaic(mosaic)
        src_origin = (int(src_origin[0]), int(src_origin[1]))
        frame_h, frame_w = frame_size(data.shape, src_origin, src_size)
        rows, cols = int(out_shape[0]), int(out_shape[1])
        out, valid, weight = self._out_buffers(out, (rows, cols), rows, cols)
        if rows and cols:
            grid, block = grid_2d(rows, cols)
            sites = [(r, c) for r in (0, 1) for c in (0, 1)]
            inverse = xp.asarray(np.concatenate([invert_transform(plane_transform(A, s)).ravel() for s in sites]))
            self._launch("d3_warp_bayer_planes", grid, block, data, _i32(data.shape[0], "band rows"),
                         _i32(data.shape[1], "band columns"), _i32(src_origin[0], "src row"),
                         _i32(src_origin[1], "src column"), _i32(frame_h, "frame rows"), _i32(frame_w, "frame columns"),
                         inverse, _i32(rows, "rows"), _i32(cols, "columns"), _i32(out_origin[0], "out row"),
                         _i32(out_origin[1], "out column"), np.int32(WARP_METHODS.index(method)), np.float64(feather_px), out, valid,
                         weight)
        return out, self._finish_warp(valid, "warp_bayer_planes"), weight

    def _lanczos_tables(self) -> tuple[Any, Any]:
        """The red/blue and green Lanczos weight tables of :func:`dwarf3gpu.warp.warp_lattice` on the target."""
        with self._tables_lock:  # uploaded once, whichever stacking thread needs them first
            if self._lattice_tables is None:
                self._lattice_tables = tuple(self.xp.asarray(lanczos_table(LATTICE_LOBES[key])) for key in ("RB", "G"))
            return self._lattice_tables

    def warp_lattice(self, mosaic: Any, pattern: str, A: Any, out_shape: tuple[int, int], *,
                     out_origin: tuple[int, int] = (0, 0), src_origin: tuple[int, int] = (0, 0),
                     src_size: tuple[int, int] | None = None, feather_px: float = 0.0,
                     out: tuple[Any, Any, Any] | None = None) -> tuple[Any, Any, Any]:
        """Resample a mosaic straight to RGB, each colour from its own lattice; see
        :func:`dwarf3gpu.warp.warp_lattice`. With ``out`` (write into these arrays, as there: the streaming
        stacking path), the lattice planes live in the calling thread's scratch buffer, so a stacking worker splits
        every frame into the same memory; without, they are fresh arrays.

        Returns
        -------
        rgb, valid, weight : array
            float32 (3, rows, cols), bool and float32 (rows, cols); bit-identical to the reference.

        Raises
        ------
        ValueError
            As the reference.
        """
        return self._warp_lattice(mosaic, pattern, A, out_shape, out_origin, src_origin, src_size, feather_px, out,
                                  False)

    def warp_lattice_chroma(self, mosaic: Any, pattern: str, A: Any, out_shape: tuple[int, int], *,
                            out_origin: tuple[int, int] = (0, 0), src_origin: tuple[int, int] = (0, 0),
                            src_size: tuple[int, int] | None = None, feather_px: float = 0.0,
                            out: tuple[Any, Any, Any] | None = None) -> tuple[Any, Any, Any]:
        """:meth:`warp_lattice` with red and blue resampled as colour differences from green
        (``d3_lattice_chroma_planes``, ``d3_warp_lattice_chroma``); see :func:`dwarf3gpu.warp.warp_lattice_chroma`.
        Same arguments, returns (bit-identical to the reference) and errors."""
        return self._warp_lattice(mosaic, pattern, A, out_shape, out_origin, src_origin, src_size, feather_px, out,
                                  True)

    def _warp_lattice(self, mosaic: Any, pattern: str, A: Any, out_shape: tuple[int, int],
                      out_origin: tuple[int, int], src_origin: tuple[int, int], src_size: tuple[int, int] | None,
                      feather_px: float, out: tuple[Any, Any, Any] | None, chroma: bool) -> tuple[Any, Any, Any]:
        """The lattice warp, plain or chroma (the split and warp kernels differ; everything else is shared)."""
        xp = self.xp
        code = pattern_code(pattern)
        if code < 0:
            raise ValueError("warp_lattice needs a Bayer pattern")
        if not feather_px >= 0.0:
            raise ValueError(f"feather_px must be >= 0, got {feather_px}")
        raw = xp.asarray(mosaic)
        # a uint16 mosaic (the raw frame as read) is split into the planes as it is: no float32 copy first
        data = xp.ascontiguousarray(raw) if raw.dtype == xp.uint16 and raw.ndim == 2 else self._mosaic(raw)
        src_origin = (int(src_origin[0]), int(src_origin[1]))
        frame_h, frame_w = frame_size(data.shape, src_origin, src_size)
        rows, cols = int(out_shape[0]), int(out_shape[1])
        given = out
        out, valid, weight = self._out_buffers(given, (3, rows, cols), rows, cols)
        if rows and cols:
            layout = lattice_layout(data.shape, src_origin, pattern)
            # Uninitialised: the split writes every cell a valid pixel's taps reach (warp.LatticeLayout).
            shapes = [(layout.rows[0], layout.cols[0]), (layout.rows[1], layout.cols[1]), (layout.n_u, layout.n_v)]
            sizes = [math.prod(shape) for shape in shapes]
            parts = self._thread_scratch(sizes) if given is not None else [xp.empty(size, xp.float32) for size in sizes]
            red, blue, green = (part.reshape(shape) for part, shape in zip(parts, shapes))
            if data.size:
                grid, block = grid_2d(*data.shape)
                split = ("d3_lattice_chroma_planes" if chroma else "d3_lattice_planes") + (
                    "_u16" if data.dtype == xp.uint16 else "")
                frame = (_i32(frame_h, "frame rows"), _i32(frame_w, "frame columns")) if chroma else ()
                self._launch(split, grid, block, data, _i32(data.shape[0], "band rows"),
                             _i32(data.shape[1], "band columns"), _i32(src_origin[0], "src row"),
                             _i32(src_origin[1], "src column"), *frame, np.int32(code), red, blue, green)
            grid, block = grid_2d(rows, cols)
            table_rb, table_g = self._lanczos_tables()
            inverse = xp.asarray(invert_transform(A).ravel())
            self._launch("d3_warp_lattice_chroma" if chroma else "d3_warp_lattice", grid, block, red, blue, green, _i32(data.shape[0], "band rows"),
                         _i32(data.shape[1], "band columns"), _i32(src_origin[0], "src row"),
                         _i32(src_origin[1], "src column"), _i32(frame_h, "frame rows"), _i32(frame_w, "frame columns"),
                         np.int32(code), inverse, table_rb, table_g, _i32(rows, "rows"), _i32(cols, "columns"),
                         _i32(out_origin[0], "out row"), _i32(out_origin[1], "out column"), np.float64(feather_px),
                         out, valid, weight)
        checked = self._finish_warp(valid, "warp_lattice_chroma" if chroma else "warp_lattice")
        return tuple(given) if given is not None else (out, checked, weight)

    # ------------------------------------------------------------------------------------------ stacking

    def _launch_clip(self, cfg: ClipSettings, data: Any, flags: Any, valid_channels: int, w: Any,
                     weight_channels: int, frame_w: Any, has_frame_weights: bool, n: int, channels: int, pixels: int,
                     planes: tuple[int, int, int], mean: Any, coverage: Any, rejected: Any) -> None:
        """Launch ``d3_sigma_clip`` over ``channels x pixels`` outputs; ``planes`` are the element strides between
        the (frame, channel) planes of the data, the flags and the weights (see the kernel)."""
        grid, block = grid_1d(channels * pixels)
        self._launch("d3_sigma_clip", grid, block, data, flags, np.int32(valid_channels), w,
                     np.int32(weight_channels), frame_w, np.int32(has_frame_weights), _i32(n, "frames"),
                     _i32(channels, "channels"), _i32(pixels, "pixels"), *(np.int64(p) for p in planes),
                     np.float64(cfg.sigma_lower), np.float64(cfg.sigma_upper), np.int32(cfg.maxiters or 0),
                     np.int32(cfg.median), np.int32(cfg.mad_std), mean, coverage, rejected)

    def _planes(self, array: np.ndarray, dtype: Any) -> tuple[Any, int]:
        """An (N, X, L) host array on the target as a flat C-contiguous carrier and its plane stride (elements).

        On the CPU target a view whose pixels are contiguous and whose N x X planes are equally spaced (e.g. the
        first L pixels of each plane of a larger buffer) is not copied: the carrier is a 1-D view running from
        its first to its last element (``as_strided``), and the kernel steps over the gaps. Anything else is
        made contiguous (a copy), as is every input of a GPU target (the upload).
        """
        xp = self.xp
        n, planes_per_frame, pixels = array.shape
        size = np.dtype(dtype).itemsize
        if xp is np and array.dtype == dtype and min(array.strides, default=0) >= 0 and array.size:
            step0, step1, step2 = array.strides
            plane = step1 if planes_per_frame > 1 else step0
            if n * planes_per_frame == 1:
                plane = pixels * size
            regular = n == 1 or planes_per_frame == 1 or step0 == planes_per_frame * step1
            if step2 == size and plane % size == 0 and plane >= pixels * size and regular:
                plane //= size
                span = (n * planes_per_frame - 1) * plane + pixels
                carrier = np.lib.stride_tricks.as_strided(array, shape=(span,), strides=(size,), writeable=False)
                return carrier, plane
        return xp.ascontiguousarray(xp.asarray(array), dtype=dtype).reshape(-1), pixels

    def clip_into(self, stack: Any, valid: Any, weights: Any, frame_weights: np.ndarray | None,
                  settings: ClipSettings, mean: Any, coverage: Any, rejected: Any,
                  executor: Executor | None = None) -> None:
        """Sigma-clip a tile on the kernel ``d3_sigma_clip``; see :func:`dwarf3gpu.clip.clip_into`.

        Clip arrays on the target seen as (N, C, L) -- ``stack`` float32, ``valid`` bool (N, 1 or C, L) or
        None, ``weights`` (N, 1 or C, L) or None, ``frame_weights`` (N,) float64 or None -- and write ``mean``
        (C, L) float32, ``coverage`` (1 or C, L; with one row, channel 0's count) and ``rejected`` (C, L), arrays
        on the target (views welcome), in place. The clip decisions (coverage, kept set, rejected counts) are the
        reference's; the means agree to float32 rounding. On the CPU target the inputs are read where they are
        when their pixels are contiguous and their planes equally spaced (the tile buffers of
        :func:`dwarf3gpu.tiles.stack_tiles`: the first L pixels of each plane), otherwise copied once
        (:meth:`_planes`). The pixels run in chunks of about ``CHUNK_SAMPLES / C`` whose float32/int32 kernel
        outputs are copied into the outputs, so the extra memory is a few MiB. Every pixel's result depends only on
        its own samples, so the output does not depend on the chunking or the thread count.

        Beyond the target's :meth:`~dwarf3gpu.backends.base.LaunchTarget.clip_kernel_max_frames` the reference
        clips instead (on the host: the tile is downloaded, its results uploaded). ``executor`` is only used by
        that fallback; the kernel runs on its own threads (OpenMP on the CPU, the GPU on CUDA).

        Raises
        ------
        ValueError
            Non-finite weights or a non-bool ``valid``, as the reference.
        """
        n, channels, pixels = stack.shape
        if n > self.target.clip_kernel_max_frames(settings):
            self._clip_on_host(stack, valid, weights, frame_weights, settings, mean, coverage, rejected, executor)
            return
        cfg = settings
        if not channels * pixels:
            return
        xp = self.xp
        fw = check_frame_weights(frame_weights, n)
        data, data_planes = self._planes(stack, np.float32)
        flags, valid_channels, valid_planes = self._dummy(xp.uint8), 0, 0
        if valid is not None:
            if valid.dtype != np.bool_:
                raise ValueError(f"valid must be a bool array, got dtype {valid.dtype}")
            flags, valid_planes = self._planes(valid, np.bool_)
            flags, valid_channels = flags.view(xp.uint8), valid.shape[1]
        w, weight_channels, weight_planes = self._dummy(xp.float32), 0, 0
        if weights is not None:
            w, weight_planes = self._planes(weights, np.float32)
            weight_channels = weights.shape[1]
            # A float64 sum is NaN/inf exactly when a weight is (finite float32 values cannot overflow it), and
            # needs no temporary array.
            if not math.isfinite(float(xp.sum(w if weight_planes == pixels else weights, dtype=xp.float64))):
                raise ValueError("weights must be finite (use 0 for samples that must not count)")
        frame_w = self._dummy(xp.float64) if fw is None else xp.asarray(fw)
        step = max(BLOCK_1D, CHUNK_SAMPLES // channels // BLOCK_1D * BLOCK_1D)
        size = channels * min(step, pixels)
        out_mean = xp.empty(size, xp.float32)
        out_coverage = xp.empty(size, xp.int32)
        out_rejected = xp.empty(size, xp.int32)
        planes = (data_planes, valid_planes, weight_planes)
        for p0 in range(0, pixels, step):
            p1 = min(p0 + step, pixels)
            m = p1 - p0
            # Each input from the chunk's first pixel to the chunk's end in the last plane.
            chunk_data = data[p0:(n * channels - 1) * data_planes + p1]
            chunk_flags = flags[p0:(n * valid_channels - 1) * valid_planes + p1] if valid_channels else flags
            chunk_w = w[p0:(n * weight_channels - 1) * weight_planes + p1] if weight_channels else w
            cm, cc, cr = out_mean[:channels * m], out_coverage[:channels * m], out_rejected[:channels * m]
            self._launch_clip(cfg, chunk_data, chunk_flags, valid_channels, chunk_w, weight_channels, frame_w,
                              fw is not None, n, channels, m, planes, cm, cc, cr)
            mean[:, p0:p1] = cm.reshape(channels, m)
            coverage[:, p0:p1] = cc.reshape(channels, m)[: coverage.shape[0]]
            rejected[:, p0:p1] = cr.reshape(channels, m)

    def _clip_on_host(self, stack: Any, valid: Any, weights: Any, frame_weights: np.ndarray | None,
                      settings: ClipSettings, mean: Any, coverage: Any, rejected: Any,
                      executor: Executor | None) -> None:
        """The reference clip of a tile the kernel does not take (host arrays; results copied to the target)."""
        host = [None if a is None else self.download(a) for a in (stack, valid, weights)]
        outputs = [np.empty(a.shape, a.dtype) for a in (mean, coverage, rejected)]
        clip_into(*host, frame_weights, settings, *outputs, None, executor)
        for target, result in zip((mean, coverage, rejected), outputs):
            target[...] = self.upload(result)
