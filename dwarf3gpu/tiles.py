"""Tiles: plan the output in memory-budgeted tiles, stack each tile through the stage operations, crop to coverage.

:func:`plan_tiles` splits the output so that one tile's working memory (frame buffers, clipping temporaries,
renders in flight) fits the budget; :func:`stack_tiles` renders every frame into a tile buffer on the stage
operations' array module, clips it there and brings back the tile's results; :func:`crop_to_coverage` finds the
largest well-covered rectangle.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from .clip import CLIP_BYTES_PER_SAMPLE, CHUNK_SAMPLES, ClipResult, ClipSettings, check_frame_weights, count_dtype
from .errors import ConfigError
from .resources import default_workers, for_each

if TYPE_CHECKING:
    from .backends.base import StageOps

__all__ = ["TilePlan", "TileRenderer", "plan_tiles", "stack_tiles", "crop_to_coverage"]


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
    workers = default_workers() if workers is None else int(workers)
    count_bytes = np.dtype(count_dtype(n_frames)).itemsize
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
            f"the memory budget of {_size_text(budget)} is too small to stack {n_frames} frames of "
            f"{width}x{height} ({channels} channel{'s' if channels > 1 else ''}): a {needed[0]}x{needed[1]} tile "
            f"needs {_size_text(need)}. Raise the memory budget (e.g. to {math.ceil(need / 2**30)}G) or "
            f"stack fewer frames", setting="memory_budget"
        )
    if tile_shape is None:  # the same number of tiles, evened out
        rows, cols = _balanced(height, rows, multiple), _balanced(width, cols, multiple)
    tiles = [(r0, r1, c0, c1) for r0, r1 in _tile_grid(height, rows)
             for c0, c1 in _tile_grid(width, cols)]
    return TilePlan(height, width, n_frames, channels, workers, (rows, cols), tiles, per_pixel, fixed,
                    fixed + rows * cols * per_pixel, budget)


class TileRenderer(Protocol):
    """Renders one frame's part of an output tile into the tile buffer."""

    def render_into(self, index: int, row0: int, row1: int, col0: int, col1: int, data: Any, valid: Any,
                    weight: Any) -> None:
        """Write frame ``index``'s samples of the tile ``[row0, row1) x [col0, col1)`` into ``data`` float32
        (C, rows, cols), ``valid`` bool (rows, cols) and ``weight`` float32 (rows, cols) (C-contiguous views of
        the tile buffer, on the stage operations' ``xp``)."""


def stack_tiles(
    plan: TilePlan,
    renderer: TileRenderer,
    n_frames: int,
    out_shape: tuple[int, int, int],
    *,
    ops: StageOps,
    settings: ClipSettings,
    frame_weights: Sequence[float] | np.ndarray | None = None,
    executor: Executor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ClipResult:
    """Stack frames tile by tile: render every frame's part of a tile, sigma-clip it, write the outputs.

    For each tile ``(row0, row1, col0, col1)`` of ``plan``, ``renderer.render_into`` writes every frame ``k`` into
    the tile buffer: one (N, C, P) float32 buffer with (N, P) valid and weight buffers, allocated once on
    ``ops.xp`` for the largest tile and reused. A sample is valid where ``valid`` is True and all its channels are
    finite. ``ops.clip_into`` then clips the tile where it lives (on the GPU for CUDA) into tile outputs on
    ``ops.xp``, which are downloaded once per tile. Each pixel's result depends only on its own samples, so the
    output is bit-identical for any plan and executor.

    Parameters
    ----------
    plan : TilePlan
        From :func:`plan_tiles` for this ``out_shape`` and ``n_frames``.
    renderer : TileRenderer
        Called from the executor's threads when one is given (it must then be thread-safe).
    n_frames : int
        Number of frames.
    out_shape : tuple of int
        (C, H, W) of the output.
    ops : StageOps
        The stage operations: array module of the tile buffers and the clip.
    settings : ClipSettings
        The clipping options (:func:`dwarf3gpu.clip.clip_settings`).
    frame_weights : array-like, optional
        (N,) per-frame weights of the mean.
    executor : concurrent.futures.Executor, optional
        Runs the frame renders (and the reference clip's chunks) concurrently; None: the calling thread.
    progress : callable, optional
        ``progress(done, n_tiles)`` after each tile.

    Returns
    -------
    ClipResult
        ``mean`` float32 (C, H, W); ``coverage`` (H, W): valid frames per pixel; ``rejected`` (C, H, W):
        rejected samples per channel and pixel (int16, int32 beyond 32767 frames); NumPy arrays.

    Raises
    ------
    ValueError
        If the plan does not match ``out_shape``/``n_frames``.
    """
    xp = ops.xp
    channels, height, width = (int(v) for v in out_shape)
    if (plan.channels, plan.height, plan.width, plan.n_frames) != (channels, height, width, n_frames):
        raise ValueError(f"the tile plan is for {plan.n_frames} frames of ({plan.channels}, {plan.height}, "
                         f"{plan.width}), not {n_frames} frames of {tuple(out_shape)}")
    fw = check_frame_weights(frame_weights, n_frames)
    dtype = count_dtype(n_frames)
    mean = np.empty((channels, height, width), np.float32)
    coverage = np.empty((height, width), dtype)
    rejected = np.empty((channels, height, width), dtype)
    most = plan.tile_shape[0] * plan.tile_shape[1]
    data_buf = xp.empty(n_frames * channels * most, xp.float32)
    valid_buf = xp.empty(n_frames * most, xp.bool_)
    weight_buf = xp.empty(n_frames * most, xp.float32)
    tile_mean = xp.empty((channels, most), xp.float32)
    tile_coverage = xp.empty((1, most), dtype)
    tile_rejected = xp.empty((channels, most), dtype)

    for index, (row0, row1, col0, col1) in enumerate(plan.tiles):
        rows, cols = row1 - row0, col1 - col0
        n_pix = rows * cols
        # this tile's (N, C, P), (N, P), (N, P) buffers: contiguous, so each frame's block is a C-order image
        data_tile = data_buf[:n_frames * channels * n_pix].reshape(n_frames, channels, n_pix)
        valid_tile = valid_buf[:n_frames * n_pix].reshape(n_frames, n_pix)
        weight_tile = weight_buf[:n_frames * n_pix].reshape(n_frames, n_pix)

        def fill(k: int) -> None:
            renderer.render_into(k, row0, row1, col0, col1, data_tile[k].reshape(channels, rows, cols),
                                 valid_tile[k].reshape(rows, cols), weight_tile[k].reshape(rows, cols))
            valid_tile[k] &= xp.isfinite(data_tile[k]).all(axis=0)

        for_each(executor, fill, range(n_frames))
        ops.clip_into(data_tile, valid_tile[:, None], weight_tile[:, None], fw, settings,
                      tile_mean[:, :n_pix], tile_coverage[:, :n_pix], tile_rejected[:, :n_pix], executor)
        mean[:, row0:row1, col0:col1] = ops.download(tile_mean[:, :n_pix]).reshape(channels, rows, cols)
        coverage[row0:row1, col0:col1] = ops.download(tile_coverage[0, :n_pix]).reshape(rows, cols)
        rejected[:, row0:row1, col0:col1] = ops.download(tile_rejected[:, :n_pix]).reshape(channels, rows, cols)
        if progress is not None:
            progress(index + 1, len(plan.tiles))
    return ClipResult(mean, coverage, rejected)


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


def _size_text(nbytes: float) -> str:
    """A memory size for messages, in the largest binary unit that keeps it at least 1 (e.g. 1 KiB, 25 MiB);
    rounded up, so that a needed size is never understated."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{math.ceil(nbytes / scale * 10) / 10:g} {unit}"
    return f"{int(nbytes)} bytes"
