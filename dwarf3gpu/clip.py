"""Pixel rejection: the reference mask- and weight-aware sigma clip and its public settings type.

The clipping follows :func:`astropy.stats.sigma_clip` (same ``cenfunc``/``stdfunc``/bounds/``maxiters``
semantics, checked against it in the tests) but works per output pixel over the frame axis, the way the kernel
``d3_sigma_clip`` does (one thread per output pixel, looping over the frames): each pixel's valid samples are
sorted once, the kept set is then always a contiguous range of that sorted list, and the median, the MAD and the
bound updates are index arithmetic on it. NumPy does the per-pixel work for blocks of pixels at a time ("chunks",
a fixed number of samples, so temporary memory does not grow with the image), optionally in threads. Every
per-pixel result is independent of how the pixels are grouped, so the output is bit-identical for any chunk, tile
or thread count (METHODS.md, "Sigma clipping").

:class:`ClipSettings` (made by :func:`clip_settings`) is what the stage operations and the tile driver pass
around; :func:`clip_into` is the reference clipping step of one tile.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from .resources import for_each, with_threads
from .robust import MAD_TO_STD

__all__ = [
    "ClipResult",
    "ClipSettings",
    "clip_settings",
    "clip_into",
    "sigma_clip_mask_aware",
    "sigma_clip_mask_aware_rgb",
    "clip_bounds",
    "check_frame_weights",
    "count_dtype",
    "per_sample_view",
    "frames_channels_pixels_shape",
    "CENFUNCS",
    "STDFUNCS",
    "CHUNK_SAMPLES",
    "CLIP_BYTES_PER_SAMPLE",
]

CENFUNCS = ("median", "mean")
STDFUNCS = ("std", "mad_std")

_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)

#: Samples (frames x pixels) per chunk of the clipping; bounds the temporaries of one worker.
CHUNK_SAMPLES = 1 << 18

#: Peak temporary bytes per chunk sample of one worker (sorted copy, masks, float64 sums and weights): measured
#: with tracemalloc at 26-28 bytes, 36-38 with weights (tests/test_stack.py checks the bound); the planner
#: counts this.
CLIP_BYTES_PER_SAMPLE = 48


class ClipResult(NamedTuple):
    """Output of the sigma clipping (unpacks as ``mean, coverage, rejected``).

    Attributes
    ----------
    mean : numpy.ndarray
        float32: weighted mean of the kept samples; NaN where no sample is kept (or the kept weights sum to 0).
    coverage : numpy.ndarray
        int16 (int32 beyond 32767 frames): number of valid samples, before clipping.
    rejected : numpy.ndarray
        Same dtype as ``coverage``: number of valid samples the clipping rejected.
    """

    mean: np.ndarray
    coverage: np.ndarray
    rejected: np.ndarray


# ------------------------------------------------------------------------------------------------ clipping


@dataclass(frozen=True)
class ClipSettings:
    """Validated clipping options (make them with :func:`clip_settings`).

    Attributes
    ----------
    sigma_lower, sigma_upper : float
        Bounds below and above the centre, in units of the spread.
    maxiters : int or None
        Most bound computations per pixel; None until nothing changes.
    median : bool
        The centre is the median (else the mean).
    mad_std : bool
        The spread is ``MAD_TO_STD x MAD`` (else the population standard deviation).
    """

    sigma_lower: float
    sigma_upper: float
    maxiters: int | None
    median: bool
    mad_std: bool


def clip_settings(sigma: float = 3.0, sigma_lower: float | None = None, sigma_upper: float | None = None,
                  maxiters: int | None = 5, cenfunc: str = "median", stdfunc: str = "std") -> ClipSettings:
    """Check astropy-style clipping options; ``sigma_lower``/``sigma_upper`` default to ``sigma`` (as astropy).

    Raises
    ------
    ValueError
        Unknown ``cenfunc``/``stdfunc``, a negative or non-finite bound, or ``maxiters`` < 1.
    """
    if cenfunc not in CENFUNCS:
        raise ValueError(f"cenfunc must be one of {CENFUNCS}, got {cenfunc!r}")
    if stdfunc not in STDFUNCS:
        raise ValueError(f"stdfunc must be one of {STDFUNCS}, got {stdfunc!r}")
    lower = float(sigma if sigma_lower is None else sigma_lower)
    upper = float(sigma if sigma_upper is None else sigma_upper)
    for name, value in (("sigma_lower", lower), ("sigma_upper", upper)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if maxiters is not None and (int(maxiters) != maxiters or maxiters < 1):
        raise ValueError(f"maxiters must be an integer >= 1 or None, got {maxiters!r}")
    return ClipSettings(lower, upper, None if maxiters is None else int(maxiters),
                         cenfunc == "median", stdfunc == "mad_std")


def count_dtype(n_frames: int) -> type:
    """int16 while it can hold ``n_frames``, else int32."""
    return np.int16 if n_frames <= np.iinfo(np.int16).max else np.int32


def per_sample_view(stack: np.ndarray, name: str, other: np.ndarray | None) -> np.ndarray | None:
    """View ``other`` (valid or weights) as (N, C or 1, L) to match ``stack`` seen as (N, C, L).

    Accepted shapes for a stack (N, *S): (N, *S) (one value per sample); and for a stack with a channel axis,
    S = (C, *R) with at least three axes (e.g. (C, h, w)), (N, 1, *R) or (N, *R) (one value per frame and
    pixel, shared by the channels).
    """
    if other is None:
        return None
    other = np.asarray(other)
    n, s = stack.shape[0], stack.shape[1:]
    if other.shape == stack.shape:
        return other.reshape(frames_channels_pixels_shape(stack.shape))
    if len(s) >= 3 and other.shape in ((n, 1) + s[1:], (n,) + s[1:]):
        return other.reshape(n, 1, math.prod(s[1:]))
    shared = f", {(n, 1) + s[1:]} or {(n,) + s[1:]}" if len(s) >= 3 else ""
    raise ValueError(f"{name} has shape {other.shape}; for a stack of shape {stack.shape} it must be "
                     f"{stack.shape}{shared}")


def frames_channels_pixels_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(N, C, L) for a stack shape (N, C, *R) (three or more axes after N) or (N, *S) (C = 1)."""
    n, s = shape[0], shape[1:]
    if len(s) >= 3:
        return n, s[0], math.prod(s[1:])
    return n, 1, math.prod(s)


def _flat_view(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A reshaped *view* of ``a`` (raises instead of silently copying, so writes reach ``a``)."""
    view = a.view()
    view.shape = shape
    return view


def _frame_sum(a: np.ndarray) -> np.ndarray:
    """float64 sum over axis 0 of an (N, m) array, adding the frames in order for every pixel.

    ``np.add.reduce`` over the outer axis adds row after row (sequential per pixel) for m >= 2, but a single
    column is summed pairwise; ``cumsum`` is sequential, so a pixel's sum never depends on its chunk.
    """
    if a.shape[1] == 1:
        return np.cumsum(a, axis=0, dtype=np.float64)[-1]
    return np.add.reduce(a, axis=0, dtype=np.float64)


def _float32_bounds(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``lo32 >= lo`` and ``hi32 <= hi`` closest to them, so ``lo <= x <= hi`` iff ``lo32 <= x <= hi32``
    for every float32 ``x`` (float32 comparisons, exact)."""
    with np.errstate(over="ignore", invalid="ignore"):
        lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
        lo32 = np.where(lo32 < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
        hi32 = np.where(hi32 > hi, np.nextafter(hi32, np.float32(-np.inf)), hi32)
    return lo32, hi32


class _Scratch:
    """Work arrays of one thread, reused from chunk to chunk (fresh large arrays cost page faults)."""

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, the same memory on every call with ``name``."""
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


def _count(mask: np.ndarray) -> np.ndarray:
    """Number of True per column of an (N, m) bool array (int32; a uint8 sum is several times faster than
    ``count_nonzero`` along axis 0)."""
    dtype = np.uint16 if mask.shape[0] <= np.iinfo(np.uint16).max else np.uint32
    return np.add.reduce(mask.view(np.uint8), axis=0, dtype=dtype).astype(np.int32)


def _kth_deviation(flat: np.ndarray, base: np.ndarray, a: np.ndarray, b: np.ndarray, centre: np.ndarray,
                   k: np.ndarray) -> np.ndarray:
    """k-th smallest (0-based) ``|X[i] - centre|`` over ``i`` in ``[a, b)`` of each sorted row.

    The k + 1 samples nearest ``centre`` form a window ``[i, i + k]`` of the sorted row, so the answer is
    ``min_i max(centre - X[i], X[i + k] - centre)``; the first term falls and the second rises with ``i``, so the
    minimum sits where they cross, found by binary search: ``i*`` = first ``i`` with ``X[i + k] - centre >=
    centre - X[i]``; the answer is ``min(X[i* + k] - centre, centre - X[i* - 1])`` (terms that exist).
    """
    first, stop = a.copy(), b - k  # windows start in [a, b - k)
    while True:
        open_ = first < stop
        if not open_.any():
            break
        mid = np.where(open_, (first + stop) >> 1, a)
        low = centre - flat[base + mid]
        high = flat[base + mid + k] - centre
        cross = high >= low
        right, left = open_ & ~cross, open_ & cross
        first[right] = mid[right] + 1
        stop[left] = mid[left]
    end = b - k
    high = np.where(first < end, flat[base + np.minimum(first, end - 1) + k] - centre, np.inf)
    low = np.where(first > a, centre - flat[base + np.maximum(first - 1, a)], np.inf)
    return np.minimum(high, low)


def _columns(a: np.ndarray | None, cols: np.ndarray | None) -> np.ndarray | None:
    """``a[:, cols]`` (``a`` itself when ``cols`` or ``a`` is None)."""
    return a if a is None or cols is None else a[:, cols]


def _sorted_rows(x: np.ndarray, xz: np.ndarray, ok: np.ndarray | None, cols: np.ndarray | None,
                 scratch: _Scratch) -> np.ndarray:
    """(m, N) float32: each selected pixel's samples sorted, the invalid ones replaced by the largest float32
    (so the valid ones come first). ``cols`` selects chunk columns (None: all); ``ok`` None: all valid."""
    if ok is None:
        source = _columns(x, cols)
    else:
        ok = _columns(ok, cols)
        invalid = scratch.get("invalid", ok.shape, bool)
        np.logical_not(ok, out=invalid)
        source = scratch.get("padded", ok.shape, np.float32)
        np.multiply(invalid, _FLOAT32_MAX, out=source)
        source += _columns(xz, cols)  # valid: 0 + x; invalid: the largest float32 + 0
    rows = scratch.get("rows", source.shape[::-1], np.float32)
    np.copyto(rows, source.T)
    rows.sort(axis=1)
    return rows


def _frame_moments(xz: np.ndarray, ok: np.ndarray | None, n: np.ndarray,
                   scratch: _Scratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-pass moments of each pixel's valid samples, float64 sums in frame order: the mean, ``s1 = sum(x -
    mean)`` (rounding residue) and ``s2 = sum((x - mean)^2)`` (``xz`` holds 0 at invalid samples; ``ok`` None:
    all valid)."""
    mean = _frame_sum(xz) / n
    dev = scratch.get("dev", xz.shape, np.float64)
    np.subtract(xz, mean, out=dev)
    if ok is not None:
        dev *= ok
    s1 = _frame_sum(dev)
    np.multiply(dev, dev, out=dev)
    return mean, s1, _frame_sum(dev)


def _range_moments(rows: np.ndarray, idx: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass mean and population standard deviation of the samples ``[a, b)`` of the sorted rows ``idx``
    (float64 sums along each row)."""
    sub = rows[idx].astype(np.float64)
    position = np.arange(rows.shape[1])
    inside = (position >= a[:, None]) & (position < b[:, None])
    sub *= inside  # the padding is finite, so it becomes 0
    count = b - a
    mean = np.add.reduce(sub, axis=1) / count
    sub -= mean[:, None]
    sub *= inside
    sub *= sub
    return mean, np.sqrt(np.add.reduce(sub, axis=1) / count)


def _median(flat: np.ndarray, base: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Median of the samples ``[a, b)`` of each sorted row (mean of the two middle ones for an even count)."""
    count = b - a
    return 0.5 * (flat[base + a + count // 2].astype(np.float64) + flat[base + a + (count - 1) // 2])


def _mad_std(flat: np.ndarray, base: np.ndarray, a: np.ndarray, b: np.ndarray, median: np.ndarray) -> np.ndarray:
    """``MAD_TO_STD x`` the median of ``|X - median|`` over the samples ``[a, b)`` of each sorted row."""
    count = b - a
    deviation = _kth_deviation(flat, base, a, b, median, count // 2)
    deviation += _kth_deviation(flat, base, a, b, median, (count - 1) // 2)
    return 0.5 * deviation * MAD_TO_STD


def _shrink(flat: np.ndarray, base: np.ndarray, a: np.ndarray, b: np.ndarray, lo: np.ndarray,
            hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[a, b) ∩ [lo, hi]`` of each sorted row, scanning inwards from both ends (``a == b`` when empty)."""
    a, b = a.copy(), b.copy()
    todo = np.flatnonzero(flat[base + a] < lo)
    while todo.size:
        a[todo] += 1
        todo = todo[a[todo] < b[todo]]
        todo = todo[flat[base[todo] + a[todo]] < lo[todo]]
    todo = np.flatnonzero((a < b) & (flat[base + np.maximum(b - 1, a)] > hi))
    while todo.size:
        b[todo] -= 1
        todo = todo[a[todo] < b[todo]]
        todo = todo[flat[base[todo] + b[todo] - 1] > hi[todo]]
    return a, b


def _grow(flat: np.ndarray, base: np.ndarray, a: np.ndarray, b: np.ndarray, n: np.ndarray, lo: np.ndarray,
          hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Widen ``[a, b)`` of each sorted row outwards over the valid samples within ``[lo, hi]``; from a range
    inside ``valid ∩ [lo, hi]`` this gives exactly that set."""
    a, b = a.copy(), b.copy()
    todo = np.flatnonzero(a > 0)
    todo = todo[flat[base[todo] + a[todo] - 1] >= lo[todo]]
    while todo.size:
        a[todo] -= 1
        todo = todo[a[todo] > 0]
        todo = todo[flat[base[todo] + a[todo] - 1] >= lo[todo]]
    todo = np.flatnonzero(b < n)
    todo = todo[flat[base[todo] + b[todo]] <= hi[todo]]
    while todo.size:
        b[todo] += 1
        todo = todo[b[todo] < n[todo]]
        todo = todo[flat[base[todo] + b[todo]] <= hi[todo]]
    return a, b


def _add_samples(flat: np.ndarray, base: np.ndarray, start: np.ndarray, stop: np.ndarray, sign: float,
                 shift: np.ndarray, s1: np.ndarray, s2: np.ndarray | None) -> None:
    """``s1 += sign * sum(X - shift)`` (and ``s2`` with the squares) over the samples ``[start, stop)`` of each
    sorted row, in index order (in place)."""
    todo = np.flatnonzero(stop > start)
    step = 0
    while todo.size:
        d = flat[base[todo] + start[todo] + step] - shift[todo]
        s1[todo] += sign * d
        if s2 is not None:
            s2[todo] += sign * (d * d)
        step += 1
        todo = todo[stop[todo] - start[todo] > step]


def _near_bounds(flat: np.ndarray, base: np.ndarray, a: np.ndarray, b: np.ndarray, na: np.ndarray,
                 nb: np.ndarray, lo: np.ndarray, hi: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Rows where a sample that the bounds ``[lo, hi]`` just kept or just dropped from ``[a, b)`` (giving
    ``[na, nb)``) lies within ``tol`` of a bound, or nothing is left: decisions the rounding could flip."""
    near = na == nb
    last = base + np.maximum(na, a + 1) - 1
    near |= (na > a) & (lo - flat[last] <= tol)
    near |= (na < nb) & (flat[base + np.minimum(na, nb - 1)] - lo <= tol)
    near |= (na < nb) & (hi - flat[base + np.maximum(nb - 1, na)] <= tol)
    near |= (nb < b) & (flat[base + np.minimum(nb, b - 1)] - hi <= tol)
    return near


class _ChunkClip(NamedTuple):
    """Per-pixel result of the clipping of one chunk (float64 bounds, unweighted mean, kept count)."""

    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    n_kept: np.ndarray


def _clip_chunk(x: np.ndarray, xz: np.ndarray, ok: np.ndarray | None, n_valid: np.ndarray, cfg: ClipSettings,
                scratch: _Scratch) -> _ChunkClip:
    """astropy's iteration for every pixel (column) of a chunk, on each pixel's sorted valid samples.

    Per pixel: compute the bounds from the kept samples, keep those within ``[lo, hi]``, stop when nothing
    changes, nothing is left or ``maxiters`` bounds were computed; the last bounds then decide over *all* valid
    samples (``_sigma_clip_fast``). The kept set is always a range ``[a, b)`` of the sorted valid samples ``X``:
    the median is ``(X[a + c // 2] + X[a + (c - 1) // 2]) / 2`` with ``c = b - a``, the MAD comes from
    :func:`_kth_deviation`, the next range from scanning inwards from the ends (:func:`_shrink`).

    The first bounds use two-pass moments over all valid samples in frame order, computed for every pixel at
    once; only the pixels that lose samples to them ("moved") iterate further, and for ``cenfunc='mean'`` with
    ``stdfunc='std'`` (no order statistic needed) only those are sorted. Later moments come from the sums ``s1 =
    sum(x - m)``, ``s2 = sum((x - m)^2)`` around the first mean ``m``, decreased by the samples that leave:
    ``mean = m + s1 / c``, ``var = s2 / c - (s1 / c)^2``. Where a sample lies within the rounding error of that
    update from a bound (:func:`_near_bounds`), the moments are recomputed two-pass over the range, so a
    decision never rests on accumulated rounding.

    ``x`` (N, p) float32, ``xz`` the same with 0 at invalid samples, ``ok`` (N, p) valid and finite (None when
    every sample is), ``n_valid`` (p,) counts.
    """
    n_frames, p = x.shape
    lo, hi, mean = np.full(p, np.nan), np.full(p, np.nan), np.full(p, np.nan)
    n_kept = np.zeros(p, np.int32)
    pix = np.flatnonzero(n_valid)
    if not pix.size:
        return _ChunkClip(lo, hi, mean, n_kept)
    n = n_valid[pix].astype(np.intp)
    cols = None if pix.size == p else pix
    zero = np.zeros(pix.size, np.intp)
    sort_all = cfg.median or cfg.mad_std
    shift, s1, s2 = _frame_moments(_columns(xz, cols), _columns(ok, cols), n, scratch)
    std = np.sqrt(s2 / n)
    if sort_all:
        rows = _sorted_rows(x, xz, ok, cols, scratch)
        flat, base = rows.reshape(-1), np.arange(pix.size) * n_frames
        if ok is None:  # all N samples valid everywhere: column views instead of gathers
            median = 0.5 * (rows[:, n_frames // 2].astype(np.float64) + rows[:, (n_frames - 1) // 2])
            largest = rows[:, -1]
        else:
            median = _median(flat, base, zero, n)
            largest = flat[base + n - 1]
        if cfg.mad_std:
            std = _mad_std(flat, base, zero, n, median)
    centre = median if cfg.median else shift
    first_lo, first_hi = centre - cfg.sigma_lower * std, centre + cfg.sigma_upper * std
    every = slice(None) if cols is None else pix
    lo[every], hi[every], n_kept[every], mean[every] = first_lo, first_hi, n, shift
    # Pixels whose valid samples all lie within the first bounds are done: all kept (written above).
    if sort_all:
        moved = (rows[:, 0] < first_lo) | (largest > first_hi)
    else:
        lo32, hi32 = _float32_bounds(first_lo, first_hi)
        values = _columns(xz, cols)
        inside = scratch.get("inside", values.shape, bool)
        np.greater_equal(values, lo32, out=inside)
        inside &= values <= hi32
        if ok is not None:
            inside &= _columns(ok, cols)
        moved = _count(inside) != n
    row = np.flatnonzero(moved)
    if not row.size:
        return _ChunkClip(lo, hi, mean, n_kept)
    pix, n, shift, s1, s2 = pix[row], n[row], shift[row], s1[row], s2[row]
    final_lo, final_hi = first_lo[row], first_hi[row]
    if sort_all:
        base = base[row]
    else:
        row = np.arange(row.size)
        rows = _sorted_rows(x, xz, ok, pix, scratch)
        flat, base = rows.reshape(-1), row * n_frames
    a, b = _shrink(flat, base, zero[: pix.size], n, final_lo, final_hi)
    use_sums = not (cfg.median and cfg.mad_std)
    # Rounding bound of the updated sums (s2 is a sum of positive terms at most s2_all; |s1| terms at most
    # sqrt(n s2_all)); each of the at most 2N additions and removals adds at most eps times that.
    eps = np.finfo(np.float64).eps
    err_s2, err_s1 = 4.0 * n_frames * eps * s2, 4.0 * n_frames * eps * np.sqrt(n * s2)
    _add_samples(flat, base, zero[: pix.size], a, -1.0, shift, s1, s2)
    _add_samples(flat, base, b, n, -1.0, shift, s1, s2)
    live = np.flatnonzero(a < b) if cfg.maxiters != 1 else np.zeros(0, np.intp)
    iteration = 1
    while live.size:
        iteration += 1
        lb_, la, lbb = base[live], a[live], b[live]
        count = lbb - la
        if cfg.median or cfg.mad_std:
            median = _median(flat, lb_, la, lbb)
        if use_sums:
            offset = s1[live] / count
            var = np.maximum(s2[live] / count - offset * offset, 0.0)
            sum_std = np.sqrt(var)
        centre = median if cfg.median else shift[live] + offset
        std = _mad_std(flat, lb_, la, lbb, median) if cfg.mad_std else sum_std
        new_lo, new_hi = centre - cfg.sigma_lower * std, centre + cfg.sigma_upper * std
        na, nb = _shrink(flat, lb_, la, lbb, new_lo, new_hi)
        if use_sums:
            # Error bound of these bounds against exact moments of the range, with a factor 2 to spare.
            widest = max(cfg.sigma_lower, cfg.sigma_upper)
            d_mean = err_s1[live] / count + eps * np.abs(centre)
            d_var = err_s2[live] / count + d_mean * (2.0 * np.abs(offset) + d_mean)
            d_var += 4.0 * eps * (s2[live] / count + offset * offset)
            d_std = 0.0 if cfg.mad_std else d_var / (sum_std + np.sqrt(d_var))
            tol = 2.0 * ((0.0 if cfg.median else d_mean) + widest * d_std)
            tol += 4.0 * eps * (np.abs(centre) + widest * std)
            redo = np.flatnonzero(_near_bounds(flat, lb_, la, lbb, na, nb, new_lo, new_hi, tol))
            if redo.size:
                exact_mean, exact_std = _range_moments(rows, row[live[redo]], la[redo], lbb[redo])
                c = median[redo] if cfg.median else exact_mean
                s = std[redo] if cfg.mad_std else exact_std
                new_lo[redo], new_hi[redo] = c - cfg.sigma_lower * s, c + cfg.sigma_upper * s
                na[redo], nb[redo] = _shrink(flat, lb_[redo], la[redo], lbb[redo], new_lo[redo], new_hi[redo])
        ls1, ls2 = s1[live], s2[live]
        _add_samples(flat, lb_, la, na, -1.0, shift[live], ls1, ls2)
        _add_samples(flat, lb_, nb, lbb, -1.0, shift[live], ls1, ls2)
        a[live], b[live], s1[live], s2[live] = na, nb, ls1, ls2
        final_lo[live], final_hi[live] = new_lo, new_hi
        if cfg.maxiters is not None and iteration >= cfg.maxiters:
            break
        live = live[(nb - na != count) & (na < nb)]
    lo[pix], hi[pix] = final_lo, final_hi
    # Final kept set: valid ∩ [lo, hi], found by widening the last range (an empty one placed at #{X < lo}).
    for i in np.flatnonzero(a == b):
        a[i] = b[i] = np.count_nonzero(flat[base[i]:base[i] + n[i]] < final_lo[i])
    fa, fb = _grow(flat, base, a, b, n, final_lo, final_hi)
    _add_samples(flat, base, fa, a, 1.0, shift, s1, None)
    _add_samples(flat, base, b, fb, 1.0, shift, s1, None)
    count = fb - fa
    n_kept[pix] = count
    with np.errstate(invalid="ignore", divide="ignore"):
        mean[pix] = np.where(count > 0, shift + s1 / count, np.nan)
    return _ChunkClip(lo, hi, mean, n_kept)


def _chunk_mean(x: np.ndarray, xz: np.ndarray, ok: np.ndarray | None, lo: np.ndarray, hi: np.ndarray,
                weights: np.ndarray | None, frame_weights: np.ndarray | None,
                scratch: _Scratch) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean (float64, NaN without kept weight) and kept count of each pixel (column) of a chunk."""
    lo32, hi32 = _float32_bounds(lo, hi)
    kept = scratch.get("kept", x.shape, bool)
    above = scratch.get("above", x.shape, bool)
    np.greater_equal(x, lo32, out=kept)
    np.less_equal(x, hi32, out=above)
    kept &= above
    if ok is not None:
        kept &= ok
    n_kept = _count(kept)
    if weights is None and frame_weights is None:
        values = scratch.get("values", x.shape, np.float32)
        np.multiply(xz, kept, out=values)
        num, den = _frame_sum(values), n_kept
    else:
        w = scratch.get("weight", x.shape, np.float64)
        if weights is None:
            np.multiply(kept, frame_weights[:, None], out=w)
        else:
            np.multiply(weights, kept, out=w)
            if frame_weights is not None:
                w *= frame_weights[:, None]
        den = _frame_sum(w)
        w *= xz
        num = _frame_sum(w)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(den > 0, num / den, np.nan)
    return mean, n_kept


def check_frame_weights(frame_weights, n_frames: int) -> np.ndarray | None:
    """(N,) float64 finite, >= 0 frame weights, or None."""
    if frame_weights is None:
        return None
    fw = np.asarray(frame_weights, np.float64)
    if fw.shape != (n_frames,):
        raise ValueError(f"frame_weights must have shape ({n_frames},), got {fw.shape}")
    if not (np.all(np.isfinite(fw)) and np.all(fw >= 0)):
        raise ValueError("frame_weights must be finite and >= 0")
    return fw


def _chunks(n_frames: int, n_pixels: int) -> list[tuple[int, int]]:
    """Pixel ranges of about CHUNK_SAMPLES samples each."""
    step = max(1, CHUNK_SAMPLES // n_frames)
    return [(start, min(start + step, n_pixels)) for start in range(0, n_pixels, step)]


def clip_into(stack: np.ndarray, valid: np.ndarray | None, weights: np.ndarray | None,
               frame_weights: np.ndarray | None, cfg: ClipSettings, mean: np.ndarray | None,
               coverage: np.ndarray | None, rejected: np.ndarray | None, bounds: tuple | None,
               executor: Executor | None) -> None:
    """Clip a stack seen as (N, C, L); write the (C, L) outputs given (``coverage`` may be (1, L) when ``valid``
    is shared by the channels: channel 0 writes it; ``bounds`` is an optional pair of (C, L) float64 arrays)."""
    n_frames, channels, n_pixels = stack.shape
    if valid is not None and valid.dtype != np.bool_:
        raise ValueError(f"valid must be a bool array, got dtype {valid.dtype}")

    scratch_of_thread: dict[int, _Scratch] = {}

    def work(task):
        channel, start, stop = task
        scratch = scratch_of_thread.setdefault(threading.get_ident(), _Scratch())
        x = stack[:, channel, start:stop]
        if x.dtype != np.float32 or x.strides[1] != x.itemsize:
            x = np.ascontiguousarray(x, np.float32)
        ok = scratch.get("ok", x.shape, bool)
        np.isfinite(x, out=ok)
        all_finite = bool(ok.all())
        if valid is not None:
            ok &= valid[:, min(channel, valid.shape[1] - 1), start:stop]
        n_valid = _count(ok)
        if n_valid.min() == n_frames:  # every sample valid: no masking needed
            ok, xz = None, x
        else:  # x with invalid samples set to 0
            xz = scratch.get("xz", x.shape, np.float32)
            if all_finite:
                np.multiply(x, ok, out=xz)
            else:
                np.copyto(xz, 0.0)
                np.copyto(xz, x, where=ok)
        clip = _clip_chunk(x, xz, ok, n_valid, cfg, scratch)
        if bounds is not None:
            bounds[0][channel, start:stop], bounds[1][channel, start:stop] = clip.lo, clip.hi
        if coverage is not None and (coverage.shape[0] > 1 or channel == 0):
            coverage[channel, start:stop] = n_valid
        if mean is None:
            return
        w = None if weights is None else weights[:, min(channel, weights.shape[1] - 1), start:stop]
        if w is None and frame_weights is None:
            mean[channel, start:stop], n_kept = clip.mean, clip.n_kept
        else:
            if w is not None and not np.isfinite(w).all():
                raise ValueError("weights must be finite (use 0 for samples that must not count)")
            mean[channel, start:stop], n_kept = _chunk_mean(x, xz, ok, clip.lo, clip.hi, w, frame_weights, scratch)
        rejected[channel, start:stop] = n_valid - n_kept

    for_each(executor, work, [(c, start, stop) for c in range(channels) for start, stop in _chunks(n_frames, n_pixels)])


def _prepare(stack, valid, weights):
    """Validate and view the inputs as (N, C, L)."""
    stack = np.asarray(stack)
    if stack.ndim < 1 or stack.shape[0] < 1:
        raise ValueError(f"stack must have at least one frame along axis 0, got shape {stack.shape}")
    if stack.dtype.kind not in "fiu":
        raise ValueError(f"stack must be a real numeric array, got dtype {stack.dtype}")
    valid3 = per_sample_view(stack, "valid", valid)
    if valid3 is not None and valid3.dtype != bool:
        raise ValueError(f"valid must be a bool array, got dtype {valid3.dtype}")
    return stack.reshape(frames_channels_pixels_shape(stack.shape)), valid3, per_sample_view(stack, "weights", weights)


def sigma_clip_mask_aware(
    stack: np.ndarray,
    valid: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    frame_weights: Sequence[float] | np.ndarray | None = None,
    *,
    sigma: float = 3.0,
    sigma_lower: float | None = None,
    sigma_upper: float | None = None,
    maxiters: int | None = 5,
    cenfunc: str = "median",
    stdfunc: str = "std",
    workers: int | None = None,
) -> ClipResult:
    """Sigma-clip a stack over its frame axis, honouring a validity mask, then take the weighted mean.

    Rejection follows ``astropy.stats.sigma_clip(masked_stack, axis=0, ...)`` with the same options: per pixel,
    the bounds ``centre - sigma_lower * std`` and ``centre + sigma_upper * std`` are computed from the samples
    kept so far, samples outside them are dropped, until nothing changes, nothing is left or ``maxiters`` bounds
    were computed; the last bounds then decide, over all valid samples, which are kept. ``std`` is the population
    standard deviation (ddof 0) around the mean, ``mad_std`` is ``1.482602218505602 x`` the median absolute
    deviation from the median, and the median of an even count is the mean of the two middle values.

    Parameters
    ----------
    stack : numpy.ndarray
        (N, ...) samples, float32 (other real dtypes are converted chunk by chunk); NaN and +-inf are invalid.
    valid : numpy.ndarray of bool, optional
        True where a sample is valid; only valid samples count. Shape ``stack.shape``, or, for a stack
        (N, C, *R) with a channel axis (at least three axes after N, e.g. (N, C, h, w)), (N, 1, *R) or
        (N, *R): one flag per frame and pixel, shared by the channels. None: every finite sample is valid.
    weights : numpy.ndarray, optional
        Per-sample weights of the mean (e.g. a feather taper), finite and >= 0, any shape ``valid`` accepts.
        They do not enter the rejection.
    frame_weights : array-like, optional
        (N,) per-frame weights of the mean (e.g. inverse noise variance), finite and >= 0. A kept sample's
        weight is ``weights x frame_weights``.
    sigma : float, optional
        Clipping bound in standard deviations, used for whichever of ``sigma_lower``/``sigma_upper`` is None.
    sigma_lower, sigma_upper : float, optional
        Lower and upper bounds in standard deviations (asymmetric clipping).
    maxiters : int or None, optional
        Most bound computations per pixel (>= 1); None iterates until nothing changes.
    cenfunc : {'median', 'mean'}, optional
        Centre of the bounds.
    stdfunc : {'std', 'mad_std'}, optional
        Spread of the bounds.
    workers : int, optional
        Threads for the pixel chunks (None: every core this process may use; 1: the calling thread only).
        The result does not depend on it.

    Returns
    -------
    ClipResult
        ``mean`` float32 of shape ``stack.shape[1:]``: weighted mean of the kept samples, NaN where none is
        kept or their weights sum to 0; ``coverage`` (same shape, int16, int32 beyond 32767 frames): valid
        samples before clipping; ``rejected`` (same shape and dtype): valid samples rejected.

    Raises
    ------
    ValueError
        On an unknown ``cenfunc``/``stdfunc``, a negative or non-finite sigma, ``maxiters < 1``, or shapes that do
        not match.

    Notes
    -----
    Means and standard deviations are accumulated in float64 in frame order; the median, the MAD and every
    comparison are exact, so ``median``/``mad_std`` bounds equal astropy's bit for bit, and ``std`` bounds
    differ from astropy's only by float64 rounding (its sums run in another order). Temporary memory is about
    ``CLIP_BYTES_PER_SAMPLE x CHUNK_SAMPLES`` bytes per worker plus the outputs.
    """
    cfg = clip_settings(sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc)
    stack3, valid3, weights3 = _prepare(stack, valid, weights)
    n_frames, channels, n_pixels = stack3.shape
    fw = check_frame_weights(frame_weights, n_frames)
    out_shape = stack.shape[1:]
    dtype = count_dtype(n_frames)
    mean = np.empty(out_shape, np.float32)
    coverage = np.empty(out_shape, dtype)
    rejected = np.empty(out_shape, dtype)
    flat = (channels, n_pixels)
    with_threads(workers, channels * len(_chunks(n_frames, n_pixels)), lambda pool: clip_into(
        stack3, valid3, weights3, fw, cfg, _flat_view(mean, flat), _flat_view(coverage, flat),
        _flat_view(rejected, flat), None, pool))
    return ClipResult(mean, coverage, rejected)


#: The public name for (N, 3, h, w) RGB stacks; the same function (the channel axis is handled generically).
sigma_clip_mask_aware_rgb = sigma_clip_mask_aware


def clip_bounds(
    stack: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    sigma: float = 3.0,
    sigma_lower: float | None = None,
    sigma_upper: float | None = None,
    maxiters: int | None = 5,
    cenfunc: str = "median",
    stdfunc: str = "std",
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Final clipping bounds of :func:`sigma_clip_mask_aware`, like astropy's ``return_bounds=True``.

    A valid sample ``x`` is kept when ``lower <= x <= upper``. Parameters as for :func:`sigma_clip_mask_aware`.

    Returns
    -------
    lower, upper : numpy.ndarray
        float64, shape ``stack.shape[1:]``; NaN where a pixel has no valid sample.
    """
    cfg = clip_settings(sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc)
    stack3, valid3, _ = _prepare(stack, valid, None)
    n_frames, channels, n_pixels = stack3.shape
    lower, upper = np.empty(stack.shape[1:]), np.empty(stack.shape[1:])
    flat = (channels, n_pixels)
    bounds = (_flat_view(lower, flat), _flat_view(upper, flat))
    with_threads(workers, channels * len(_chunks(n_frames, n_pixels)), lambda pool: clip_into(
        stack3, valid3, None, None, cfg, None, None, None, bounds, pool))
    return lower, upper
