"""Stacking: frame normalisation, mask- and weight-aware sigma clipping, tiling under a memory budget, cropping.

This is the CPU reference of the rejection stage. The clipping follows :func:`astropy.stats.sigma_clip` (same
``cenfunc``/``stdfunc``/bounds/``maxiters`` semantics, checked against it in ``tests/test_stack.py``) but works per
output pixel over the frame axis, the way the CUDA kernel will (one thread per output pixel, looping over the
frames): each pixel's valid samples are sorted once, the kept set is then always a contiguous range of that sorted
list, and the median, the MAD and the bound updates are index arithmetic on it. NumPy does the per-pixel work for
blocks of pixels at a time ("chunks", a fixed number of samples, so temporary memory does not grow with the
image), optionally in threads. Every per-pixel result is independent of how the pixels are grouped, so the output
is bit-identical for any chunk, tile or thread count. Formulas and measurements: METHODS.md, "Stacking".
"""

from __future__ import annotations

import math
import os
import re
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .errors import ConfigError

__all__ = [
    "ClipResult",
    "TilePlan",
    "sigma_clip_mask_aware",
    "sigma_clip_mask_aware_rgb",
    "clip_bounds",
    "normalisation",
    "normalise_frames",
    "plan_tiles",
    "default_memory_budget",
    "parse_memory",
    "stack_tiles",
    "crop_to_coverage",
    "CENFUNCS",
    "STDFUNCS",
    "NORMALISATIONS",
]

CENFUNCS = ("median", "mean")
STDFUNCS = ("std", "mad_std")
NORMALISATIONS = ("additive", "multiplicative", "none")

_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)

#: ``mad_std = MAD_TO_STD x MAD``; the constant astropy's C code uses (1 / Phi^-1(3/4)).
MAD_TO_STD = 1.482602218505602

#: Samples (frames x pixels) per chunk of the clipping; bounds the temporaries of one worker.
CHUNK_SAMPLES = 1 << 18

#: Peak temporary bytes per chunk sample of one worker (sorted copy, masks, float64 sums and weights): measured
#: with tracemalloc at 26-28 bytes, 36-38 with weights (tests/test_stack.py checks the bound); the planner
#: counts this.
CLIP_BYTES_PER_SAMPLE = 48

#: Default memory budget: this share of the available RAM ...
DEFAULT_BUDGET_FRACTION = 0.5
#: ... capped at this many bytes: square tiles of a few hundred thousand pixels already stack at full speed, and
#: with the interpreter and the finished master the whole process then stays under 2 GB (benchmarks/RESULTS.md).
DEFAULT_BUDGET_CAP = 1 << 30
#: Used when the available RAM cannot be read.
FALLBACK_AVAILABLE = 4 << 30


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
class _ClipSettings:
    """Validated clipping options."""

    sigma_lower: float
    sigma_upper: float
    maxiters: int | None
    median: bool
    mad_std: bool


def _settings(sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc) -> _ClipSettings:
    """Check the options; ``sigma_lower``/``sigma_upper`` default to ``sigma`` (astropy)."""
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
    return _ClipSettings(lower, upper, None if maxiters is None else int(maxiters),
                         cenfunc == "median", stdfunc == "mad_std")


def _count_dtype(n_frames: int) -> type:
    """int16 while it can hold ``n_frames``, else int32."""
    return np.int16 if n_frames <= np.iinfo(np.int16).max else np.int32


def _frames_channels_pixels(stack: np.ndarray, name: str, other: np.ndarray | None) -> np.ndarray | None:
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
        return other.reshape(_fcl_shape(stack.shape))
    if len(s) >= 3 and other.shape in ((n, 1) + s[1:], (n,) + s[1:]):
        return other.reshape(n, 1, math.prod(s[1:]))
    shared = f", {(n, 1) + s[1:]} or {(n,) + s[1:]}" if len(s) >= 3 else ""
    raise ValueError(f"{name} has shape {other.shape}; for a stack of shape {stack.shape} it must be "
                     f"{stack.shape}{shared}")


def _fcl_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
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


def _clip_chunk(x: np.ndarray, xz: np.ndarray, ok: np.ndarray | None, n_valid: np.ndarray, cfg: _ClipSettings,
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


def _check_frame_weights(frame_weights, n_frames: int) -> np.ndarray | None:
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


def _run(executor: Executor | None, function: Callable[[Any], None], items: Sequence) -> None:
    """``function(item)`` for every item, in ``executor`` when given (exceptions propagate)."""
    if executor is None:
        for item in items:
            function(item)
    else:
        for _ in executor.map(function, items):
            pass


def _clip_into(stack: np.ndarray, valid: np.ndarray | None, weights: np.ndarray | None,
               frame_weights: np.ndarray | None, cfg: _ClipSettings, mean: np.ndarray | None,
               coverage: np.ndarray | None, rejected: np.ndarray | None, bounds: tuple | None,
               executor: Executor | None) -> None:
    """Clip a stack seen as (N, C, L); write the (C, L) outputs given (``coverage`` may be (1, L) when ``valid``
    is shared by the channels: channel 0 writes it; ``bounds`` is an optional pair of (C, L) float64 arrays)."""
    n_frames, channels, n_pixels = stack.shape

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

    _run(executor, work, [(c, start, stop) for c in range(channels) for start, stop in _chunks(n_frames, n_pixels)])


def _prepare(stack, valid, weights):
    """Validate and view the inputs as (N, C, L)."""
    stack = np.asarray(stack)
    if stack.ndim < 1 or stack.shape[0] < 1:
        raise ValueError(f"stack must have at least one frame along axis 0, got shape {stack.shape}")
    if stack.dtype.kind not in "fiu":
        raise ValueError(f"stack must be a real numeric array, got dtype {stack.dtype}")
    valid3 = _frames_channels_pixels(stack, "valid", valid)
    if valid3 is not None and valid3.dtype != bool:
        raise ValueError(f"valid must be a bool array, got dtype {valid3.dtype}")
    return stack.reshape(_fcl_shape(stack.shape)), valid3, _frames_channels_pixels(stack, "weights", weights)


def _default_workers() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _with_threads(workers: int | None, n_tasks_hint: int, call: Callable[[Executor | None], None]) -> None:
    """Run ``call(executor)`` with a private thread pool of ``workers`` threads (None: all cores), or none."""
    workers = _default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or n_tasks_hint < 2:
        call(None)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        call(pool)


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
    cfg = _settings(sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc)
    stack3, valid3, weights3 = _prepare(stack, valid, weights)
    n_frames, channels, n_pixels = stack3.shape
    fw = _check_frame_weights(frame_weights, n_frames)
    out_shape = stack.shape[1:]
    dtype = _count_dtype(n_frames)
    mean = np.empty(out_shape, np.float32)
    coverage = np.empty(out_shape, dtype)
    rejected = np.empty(out_shape, dtype)
    flat = (channels, n_pixels)
    _with_threads(workers, channels * len(_chunks(n_frames, n_pixels)), lambda pool: _clip_into(
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
    cfg = _settings(sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc)
    stack3, valid3, _ = _prepare(stack, valid, None)
    n_frames, channels, n_pixels = stack3.shape
    lower, upper = np.empty(stack.shape[1:]), np.empty(stack.shape[1:])
    flat = (channels, n_pixels)
    bounds = (_flat_view(lower, flat), _flat_view(upper, flat))
    _with_threads(workers, channels * len(_chunks(n_frames, n_pixels)), lambda pool: _clip_into(
        stack3, valid3, None, None, cfg, None, None, None, bounds, pool))
    return lower, upper


# ------------------------------------------------------------------------------------------- normalisation


def normalisation(ref_bg, frame_bg, mode: str = "additive") -> tuple[np.ndarray, np.ndarray]:
    """Offset and scale that bring a frame's background to the reference's: ``x' = x * scale + offset``.

    Parameters
    ----------
    ref_bg : array-like
        Background level of the reference frame, per channel (C,) (or a scalar).
    frame_bg : array-like
        Background level of the frame, same shape (or (N, C) for N frames at once).
    mode : {'additive', 'multiplicative', 'none'}
        ``additive``: ``x + (ref_bg - bg)`` (offset ``ref_bg - bg``, scale 1): matches sky levels that differ by
        light pollution or moonlight. ``multiplicative``: ``x * ref_bg / bg`` (offset 0): matches frames whose
        whole signal is scaled (transparency), needs positive backgrounds. ``none``: offset 0, scale 1.

    Returns
    -------
    offset, scale : numpy.ndarray
        float64, shape of ``frame_bg`` broadcast with ``ref_bg``.

    Raises
    ------
    ConfigError
        For an unknown mode, or ``multiplicative`` with a background level that is not positive.
    """
    ref = np.asarray(ref_bg, np.float64)
    bg = np.asarray(frame_bg, np.float64)
    shape = np.broadcast_shapes(ref.shape, bg.shape)
    if mode == "additive":
        return ref - bg + np.zeros(shape), np.ones(shape)
    if mode == "multiplicative":
        if not (np.all(ref > 0) and np.all(bg > 0)):
            raise ConfigError(
                f"multiplicative normalisation needs positive background levels (reference {ref.tolist()}, "
                f"frame {bg.tolist()}); use --normalisation additive"
            )
        return np.zeros(shape), ref / bg + np.zeros(shape)
    if mode == "none":
        return np.zeros(shape), np.ones(shape)
    raise ConfigError(f"unknown normalisation {mode!r}; choose one of {', '.join(NORMALISATIONS)}")


def normalise_frames(stack: np.ndarray, offsets, scales, out: np.ndarray | None = None) -> np.ndarray:
    """``stack * scale + offset`` per frame (and channel), in float32.

    Parameters
    ----------
    stack : numpy.ndarray
        (N, ...) samples; for (N, C, ...) the offsets and scales may be per channel.
    offsets, scales : array-like
        (N,) or (N, C), from :func:`normalisation`.
    out : numpy.ndarray, optional
        float32 destination (may be ``stack`` itself for an in-place update).

    Returns
    -------
    numpy.ndarray
        The normalised samples.
    """
    stack = np.asarray(stack)
    off = np.asarray(offsets, np.float32)
    scl = np.asarray(scales, np.float32)
    extra = (1,) * (stack.ndim - off.ndim)
    if off.shape[0] != stack.shape[0] or scl.shape != off.shape:
        raise ValueError(f"offsets {off.shape} and scales {scl.shape} must both be (N,) or (N, C) for a stack "
                         f"of shape {stack.shape}")
    out = np.multiply(stack, scl.reshape(scl.shape + extra), out=out, dtype=np.float32)
    return np.add(out, off.reshape(off.shape + extra), out=out)


# ------------------------------------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class TilePlan:
    """Rectangular tiles of the output image that the stacking processes one at a time.

    Tiles are as square as the budget allows: a rotated frame's source window for a square tile is at most twice
    the tile's area, whereas a thin full-width band of a frame rotated by theta needs ``width x sin(theta)`` extra
    source rows, all of which must be read and debayered for every band.

    Attributes
    ----------
    height, width : int
        Output image size.
    n_frames, channels : int
        Frames in the stack and channels per frame (1 for a CFA plane, 3 for RGB).
    workers : int
        Threads the plan allows for (clipping temporaries and frame renders in flight).
    tile_shape : (int, int)
        ``(rows, cols)`` of every tile but possibly those of the last tile row or column (even numbers unless one
        tile spans that whole axis).
    tiles : list of (int, int, int, int)
        ``(row0, row1, col0, col1)`` of each tile (half-open), row by row, covering the image once.
    bytes_per_pixel : int
        Memory one more tile pixel costs (frame buffers, tile outputs and renders in flight).
    fixed_bytes : int
        Memory that does not depend on the tile size (output arrays and clipping temporaries).
    bytes_per_tile : int
        Peak working memory of a full tile, ``fixed_bytes + rows x cols x bytes_per_pixel``.
    budget : int
        The memory budget the plan was made for.
    """

    height: int
    width: int
    n_frames: int
    channels: int
    workers: int
    tile_shape: tuple[int, int]
    tiles: list[tuple[int, int, int, int]]
    bytes_per_pixel: int
    fixed_bytes: int
    bytes_per_tile: int
    budget: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready description (the manifest stores it)."""
        return {
            "height": self.height, "width": self.width, "n_frames": self.n_frames, "channels": self.channels,
            "workers": self.workers, "tile_shape": list(self.tile_shape), "n_tiles": len(self.tiles),
            "tiles": [list(t) for t in self.tiles], "bytes_per_pixel": self.bytes_per_pixel,
            "fixed_bytes": self.fixed_bytes, "bytes_per_tile": self.bytes_per_tile, "budget": self.budget,
        }


def _sample_bytes(channels: int) -> int:
    """Frame-buffer bytes per frame and output pixel: data (float32 per channel), valid (bool), weight (float32)."""
    return 4 * channels + 1 + 4


def _round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def _tile_grid(size: int, tile: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of tiles of ``tile`` along an axis of ``size`` (the last one may be shorter)."""
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


def _balanced(size: int, tile: int, multiple: int) -> int:
    """The smallest tile length (a multiple of ``multiple``, or ``size``) giving as many tiles as ``tile`` does."""
    if tile >= size or tile < 1:
        return min(size, max(tile, 0))
    count = -(-size // tile)
    return min(tile, _round_up(-(-size // count), multiple))


def plan_tiles(
    height: int,
    width: int,
    n_frames: int,
    channels: int,
    memory_budget_bytes: int,
    *,
    workers: int | None = None,
    render_bytes_per_pixel: int = 0,
    tile_shape: tuple[int, int] | None = None,
    min_side: int = 16,
    multiple: int = 2,
) -> TilePlan:
    """Split the output into tiles whose peak working memory fits ``memory_budget_bytes``.

    Accounting (bytes): outputs ``H x W x (4C + 2C + 2)`` (mean float32, rejected and coverage int16; int32
    beyond 32767 frames doubles the counts) and clipping temporaries ``workers x CHUNK_SAMPLES x
    CLIP_BYTES_PER_SAMPLE`` are fixed; each tile pixel costs ``(N + workers) x (4C + 1 + 4)`` (the (N, C, P)
    data, (N, P) valid and weight buffers, plus one rendered tile per worker in flight), ``6C + 2`` (the tile's
    outputs before they are copied into place) and ``workers x render_bytes_per_pixel`` (the renderer's own
    scratch per output pixel, e.g. the raw and debayered source window).

    The tile is the largest square-ish rectangle that fits: side ``sqrt(P)`` for ``P`` affordable pixels (even
    lengths keep every tile on the same Bayer phase), then evened out so the tiles of a row (column) have about
    the same size. One tile is used when the whole image fits.

    Parameters
    ----------
    height, width : int
        Output size.
    n_frames, channels : int
        Frames to stack and channels per frame.
    memory_budget_bytes : int
        Budget (see :func:`default_memory_budget`, :func:`parse_memory`).
    workers : int, optional
        Threads that will clip and render (None: every core this process may use).
    render_bytes_per_pixel : int, optional
        The renderer's scratch memory per output pixel of a render in flight.
    tile_shape : (int, int), optional
        Use tiles of this ``(rows, cols)`` (clipped to the image) instead of the largest that fits; the budget is
        still checked.
    min_side : int, optional
        Smallest tile side worth processing (smaller: mostly per-tile overhead).
    multiple : int, optional
        Tile sides are multiples of it (2 keeps every tile on the same Bayer phase).

    Returns
    -------
    TilePlan

    Raises
    ------
    ConfigError
        When even a ``min_side`` x ``min_side`` tile (or ``tile_shape``) does not fit in the budget.
    """
    height, width, n_frames, channels = int(height), int(width), int(n_frames), int(channels)
    if min(height, width, n_frames, channels, min_side, multiple) < 1:
        raise ValueError("height, width, n_frames, channels, min_side and multiple must be positive")
    workers = _default_workers() if workers is None else int(workers)
    count_bytes = np.dtype(_count_dtype(n_frames)).itemsize
    fixed = height * width * (4 * channels + count_bytes * (channels + 1))
    fixed += workers * CHUNK_SAMPLES * CLIP_BYTES_PER_SAMPLE
    per_pixel = ((n_frames + workers) * _sample_bytes(channels) + 4 * channels + count_bytes * (channels + 1)
                 + workers * int(render_bytes_per_pixel))
    budget = int(memory_budget_bytes)
    pixels = (budget - fixed) // per_pixel if budget > fixed else 0
    if tile_shape is not None:
        rows, cols = min(height, int(tile_shape[0])), min(width, int(tile_shape[1]))
        if rows < 1 or cols < 1:
            raise ValueError(f"tile_shape must be positive, got {tile_shape}")
        needed = (rows, cols)
    else:
        needed = (min(height, _round_up(min_side, multiple)), min(width, _round_up(min_side, multiple)))
        side = math.isqrt(max(pixels, 0)) // multiple * multiple
        if pixels >= height * width:
            rows, cols = height, width
        elif side >= width:
            rows, cols = pixels // width // multiple * multiple, width
        elif side >= height:
            rows, cols = height, pixels // height // multiple * multiple
        else:
            rows = cols = side
    if rows * cols > pixels or rows < needed[0] or cols < needed[1]:
        need = fixed + needed[0] * needed[1] * per_pixel
        raise ConfigError(
            f"the memory budget of {budget / 2**20:.0f} MiB is too small to stack {n_frames} frames of "
            f"{width}x{height} ({channels} channel{'s' if channels > 1 else ''}): a {needed[0]}x{needed[1]} tile "
            f"needs {math.ceil(need / 2**20)} MiB. Raise --memory-budget (e.g. {math.ceil(need / 2**30)}G) or "
            f"stack fewer frames"
        )
    if tile_shape is None:  # the same number of tiles, evened out
        rows, cols = _balanced(height, rows, multiple), _balanced(width, cols, multiple)
    tiles = [(r0, r1, c0, c1) for r0, r1 in _tile_grid(height, rows)
             for c0, c1 in _tile_grid(width, cols)]
    return TilePlan(height, width, n_frames, channels, workers, (rows, cols), tiles, per_pixel, fixed,
                    fixed + rows * cols * per_pixel, budget)


def _available_memory() -> int:
    """Bytes of RAM available now: MemAvailable, lowered by a cgroup (container) limit when one is set."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            available = FALLBACK_AVAILABLE
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return int(available)


def default_memory_budget() -> int:
    """Default budget: ``DEFAULT_BUDGET_FRACTION`` (50 %) of the available RAM, at most ``DEFAULT_BUDGET_CAP``
    (1 GiB). The available RAM is /proc/meminfo's MemAvailable (else ``os.sysconf`` free pages, else 4 GiB),
    lowered to the room left under a cgroup v2 memory limit when there is one."""
    return int(min(DEFAULT_BUDGET_FRACTION * _available_memory(), DEFAULT_BUDGET_CAP))


_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Bytes from a ``--memory-budget`` value: a number with an optional binary unit.

    ``K``, ``M``, ``G``, ``T`` (also ``KB``/``KiB`` ...; case-insensitive) are powers of 1024; a bare number is
    bytes. Examples: ``4G`` = 4294967296, ``512M``, ``1.5g``, ``800MiB``.

    Raises
    ------
    ConfigError
        If the text cannot be read or the amount is not positive.
    """
    match = _MEMORY_RE.match(str(text))
    if not match:
        raise ConfigError(f"--memory-budget {text!r} is not a memory size; use e.g. 4G or 512M")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    value = number * 1024 ** ("kmgt".index(unit) + 1) if unit else number
    if not value >= 1:
        raise ConfigError(f"--memory-budget {text!r} must be at least one byte; use e.g. 4G or 512M")
    return int(value)


# -------------------------------------------------------------------------------------------------- driver

RenderTile = Callable[[int, int, int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def stack_tiles(
    plan: TilePlan,
    render_tile: RenderTile,
    n_frames: int,
    out_shape: tuple[int, int, int],
    *,
    frame_weights: Sequence[float] | np.ndarray | None = None,
    sigma: float = 3.0,
    sigma_lower: float | None = None,
    sigma_upper: float | None = None,
    maxiters: int | None = 5,
    cenfunc: str = "median",
    stdfunc: str = "std",
    executor: Executor | None = None,
    progress: Callable[[int, int], None] | None = None,
    clip: Callable[..., None] | None = None,
    xp: Any = np,
) -> ClipResult:
    """Stack frames tile by tile: render every frame's part of a tile, sigma-clip, write the outputs.

    For each tile ``(row0, row1, col0, col1)`` of ``plan``, ``render_tile(k, row0, row1, col0, col1)`` is called
    for every frame ``k`` and must return ``data`` float32 (C, rows, cols) (or (rows, cols) when C = 1),
    ``valid`` bool (rows, cols) and ``weight`` float32 (rows, cols) (e.g. a feather taper, >= 0). A sample is
    valid where ``valid`` is True and all its channels are finite. The renders are copied into one (N, C, P)
    buffer (with (N, P) valid and weight buffers), allocated once for the largest tile and reused, and clipped as
    by :func:`sigma_clip_mask_aware` with the shared ``valid`` and ``weight``. Each pixel's result depends only on
    its own samples, so the output is bit-identical for any plan and executor.

    Parameters
    ----------
    plan : TilePlan
        From :func:`plan_tiles` for this ``out_shape`` and ``n_frames``.
    render_tile : callable
        ``render_tile(frame_index, row0, row1, col0, col1) -> (data, valid, weight)``; called from the
        executor's threads when one is given (it must then be thread-safe). If it has a method
        ``render_into(frame_index, row0, row1, col0, col1, data, valid, weight)``, that is called instead with
        the tile buffer's own (C, rows, cols), (rows, cols) and (rows, cols) C-contiguous views to fill (no copy).
    n_frames : int
        Number of frames.
    out_shape : tuple of int
        (C, H, W) of the output.
    frame_weights : array-like, optional
        (N,) per-frame weights of the mean.
    sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc
        As for :func:`sigma_clip_mask_aware`.
    executor : concurrent.futures.Executor, optional
        Runs the frame renders and the clipping chunks concurrently (a thread pool); None: the calling thread.
    progress : callable, optional
        ``progress(done, n_tiles)`` after each tile.
    clip : callable, optional
        The clipping step, called once per tile with the arguments of (and in place of) the NumPy reference
        step ``_clip_into`` (the default): the tile's (N, C, P) data, (N, 1, P) valid and weight views, the frame
        weights, the settings, and (C, P) mean, (1, P) coverage and (C, P) rejected views to write. A backend
        passes its kernel here (``KernelOps.clip_into``: the same decisions, means within float32 rounding). It
        must give every pixel a result that depends on that pixel's samples only, as the reference does.
    xp : module, optional
        Array module of the tile buffers: NumPy (default), or the backend's device module (CuPy) to keep each
        tile's stack on the GPU, where ``render_into`` renders and ``clip`` clips it; the outputs stay NumPy.

    Returns
    -------
    ClipResult
        ``mean`` float32 (C, H, W); ``coverage`` (H, W): valid frames per pixel; ``rejected`` (C, H, W):
        rejected samples per channel and pixel (int16, int32 beyond 32767 frames).

    Raises
    ------
    ValueError
        If the plan does not match ``out_shape``/``n_frames`` or a render has the wrong shape.
    """
    cfg = _settings(sigma, sigma_lower, sigma_upper, maxiters, cenfunc, stdfunc)
    channels, height, width = (int(v) for v in out_shape)
    if (plan.channels, plan.height, plan.width, plan.n_frames) != (channels, height, width, n_frames):
        raise ValueError(f"the tile plan is for {plan.n_frames} frames of ({plan.channels}, {plan.height}, "
                         f"{plan.width}), not {n_frames} frames of {tuple(out_shape)}")
    fw = _check_frame_weights(frame_weights, n_frames)
    dtype = _count_dtype(n_frames)
    mean = np.empty((channels, height, width), np.float32)
    coverage = np.empty((height, width), dtype)
    rejected = np.empty((channels, height, width), dtype)
    most = plan.tile_shape[0] * plan.tile_shape[1]
    data_buf = xp.empty(n_frames * channels * most, xp.float32)
    valid_buf = xp.empty(n_frames * most, xp.bool_)
    weight_buf = xp.empty(n_frames * most, xp.float32)
    tile_mean = np.empty((channels, most), np.float32)
    tile_coverage = np.empty((1, most), dtype)
    tile_rejected = np.empty((channels, most), dtype)
    render_into = getattr(render_tile, "render_into", None)

    for index, (row0, row1, col0, col1) in enumerate(plan.tiles):
        rows, cols = row1 - row0, col1 - col0
        n_pix = rows * cols
        # this tile's (N, C, P), (N, P), (N, P) buffers: contiguous, so each frame's block is a C-order image
        data_tile = data_buf[:n_frames * channels * n_pix].reshape(n_frames, channels, n_pix)
        valid_tile = valid_buf[:n_frames * n_pix].reshape(n_frames, n_pix)
        weight_tile = weight_buf[:n_frames * n_pix].reshape(n_frames, n_pix)

        def fill(k: int) -> None:
            if render_into is not None:
                render_into(k, row0, row1, col0, col1, data_tile[k].reshape(channels, rows, cols),
                            valid_tile[k].reshape(rows, cols), weight_tile[k].reshape(rows, cols))
                valid_tile[k] &= xp.isfinite(data_tile[k]).all(axis=0)
                return
            data, valid, weight = render_tile(k, row0, row1, col0, col1)
            data = np.asarray(data)
            if data.shape == (rows, cols) and channels == 1:
                data = data[None]
            if data.shape != (channels, rows, cols) or np.shape(valid) != (rows, cols) or \
                    np.shape(weight) != (rows, cols):
                raise ValueError(f"render_tile({k}, {row0}, {row1}, {col0}, {col1}) returned shapes {data.shape}, "
                                 f"{np.shape(valid)}, {np.shape(weight)}; expected ({channels}, {rows}, {cols}) "
                                 f"and ({rows}, {cols}) twice")
            finite = np.logical_and(np.reshape(valid, n_pix), np.isfinite(data).all(axis=0).reshape(n_pix))
            data_tile[k] = xp.asarray(data.reshape(channels, n_pix))
            valid_tile[k] = xp.asarray(finite)
            weight_tile[k] = xp.asarray(np.reshape(weight, n_pix))

        _run(executor, fill, range(n_frames))
        (clip or _clip_into)(
            data_tile, valid_tile[:, None], weight_tile[:, None], fw, cfg,
            tile_mean[:, :n_pix], tile_coverage[:, :n_pix], tile_rejected[:, :n_pix], None, executor,
        )
        mean[:, row0:row1, col0:col1] = tile_mean[:, :n_pix].reshape(channels, rows, cols)
        coverage[row0:row1, col0:col1] = tile_coverage[0, :n_pix].reshape(rows, cols)
        rejected[:, row0:row1, col0:col1] = tile_rejected[:, :n_pix].reshape(channels, rows, cols)
        if progress is not None:
            progress(index + 1, len(plan.tiles))
    return ClipResult(mean, coverage, rejected)


# ------------------------------------------------------------------------------------------------ cropping


def crop_to_coverage(
    image: np.ndarray,
    coverage: np.ndarray,
    min_fraction: float | None = None,
    min_count: int | None = None,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop to the largest axis-aligned rectangle where the coverage reaches a threshold.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) or (..., H, W).
    coverage : numpy.ndarray
        (H, W) number of frames per pixel.
    min_fraction : float, optional
        Threshold as a fraction of ``coverage.max()`` (rounded up to a count); default 1.0 (full coverage).
    min_count : int, optional
        Threshold as a frame count (instead of ``min_fraction``).

    Returns
    -------
    cropped : numpy.ndarray
        ``image[..., row0:row1, col0:col1]`` (a view).
    box : tuple of int
        ``(row0, row1, col0, col1)``; (0, 0, 0, 0) when no pixel reaches the threshold.

    Notes
    -----
    Exact: per row, the DP of the maximal-rectangle problem (histogram method) gives every column's run height
    ``h`` of qualifying pixels ending on this row and the widest span ``[left, right)`` such a run of height
    ``h`` allows (the previous row's span narrowed by the nearest failing pixels of this row, from running
    maximum/minimum of their indices); the best ``h x (right - left)`` over all rows and columns is the largest
    rectangle. O(H x W), vectorised over each row; the first of equal-area rectangles in row-major order of
    their bottom-left corner wins.
    """
    coverage = np.asarray(coverage)
    if coverage.ndim != 2 or image.shape[-2:] != coverage.shape:
        raise ValueError(f"coverage must be (H, W) matching the image's last two axes; got {coverage.shape} "
                         f"for an image of shape {image.shape}")
    if min_count is not None and min_fraction is not None:
        raise ValueError("give min_fraction or min_count, not both")
    if min_count is None:
        fraction = 1.0 if min_fraction is None else float(min_fraction)
        threshold = math.ceil(fraction * float(coverage.max()) - 1e-9) if coverage.size else 0
    else:
        threshold = int(min_count)
    ok = coverage >= threshold
    height, width = ok.shape
    cols = np.arange(width)
    run = np.zeros(width, np.int64)
    left = np.zeros(width, np.int64)
    right = np.full(width, width, np.int64)
    best, box = 0, (0, 0, 0, 0)
    for row in range(height):
        good = ok[row]
        run = np.where(good, run + 1, 0)
        # nearest failing pixel to the left (+1) and to the right of every column, on this row
        cur_left = np.maximum.accumulate(np.where(good, 0, cols + 1))
        cur_right = np.minimum.accumulate(np.where(good, width, cols)[::-1])[::-1]
        left = np.where(good, np.maximum(left, cur_left), 0)
        right = np.where(good, np.minimum(right, cur_right), width)
        area = run * (right - left)
        j = int(np.argmax(area))
        if area[j] > best:
            best = int(area[j])
            box = (row - int(run[j]) + 1, row + 1, int(left[j]), int(right[j]))
    r0, r1, c0, c1 = box
    return image[..., r0:r1, c0:c1], box
