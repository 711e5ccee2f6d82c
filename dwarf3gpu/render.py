"""One frame's contribution to an output tile: read the raw window, calibrate, resample, normalise.

:class:`FrameRenderer` is the :class:`~dwarf3gpu.tiles.TileRenderer` of the pipeline. For every frame and tile it
reads the source window the tile needs (only those rows, only those columns decoded), uploads it once to the
stage operations' array module, and there applies the dark calibration, the debayer/resampling path of the
settings and the normalisation, writing into the tile buffer. On CUDA nothing of a frame comes back to the host.

Paths (``--debayer`` / ``--demosaic``): ``rgb`` + ``lattice`` (each colour resampled from its own CFA lattice) or
``chroma`` (the same, red and blue as colour differences from green),
``rgb`` + ``bilinear`` or ``mhc`` (debayer the window, then warp the RGB), ``superpixel`` (2x2 cells, then warp at
half resolution), ``bayer-first`` and ``none`` (the four Bayer planes warped separately into a CFA tile).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends.base import StageOps
from .calibrate import HOT_REACH, DarkCalibration
from .config import StackConfig
from .fitsio import read_raw_window
from .geometry import superpixel_transform
from .warp import LATTICE_MARGIN, source_window, window_margin

__all__ = ["FrameRenderer", "RawWindowReader", "RENDER_BYTES_PER_PIXEL", "DEBAYER_MARGIN", "render_paths"]

#: Extra source margin for a debayered band: interior pixels then equal a full-frame debayer bit for bit.
DEBAYER_MARGIN = 3

#: Scratch memory of one frame render per output pixel, beyond the render itself (which the planner counts): the
#: raw window (2 bytes), its float32 copy (4) and its debayered RGB (12) per source pixel, times 2 for the source
#: window of a tile of a rotated frame (at most twice the tile's area for a square tile), plus slack. The default
#: lattice path needs less: the raw window (2) and its colour planes (about 6) per source pixel.
RENDER_BYTES_PER_PIXEL = 40


def render_paths(config: StackConfig) -> tuple[bool, bool]:
    """``(superpixel, cfa)`` of the settings: a half-resolution output, a one-channel CFA output."""
    return config.debayer == "superpixel", config.debayer in ("bayer-first", "none")


class RawWindowReader:
    """Reads raw windows of frames onto the stage operations' array module, dark-calibrated.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        The raw frames.
    frame_size : tuple of int
        (height, width) of the frames.
    ops : StageOps
        Where the windows go and are calibrated.
    calibration : DarkCalibration, optional
        The dark (or hot pixels) applied to every window.
    """

    def __init__(self, paths: Sequence[Path], frame_size: tuple[int, int], ops: StageOps,
                 calibration: DarkCalibration | None = None):
        self.paths = list(paths)
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.ops = ops
        self.calibration = calibration
        self.dark = ops.on_target(calibration) if calibration is not None else None

    def read(self, index: int, window: tuple[int, int, int, int] | None = None) -> Any:
        """Frame ``index``'s raw pixels ``window`` = (row0, row1, col0, col1) (default: the whole frame) on
        ``ops.xp``: as stored, or calibrated (float32 with a dark offset; as stored with hot pixels only).

        One upload per call. With a calibration the window is read ``HOT_REACH`` pixels larger on every side
        (within the frame), calibrated, then cut back: a hot pixel near its edge is repaired from the same
        neighbours as in the full frame, so the pixels do not depend on the tiling.
        """
        path = self.paths[index]
        height, width = self.frame_size
        r0, r1, c0, c1 = window if window is not None else (0, height, 0, width)
        if self.calibration is None:
            return self.ops.upload(read_raw_window(path, (r0, r1), (c0, c1)))
        e0, e1 = max(0, r0 - HOT_REACH), min(height, r1 + HOT_REACH)
        f0, f1 = max(0, c0 - HOT_REACH), min(width, c1 + HOT_REACH)
        band = self.ops.upload(read_raw_window(path, (e0, e1), (f0, f1)))
        xp = self.ops.xp
        if self.calibration.offset is not None or band.dtype != xp.uint16:
            band = band.astype(xp.float32)
        self.ops.calibrate_window(band, (e0, f0), self.dark)
        return band[r0 - e0:r1 - e0, c0 - f0:c1 - f0]


class FrameRenderer:
    """Renders the kept frames into output tiles through the stage operations.

    Parameters
    ----------
    paths : sequence of pathlib.Path
        The raw frames, in stacking order.
    matrices : sequence of numpy.ndarray
        Each frame's (2, 3) transform, frame pixel -> reference pixel (full resolution).
    norms : sequence of (numpy.ndarray, numpy.ndarray)
        Each frame's per-colour normalisation (offset, scale), from :func:`dwarf3gpu.normalise.normalisation`.
    pattern : str
        Bayer pattern of the frames.
    config : StackConfig
        The settings (debayer mode, demosaic, interpolation, feather).
    ops : StageOps
        Where the work runs.
    frame_size : tuple of int
        (height, width) of the raw frames.
    calibration : DarkCalibration, optional
        The dark (or hot pixels) applied to every raw window.
    """

    def __init__(self, paths: Sequence[Path], matrices: Sequence[np.ndarray], norms: Sequence[tuple[Any, Any]],
                 pattern: str, config: StackConfig, ops: StageOps, frame_size: tuple[int, int],
                 calibration: DarkCalibration | None = None):
        self.paths, self.matrices, self.norms = list(paths), [np.asarray(m, float) for m in matrices], list(norms)
        self.pattern, self.config, self.ops = pattern, config, ops
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.superpixel, self.cfa = render_paths(config)
        self.reader = RawWindowReader(paths, frame_size, ops, calibration)

    def render_into(self, index: int, row0: int, row1: int, col0: int, col1: int, data: Any, valid: Any,
                    weight: Any) -> None:
        """Render frame ``index`` on the tile ``[row0, row1) x [col0, col1)`` into ``data`` float32 (C, rows, cols),
        ``valid`` bool and ``weight`` float32 (rows, cols), C-contiguous arrays of the stage operations' ``xp``."""
        ops, config = self.ops, self.config
        A = self.matrices[index]
        height, width = self.frame_size
        method = config.interpolation
        offset, scale = self.norms[index]
        out_shape, out_origin = (row1 - row0, col1 - col0), (row0, col0)
        out = (data, valid, weight)
        if self.superpixel:  # a half-resolution source window, debayered 2x2 cell by cell
            A = superpixel_transform(A)
            half = (height // 2, width // 2)
            r0, r1, c0, c1 = source_window(A, out_shape, out_origin, half, window_margin(method))
            cells = self.reader.read(index, (2 * r0, 2 * r1, 2 * c0, 2 * c1))
            ops.warp_affine(ops.debayer_superpixel(cells, self.pattern), A, out_shape, out_origin=out_origin,
                            src_origin=(r0, c0), method=method, feather_px=config.feather_px / 2, src_size=half,
                            out=out)
            ops.normalise(data, offset, scale)
            return
        lattice = not self.cfa and config.demosaic in ("lattice", "chroma")
        margin = (LATTICE_MARGIN if lattice
                  else window_margin(method, bayer_planes=self.cfa) + (0 if self.cfa else DEBAYER_MARGIN))
        r0, r1, c0, c1 = source_window(A, out_shape, out_origin, (height, width), margin)
        band = self.reader.read(index, (r0, r1, c0, c1))
        common = dict(out_origin=out_origin, src_origin=(r0, c0), src_size=(height, width),
                      feather_px=config.feather_px)
        if lattice:  # each colour straight from its own CFA lattice: no separate demosaic (METHODS.md, "Warp")
            resample = ops.warp_lattice_chroma if config.demosaic == "chroma" else ops.warp_lattice
            resample(band, self.pattern, A, out_shape, out=out, **common)  # takes the raw uint16 as read
            ops.normalise(data, offset, scale)
            return
        band = band.astype(ops.xp.float32, copy=False)
        if self.cfa:
            ops.warp_bayer_planes(band, self.pattern, A, out_shape, method=method, out=(data[0], valid, weight),
                                  **common)
            ops.normalise(data, offset, scale, self.pattern, out_origin)
            return
        debayer = ops.debayer_mhc if config.demosaic == "mhc" else ops.debayer_bilinear
        ops.warp_affine(debayer(band, self.pattern, origin=(r0, c0)), A, out_shape, method=method, out=out, **common)
        ops.normalise(data, offset, scale)

    def render(self, index: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``index`` alone on the whole output grid of ``shape`` (C, H, W): (data, valid) on the host."""
        xp = self.ops.xp
        channels, height, width = shape
        data = xp.empty((channels, height, width), xp.float32)
        valid = xp.empty((height, width), xp.bool_)
        weight = xp.empty((height, width), xp.float32)
        self.render_into(index, 0, height, 0, width, data, valid, weight)
        return self.ops.download(data), self.ops.download(valid)
