"""Geometry conventions of the whole package: the 2x3 transform and the Bayer colour filter array.

**Transforms.** A transform is a 2x3 float64 affine ``A`` that maps a frame pixel ``(x, y)`` (x = column,
y = row, origin at the centre of pixel (0, 0), full-resolution mosaic pixels) to the reference frame's pixel::

    [x_ref, y_ref] = A[:, :2] @ [x, y] + A[:, 2]

Arrays index ``[row, col]``; astroalign's (x, y) matrices enter through :mod:`dwarf3gpu.register` and everything
else uses this one convention: :func:`apply_transform`, :func:`invert_transform`, :func:`compose`,
:func:`rotation_deg`, :func:`scale`, :func:`to_cv2_warp_matrix`, :func:`even_pixel_shift`, and the conversions
to half-resolution grids (:func:`superpixel_transform`, :func:`plane_transform`).

**Bayer patterns.** A pattern names the colours of the mosaic pixels (0, 0), (0, 1), (1, 0), (1, 1) (FITS
``BAYERPAT``); a pixel's colour comes from its absolute position in the frame, so a window of a frame keeps its
phase through its ``origin``: :data:`BAYER_PATTERNS`, :func:`normalise_pattern`, :func:`bayer_offsets`,
:func:`pattern_code` (the kernels' integer code) and :func:`cfa_channel_map`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "BAYER_PATTERNS",
    "MONO_CODE",
    "normalise_pattern",
    "bayer_offsets",
    "pattern_code",
    "cfa_channel_map",
    "apply_transform",
    "invert_transform",
    "compose",
    "rotation_deg",
    "scale",
    "to_cv2_warp_matrix",
    "even_pixel_shift",
    "superpixel_transform",
    "plane_transform",
]

BAYER_PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")
"""The four Bayer patterns, in the order of their kernel codes (:func:`pattern_code`)."""

MONO_CODE = -1
"""Kernel code of a mosaic without a colour filter array."""


def normalise_pattern(pattern: str) -> str:
    """Return the upper-case pattern name, or raise ValueError for an unknown one."""
    name = str(pattern).strip().upper()
    if name not in BAYER_PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}: expected one of {', '.join(BAYER_PATTERNS)}")
    return name


def bayer_offsets(pattern: str) -> dict[str, list[tuple[int, int]]]:
    """Return the (row, col) positions of the R, G and B sites in the 2x2 Bayer cell.

    Parameters
    ----------
    pattern : {'RGGB', 'GRBG', 'GBRG', 'BGGR'}
        Colours of the mosaic pixels (0, 0), (0, 1), (1, 0), (1, 1) (FITS ``BAYERPAT``,
        case-insensitive).

    Returns
    -------
    dict
        ``{"R": [(r, c)], "G": [(r, c), (r, c)], "B": [(r, c)]}``, the greens in raster order.
        A pixel at absolute (row, col) has the colour whose offset is ``(row % 2, col % 2)``.

    Raises
    ------
    ValueError
        If the pattern is unknown.
    """
    name = normalise_pattern(pattern)
    cells = [(r, c) for r in (0, 1) for c in (0, 1)]
    return {colour: [cell for cell, letter in zip(cells, name) if letter == colour] for colour in "RGB"}


def pattern_code(pattern: str | None) -> int:
    """Kernel code of a Bayer pattern: its index in :data:`BAYER_PATTERNS`; :data:`MONO_CODE` for None (mono).

    Raises
    ------
    ValueError
        Unknown pattern.
    """
    if pattern is None:
        return MONO_CODE
    return BAYER_PATTERNS.index(normalise_pattern(pattern))


def cfa_channel_map(pattern: str, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) channel index (0 R, 1 G, 2 B) of each pixel of a CFA tile at absolute ``origin`` (row, col)."""
    offsets = bayer_offsets(pattern)
    cell = np.zeros((2, 2), np.intp)
    for c, name in enumerate("RGB"):
        for dr, dc in offsets[name]:
            cell[dr, dc] = c
    r = (np.arange(origin[0], origin[0] + shape[0]) % 2)[:, None]
    col = (np.arange(origin[1], origin[1] + shape[1]) % 2)[None, :]
    return cell[r, col]


def apply_transform(A: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map points through an affine transform.

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine, frame pixel -> reference pixel.
    xy : numpy.ndarray
        (N, 2) or (2,) points [x, y].

    Returns
    -------
    numpy.ndarray
        Transformed points, same shape as ``xy``, float64.
    """
    A = np.asarray(A, dtype=np.float64)
    return np.asarray(xy, dtype=np.float64) @ A[:, :2].T + A[:, 2]


def invert_transform(A: np.ndarray) -> np.ndarray:
    """Return the inverse affine (reference pixel -> frame pixel).

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine.

    Returns
    -------
    numpy.ndarray
        (2, 3) float64 affine ``B`` with ``apply_transform(B, apply_transform(A, p)) == p``.
    """
    A = np.asarray(A, dtype=np.float64)
    linear = np.linalg.inv(A[:, :2])
    return np.hstack([linear, (-linear @ A[:, 2])[:, None]])


def compose(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Return the affine that applies ``B`` first, then ``A`` (like the matrix product A @ B).

    Parameters
    ----------
    A, B : numpy.ndarray
        (2, 3) affines; e.g. ``compose(mid_to_ref, frame_to_mid)`` is ``frame_to_ref``.

    Returns
    -------
    numpy.ndarray
        (2, 3) float64 affine ``p -> A(B(p))``.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    return np.hstack([A[:, :2] @ B[:, :2], (A[:, :2] @ B[:, 2] + A[:, 2])[:, None]])


def rotation_deg(A: np.ndarray) -> float:
    """Return the rotation angle of an affine in degrees, in (-180, 180].

    The angle is that of the closest similarity transform, measured from the +x axis towards
    the +y axis (on an image displayed with row 0 at the top this is clockwise).

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine.

    Returns
    -------
    float
        Rotation in degrees.
    """
    A = np.asarray(A, dtype=np.float64)
    return math.degrees(math.atan2(A[1, 0] - A[0, 1], A[0, 0] + A[1, 1]))


def scale(A: np.ndarray) -> float:
    """Return the mean linear scale of an affine, ``sqrt(|det A[:, :2]|)``.

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine.

    Returns
    -------
    float
        1.0 for a rigid motion.
    """
    A = np.asarray(A, dtype=np.float64)
    return math.sqrt(abs(float(np.linalg.det(A[:, :2]))))


def to_cv2_warp_matrix(A: np.ndarray) -> np.ndarray:
    """Return the matrix that resamples a frame into the reference grid with cv2.warpAffine.

    cv2.warpAffine fills each destination pixel from ``src`` at ``M @ [x, y, 1]`` when
    ``cv2.WARP_INVERSE_MAP`` is set, i.e. ``M`` must map *destination* (reference) pixels to
    *source* (frame) pixels, which is the inverse of ``A``. Without the flag cv2 inverts ``M``
    itself and would expect ``A``. This function returns the explicit inverse, so the mapping
    used for sampling is the one written down here::

        M = to_cv2_warp_matrix(A)
        aligned = cv2.warpAffine(frame, M, (ref_width, ref_height),
                                 flags=cv2.INTER_LANCZOS4 | cv2.WARP_INVERSE_MAP)

    cv2 puts integer coordinates at pixel centres, the project convention, so no half-pixel
    offset is needed: a star at frame pixel ``p`` lands at ``apply_transform(A, p)``.

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine, frame pixel -> reference pixel.

    Returns
    -------
    numpy.ndarray
        (2, 3) float64 matrix, reference pixel -> frame pixel, for use with
        ``cv2.WARP_INVERSE_MAP``.
    """
    return invert_transform(A)


def even_pixel_shift(A: np.ndarray, centre_xy: tuple[float, float] | None = None) -> tuple[int, int]:
    """Round a transform's displacement to even integers (keeps the Bayer phase).

    The shift applies to the frame: frame pixel (x, y) goes to reference pixel
    (x + dx, y + dy), i.e. ``aligned[y + dy, x + dx] = frame[y, x]``. Even values keep every
    CFA site on a site of the same colour.

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine, frame pixel -> reference pixel.
    centre_xy : tuple of float, optional
        Frame point whose displacement ``A(p) - p`` is rounded; pass the frame centre
        ``((width - 1) / 2, (height - 1) / 2)`` so that a small residual rotation does not
        bias the shift. None uses the translation part ``A[:, 2]`` (displacement of pixel 0, 0).

    Returns
    -------
    (int, int)
        ``(dx, dy)``, both even.
    """
    A = np.asarray(A, dtype=np.float64)
    if centre_xy is None:
        displacement = A[:, 2]
    else:
        point = np.asarray(centre_xy, dtype=np.float64)
        displacement = apply_transform(A, point) - point
    dx, dy = (2 * np.round(displacement / 2.0)).astype(int)
    return int(dx), int(dy)


def superpixel_transform(A: np.ndarray) -> np.ndarray:
    """Convert a full-resolution frame -> reference affine to superpixel coordinates.

    With ``S(p) = 2 p + 0.5`` mapping a superpixel coordinate to full resolution (see
    :func:`debayer_superpixel`), the result is ``S^-1 o A o S``: the same linear part and the
    translation ``(A[:, :2] @ [0.5, 0.5] + A[:, 2] - 0.5) / 2``.

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine, full-resolution frame pixel -> full-resolution reference pixel.

    Returns
    -------
    numpy.ndarray
        (2, 3) float64 affine, superpixel of the frame -> superpixel of the reference.
    """
    A = np.asarray(A, dtype=np.float64)
    shift = A[:, :2] @ np.array([0.5, 0.5]) + A[:, 2] - 0.5
    return np.hstack([A[:, :2], (shift / 2.0)[:, None]])


def plane_transform(A: np.ndarray, site: tuple[int, int]) -> np.ndarray:
    """Express a full-resolution affine between the Bayer planes of one site.

    The plane of site ``(r, c)`` holds the mosaic pixels ``[r::2, c::2]``: plane pixel
    ``p = (j, i)`` is the full-resolution point ``S(p) = 2 p + (c, r)``. The plane's affine is
    ``S^-1 o A o S``: the same linear part and the translation
    ``(A[:, :2] @ (c, r) + A[:, 2] - (c, r)) / 2``.

    Parameters
    ----------
    A : numpy.ndarray
        (2, 3) affine, full-resolution frame pixel -> reference pixel.
    site : tuple of int
        (row, col) of the site in the 2x2 cell, each 0 or 1.

    Returns
    -------
    numpy.ndarray
        (2, 3) float64 affine, frame plane pixel -> reference plane pixel of the same site.
    """
    A = np.asarray(A, dtype=np.float64)
    offset = np.array([site[1], site[0]], dtype=np.float64)
    return np.hstack([A[:, :2], ((A[:, :2] @ offset + A[:, 2] - offset) / 2.0)[:, None]])
