"""FITS input and output.

Reading validates the primary header and the file size before touching the data, so a truncated, corrupt
or non-image file raises :class:`~dwarf3gpu.errors.FitsReadError` naming the file and the problem.

Raw DWARF 3 (and Seestar) lights are 16-bit with ``BZERO = 32768, BSCALE = 1``: the stored big-endian
``int16`` value ``s`` stands for ``s + 32768``, which is the same bit pattern as the ``uint16`` value with
its top bit flipped. :func:`read_raw_uint16` reads such frames with a single NumPy pass (byte swap fused with
the XOR of the sign bit) and :func:`read_fits` with a single fused swap-convert-add, without astropy's general
scaling machinery (``benchmarks/bench_fitsio.py`` measures the gain).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy.io import fits

from .atomic import atomic_path
from .errors import FitsReadError

__all__ = [
    "FitsImage",
    "FitsLayout",
    "read_header",
    "read_layout",
    "read_raw_uint16",
    "read_raw_window",
    "read_fits",
    "write_fits",
    "write_raw_uint16",
]

BLOCK = 2880
CARD = 80
_MAX_HEADER_BLOCKS = 1000  # 2.88 MB of header: far beyond any real file
_BITPIX_BYTES = {8: 1, 16: 2, 32: 4, 64: 8, -32: 4, -64: 8}
_STRUCTURAL_KEYS = ("SIMPLE", "BITPIX", "EXTEND", "BZERO", "BSCALE", "BLANK", "PCOUNT", "GCOUNT")


class FitsImage(NamedTuple):
    """Pixel data and header of a FITS primary image.

    Attributes
    ----------
    data : numpy.ndarray
        float32 pixels with BZERO/BSCALE applied; shape (H, W) or (3, H, W).
    header : astropy.io.fits.Header
        The primary header as stored.
    """

    data: np.ndarray
    header: fits.Header


class FitsLayout(NamedTuple):
    """Where the primary image of a FITS file lives.

    Attributes
    ----------
    header : astropy.io.fits.Header
        Parsed primary header.
    data_offset : int
        Byte offset of the first data byte.
    shape : tuple of int
        Array shape in NumPy order (NAXISn, ..., NAXIS1).
    bitpix : int
        BITPIX of the stored data.
    """

    header: fits.Header
    data_offset: int
    shape: tuple[int, ...]
    bitpix: int

    @property
    def data_nbytes(self) -> int:
        """Number of bytes of the primary data unit (without padding)."""
        return int(np.prod(self.shape, dtype=np.int64)) * _BITPIX_BYTES[self.bitpix]

    @property
    def is_raw_uint16(self) -> bool:
        """True for 16-bit data stored with BZERO = 32768 and BSCALE = 1 (unsigned 16-bit)."""
        h = self.header
        return (
            self.bitpix == 16
            and float(h.get("BZERO", 0)) == 32768.0
            and float(h.get("BSCALE", 1)) == 1.0
            and "BLANK" not in h
        )


def read_layout(path: str | os.PathLike) -> FitsLayout:
    """Parse and validate the primary header of a FITS file without reading its data.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file.

    Returns
    -------
    FitsLayout
        Header, data offset, shape and BITPIX.

    Raises
    ------
    FitsReadError
        Missing or unreadable file, not FITS, header without END, no image in the primary HDU,
        or a file shorter than its header says (truncated).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            raw = bytearray()
            for _ in range(_MAX_HEADER_BLOCKS):
                block = fh.read(BLOCK)
                if len(block) < BLOCK:
                    if not raw and not block:
                        raise FitsReadError(p, "the file is empty (0 bytes); copy it again from the device")
                    raise FitsReadError(p, "the header is truncated (the file ends before the END card)")
                if not raw and not block.startswith(b"SIMPLE  ="):
                    raise FitsReadError(p, "not a FITS file (it does not start with SIMPLE =)")
                raw += block
                if _has_end_card(block):
                    break
            else:
                raise FitsReadError(p, "no END card in the first 2.9 MB: not a valid FITS header")
    except OSError as exc:
        raise FitsReadError(p, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise FitsReadError(p, "the header holds non-ASCII bytes: the file is corrupt") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = fits.Header.fromstring(text)
    except Exception as exc:  # astropy raises several types for malformed cards
        raise FitsReadError(p, f"the header cannot be parsed ({exc})") from exc
    _check_cards(p, header)
    try:
        bitpix = int(header["BITPIX"])
        naxis = int(header["NAXIS"])
        shape = tuple(int(header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
    except (KeyError, ValueError, TypeError) as exc:
        raise FitsReadError(p, f"the header lacks a valid BITPIX/NAXIS description ({exc})") from exc
    if bitpix not in _BITPIX_BYTES:
        raise FitsReadError(p, f"BITPIX = {bitpix} is not a valid FITS value")
    if naxis == 0 or any(n <= 0 for n in shape):
        raise FitsReadError(p, "the primary HDU holds no image (NAXIS = 0 or an empty axis)")
    layout = FitsLayout(header, len(raw), shape, bitpix)
    needed = layout.data_offset + layout.data_nbytes
    if size < needed:
        raise FitsReadError(
            p,
            f"the file is truncated: {size} bytes on disk, {needed} needed for a "
            f"{'x'.join(map(str, reversed(shape)))} image (an interrupted copy? copy it again)",
        )
    return layout


def _check_cards(path: Path, header: fits.Header) -> None:
    """Parse every card's value now (astropy parses them lazily, on first use) so that one unparsable card
    makes the whole file unreadable, with the card named, instead of failing later wherever it is read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for card in header.cards:
            try:
                card.value  # noqa: B018 - parses the card
            except Exception:  # astropy's VerifyError and friends
                image = (getattr(card, "_image", None) or card.image).rstrip()  # as stored, not as re-formatted
                raise FitsReadError(
                    path,
                    f"header card {card.keyword or '(blank)'} cannot be parsed ({image!r}); the file is damaged or "
                    "was written by another program: copy it again from the device, or fix the card",
                ) from None


def _has_end_card(block: bytes) -> bool:
    """Return True when one of the 36 cards of a header block is the END card."""
    return any(block[i : i + CARD].rstrip() == b"END" for i in range(0, BLOCK, CARD))


def read_header(path: str | os.PathLike) -> fits.Header:
    """Return the validated primary header of a FITS file (the data is not read).

    Raises
    ------
    FitsReadError
        See :func:`read_layout`.
    """
    return read_layout(path).header


def read_raw_uint16(
    path: str | os.PathLike, layout: FitsLayout | None = None, rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> tuple[np.ndarray, fits.Header]:
    """Read a 16-bit ``BZERO = 32768`` frame as native ``uint16`` (exact), the pipeline's fast path.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file with BITPIX = 16, BZERO = 32768, BSCALE = 1.
    layout : FitsLayout, optional
        Result of :func:`read_layout` when the caller already has it.
    rows : (int, int), optional
        Read only image rows ``rows[0]:rows[1]`` (half-open, 2-D images): one contiguous read of those rows, as a
        stacking band needs them.
    cols : (int, int), optional
        Return only columns ``cols[0]:cols[1]`` (2-D images): the rows are still read whole (one contiguous
        read), but only the window is decoded, into a C-contiguous array.

    Returns
    -------
    data : numpy.ndarray
        uint16 array of the stored values plus 32768, in NumPy order (only the requested rows).
    header : astropy.io.fits.Header
        Primary header.

    Raises
    ------
    FitsReadError
        If the file is invalid or not stored as unsigned 16-bit.
    """
    layout = layout or read_layout(path)
    if not layout.is_raw_uint16:
        raise FitsReadError(path, "not an unsigned 16-bit frame (BITPIX=16, BZERO=32768, BSCALE=1); use read_fits")
    stored = _read_data_unit(path, layout, ">u2", rows)
    if cols is not None:
        if stored.ndim != 2:
            raise ValueError(f"a column range needs a 2-D image, not shape {stored.shape}")
        stored = stored[:, max(0, int(cols[0])):max(0, int(cols[1]))]
    # one pass: byte swap to native order (the dtype cast) and flip the sign bit (+32768 modulo 2**16)
    data = np.bitwise_xor(stored, np.uint16(0x8000), dtype=np.uint16)
    return data, layout.header


def _read_data_unit(path: str | os.PathLike, layout: FitsLayout, dtype: str,
                    rows: tuple[int, int] | None = None) -> np.ndarray:
    """The primary data unit (or rows ``rows[0]:rows[1]`` of a 2-D one) as stored (big-endian ``dtype``), shaped,
    memory-mapped read-only; raise FitsReadError when the file is shorter."""
    shape, offset = layout.shape, layout.data_offset
    if rows is not None:
        if len(shape) != 2:
            raise ValueError(f"a row range needs a 2-D image, not shape {shape}")
        row0, row1 = max(0, int(rows[0])), min(shape[0], int(rows[1]))
        row1 = max(row0, row1)
        offset += row0 * shape[1] * np.dtype(dtype).itemsize
        shape = (row1 - row0, shape[1])
    count = int(np.prod(shape, dtype=np.int64))
    try:
        if os.path.getsize(path) < offset + count * np.dtype(dtype).itemsize:
            raise FitsReadError(path, "the data unit is truncated")
        if count == 0:
            return np.empty(shape, dtype)
        # Mapped, not read: the decode reads the page cache directly (no copy into fresh pages first); the file
        # is closed when the array is dropped (the callers decode it at once).
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape).view(np.ndarray)
    except OSError as exc:
        raise FitsReadError(path, f"cannot be read ({exc.strerror or exc})") from exc


def read_fits(path: str | os.PathLike, *, fast: bool = True) -> FitsImage:
    """Read the primary image of a FITS file as float32 with BZERO/BSCALE applied.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file.
    fast : bool, default True
        Use :func:`read_raw_uint16` for unsigned 16-bit frames (bit-identical to astropy, faster).
        Other layouts are always read through astropy.

    Returns
    -------
    FitsImage
        ``(data, header)``; 16-bit values are exact in float32.

    Raises
    ------
    FitsReadError
        Missing, truncated, corrupt or non-image file.

    Examples
    --------
    >>> data, header = read_fits("IC 434_60s60_Astro_20251018-045926401_16C.fits")  # doctest: +SKIP
    >>> data.dtype, header["BAYERPAT"]  # doctest: +SKIP
    (dtype('float32'), 'RGGB')
    """
    layout = read_layout(path)
    if fast and layout.is_raw_uint16:
        stored = _read_data_unit(path, layout, ">i2")
        # one pass: byte swap, convert and add BZERO; every 16-bit value is exact in float32
        return FitsImage(np.add(stored, np.float32(32768.0), dtype=np.float32), layout.header)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                data = hdul[0].data
                header = hdul[0].header.copy()
                if data is None:
                    raise FitsReadError(path, "the primary HDU holds no image")
                data = np.asarray(data, dtype=np.float32)
    except FitsReadError:
        raise
    except Exception as exc:
        raise FitsReadError(path, f"the data cannot be decoded ({exc})") from exc
    return FitsImage(data, header)


@functools.lru_cache(maxsize=4096)
def _layout_of(path: str, size: int, mtime_ns: int) -> FitsLayout:
    """:func:`read_layout` of a file, memoized by its identity (size and modification time): the stacking reads one
    window of every frame per tile, and the header is parsed and checked once."""
    return read_layout(path)


def read_raw_window(path: str | os.PathLike, rows: tuple[int, int] | None = None,
                    cols: tuple[int, int] | None = None) -> np.ndarray:
    """A raw mosaic, or its window ``rows[0]:rows[1]`` x ``cols[0]:cols[1]``, as stored.

    The one reader of raw frames for every stage: uint16 on the fast path (:func:`read_raw_uint16`: only those
    rows read, only the window decoded, C-contiguous), otherwise the values :func:`read_fits` gives (float32).

    Raises
    ------
    FitsReadError
        The file cannot be read, or it is not a 2-D mosaic.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FitsReadError(path, f"cannot be read ({exc.strerror or exc})") from exc
    layout = _layout_of(os.fspath(path), st.st_size, st.st_mtime_ns)
    if len(layout.shape) != 2:
        raise FitsReadError(path, f"expected a 2-D Bayer mosaic, got shape {layout.shape}")
    if layout.is_raw_uint16:
        return read_raw_uint16(path, layout, rows, cols)[0]
    data = read_fits(path).data
    if data.ndim != 2:
        raise FitsReadError(path, f"expected a 2-D Bayer mosaic, got shape {data.shape}")
    data = data if rows is None else data[rows[0]:rows[1]]
    return data if cols is None else data[:, cols[0]:cols[1]]


def _clean_header(header: fits.Header | None) -> fits.Header:
    """Copy ``header`` without the cards that describe the stored array (astropy rewrites them)."""
    out = fits.Header()
    if header is None:
        return out
    for card in header.cards:
        key = card.keyword
        if key in _STRUCTURAL_KEYS or key.startswith("NAXIS") or key == "END":
            continue
        out.append(card, end=True)
    return out


def write_fits(data: np.ndarray, path: str | os.PathLike, header: fits.Header | None = None) -> Path:
    """Write an image as a float32 FITS file, atomically, replacing any existing file.

    Parameters
    ----------
    data : numpy.ndarray
        (H, W) mono or CFA image, or an RGB image as (H, W, 3) or (3, H, W). RGB is always written as
        (3, H, W) (NAXIS3 = 3), the layout Siril, PixInsight and DS9 open as colour.
    path : str or os.PathLike
        Destination; parent folders are created.
    header : astropy.io.fits.Header, optional
        Cards to copy (structural cards such as BITPIX, NAXISn, BZERO are recomputed).

    Returns
    -------
    pathlib.Path
        The written path.
    """
    arr = np.asarray(data)
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.shape[0] != 3:
        arr = np.moveaxis(arr, -1, 0)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[0] != 3):
        raise ValueError(f"write_fits expects (H, W), (H, W, 3) or (3, H, W); got shape {arr.shape}")
    # FITS stores big-endian values; converting into a new array here (one pass) spares astropy's in-place
    # byteswap and swap back of a little-endian array (two passes), and leaves ``data`` untouched while it is
    # written, so other threads may read it meanwhile. Same bytes.
    arr = np.ascontiguousarray(arr, dtype=np.dtype(">f4"))
    hdu = fits.PrimaryHDU(arr, header=_clean_header(header))
    if arr.ndim == 3:
        hdu.header["CTYPE3"] = ("RGB", "colour planes R, G, B")
    with atomic_path(path) as tmp:
        hdu.writeto(tmp, overwrite=True, output_verify="silentfix")
    return Path(path)


def write_raw_uint16(data: np.ndarray, path: str | os.PathLike, header: fits.Header | None = None) -> Path:
    """Write a uint16 image byte for byte the way DWARF 3 does: BITPIX = 16, BZERO = 32768, BSCALE = 1.

    The structural cards come first in the device's order (SIMPLE, BITPIX, NAXIS, NAXISn, EXTEND, BZERO,
    BSCALE), then the cards of ``header``; the data are big-endian ``int16`` values ``v - 32768``.

    Parameters
    ----------
    data : numpy.ndarray
        uint16 image (H, W) or cube (3, H, W).
    path : str or os.PathLike
        Destination (written atomically).
    header : astropy.io.fits.Header, optional
        Cards to copy after the structural ones (comments kept).

    Returns
    -------
    pathlib.Path
        The written path.
    """
    arr = np.ascontiguousarray(data)
    if arr.dtype != np.uint16:
        raise ValueError(f"write_raw_uint16 expects uint16 data, got {arr.dtype}")
    out = fits.Header()
    out["SIMPLE"] = (True, "file does conform to FITS standard")
    out["BITPIX"] = (16, "number of bits per data pixel")
    out["NAXIS"] = (arr.ndim, "number of data axes")
    for i, n in enumerate(reversed(arr.shape), start=1):
        out[f"NAXIS{i}"] = (n, f"length of data axis {i}")
    out["EXTEND"] = (True, "FITS dataset may contain extensions")
    out["BZERO"] = (32768, "offset data range to that of unsigned short")
    out["BSCALE"] = (1, "default scaling factor")
    for card in _clean_header(header).cards:
        out.append(card, end=True)
    text = out.tostring()  # padded to a multiple of 2880 bytes, END included
    stored = np.bitwise_xor(arr, np.uint16(0x8000)).astype(">u2")
    pad = (-stored.nbytes) % BLOCK
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(text.encode("ascii"))
        fh.write(stored.tobytes())
        fh.write(b"\0" * pad)
    return Path(path)
