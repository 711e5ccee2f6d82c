"""Per-frame scalars of the stack: background levels, the normalisation that matches them, frame weights.

:func:`cfa_channel_medians` measures a raw frame's background per colour; :func:`normalisation` turns two levels
into ``x' = x * scale + offset``; :func:`apply_normalisation` applies it in place to a rendered tile on any array
module; :func:`frame_weights_for` gives the weights of the mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError
from .geometry import bayer_offsets
from .robust import uint16_median

__all__ = ["NORMALISATIONS", "normalisation", "normalise_frames", "apply_normalisation", "cfa_channel_medians",
           "frame_weights_for"]

NORMALISATIONS = ("additive", "multiplicative", "none")


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
                f"frame {bg.tolist()}); use additive normalisation"
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


def apply_normalisation(data: Any, offset: np.ndarray, scale: np.ndarray, pattern: str | None = None,
                        origin: tuple[int, int] = (0, 0)) -> None:
    """``data = data * scale + offset`` in place, in float32, on any array module (only scalars cross over).

    Parameters
    ----------
    data : array
        float32 (C, h, w) rendered tile (NumPy or CuPy), modified in place.
    offset, scale : numpy.ndarray
        (C,) per channel, or, with ``pattern``, (3,) per colour R, G, B of a (1, h, w) CFA tile.
    pattern : str, optional
        Bayer pattern of the frame when ``data`` is a CFA tile: each pixel takes its colour's offset and scale.
    origin : tuple of int, optional
        (row, col) of the tile in the reference grid (the Bayer phase of a CFA tile).
    """
    offset32, scale32 = np.asarray(offset, np.float32), np.asarray(scale, np.float32)
    if pattern is None:
        for c in range(data.shape[0]):
            data[c] *= scale32[c]
            data[c] += offset32[c]
        return
    for c, name in enumerate("RGB"):
        for dr, dc in bayer_offsets(pattern)[name]:
            site = data[0, (dr - origin[0]) % 2::2, (dc - origin[1]) % 2::2]
            site *= scale32[c]
            site += offset32[c]


def cfa_channel_medians(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """Median of each colour's raw pixels (every 2nd cell sampled: plenty for a background level), as
    ``np.nanmedian`` of the float32 samples gives it; uint16 mosaics by counting (exact, no sort)."""
    offsets = bayer_offsets(pattern)
    out = []
    for name in "RGB":
        samples = np.concatenate([mosaic[dr::4, dc::4].ravel() for dr, dc in offsets[name]])
        out.append(uint16_median(samples) if samples.dtype == np.uint16 else
                   float(np.nanmedian(samples.astype(np.float32))))
    return np.array(out)


def frame_weights_for(kept, mode: str) -> np.ndarray:
    """Per-frame weights of the mean: 1, or 1 / noise^2 normalised to a mean of 1."""
    if mode == "none":
        return np.ones(len(kept), np.float32)
    noise = np.array([r.metrics.noise for r in kept], float)
    w = 1.0 / noise**2
    return (w / w.mean()).astype(np.float32)
