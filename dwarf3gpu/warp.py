"""Resampling of frames onto the reference grid: affine warps, Bayer-plane warps, the lattice resampler.

NumPy reference of the resampling stage operations, which the kernels of ``kernels/warp.cu`` implement one
thread per output element (see METHODS.md, "Warp"). Every output pixel is a fixed function of its
ABSOLUTE position in the reference grid: its source coordinate is computed in float64 from
the inverse of the frame -> reference affine ``A`` (the project convention,
:mod:`dwarf3gpu.geometry`), so results do not depend on how the output is cut into tiles or
the source into bands. Sample values are float32.

- :func:`warp_affine`: bilinear or bicubic (Keys, a = -0.5) resampling of a frame, a band of
  one, or its channels, into an output tile, with a validity mask and a feather weight.
- :func:`source_window`: the source band an output tile needs.
- :func:`warp_bayer_planes`: a mosaic warped as its four half-resolution Bayer planes and
  re-interleaved, keeping the pattern's phase at the output's absolute position.
- :func:`warp_lattice`: a mosaic resampled straight to RGB, every colour interpolated from its
  own CFA lattice (Lanczos-5 on the green quincunx, Lanczos-3 on red and blue): one
  interpolation instead of a demosaic and a warp (the default of ``--debayer rgb``).
- :func:`warp_lattice_chroma`: the same, but red and blue resampled as colour differences from green
  (``--demosaic chroma``): R and B alias like G, so star cores keep one colour.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .geometry import bayer_offsets, invert_transform, plane_transform

__all__ = [
    "warp_affine",
    "source_window",
    "window_margin",
    "warp_bayer_planes",
    "warp_lattice",
    "warp_lattice_chroma",
    "lanczos_table",
    "lattice_layout",
    "lattice_planes",
    "lattice_chroma_planes",
    "check_method",
    "frame_size",
    "WARP_METHODS",
    "LATTICE_LOBES",
    "LATTICE_MARGIN",
    "CHROMA_REACH",
    "LANCZOS_PHASES",
    "CHUNK_PIXELS",
]

WARP_METHODS = ("bilinear", "bicubic")
"""Interpolation methods of :func:`warp_affine` and :func:`warp_bayer_planes`."""

KEYS_A = -0.5
"""Keys cubic convolution parameter of the bicubic kernel (-0.5: third-order accurate)."""

_TAPS = {"bilinear": (0, 1), "bicubic": (-1, 0, 1, 2)}
"""Tap offsets from ``floor(coordinate)`` along each axis."""

CHUNK_PIXELS = 1 << 15
"""Output pixels per processing chunk (whole rows), to keep temporaries in cache."""


def _empty_outputs(channels: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed (channels, rows, cols) float32 image, (rows, cols) bool validity and float32 weight of a warp."""
    return (np.zeros((channels, rows, cols), np.float32), np.zeros((rows, cols), bool),
            np.zeros((rows, cols), np.float32))


def _source_coordinates(B: np.ndarray, out_shape: tuple[int, int], out_origin: tuple[int, int]):
    """Yield ``(first, last, xs, ys)`` for chunks of output rows ``first:last`` (about ``CHUNK_PIXELS`` pixels):
    the float64 source coordinates of every pixel through the inverse affine ``B``, from its ABSOLUTE reference
    position, in the order the kernels use: ``xs = B00 X + (B01 Y + B02)``, ``ys = B10 X + (B11 Y + B12)``."""
    rows_out, cols_out = out_shape
    cols_abs = np.arange(cols_out, dtype=np.float64) + int(out_origin[1])
    x_of_col, y_of_col = B[0, 0] * cols_abs, B[1, 0] * cols_abs
    step = max(1, CHUNK_PIXELS // max(cols_out, 1))
    for first in range(0, rows_out, step):
        last = min(first + step, rows_out)
        rows_abs = np.arange(first, last, dtype=np.float64) + int(out_origin[0])
        yield (first, last, x_of_col[None, :] + (B[0, 1] * rows_abs + B[0, 2])[:, None],
               y_of_col[None, :] + (B[1, 1] * rows_abs + B[1, 2])[:, None])


def check_method(method: str) -> tuple[int, ...]:
    """Return the tap offsets of ``method`` or raise ValueError."""
    if method not in _TAPS:
        raise ValueError(f"unknown warp method {method!r}: expected one of {', '.join(WARP_METHODS)}")
    return _TAPS[method]


def _weights(t: np.ndarray, method: str) -> list[np.ndarray | None]:
    """Interpolation weights (float32) of the taps for fractional offsets ``t`` in [0, 1].

    Bilinear: ``(1 - t, t)``. Bicubic: Keys' kernel ``W`` at the tap distances
    ``(1 + t, t, 1 - t, 2 - t)`` with ``W(d) = (a + 2)|d|^3 - (a + 3)|d|^2 + 1`` for
    ``|d| <= 1`` and ``a|d|^3 - 5a|d|^2 + 8a|d| - 4a`` for ``1 < |d| < 2``; at ``t = 0`` the
    other taps' weights are exactly zero. The entry of the tap at ``floor`` is None: its
    weight is implicit in :func:`_interpolate`.
    """
    if method == "bilinear":
        return [None, t.astype(np.float32)]
    a = KEYS_A
    w_far = [((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a for d in (1.0 + t, 2.0 - t)]
    d = 1.0 - t
    w_near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    return [w_far[0].astype(np.float32), None, w_near.astype(np.float32), w_far[1].astype(np.float32)]


def _interpolate(
    flat: np.ndarray,
    index: list[list[np.ndarray]],
    wy: list[np.ndarray | None],
    wx: list[np.ndarray | None],
    centre: int,
) -> np.ndarray:
    """Separable interpolation of one channel, written relative to the tap at ``floor``.

    ``index[k][m]`` is the flat index of tap row k, tap column m. Along each axis
    ``v = v_c + sum_{m != c} w_m (v_m - v_c)`` (m in tap order), with ``v_c`` the value at the
    ``floor`` tap: that is ``sum_m w_m v_m`` with ``w_c = 1 - sum_{m != c} w_m``, but exact for
    a uniform image and at integer coordinates (all differences or all other weights are
    zero), which the float32 sum of products is not. Along x first, then along y.
    """
    lines = []
    for row in index:
        at_centre = np.take(flat, row[centre])
        line = at_centre.copy()
        for m, taps in enumerate(row):
            if m != centre:
                term = np.take(flat, taps)
                term -= at_centre
                term *= wx[m]
                line += term
        lines.append(line)
    out = lines[centre].copy()
    for k, line in enumerate(lines):
        if k != centre:
            line -= lines[centre]
            line *= wy[k]
            out += line
    return out


def frame_size(data_shape: tuple[int, int], src_origin: tuple[int, int], src_size) -> tuple[int, int]:
    """Full source frame size; check that the band lies inside it."""
    if src_size is None:
        if src_origin != (0, 0):
            raise ValueError("src_size (the full frame's height, width) is needed when src_origin is not (0, 0)")
        return data_shape
    height, width = int(src_size[0]), int(src_size[1])
    r0, c0 = src_origin
    if r0 < 0 or c0 < 0 or r0 + data_shape[0] > height or c0 + data_shape[1] > width:
        raise ValueError(
            f"source band of shape {data_shape} at (row, col) {src_origin} does not fit in a frame of "
            f"{height} x {width}"
        )
    return height, width


def _check_band(
    coords: np.ndarray, ok: np.ndarray, taps: tuple[int, ...], start: int, length: int, size: int, axis: str
) -> None:
    """Raise ValueError unless the band ``[start, start + length)`` holds every tap needed."""
    low = max(math.floor(float(np.min(coords, where=ok, initial=np.inf))) + taps[0], 0)
    high = min(math.floor(float(np.max(coords, where=ok, initial=-np.inf))) + taps[-1], size - 1)
    if low < start or high > start + length - 1:
        raise ValueError(
            f"source band {axis} [{start}, {start + length}) lacks the taps [{low}, {high + 1}) needed by the "
            "output tile; cut it with source_window()"
        )


def warp_affine(
    image: np.ndarray,
    A: np.ndarray,
    out_shape: tuple[int, int],
    *,
    out_origin: tuple[int, int] = (0, 0),
    src_origin: tuple[int, int] = (0, 0),
    method: str = "bilinear",
    feather_px: float = 0.0,
    src_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample a frame (or a band of it) into a tile of the reference grid.

    Output pixel ``(i, j)`` of the tile is reference pixel ``(X, Y) = (out_origin[1] + j,
    out_origin[0] + i)``; its source coordinate is, in float64 with ``B = A^-1``,
    ``xs = B00 X + (B01 Y + B02)``, ``ys = B10 X + (B11 Y + B12)`` (full-frame source pixels),
    so the result depends only on the absolute position, never on the tiling. The image is
    sampled at ``(xs - src_origin[1], ys - src_origin[0])``: bilinear (2 x 2 taps) or bicubic
    (Keys, a = -0.5, 4 x 4 taps), in float32, exact at integer coordinates and on uniform
    images.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) or (C, H, W) source, float32 (other dtypes are converted); the whole frame or a
        band of it.
    A : numpy.ndarray
        (2, 3) affine, full-frame source pixel -> reference pixel.
    out_shape : tuple of int
        (rows, cols) of the output tile.
    out_origin : tuple of int, optional
        (row, col) of the tile's top-left pixel in the reference grid.
    src_origin : tuple of int, optional
        (row, col) of ``image``'s top-left pixel in the full source frame.
    method : {'bilinear', 'bicubic'}, optional
        Interpolation.
    feather_px : float, optional
        Width of the edge taper of ``weight`` in source pixels; 0 for none.
    src_size : tuple of int, optional
        (height, width) of the full source frame; None when ``image`` is the whole frame.

    Returns
    -------
    warped : numpy.ndarray
        float32, (rows, cols) or (C, rows, cols); 0 where not valid.
    valid : numpy.ndarray
        bool (rows, cols): every tap with a non-zero weight lies inside the source frame,
        i.e. ``0 <= xs <= W - 1`` (bilinear) or ``1 <= xs <= W - 2`` (bicubic), and the
        same for ``ys``.
    weight : numpy.ndarray
        float32 (rows, cols): ``clip(d / feather_px, 0, 1)`` with ``d = min(xs + 0.5,
        W - 0.5 - xs, ys + 0.5, H - 0.5 - ys)`` the distance to the frame edge in source
        pixels; 1 when ``feather_px`` is 0; 0 where not valid.

    Raises
    ------
    ValueError
        If the method is unknown, ``feather_px`` is negative, the image is not 2-D or 3-D,
        the band does not fit in the frame, or the band lacks taps that a valid output pixel
        needs (cut bands with :func:`source_window`).
    """
    taps = check_method(method)
    if not feather_px >= 0.0:
        raise ValueError(f"feather_px must be >= 0, got {feather_px}")
    data = np.asarray(image).astype(np.float32, copy=False)
    if data.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (C, H, W) image, got shape {data.shape}")
    planes = data if data.ndim == 3 else data[None]
    src_origin = (int(src_origin[0]), int(src_origin[1]))
    n_ch, band_h, band_w = planes.shape
    height, width = frame_size((band_h, band_w), src_origin, src_size)
    rows_out, cols_out = int(out_shape[0]), int(out_shape[1])
    B = invert_transform(A)
    flat = np.ascontiguousarray(planes).reshape(n_ch, -1)
    centre = taps.index(0)
    low, high_x, high_y = -taps[0], width - taps[-1], height - taps[-1]

    warped, valid, weight = _empty_outputs(n_ch, rows_out, cols_out)
    for first, last, xs, ys in _source_coordinates(B, (rows_out, cols_out), out_origin):
        ok = (xs >= low) & (xs <= high_x) & (ys >= low) & (ys <= high_y)
        if not ok.any():
            continue
        _check_band(xs, ok, taps, src_origin[1], band_w, width, "columns")
        _check_band(ys, ok, taps, src_origin[0], band_h, height, "rows")
        fx, fy = np.floor(xs), np.floor(ys)
        wx, wy = _weights(xs - fx, method), _weights(ys - fy, method)
        ix = fx.astype(np.intp) - src_origin[1]
        iy = fy.astype(np.intp) - src_origin[0]
        col_index = [np.clip(ix + t, 0, band_w - 1) for t in taps]
        index = [[np.clip(iy + t, 0, band_h - 1) * band_w + cols for cols in col_index] for t in taps]
        for channel in range(n_ch):
            values = _interpolate(flat[channel], index, wy, wx, centre)
            np.copyto(warped[channel, first:last], values, where=ok)
        valid[first:last] = ok
        if feather_px > 0.0:
            edge = np.minimum(np.minimum(xs + 0.5, (width - 0.5) - xs), np.minimum(ys + 0.5, (height - 0.5) - ys))
            taper = np.clip(edge / feather_px, 0.0, 1.0).astype(np.float32)
            np.copyto(weight[first:last], taper, where=ok)
        else:
            weight[first:last] = ok
    return (warped if data.ndim == 3 else warped[0]), valid, weight


def window_margin(method: str, bayer_planes: bool = False) -> int:
    """Margin for :func:`source_window` that covers every tap of a warp.

    Parameters
    ----------
    method : {'bilinear', 'bicubic'}
        Interpolation of the warp.
    bayer_planes : bool, optional
        True for :func:`warp_bayer_planes`, whose taps are two full-resolution pixels apart.

    Returns
    -------
    int
        0 (bilinear) or 1 (bicubic) for :func:`warp_affine`; 3 or 5 for the Bayer planes
        (``2 (taps - 1)`` from the plane spacing, plus 1 for the rounding of the plane
        coordinates).

    Raises
    ------
    ValueError
        If the method is unknown.
    """
    taps = check_method(method)
    reach = max(-taps[0], taps[-1] - 1)
    return 2 * reach + 3 if bayer_planes else reach


def source_window(
    A: np.ndarray,
    out_shape: tuple[int, int],
    out_origin: tuple[int, int],
    src_size: tuple[int, int],
    margin: int,
) -> tuple[int, int, int, int]:
    """Return the source band an output tile needs.

    The four corner pixels of the tile are mapped to the source with the same float64
    arithmetic as :func:`warp_affine` (each coordinate is monotonic in X and Y, so the corners
    bound every pixel exactly); the band spans ``floor(min) - margin`` to ``floor(max) + 1 +
    margin`` in each axis (margin 0 covers the bilinear taps, see :func:`window_margin`),
    clipped to the frame, with ``row0`` and ``col0`` rounded down to even so that a band of a
    mosaic keeps the Bayer phase.

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine, source pixel -> reference pixel.
    out_shape : tuple of int
        (rows, cols) of the output tile (at least 1 x 1).
    out_origin : tuple of int
        (row, col) of the tile's top-left pixel in the reference grid.
    src_size : tuple of int
        (height, width) of the full source frame.
    margin : int
        Extra source pixels on each side.

    Returns
    -------
    (int, int, int, int)
        ``(row0, row1, col0, col1)``, half-open: the band is ``frame[row0:row1, col0:col1]``
        (empty when the tile maps outside the frame).
    """
    B = invert_transform(A)
    rows = np.array([out_origin[0], out_origin[0] + out_shape[0] - 1], dtype=np.float64)
    cols = np.array([out_origin[1], out_origin[1] + out_shape[1] - 1], dtype=np.float64)
    xs = (B[0, 0] * cols)[None, :] + (B[0, 1] * rows + B[0, 2])[:, None]
    ys = (B[1, 0] * cols)[None, :] + (B[1, 1] * rows + B[1, 2])[:, None]

    def span(coords: np.ndarray, size: int) -> tuple[int, int]:
        start = min(max(math.floor(float(coords.min())) - margin, 0), size)
        stop = min(max(math.floor(float(coords.max())) + 2 + margin, 0), size)
        start -= start % 2
        return start, max(stop, start)

    row0, row1 = span(ys, int(src_size[0]))
    col0, col1 = span(xs, int(src_size[1]))
    return row0, row1, col0, col1






def warp_bayer_planes(
    mosaic: np.ndarray,
    pattern: str,
    A: np.ndarray,
    out_shape: tuple[int, int],
    *,
    out_origin: tuple[int, int] = (0, 0),
    src_origin: tuple[int, int] = (0, 0),
    src_size: tuple[int, int] | None = None,
    method: str = "bilinear",
    feather_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp a raw mosaic as its four Bayer planes and re-interleave them into a mosaic.

    Each site ``(r, c)`` of the 2x2 cell (R, the two G, B) forms a half-resolution plane; it
    is warped with :func:`warp_affine` using :func:`plane_transform` and fills the output
    pixels whose ABSOLUTE reference position has parity ``(r, c)``. The output is therefore
    a mosaic with the same pattern phase as the frame, every value interpolated only from
    samples of its own colour (and of its own green lattice).

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw frame or band of one (uint16 or float).
    pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'}
        Bayer pattern of the frame (and of the output mosaic).
    A : numpy.ndarray
        (2, 3) affine, full-resolution frame pixel -> reference pixel.
    out_shape : tuple of int
        (rows, cols) of the output tile, full resolution.
    out_origin : tuple of int, optional
        (row, col) of the tile in the reference grid.
    src_origin : tuple of int, optional
        (row, col) of ``mosaic[0, 0]`` in the frame (any parity).
    src_size : tuple of int, optional
        (height, width) of the full frame; None when ``mosaic`` is the whole frame.
    method : {'bilinear', 'bicubic'}, optional
        Interpolation within each plane.
    feather_px : float, optional
        Edge taper in full-resolution pixels (applied as ``feather_px / 2`` plane pixels,
        the distance to each plane's own frame edge).

    Returns
    -------
    warped_mosaic : numpy.ndarray
        float32 (rows, cols); 0 where not valid.
    valid : numpy.ndarray
        bool (rows, cols), from each pixel's own plane (see :func:`warp_affine`).
    weight : numpy.ndarray
        float32 (rows, cols) feather weight, 0 where not valid.

    Raises
    ------
    ValueError
        If the pattern or method is unknown, the mosaic is not 2-D, or the band lacks taps
        (cut it with :func:`source_window` and ``window_margin(method, bayer_planes=True)``).
    """
    data = np.asarray(mosaic).astype(np.float32, copy=False)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D raw mosaic, got shape {data.shape}")
    offsets = bayer_offsets(pattern)
    src_origin = (int(src_origin[0]), int(src_origin[1]))
    out_origin = (int(out_origin[0]), int(out_origin[1]))
    height, width = frame_size(data.shape, src_origin, src_size)
    rows_out, cols_out = int(out_shape[0]), int(out_shape[1])
    warped = np.zeros((rows_out, cols_out), np.float32)
    valid = np.zeros((rows_out, cols_out), bool)
    weight = np.zeros((rows_out, cols_out), np.float32)
    for site in offsets["R"] + offsets["G"] + offsets["B"]:
        r, c = site
        in_r, in_c = (r - src_origin[0]) % 2, (c - src_origin[1]) % 2
        out_r, out_c = (r - out_origin[0]) % 2, (c - out_origin[1]) % 2
        plane_out = (len(range(out_r, rows_out, 2)), len(range(out_c, cols_out, 2)))
        if plane_out[0] == 0 or plane_out[1] == 0:
            continue
        result = warp_affine(
            data[in_r::2, in_c::2],
            plane_transform(A, site),
            plane_out,
            out_origin=((out_origin[0] + out_r - r) // 2, (out_origin[1] + out_c - c) // 2),
            src_origin=((src_origin[0] + in_r - r) // 2, (src_origin[1] + in_c - c) // 2),
            method=method,
            feather_px=feather_px / 2.0,
            src_size=((height - r + 1) // 2, (width - c + 1) // 2),
        )
        for target, plane in zip((warped, valid, weight), result):
            target[out_r::2, out_c::2] = plane
    return warped, valid, weight


# ------------------------------------------------------------------------------------------ lattice warp

LANCZOS_PHASES = 1024
"""Sub-sample phases of the Lanczos weight tables: lattice coordinates are rounded to 1 / LANCZOS_PHASES of a
lattice step (at most 0.0007 pixel on the green lattice, 0.001 pixel on the red/blue ones)."""

LATTICE_LOBES = {"G": 5, "RB": 3}
"""Lanczos lobes ``n`` of :func:`warp_lattice`: Lanczos-5 on the green quincunx (step sqrt(2) pixels), Lanczos-3 on
the red and blue lattices (step 2 pixels); the kernels reach about 7 and 6 pixels along the lattice axes."""

LATTICE_MARGIN = 11
"""Margin for :func:`source_window` that covers every tap of :func:`warp_lattice` (the green kernel's corners
lie up to 10 pixels from the source point along the frame axes, plus 1 for the phase rounding)."""


def lanczos_table(lobes: int, phases: int = LANCZOS_PHASES) -> np.ndarray:
    """Normalised Lanczos weights for every sub-sample phase: float32 (phases, 2 lobes).

    Row ``p`` holds the weights of the taps ``k = -(lobes - 1) .. lobes`` for a point at ``base + p / phases``:
    ``L(k - t)`` with ``L(d) = sinc(d) sinc(d / lobes)`` (``sinc(x) = sin(pi x) / (pi x)``), ``t = p / phases``,
    divided by their sum (float64), then rounded to float32. Row 0 is exactly 1 on the tap ``k = 0`` and 0
    elsewhere. The table is computed once on the host and handed to the kernels, so no platform's ``sin`` enters
    a resampled value.
    """
    taps = np.arange(-(lobes - 1), lobes + 1, dtype=np.float64)
    t = np.arange(phases, dtype=np.float64)[:, None] / phases
    d = taps[None, :] - t
    w = np.sinc(d) * np.sinc(d / lobes)
    w /= w.sum(axis=1, keepdims=True)
    w[0] = taps == 0
    return w.astype(np.float32)


_LANCZOS_TABLES: dict[int, np.ndarray] = {}


def _lanczos(lobes: int) -> np.ndarray:
    """Cached :func:`lanczos_table` (read-only)."""
    table = _LANCZOS_TABLES.get(lobes)
    if table is None:
        table = lanczos_table(lobes)
        table.flags.writeable = False
        _LANCZOS_TABLES[lobes] = table
    return table


def _quantise(coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(base, phase)`` of lattice coordinates rounded to 1 / LANCZOS_PHASES: ``q = floor(coord P + 0.5)``,
    ``base = floor(q / P)``, ``phase = q - base P`` (float64, then int64)."""
    q = np.floor(coord * float(LANCZOS_PHASES) + 0.5).astype(np.int64)
    base = q // LANCZOS_PHASES
    return base, q - base * LANCZOS_PHASES


class LatticeLayout(NamedTuple):
    """Where the colour lattices of a mosaic band lie in their dense planes (:func:`lattice_planes`).

    Red (``s = 0``) and blue (``s = 1``): plane row ``i``, column ``j`` is band pixel
    ``(row_off[s] + 2 i, col_off[s] + 2 j)``, lattice point ``(iy0[s] + i, jx0[s] + j)`` (the frame pixel
    ``(2 (iy0 + i) + site_r, 2 (jx0 + j) + site_c)``); the plane is ``rows[s] x cols[s]``. Green: an
    ``n_u x n_v`` plane whose row ``a``, column ``b`` is lattice point ``(U, V) = (u_lo + a, v_lo + b)``, the
    frame pixel ``(U - V, U + V + g)`` (row, column), 0 where that pixel is outside the band.
    """

    sites: tuple[tuple[int, int], tuple[int, int]]
    row_off: tuple[int, int]
    col_off: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    iy0: tuple[int, int]
    jx0: tuple[int, int]
    g: int
    u_lo: int
    v_lo: int
    n_u: int
    n_v: int


def lattice_layout(band_shape: tuple[int, int], src_origin: tuple[int, int], pattern: str) -> LatticeLayout:
    """The :class:`LatticeLayout` of a ``band_shape`` mosaic band at ``src_origin`` (row, col) of a frame with
    Bayer ``pattern`` (the kernels' ``d3_make_lattice_layout``)."""
    offsets = bayer_offsets(pattern)
    band_h, band_w = int(band_shape[0]), int(band_shape[1])
    r0, c0 = int(src_origin[0]), int(src_origin[1])
    sites = (offsets["R"][0], offsets["B"][0])
    row_off = tuple((r - r0) % 2 for r, _ in sites)
    col_off = tuple((c - c0) % 2 for _, c in sites)
    rows = tuple((band_h - o + 1) // 2 if band_h > o else 0 for o in row_off)
    cols = tuple((band_w - o + 1) // 2 if band_w > o else 0 for o in col_off)
    iy0 = tuple((r0 + o - r) // 2 for o, (r, _) in zip(row_off, sites))
    jx0 = tuple((c0 + o - c) // 2 for o, (_, c) in zip(col_off, sites))
    g = (sites[0][0] + sites[0][1] + 1) % 2
    x1, y1 = c0 + band_w - 1, r0 + band_h - 1
    u_lo, v_lo = (c0 + r0 - g) // 2, (c0 - y1 - g) // 2
    return LatticeLayout(sites, row_off, col_off, rows, cols, iy0, jx0, g, u_lo, v_lo,
                         (x1 + y1 - g) // 2 - u_lo + 1, (x1 - r0 - g) // 2 - v_lo + 1)


def lattice_planes(mosaic: np.ndarray, src_origin: tuple[int, int], pattern: str) -> tuple[np.ndarray, ...]:
    """Split a mosaic band into its red, blue and green lattice planes, float32, laid out as
    :func:`lattice_layout` says (the kernel ``d3_lattice_planes``): every lattice's taps along its inner axis
    become contiguous."""
    data = np.asarray(mosaic, dtype=np.float32)
    L = lattice_layout(data.shape, src_origin, pattern)
    red, blue = (np.ascontiguousarray(data[ro::2, co::2]) for ro, co in zip(L.row_off, L.col_off))
    green = np.zeros((L.n_u, L.n_v), np.float32)
    y, x = np.indices(data.shape)
    Y, X = y + int(src_origin[0]), x + int(src_origin[1])
    is_green = (X + Y) % 2 == L.g
    green[(X[is_green] + Y[is_green] - L.g) // 2 - L.u_lo, (X[is_green] - Y[is_green] - L.g) // 2 - L.v_lo] = data[is_green]
    return red, blue, green


CHROMA_REACH = 2
"""Pixels beyond a red or blue lattice tap that :func:`lattice_chroma_planes` reads (the green estimate's 5 x 5
cross)."""


def _reflect(k: np.ndarray, n: int) -> np.ndarray:
    """Frame index ``k`` reflected about the edge pixels into ``[0, n - 1]`` (``-1 -> 1``, ``n -> n - 2``: the
    Bayer colour is kept)."""
    k = np.where(k < 0, -k, k)
    return np.where(k > n - 1, 2 * (n - 1) - k, k)


def lattice_chroma_planes(mosaic: np.ndarray, src_origin: tuple[int, int], pattern: str,
                          frame_size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """The lattice planes of :func:`lattice_planes` with red and blue replaced by the colour differences ``R - G``
    and ``B - G`` at their sites (the kernel ``d3_lattice_chroma_planes``).

    ``G`` at a red or blue site is the Malvar-He-Cutler green estimate from the 5 x 5 cross around it (centre
    ``C``, green neighbours ``N S W E`` at 1 pixel, same-colour ``NN SS WW EE`` at 2 pixels), float32 in this
    order: ``G = ((N + S) + (W + E)) 0.25 + (((C + C) + (C + C)) - ((NN + SS) + (WW + EE))) 0.125``, then
    ``C - G``; uniform colours give exactly ``G``. Neighbours beyond the frame are reflected about its edge pixels
    (the colour is kept); those inside the frame but outside the band are clamped to the band: no valid pixel of
    :func:`warp_lattice_chroma` uses such an entry (its band check covers :data:`CHROMA_REACH`).
    """
    data = np.asarray(mosaic, dtype=np.float32)
    L = lattice_layout(data.shape, src_origin, pattern)
    red, blue, green = lattice_planes(data, src_origin, pattern)
    band_h, band_w = data.shape
    r0, c0 = int(src_origin[0]), int(src_origin[1])
    height, width = int(frame_size[0]), int(frame_size[1])
    planes = []
    for s, plane in enumerate((red, blue)):
        rows = np.arange(plane.shape[0]) * 2 + L.row_off[s] + r0
        cols = np.arange(plane.shape[1]) * 2 + L.col_off[s] + c0

        def at(dy: int, dx: int) -> np.ndarray:
            iy = np.clip(_reflect(rows + dy, height) - r0, 0, band_h - 1)
            ix = np.clip(_reflect(cols + dx, width) - c0, 0, band_w - 1)
            return data[iy[:, None], ix[None, :]]

        centre = plane
        green4 = (at(-1, 0) + at(1, 0)) + (at(0, -1) + at(0, 1))
        laplace = ((centre + centre) + (centre + centre)) - ((at(-2, 0) + at(2, 0)) + (at(0, -2) + at(0, 2)))
        estimate = green4 * np.float32(0.25) + laplace * np.float32(0.125)
        planes.append(np.ascontiguousarray(centre - estimate, dtype=np.float32))
    return planes[0], planes[1], green


def _lattice_sum(plane: np.ndarray, first: np.ndarray, outer: int, w_inner: np.ndarray,
                 w_outer: np.ndarray) -> np.ndarray:
    """Separable interpolation over the taps ``x[k][m] = plane[first + k outer + m]`` of a flat lattice plane
    (inner taps contiguous), relative to the centre tap ``c = n / 2 - 1`` so that a uniform input comes out
    exactly: along the outer axis first, ``acc[m] = x[c][m] + sum_{k != c} w_outer[k] (x[k][m] - x[c][m])``, then
    ``acc[c] + sum_{m != c} w_inner[m] (acc[m] - acc[c])``, in order, float32 with every operation rounded (the
    kernels' ``d3_lattice_sum``)."""
    n = w_inner.shape[1]
    c = n // 2 - 1
    centre = [np.take(plane, first + c * outer + m) for m in range(n)]
    acc = [x.copy() for x in centre]
    for k in range(n):
        if k != c:
            row = first + k * outer
            for m in range(n):
                term = np.take(plane, row + m)
                term -= centre[m]
                term *= w_outer[:, k]
                acc[m] += term
    out = acc[c].copy()
    for m in range(n):
        if m != c:
            term = acc[m] - acc[c]
            term *= w_inner[:, m]
            out += term
    return out


def warp_lattice(
    mosaic: np.ndarray,
    pattern: str,
    A: np.ndarray,
    out_shape: tuple[int, int],
    *,
    out_origin: tuple[int, int] = (0, 0),
    src_origin: tuple[int, int] = (0, 0),
    src_size: tuple[int, int] | None = None,
    feather_px: float = 0.0,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample a raw mosaic straight to RGB on the reference grid: every colour from its own CFA lattice.

    One interpolation per output value, no separate demosaic. The source point of output pixel ``(X, Y)`` is
    ``(xs, ys)`` as in :func:`warp_affine`; each colour is interpolated there from its own samples only, with a
    separable Lanczos kernel in the coordinates of its lattice (weights from :func:`lanczos_table`, the lattice
    coordinate rounded to 1 / :data:`LANCZOS_PHASES` of a step):

    - R (site ``(rr, rc)``) and B: the lattice ``(2 j + c, 2 i + r)``, coordinates ``((xs - c) / 2, (ys - r) / 2)``,
      Lanczos-3 (:data:`LATTICE_LOBES`);
    - G: the quincunx of the sites with ``(x + y) % 2 == g``, rotated 45 degrees: ``u = (xs + ys - g) / 2``,
      ``v = (xs - ys - g) / 2`` (lattice point ``(U, V)`` is pixel ``(U + V + g, U - V)``), Lanczos-5.

    The band is first split into three dense planes (:func:`lattice_planes`), so that each lattice's taps along
    x (R, B) or v (G) are contiguous; the separable sum runs along the outer axis first (:func:`_lattice_sum`).

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw frame or a band of one (uint16 or float).
    pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'}
        Bayer pattern of the frame.
    A : numpy.ndarray
        (2, 3) affine, full-frame source pixel -> reference pixel.
    out_shape : tuple of int
        (rows, cols) of the output tile.
    out_origin : tuple of int, optional
        (row, col) of the tile in the reference grid.
    src_origin : tuple of int, optional
        (row, col) of ``mosaic[0, 0]`` in the frame (any parity).
    src_size : tuple of int, optional
        (height, width) of the full frame; None when ``mosaic`` is the whole frame.
    feather_px : float, optional
        Edge taper of ``weight`` in source pixels, as in :func:`warp_affine`.
    out : tuple of numpy.ndarray, optional
        ``(rgb, valid, weight)`` arrays of the returned shapes and types to write into (and return), e.g. views
        of a stacking buffer.

    Returns
    -------
    rgb : numpy.ndarray
        float32 (3, rows, cols), R, G, B; 0 where not valid.
    valid : numpy.ndarray
        bool (rows, cols): every tap of all three kernels lies inside the source frame.
    weight : numpy.ndarray
        float32 (rows, cols), the feather weight of :func:`warp_affine`; 0 where not valid.

    Raises
    ------
    ValueError
        If the pattern is unknown, ``feather_px`` is negative, the mosaic is not 2-D, the band does not fit in
        the frame, or the band lacks taps a valid pixel needs (cut it with :func:`source_window` and
        :data:`LATTICE_MARGIN`).
    """
    return _warp_lattice(mosaic, pattern, A, out_shape, out_origin, src_origin, src_size, feather_px, out, False)


def warp_lattice_chroma(
    mosaic: np.ndarray,
    pattern: str,
    A: np.ndarray,
    out_shape: tuple[int, int],
    *,
    out_origin: tuple[int, int] = (0, 0),
    src_origin: tuple[int, int] = (0, 0),
    src_size: tuple[int, int] | None = None,
    feather_px: float = 0.0,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`warp_lattice` with red and blue resampled as colour differences from green (``--demosaic chroma``).

    G is resampled from its quincunx exactly as in :func:`warp_lattice`. The red and blue lattice samples are
    replaced by ``R - G`` and ``B - G``, with G at those sites the Malvar-He-Cutler estimate of
    :func:`lattice_chroma_planes`; these differences are resampled from the red and blue lattices with the same
    Lanczos-3 weights, and added to the resampled green: ``R = G' + (R - G)'``, ``B = G' + (B - G)'`` (float32,
    in that order). Colour differences are smooth across a star, so they alias far less than R and B: the
    colours of a star core no longer ring around it.

    Same parameters, returns and errors as :func:`warp_lattice`, and the same valid mask and weight: the green
    estimates reflect about the frame edges, and the band must hold the red and blue taps'
    :data:`CHROMA_REACH`-pixel neighbours as well (within :data:`LATTICE_MARGIN`). A uniform colour comes out
    exactly whenever ``R - G`` and ``B - G`` are exact in float32 (integer values, e.g. raw counts, or channels
    within a factor 2 of each other); otherwise within an ulp of the larger channel.
    """
    return _warp_lattice(mosaic, pattern, A, out_shape, out_origin, src_origin, src_size, feather_px, out, True)


def _warp_lattice(mosaic, pattern, A, out_shape, out_origin, src_origin, src_size, feather_px, out, chroma: bool):
    """:func:`warp_lattice` (``chroma`` False) or :func:`warp_lattice_chroma` (True)."""
    if not feather_px >= 0.0:
        raise ValueError(f"feather_px must be >= 0, got {feather_px}")
    data = np.asarray(mosaic).astype(np.float32, copy=False)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D raw mosaic, got shape {data.shape}")
    src_origin = (int(src_origin[0]), int(src_origin[1]))
    L = lattice_layout(data.shape, src_origin, pattern)
    band_h, band_w = data.shape
    height, width = frame_size(data.shape, src_origin, src_size)
    rows_out, cols_out = int(out_shape[0]), int(out_shape[1])
    B = invert_transform(A)
    split = (lattice_chroma_planes(data, src_origin, pattern, (height, width)) if chroma
             else lattice_planes(data, src_origin, pattern))
    planes_flat = [plane.ravel() for plane in split]
    (rr, rc), (br, bc) = L.sites
    g = L.g
    n_rb, n_g = LATTICE_LOBES["RB"], LATTICE_LOBES["G"]
    table_rb, table_g = _lanczos(n_rb), _lanczos(n_g)

    rgb, valid, weight = _empty_outputs(3, rows_out, cols_out)
    for first, last, xs, ys in _source_coordinates(B, (rows_out, cols_out), out_origin):
        # Red and blue: plane taps base - (n - 1) .. base + n must lie in the plane; pixel = 2 plane + site.
        planes = []
        ok = np.ones(xs.shape, bool)
        for r, c in ((rr, rc), (br, bc)):
            jx, px = _quantise((xs - c) * 0.5)
            iy, py = _quantise((ys - r) * 0.5)
            ok &= (jx >= n_rb - 1) & (jx + n_rb <= (width - c + 1) // 2 - 1)
            ok &= (iy >= n_rb - 1) & (iy + n_rb <= (height - r + 1) // 2 - 1)
            planes.append((r, c, jx, px, iy, py))
        # Green: lattice taps U0 - (n - 1) .. U0 + n, V0 likewise; pixel (U + V + g, U - V), extremes at the corners.
        u0, pu = _quantise(((xs + ys) - g) * 0.5)
        v0, pv = _quantise(((xs - ys) - g) * 0.5)
        reach = 2 * (n_g - 1)
        ok &= (u0 + v0 - reach + g >= 0) & (u0 + v0 + 2 * n_g + g <= width - 1)
        ok &= (u0 - v0 - (2 * n_g - 1) >= 0) & (u0 - v0 + (2 * n_g - 1) <= height - 1)
        if not ok.any():
            continue
        # Every needed pixel must be in the band: the extremes over the valid pixels.
        xg_lo, xg_hi = u0 + v0 - reach + g, u0 + v0 + 2 * n_g + g
        yg_lo, yg_hi = u0 - v0 - (2 * n_g - 1), u0 - v0 + (2 * n_g - 1)
        lows_x, highs_x, lows_y, highs_y = [xg_lo[ok]], [xg_hi[ok]], [yg_lo[ok]], [yg_hi[ok]]
        extra = CHROMA_REACH if chroma else 0  # the green estimates' neighbours, reflected into the frame
        for r, c, jx, _, iy, _ in planes:
            lows_x.append(np.maximum(2 * (jx[ok] - (n_rb - 1)) + c - extra, 0))
            highs_x.append(np.minimum(2 * (jx[ok] + n_rb) + c + extra, width - 1))
            lows_y.append(np.maximum(2 * (iy[ok] - (n_rb - 1)) + r - extra, 0))
            highs_y.append(np.minimum(2 * (iy[ok] + n_rb) + r + extra, height - 1))
        for lows, highs, start, length, axis in ((lows_x, highs_x, src_origin[1], band_w, "columns"),
                                                 (lows_y, highs_y, src_origin[0], band_h, "rows")):
            low, high = min(int(a.min()) for a in lows), max(int(a.max()) for a in highs)
            if low < start or high > start + length - 1:
                raise ValueError(
                    f"source band {axis} [{start}, {start + length}) lacks the taps [{low}, {high + 1}) needed by "
                    "the output tile; cut it with source_window() and LATTICE_MARGIN"
                )
        # G: inner axis v, outer axis u of the green plane; first tap (U0 - n + 1, V0 - n + 1).
        first_tap = (u0[ok] - (n_g - 1) - L.u_lo) * L.n_v + (v0[ok] - (n_g - 1) - L.v_lo)
        green = _lattice_sum(planes_flat[2], first_tap, L.n_v, table_g[pv[ok]], table_g[pu[ok]])
        rgb[1, first:last][ok] = green
        for s, (channel, (_, _, jx, px, iy, py)) in enumerate(zip((0, 2), planes)):
            first_tap = (iy[ok] - (n_rb - 1) - L.iy0[s]) * L.cols[s] + (jx[ok] - (n_rb - 1) - L.jx0[s])
            values = _lattice_sum(planes_flat[s], first_tap, L.cols[s], table_rb[px[ok]], table_rb[py[ok]])
            rgb[channel, first:last][ok] = green + values if chroma else values
        valid[first:last] = ok
        if feather_px > 0.0:
            edge = np.minimum(np.minimum(xs + 0.5, (width - 0.5) - xs), np.minimum(ys + 0.5, (height - 0.5) - ys))
            taper = np.clip(edge / feather_px, 0.0, 1.0).astype(np.float32)
            np.copyto(weight[first:last], taper, where=ok)
        else:
            weight[first:last] = ok
    if out is not None:
        for target, result in zip(out, (rgb, valid, weight)):
            np.copyto(target, result)
        return tuple(out)
    return rgb, valid, weight
