"""Debayering of one-shot-colour mosaics: bilinear (normalised convolution) and 2x2 superpixel.

These are the CPU reference implementations of per-pixel stages that the CUDA backend ports
one thread per output element, so every output value is a fixed formula of its own
neighbourhood (see METHODS.md, "Debayer"):

- :func:`debayer_bilinear` fills each channel by normalised convolution of its own samples,
  ``out_c = conv(mosaic * mask_c, K_c) / conv(mask_c, K_c)``, with zeros outside the array;
  measured samples keep their value exactly and the array edges need no reflection.
  The Bayer phase is taken from the absolute position ``origin`` of the array in the frame, so
  a band of rows/columns with a 2-pixel margin debayers to exactly the full frame's pixels.
- :func:`debayer_mhc` is the Malvar-He-Cutler (2004) gradient-corrected linear interpolation
  (5x5 filters) inside the frame and :func:`debayer_bilinear` on the 2-pixel border; a band
  with a 2-pixel margin (the pipeline uses 3) debayers to exactly the full frame's pixels.
- :func:`debayer_superpixel` makes one RGB pixel per 2x2 cell (R, mean of the two G, B), with
  pixel ``(i, j)`` centred at full-resolution ``(x, y) = (2j + 0.5, 2i + 0.5)``;
  :func:`~dwarf3gpu.geometry.superpixel_transform` converts a full-resolution transform to that grid.

Coordinates follow the project convention: x = column, y = row, origin at the centre of
pixel (0, 0).
"""

from __future__ import annotations

import numpy as np

from .geometry import bayer_offsets, normalise_pattern

__all__ = [
    "debayer_bilinear",
    "debayer_mhc",
    "debayer_superpixel",
    "debayer_rggb",
]

DEBAYER_METHODS = ("bilinear", "superpixel")
"""Methods understood by :func:`debayer_rggb`."""


def _as_float32_mosaic(mosaic: np.ndarray) -> np.ndarray:
    """Return a 2-D mosaic as float32 (uint16 values are exact), or raise ValueError."""
    data = np.asarray(mosaic)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D raw mosaic, got an array of shape {data.shape}")
    return data.astype(np.float32, copy=False)


def _local_start(offset: int, origin: int) -> int:
    """First local index whose absolute index ``origin + i`` has the parity of ``offset``."""
    return (offset - origin) % 2


def _smooth_pairs(padded: np.ndarray, axis: int) -> np.ndarray:
    """Return ``a[i] + 0.5 * (a[i - 1] + a[i + 1])`` along ``axis`` of a zero-padded array.

    ``padded`` carries one zero row (``axis=0``) or column (``axis=1``) on each side of the
    data ``a``; the result has the unpadded shape.
    """
    if axis == 0:
        before, centre, after = padded[:-2], padded[1:-1], padded[2:]
    else:
        before, centre, after = padded[:, :-2], padded[:, 1:-1], padded[:, 2:]
    out = np.add(before, after)
    out *= np.float32(0.5)
    out += centre
    return out


def _pair_counts(n: int, offset: int, origin: int) -> np.ndarray:
    """1-D normalisation of ``[1/2, 1, 1/2]`` over the sites of one parity along an axis of length n.

    Entry i is the kernel weight that falls on in-array sites whose absolute index has the
    parity of ``offset``: 1 on such a site, 1/2 per in-array neighbour site elsewhere.
    """
    sites = np.zeros(n + 2, np.float32)
    sites[1 + _local_start(offset, origin) : n + 1 : 2] = 1.0
    return _smooth_pairs(sites[None, :], axis=1)[0]


def _interpolate_rb(data: np.ndarray, site: tuple[int, int], origin: tuple[int, int]) -> np.ndarray:
    """Normalised convolution of the R or B sites with K = [[1,2,1],[2,4,2],[1,2,1]] / 4.

    K is the outer product of ``[1/2, 1, 1/2]`` with itself and the site mask is the outer
    product of a row mask and a column mask, so the numerator is two 1-D passes and the
    denominator the outer product of two 1-D normalisations (values 1/2 or 1: the division
    is exact).
    """
    h, w = data.shape
    r0, c0 = _local_start(site[0], origin[0]), _local_start(site[1], origin[1])
    sparse = np.zeros((h + 2, w + 2), np.float32)
    sparse[1 + r0 : h + 1 : 2, 1 + c0 : w + 1 : 2] = data[r0::2, c0::2]
    across = np.zeros((h + 2, w), np.float32)
    across[1:-1] = _smooth_pairs(sparse[1:-1], axis=1)
    out = _smooth_pairs(across, axis=0)
    out /= _pair_counts(h, site[0], origin[0])[:, None]
    out /= _pair_counts(w, site[1], origin[1])[None, :]
    return out


def _neighbour_counts(n: int) -> np.ndarray:
    """Number of in-array neighbours (0, 1 or 2) of each index along an axis of length n."""
    index = np.arange(n)
    return ((index > 0).astype(np.float32) + (index < n - 1)).astype(np.float32)


def _interpolate_g(data: np.ndarray, sites: list[tuple[int, int]], origin: tuple[int, int]) -> np.ndarray:
    """Normalised convolution of the G sites with the cross K = [[0,1,0],[1,4,1],[0,1,0]] / 4.

    On a G site the result is the sample (no other G site is under the cross); elsewhere all
    four cross neighbours are G sites, so the denominator is ``(n_rows + n_cols) / 4`` with the
    in-array vertical and horizontal neighbour counts.
    """
    h, w = data.shape
    sparse = np.zeros((h + 2, w + 2), np.float32)
    green = np.zeros((h, w), bool)
    for site in sites:
        r0, c0 = _local_start(site[0], origin[0]), _local_start(site[1], origin[1])
        sparse[1 + r0 : h + 1 : 2, 1 + c0 : w + 1 : 2] = data[r0::2, c0::2]
        green[r0::2, c0::2] = True
    out = np.add(sparse[:-2, 1:-1], sparse[2:, 1:-1])
    out += np.add(sparse[1:-1, :-2], sparse[1:-1, 2:])
    out *= np.float32(0.25)
    out += sparse[1:-1, 1:-1]
    rows, cols = _neighbour_counts(h), _neighbour_counts(w)
    out /= np.where(green, np.float32(1.0), np.float32(0.25) * (rows[:, None] + cols[None, :]))
    return out


def debayer_bilinear(mosaic: np.ndarray, pattern: str, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Bilinear debayering by normalised convolution.

    For each channel ``c`` with site mask ``m_c``: ``out_c = conv(mosaic * m_c, K_c) /
    conv(m_c, K_c)``, zero outside the array, with ``K = [[1,2,1],[2,4,2],[1,2,1]] / 4`` for R
    and B and the cross ``[[0,1,0],[1,4,1],[0,1,0]] / 4`` for G (the full K would average a
    green sample with its four diagonal greens). Measured samples keep their value exactly;
    inside the frame a missing value is the mean of the 2 or 4 nearest samples of its
    colour, and at an edge the mean of those present (no reflection artefacts). A uniform
    colour with integer (e.g. uint16) values is reproduced exactly everywhere.

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw mosaic (uint16 or float), the whole frame or a band of it.
    pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'}
        Bayer pattern of the *frame* (pixel (0, 0) of the frame, not of the band).
    origin : tuple of int, optional
        (row, col) of ``mosaic[0, 0]`` in the frame; the Bayer phase comes from absolute
        positions. A band cut with a margin of 2 pixels (1 is enough) on each side that is
        not a frame edge gives bit-identical interior pixels to debayering the whole frame.

    Returns
    -------
    numpy.ndarray
        (3, H, W) float32, channels R, G, B.

    Raises
    ------
    ValueError
        If ``mosaic`` is not 2-D or the pattern is unknown.
    """
    data = _as_float32_mosaic(mosaic)
    offsets = bayer_offsets(pattern)
    origin = (int(origin[0]), int(origin[1]))
    out = np.empty((3,) + data.shape, np.float32)
    out[0] = _interpolate_rb(data, offsets["R"][0], origin)
    out[1] = _interpolate_g(data, offsets["G"], origin)
    out[2] = _interpolate_rb(data, offsets["B"][0], origin)
    return out


MHC_BORDER = 2
"""Pixels closer than this to an array edge are filled by :func:`debayer_bilinear` in :func:`debayer_mhc`."""


def _mhc_phase(data: np.ndarray, out: np.ndarray, name: str, origin: tuple[int, int], lr: int, lc: int) -> None:
    """Fill the interior pixels of one 2x2 phase (local row/col parity ``lr``, ``lc``) of ``out`` by MHC.

    Every output is a fixed formula of the 5x5 neighbourhood of its pixel, chosen by the colour of the pixel
    and of its horizontal/vertical neighbours (one thread per output pixel in a CUDA port).
    """
    h, w = data.shape
    b = MHC_BORDER
    r0, c0 = b + lr, b + lc
    if r0 >= h - b or c0 >= w - b:
        return

    def at(dr: int, dc: int) -> np.ndarray:
        return data[r0 + dr : h - b + dr : 2, c0 + dc : w - b + dc : 2]

    ar, ac = (origin[0] + r0) % 2, (origin[1] + c0) % 2
    site = name[2 * ar + ac]
    horiz = name[2 * ar + (1 - ac)]  # colour of the left/right neighbours
    centre = at(0, 0)
    h1 = at(0, -1) + at(0, 1)
    v1 = at(-1, 0) + at(1, 0)
    h2 = at(0, -2) + at(0, 2)
    v2 = at(-2, 0) + at(2, 0)
    diag = (at(-1, -1) + at(-1, 1)) + (at(1, -1) + at(1, 1))
    eighth = np.float32(0.125)
    channels = {"R": 0, "G": 1, "B": 2}
    target = (slice(r0, h - b, 2), slice(c0, w - b, 2))
    out[(channels[site],) + target] = centre
    if site == "G":
        # R/B at a green site: 5 C + 4 (own-colour pair) - (same-axis +-2 greens) - diagonals + 1/2 (other axis +-2)
        along = ((np.float32(5.0) * centre + np.float32(4.0) * h1) - (h2 + diag) + np.float32(0.5) * v2) * eighth
        across = ((np.float32(5.0) * centre + np.float32(4.0) * v1) - (v2 + diag) + np.float32(0.5) * h2) * eighth
        other = "B" if horiz == "R" else "R"
        out[(channels[horiz],) + target] = along
        out[(channels[other],) + target] = across
    else:
        # G at R/B: 4 C + 2 (cross greens) - (+-2 same-colour); B at R / R at B: 6 C + 2 diagonals - 3/2 (+-2 same)
        axial2 = h2 + v2
        green = ((np.float32(4.0) * centre + np.float32(2.0) * (h1 + v1)) - axial2) * eighth
        opposite = ((np.float32(6.0) * centre + np.float32(2.0) * diag) - np.float32(1.5) * axial2) * eighth
        out[(1,) + target] = green
        out[(2 if site == "R" else 0,) + target] = opposite


def debayer_mhc(mosaic: np.ndarray, pattern: str, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Malvar-He-Cutler (2004) gradient-corrected linear debayering, bilinear on the 2-pixel border.

    H. S. Malvar, L.-W. He, R. Cutler, "High-quality linear interpolation for demosaicing of Bayer-patterned
    color images", ICASSP 2004. A missing value is the bilinear estimate of its colour corrected by the
    Laplacian of the colour measured at the pixel; the filters (all / 8, C = the pixel, H1/V1 = sum of the
    horizontal/vertical neighbours at distance 1, H2/V2 at distance 2, D = sum of the four diagonals):

    - G at R or B: ``4 C + 2 (H1 + V1) - (H2 + V2)``;
    - R (B) at G with R (B) left and right: ``5 C + 4 H1 - H2 - D + (V2) / 2``; with R (B) above and below:
      ``5 C + 4 V1 - V2 - D + (H2) / 2``;
    - B at R, R at B: ``6 C + 2 D - 3/2 (H2 + V2)``.

    The filters are linear (flux and noise stay linear: no data-dependent switching). Applied to a uniform
    colour they return exactly that colour (their weights sum to 1 on the wanted colour and to 0 on each other
    colour; float32 arithmetic is exact for integer data such as uint16). Measured pixels keep their value. Pixels closer than 2 to an
    array edge, where the 5x5 filter would leave the array, take :func:`debayer_bilinear`'s normalised
    convolution (no reflection artefacts).

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw mosaic (uint16 or float), the whole frame or a band of it.
    pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'}
        Bayer pattern of the *frame*.
    origin : tuple of int, optional
        (row, col) of ``mosaic[0, 0]`` in the frame; the Bayer phase comes from absolute positions. A band cut
        with a margin of 2 pixels on each side that is not a frame edge gives bit-identical interior pixels to
        debayering the whole frame (the pipeline uses 3).

    Returns
    -------
    numpy.ndarray
        (3, H, W) float32, channels R, G, B.

    Raises
    ------
    ValueError
        If ``mosaic`` is not 2-D or the pattern is unknown.
    """
    data = _as_float32_mosaic(mosaic)
    name = normalise_pattern(pattern)
    origin = (int(origin[0]), int(origin[1]))
    h, w = data.shape
    b = MHC_BORDER
    out = np.empty((3, h, w), np.float32)
    for lr in (0, 1):
        for lc in (0, 1):
            _mhc_phase(data, out, name, origin, lr, lc)
    # The border from bilinear strips of b + 2 pixels: bilinear reaches 1 pixel, so the strip's inner edge does
    # not change the pixels it fills (bit-identical to a whole-array bilinear debayer).
    strip = b + 2
    top, left = min(b, h), min(b, w)
    bottom, right = max(h - b, 0), max(w - b, 0)
    s_row, s_col = max(h - strip, 0), max(w - strip, 0)
    out[:, :top] = debayer_bilinear(data[:strip], name, origin)[:, :top]
    out[:, bottom:] = debayer_bilinear(data[s_row:], name, (origin[0] + s_row, origin[1]))[:, bottom - s_row :]
    out[:, :, :left] = debayer_bilinear(data[:, :strip], name, origin)[:, :, :left]
    out[:, :, right:] = debayer_bilinear(data[:, s_col:], name, (origin[0], origin[1] + s_col))[:, :, right - s_col :]
    return out


def debayer_superpixel(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """Superpixel debayering: one RGB pixel per 2x2 Bayer cell.

    Pixel ``(i, j)`` is built from mosaic rows ``2i, 2i+1`` and columns ``2j, 2j+1``: R, the
    mean of the two G, B. Its centre is full-resolution ``(x, y) = (2j + 0.5, 2i + 0.5)``
    (the centre of the cell; the greens lie on a diagonal, so their mean is there too, while
    R and B are half a full-resolution pixel off in each axis). Use
    :func:`~dwarf3gpu.geometry.superpixel_transform` to express transforms on this grid. An odd last row or
    column is dropped.

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw frame (uint16 or float) whose pixel (0, 0) starts a Bayer cell.
    pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'}
        Bayer pattern.

    Returns
    -------
    numpy.ndarray
        (3, H // 2, W // 2) float32, channels R, G, B.

    Raises
    ------
    ValueError
        If ``mosaic`` is not 2-D or the pattern is unknown.
    """
    data = _as_float32_mosaic(mosaic)
    offsets = bayer_offsets(pattern)
    h, w = (data.shape[0] // 2) * 2, (data.shape[1] // 2) * 2

    def plane(site: tuple[int, int]) -> np.ndarray:
        return data[site[0] : h : 2, site[1] : w : 2]

    out = np.empty((3, h // 2, w // 2), np.float32)
    out[0] = plane(offsets["R"][0])
    np.add(plane(offsets["G"][0]), plane(offsets["G"][1]), out=out[1])
    out[1] *= np.float32(0.5)
    out[2] = plane(offsets["B"][0])
    return out




def debayer_rggb(mosaic: np.ndarray, pattern: str = "RGGB", method: str = "bilinear") -> np.ndarray:
    """Debayer a whole raw frame (the public convenience entry point).

    Parameters
    ----------
    mosaic : numpy.ndarray
        (H, W) raw frame, uint16 or float.
    pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'}, optional
        Bayer pattern (FITS ``BAYERPAT``).
    method : {'bilinear', 'superpixel'}, optional
        :func:`debayer_bilinear` (full resolution) or :func:`debayer_superpixel` (half
        resolution, centred at ``(2j + 0.5, 2i + 0.5)``).

    Returns
    -------
    numpy.ndarray
        (3, H, W) or (3, H // 2, W // 2) float32, channels R, G, B.

    Raises
    ------
    ValueError
        If ``mosaic`` is not 2-D, or the pattern or the method is unknown.
    """
    if method == "bilinear":
        return debayer_bilinear(mosaic, pattern)
    if method == "superpixel":
        return debayer_superpixel(mosaic, pattern)
    raise ValueError(f"unknown debayer method {method!r}: expected one of {', '.join(DEBAYER_METHODS)}")
