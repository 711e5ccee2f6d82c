"""The stage operations on the CUDA C kernels, for either target.

:class:`KernelOps` wraps the kernels of ``kernels/*.cu`` with the semantics of the NumPy reference functions
(:mod:`dwarf3gpu.fitsio`, :mod:`dwarf3gpu.debayer`, :mod:`dwarf3gpu.stars`, :mod:`dwarf3gpu.warp`,
:mod:`dwarf3gpu.stack`): it validates the inputs, converts them, allocates the outputs, computes the launch
geometry and the typed scalar arguments, launches, and checks what the kernels report. It only needs an array
module ``xp`` and a ``launch(name, grid, block, *args)`` callable, so the CPU build (NumPy arrays,
:func:`dwarf3gpu.backends.native.native_ops`) and a CuPy backend (CuPy arrays, NVRTC module) share it.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Executor
from typing import Any, Callable, Sequence

import numpy as np

from ..debayer import bayer_offsets
from ..register import invert_transform
from ..stack import (
    CHUNK_SAMPLES,
    ClipResult,
    _check_frame_weights,
    _clip_into,
    _ClipSettings,
    _count_dtype,
    _fcl_shape,
    _frames_channels_pixels,
    _settings,
)
from ..stars import BAYER_PATTERNS
from ..warp import (LATTICE_LOBES, WARP_METHODS, _check_method, _frame_size, lanczos_table, lattice_layout,
                    plane_transform)
from .kernels import BLOCK_1D, grid_1d, grid_2d

__all__ = ["KernelOps", "pattern_code", "MOMENT_SEGMENT", "HISTOGRAM_SEGMENT"]

MOMENT_SEGMENT = 1 << 14
"""Values per thread of the moments reduction (the host adds the per-segment partials in order)."""

HISTOGRAM_SEGMENT = 1 << 16
"""Values per thread of the histogram reduction (each thread owns one row of counts)."""

_MONO = -1
_INT32_MAX = 2**31 - 1

Launch = Callable[..., None]


def pattern_code(pattern: str | None) -> int:
    """Kernel code of a Bayer pattern: its index in ("RGGB", "GRBG", "GBRG", "BGGR"); -1 for None (mono).

    Raises
    ------
    ValueError
        Unknown pattern.
    """
    if pattern is None:
        return _MONO
    bayer_offsets(pattern)  # validates the name
    return BAYER_PATTERNS.index(str(pattern).strip().upper())


def _i32(value: int, what: str) -> np.int32:
    """``value`` as numpy.int32, or ValueError when it does not fit."""
    value = int(value)
    if not -_INT32_MAX - 1 <= value <= _INT32_MAX:
        raise ValueError(f"{what} = {value} does not fit the kernels' 32-bit int (tile the work)")
    return np.int32(value)


class KernelOps:
    """Per-pixel stage operations running the CUDA C kernels.

    Parameters
    ----------
    launch : callable
        ``launch(name, grid, block, *args)``: runs a kernel, checking its arguments against the C signature.
    xp : module
        Array module of the target (``numpy`` or ``cupy``); inputs are converted with ``xp.asarray``.
    clip_max_frames : int
        ``D3_CLIP_MAX_FRAMES`` of the kernel build: most frames of a median or MAD clip.
    """

    def __init__(self, launch: Launch, xp: Any, clip_max_frames: int):
        self._launch = launch
        self.xp = xp
        self.clip_max_frames = int(clip_max_frames)
        self._scratch = threading.local()

    # ------------------------------------------------------------------------------------------ helpers

    def _f32(self, array: Any) -> Any:
        """C-contiguous float32 copy or view of ``array`` on the target."""
        return self.xp.ascontiguousarray(self.xp.asarray(array), dtype=self.xp.float32)

    def _mosaic(self, mosaic: Any) -> Any:
        """2-D float32 mosaic (uint16 values are exact), or ValueError."""
        data = self._f32(mosaic)
        if data.ndim != 2:
            raise ValueError(f"expected a 2-D raw mosaic, got an array of shape {data.shape}")
        return data

    def _host(self, array: Any) -> np.ndarray:
        """``array`` as a NumPy array on the host."""
        return self.xp.asnumpy(array) if hasattr(self.xp, "asnumpy") else np.asarray(array)

    def _dummy(self, dtype: Any) -> Any:
        """One-element array for a pointer argument the kernel does not read."""
        return self.xp.zeros(1, dtype)

    # ------------------------------------------------------------------------------------------- decode

    def decode(self, stored: Any, dark: Any = None, flat: Any = None, shape: Sequence[int] | None = None) -> Any:
        """Decode 16-bit ``BZERO = 32768`` FITS data to float32, optionally ``(value - dark) / flat``.

        Same values as :func:`dwarf3gpu.fitsio.read_fits` (exact), then the calibration in float32.

        Parameters
        ----------
        stored : array
            The data unit as read from the file: a big-endian 16-bit NumPy array (``>i2`` or ``>u2``), or its
            raw bytes as a uint8 array (then give ``shape``).
        dark, flat : array, optional
            float32 (or convertible) arrays of the image's shape: subtracted, then divided by.
        shape : sequence of int, optional
            Image shape when ``stored`` is raw bytes.

        Returns
        -------
        array
            float32 image.

        Raises
        ------
        ValueError
            Native-order or non-16-bit input, or mismatched sizes.
        """
        xp = self.xp
        if isinstance(stored, np.ndarray) and stored.dtype.kind in "iu" and stored.dtype.itemsize == 2:
            if stored.dtype.byteorder != ">":
                raise ValueError(f"expected the stored big-endian words (dtype >i2 or >u2), got {stored.dtype}: "
                                 "native-order data is already decoded")
            shape = stored.shape
            raw = xp.asarray(np.ascontiguousarray(stored).view(np.uint8))
        else:
            raw = xp.ascontiguousarray(xp.asarray(stored))
            if raw.dtype != xp.uint8 or shape is None:
                raise ValueError("stored must be a big-endian 16-bit array or raw uint8 bytes with a shape")
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        if raw.size != 2 * n:
            raise ValueError(f"{raw.size} bytes do not hold a 16-bit image of shape {shape}")
        out = xp.empty(shape, xp.float32)
        calibration = []
        for name, frame in (("dark", dark), ("flat", flat)):
            if frame is None:
                calibration += [self._dummy(xp.float32), np.int32(0)]
                continue
            frame = self._f32(frame)
            if frame.shape != shape:
                raise ValueError(f"the {name} has shape {frame.shape}, the image {shape}")
            calibration += [frame, np.int32(1)]
        if n:
            grid, block = grid_1d(n)
            self._launch("d3_decode_bzero16", grid, block, raw, _i32(n, "pixels"), *calibration, out)
        return out

    # ------------------------------------------------------------------------------------------ debayer

    def debayer_bilinear(self, mosaic: Any, pattern: str, origin: tuple[int, int] = (0, 0)) -> Any:
        """Bilinear debayer by normalised convolution; see :func:`dwarf3gpu.debayer.debayer_bilinear`.

        Returns
        -------
        array
            (3, H, W) float32, R, G, B; bit-identical to the reference.
        """
        data = self._mosaic(mosaic)
        code = pattern_code(pattern)
        h, w = data.shape
        out = self.xp.empty((3, h, w), self.xp.float32)
        if h and w:
            grid, block = grid_2d(h, w)
            self._launch("d3_debayer_bilinear", grid, block, data, _i32(h, "rows"), _i32(w, "columns"),
                         _i32(origin[0], "origin row"), _i32(origin[1], "origin column"), np.int32(code), out)
        return out

    def _half_resolution(self, kernel: str, mosaic: Any, code: int, shape: tuple[int, ...]) -> Any:
        """Run a 2x2-cell kernel on a mosaic; ``shape`` is the output shape before the (h / 2, w / 2) axes."""
        data = self._mosaic(mosaic)
        h, w = data.shape
        out = self.xp.empty(shape + (h // 2, w // 2), self.xp.float32)
        if h // 2 and w // 2:
            grid, block = grid_2d(h // 2, w // 2)
            self._launch(kernel, grid, block, data, _i32(h, "rows"), _i32(w, "columns"), np.int32(code), out)
        return out

    def debayer_superpixel(self, mosaic: Any, pattern: str) -> Any:
        """One RGB pixel per 2x2 cell; see :func:`dwarf3gpu.debayer.debayer_superpixel`.

        Returns
        -------
        array
            (3, H // 2, W // 2) float32; bit-identical to the reference.
        """
        return self._half_resolution("d3_debayer_superpixel", mosaic, pattern_code(pattern), (3,))

    def luminance_proxy(self, mosaic: Any, bayer_pattern: str | None) -> Any:
        """Mean of the two greens per 2x2 cell (mean of four for mono); see :func:`dwarf3gpu.stars.luminance_proxy`.

        Returns
        -------
        array
            (H // 2, W // 2) float32; bit-identical to the reference.
        """
        return self._half_resolution("d3_luminance_proxy", mosaic, pattern_code(bayer_pattern), ())

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
                    src_size: tuple[int, int] | None = None) -> tuple[Any, Any, Any]:
        """Resample a frame (or a band of it) into a reference tile; see :func:`dwarf3gpu.warp.warp_affine`.

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
        _check_method(method)
        if not feather_px >= 0.0:
            raise ValueError(f"feather_px must be >= 0, got {feather_px}")
        data = self._f32(image)
        if data.ndim not in (2, 3):
            raise ValueError(f"expected an (H, W) or (C, H, W) image, got shape {data.shape}")
        planes = data if data.ndim == 3 else data[None]
        channels, band_h, band_w = planes.shape
        src_origin = (int(src_origin[0]), int(src_origin[1]))
        frame_h, frame_w = _frame_size((band_h, band_w), src_origin, src_size)
        rows, cols = int(out_shape[0]), int(out_shape[1])
        out, valid, weight = self._warp_buffers((channels, rows, cols), rows, cols)
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
                          feather_px: float = 0.0) -> tuple[Any, Any, Any]:
        """Warp a mosaic as its four Bayer planes; see :func:`dwarf3gpu.warp.warp_bayer_planes`.

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
        _check_method(method)
        pattern_code(pattern)
        if not feather_px >= 0.0:
            raise ValueError(f"feather_px must be >= 0, got {feather_px}")
        data = self._mosaic(mosaic)
        src_origin = (int(src_origin[0]), int(src_origin[1]))
        frame_h, frame_w = _frame_size(data.shape, src_origin, src_size)
        rows, cols = int(out_shape[0]), int(out_shape[1])
        out, valid, weight = self._warp_buffers((rows, cols), rows, cols)
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
        tables = getattr(self, "_lattice_tables", None)
        if tables is None:
            tables = tuple(self.xp.asarray(lanczos_table(LATTICE_LOBES[key])) for key in ("RB", "G"))
            self._lattice_tables = tables
        return tables

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
        frame_h, frame_w = _frame_size(data.shape, src_origin, src_size)
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
                self._launch("d3_lattice_planes_u16" if data.dtype == xp.uint16 else "d3_lattice_planes", grid, block,
                             data, _i32(data.shape[0], "band rows"),
                             _i32(data.shape[1], "band columns"), _i32(src_origin[0], "src row"),
                             _i32(src_origin[1], "src column"), np.int32(code), red, blue, green)
            grid, block = grid_2d(rows, cols)
            table_rb, table_g = self._lanczos_tables()
            inverse = xp.asarray(invert_transform(A).ravel())
            self._launch("d3_warp_lattice", grid, block, red, blue, green, _i32(data.shape[0], "band rows"),
                         _i32(data.shape[1], "band columns"), _i32(src_origin[0], "src row"),
                         _i32(src_origin[1], "src column"), _i32(frame_h, "frame rows"), _i32(frame_w, "frame columns"),
                         np.int32(code), inverse, table_rb, table_g, _i32(rows, "rows"), _i32(cols, "columns"),
                         _i32(out_origin[0], "out row"), _i32(out_origin[1], "out column"), np.float64(feather_px),
                         out, valid, weight)
        checked = self._finish_warp(valid, "warp_lattice")
        return tuple(given) if given is not None else (out, checked, weight)

    # ------------------------------------------------------------------------------------------ stacking

    def _per_sample(self, other: Any, name: str, stack_shape: tuple[int, ...], dtype: Any) -> tuple[Any, int]:
        """``valid`` or ``weights`` as a contiguous (N, C or 1, L) array of ``dtype`` and its channel count.

        The accepted shapes are the reference's (:func:`dwarf3gpu.stack.sigma_clip_mask_aware`): its own shape
        check runs on zero-stride stand-ins, so no memory is touched.
        """
        xp = self.xp
        other = xp.asarray(other)
        probe = _frames_channels_pixels(np.broadcast_to(np.float32(0), stack_shape), name,
                                        np.broadcast_to(False, other.shape))
        if name == "valid":
            if other.dtype != xp.bool_:
                raise ValueError(f"valid must be a bool array, got dtype {other.dtype}")
            return xp.ascontiguousarray(other).reshape(probe.shape).view(xp.uint8), probe.shape[1]
        other = xp.ascontiguousarray(other, dtype=dtype).reshape(probe.shape)
        if not bool(xp.isfinite(other).all()):
            raise ValueError("weights must be finite (use 0 for samples that must not count)")
        return other, probe.shape[1]

    def _launch_clip(self, cfg: _ClipSettings, data: Any, flags: Any, valid_channels: int, w: Any,
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

    def _check_clip_frames(self, cfg: _ClipSettings, n: int) -> None:
        """ValueError when a median/MAD clip has more frames than the kernel's per-thread arrays hold."""
        if (cfg.median or cfg.mad_std) and n > self.clip_max_frames:
            raise ValueError(f"the kernel's median/MAD clipping takes at most {self.clip_max_frames} frames per tile, "
                             f"got {n}; use cenfunc='mean', stdfunc='std' or fewer frames")

    def sigma_clip(self, stack: Any, valid: Any = None, weights: Any = None, frame_weights: Any = None, *,
                   sigma: float = 3.0, sigma_lower: float | None = None, sigma_upper: float | None = None,
                   maxiters: int | None = 5, cenfunc: str = "median", stdfunc: str = "std") -> ClipResult:
        """Mask- and weight-aware sigma clipping over axis 0, then the weighted mean of the kept samples.

        Semantics, options and outputs of :func:`dwarf3gpu.stack.sigma_clip_mask_aware`, with two limits:
        ``weights`` are used as float32, and a ``median`` centre or ``mad_std`` spread allows at most
        ``clip_max_frames`` frames (the kernel sorts each pixel's samples in fixed-size per-thread arrays).
        Clip decisions (coverage, kept set, rejected counts) equal the reference's; with a ``std`` spread the
        bounds after the first differ from the reference's by float64 rounding (sums taken in another order),
        which only a sample within about 1e-15 relative of a bound could notice. Means agree to float32 rounding
        (the weighted mean is the reference's float64 value; without weights the sum may run in sorted order).

        Returns
        -------
        ClipResult
            ``mean`` float32, ``coverage`` and ``rejected`` (int16, int32 beyond 32767 frames), each of
            shape ``stack.shape[1:]``.

        Raises
        ------
        ValueError
            As the reference, and for more than ``clip_max_frames`` frames with a median or MAD.
        """
        xp = self.xp
        cfg = _settings(sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc)
        stack = xp.asarray(stack)
        if stack.ndim < 1 or stack.shape[0] < 1:
            raise ValueError(f"stack must have at least one frame along axis 0, got shape {stack.shape}")
        if stack.dtype.kind not in "fiu":
            raise ValueError(f"stack must be a real numeric array, got dtype {stack.dtype}")
        n, channels, pixels = _fcl_shape(stack.shape)
        self._check_clip_frames(cfg, n)
        fw = _check_frame_weights(frame_weights, n)
        data = xp.ascontiguousarray(stack, dtype=xp.float32).reshape(n, channels, pixels)
        flags, valid_channels = (self._dummy(xp.uint8), 0) if valid is None else self._per_sample(
            valid, "valid", stack.shape, xp.uint8)
        w, weight_channels = (self._dummy(xp.float32), 0) if weights is None else self._per_sample(
            weights, "weights", stack.shape, xp.float32)
        frame_w = self._dummy(xp.float64) if fw is None else xp.asarray(fw)
        out_shape = stack.shape[1:]
        mean = xp.empty(out_shape, xp.float32)
        coverage = xp.empty(out_shape, xp.int32)
        rejected = xp.empty(out_shape, xp.int32)
        if channels * pixels:
            self._launch_clip(cfg, data, flags, valid_channels, w, weight_channels, frame_w, fw is not None, n,
                              channels, pixels, (pixels, pixels, pixels), mean, coverage, rejected)
        counts = _count_dtype(n)
        return ClipResult(mean, coverage.astype(counts), rejected.astype(counts))

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

    def clip_into(self, stack: np.ndarray, valid: np.ndarray | None, weights: np.ndarray | None,
                  frame_weights: np.ndarray | None, cfg: _ClipSettings, mean: np.ndarray | None,
                  coverage: np.ndarray | None, rejected: np.ndarray | None, bounds: tuple | None = None,
                  executor: Executor | None = None) -> None:
        """The clipping step of :func:`dwarf3gpu.stack.stack_tiles` on the kernel (its ``clip`` argument).

        Same signature and outputs as the reference step ``stack._clip_into``: clip host arrays seen as (N, C, L)
        -- ``stack`` float32, ``valid`` bool (N, 1 or C, L) or None, ``weights`` (N, 1 or C, L) or None,
        ``frame_weights`` (N,) float64 or None, ``cfg`` from ``stack._settings`` -- and write the NumPy arrays
        ``mean`` (C, L) float32, ``coverage`` (1 or C, L; with one row, channel 0's count) and ``rejected``
        (C, L) in place (views welcome). On the CPU target the inputs are read where they are when their pixels
        are contiguous and their planes equally spaced (the tile buffers of ``stack_tiles``: the first L pixels
        of each plane), otherwise copied once (:meth:`_planes`). The pixels run in chunks of about
        ``stack.CHUNK_SAMPLES / C`` whose float32/int32 kernel outputs are copied into ``mean``, ``coverage``
        and ``rejected``, so the extra memory is a few MiB. Every pixel's result depends only on its own
        samples, so the output does not depend on the chunking or the thread count.

        Where the kernel cannot, the reference step runs instead: bounds requested (``bounds`` not None), an
        output not wanted (None), or a median/MAD clip of more than ``clip_max_frames`` frames. ``executor`` is
        only used by that fallback; the kernel runs on its own threads (OpenMP on the CPU target, the GPU on CUDA).

        Raises
        ------
        ValueError
            Non-finite weights or a non-bool ``valid``, as the reference.
        """
        n, channels, pixels = stack.shape
        if (bounds is not None or mean is None or coverage is None or rejected is None
                or ((cfg.median or cfg.mad_std) and n > self.clip_max_frames)):
            host = [None if a is None else self._host(a) for a in (stack, valid, weights)]  # device tiles come back
            _clip_into(*host, frame_weights, cfg, mean, coverage, rejected, bounds, executor)
            return
        if not channels * pixels:
            return
        xp = self.xp
        fw = _check_frame_weights(frame_weights, n)
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
            mean[:, p0:p1] = self._host(cm).reshape(channels, m)
            coverage[:, p0:p1] = self._host(cc).reshape(channels, m)[: coverage.shape[0]]
            rejected[:, p0:p1] = self._host(cr).reshape(channels, m)

    # ---------------------------------------------------------------------------------------- statistics

    def _segments(self, values: Any, segment: int) -> tuple[Any, int, int]:
        """Flat float32 data, its size and the number of segments."""
        flat = self._f32(values).ravel()
        n = int(flat.size)
        return flat, n, (n + segment - 1) // segment

    def moments(self, values: Any, shift: float = 0.0) -> tuple[int, float, float]:
        """Count, mean and population standard deviation of the finite values, deterministic.

        Each kernel thread sums one segment of :data:`MOMENT_SEGMENT` values in float64 around ``shift`` (choose
        it near the mean to avoid cancellation); the host adds the partial sums exactly (``math.fsum``).

        Returns
        -------
        count, mean, std : int, float, float
            NaN mean and std without finite values.
        """
        xp = self.xp
        flat, n, segments = self._segments(values, MOMENT_SEGMENT)
        if not segments:
            return 0, math.nan, math.nan
        count = xp.empty(segments, xp.int32)
        s1 = xp.empty(segments, xp.float64)
        s2 = xp.empty(segments, xp.float64)
        grid, block = grid_1d(segments)
        self._launch("d3_segment_moments", grid, block, flat, _i32(n, "values"), np.int32(MOMENT_SEGMENT),
                     np.float64(shift), count, s1, s2)
        total = int(self._host(count).sum())
        if total == 0:
            return 0, math.nan, math.nan
        mean_offset = math.fsum(self._host(s1).tolist()) / total
        variance = math.fsum(self._host(s2).tolist()) / total - mean_offset * mean_offset
        return total, shift + mean_offset, math.sqrt(max(variance, 0.0))

    def histogram(self, values: Any, bins: int, value_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of the values in uniform bins, deterministic; the counts of :func:`numpy.histogram`
        with ``range=(numpy.float64(lo), numpy.float64(hi))``.

        Each kernel thread counts one segment of :data:`HISTOGRAM_SEGMENT` values into its own row; the host
        adds the rows.

        Returns
        -------
        counts : numpy.ndarray
            int64 (bins,), on the host.
        edges : numpy.ndarray
            float64 (bins + 1,), ``numpy.linspace(lo, hi, bins + 1)``.
        """
        xp = self.xp
        lo, hi = float(value_range[0]), float(value_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or int(bins) < 1:
            raise ValueError(f"need bins >= 1 and a finite range lo < hi, got {bins} bins over {value_range}")
        edges = np.linspace(lo, hi, int(bins) + 1)
        flat, n, segments = self._segments(values, HISTOGRAM_SEGMENT)
        if not segments:
            return np.zeros(int(bins), np.int64), edges
        counts = xp.empty((segments, int(bins)), xp.int32)
        grid, block = grid_1d(segments)
        self._launch("d3_segment_histogram", grid, block, flat, _i32(n, "values"), np.int32(HISTOGRAM_SEGMENT),
                     xp.asarray(edges), _i32(bins, "bins"), counts)
        return self._host(counts.sum(axis=0, dtype=xp.int64)), edges
