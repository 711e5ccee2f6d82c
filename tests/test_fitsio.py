"""FITS input/output against astropy as the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from dwarf3gpu.errors import FitsReadError
from dwarf3gpu.fitsio import (
    read_fits,
    read_header,
    read_layout,
    read_raw_uint16,
    read_raw_window,
    write_fits,
    write_raw_uint16,
)


@pytest.fixture
def raw_frame(tmp_path):
    """A 16-bit frame covering the full uint16 range, written by astropy the way DWARF 3 does (BZERO = 32768)."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 65536, size=(37, 53), dtype=np.uint16)
    data[0, :4] = [0, 1, 32767, 65535]
    path = tmp_path / "raw.fits"
    hdu = fits.PrimaryHDU(data)
    hdu.header["BAYERPAT"] = "RGGB"
    hdu.writeto(path)
    return path, data


def test_raw_uint16_exact_and_matches_astropy(raw_frame):
    path, truth = raw_frame
    with fits.open(path) as hdul:
        assert hdul[0].header["BZERO"] == 32768
        reference = hdul[0].data.astype(np.float32)
    fast, header = read_fits(path)
    slow, _ = read_fits(path, fast=False)
    raw, _ = read_raw_uint16(path)
    assert fast.dtype == np.float32 and slow.dtype == np.float32
    np.testing.assert_array_equal(fast, reference)
    np.testing.assert_array_equal(slow, reference)
    np.testing.assert_array_equal(raw, truth)
    assert raw.dtype == np.uint16 and raw.flags.c_contiguous
    assert header["BAYERPAT"] == "RGGB"
    window, _ = read_raw_uint16(path, rows=(3, 11), cols=(5, 17))  # a stacking window: decoded alone, contiguous
    np.testing.assert_array_equal(window, truth[3:11, 5:17])
    assert window.flags.c_contiguous


WINDOWS = [(None, None), ((3, 11), None), (None, (5, 17)), ((3, 11), (5, 17)), ((0, 37), (0, 53)), ((36, 37), (52, 53))]


def test_raw_window_of_a_uint16_file_is_the_full_read_sliced(raw_frame):
    """read_raw_window on a BZERO = 32768 frame: uint16, exact, C-contiguous, and every window is the full read
    sliced (rows only, columns only, both, the whole frame, a corner pixel)."""
    path, truth = raw_frame
    full = read_raw_window(path)
    assert full.dtype == np.uint16 and full.flags.c_contiguous
    np.testing.assert_array_equal(full, truth)
    for rows, cols in WINDOWS:
        window = read_raw_window(path, rows=rows, cols=cols)
        r = slice(None) if rows is None else slice(*rows)
        c = slice(None) if cols is None else slice(*cols)
        assert window.dtype == np.uint16 and window.flags.c_contiguous, (rows, cols)
        np.testing.assert_array_equal(window, full[r, c])
        np.testing.assert_array_equal(window, truth[r, c])


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_raw_window_of_other_files_is_read_fits_sliced(tmp_path, dtype):
    """Files that are not raw uint16 (float32, signed 16-bit, 8-bit) come back with read_fits' values (float32),
    windowed the same way."""
    rng = np.random.default_rng(4)
    data = (rng.random((21, 30)) * 100).astype(dtype)
    path = tmp_path / "other.fits"
    fits.PrimaryHDU(data).writeto(path)
    full = read_raw_window(path)
    assert full.dtype == np.float32
    np.testing.assert_array_equal(full, read_fits(path).data)
    np.testing.assert_array_equal(full, data.astype(np.float32))
    for rows, cols in ((None, (4, 9)), ((2, 20), None), ((2, 20), (4, 9)), ((20, 21), (29, 30))):
        r = slice(None) if rows is None else slice(*rows)
        c = slice(None) if cols is None else slice(*cols)
        np.testing.assert_array_equal(read_raw_window(path, rows=rows, cols=cols), full[r, c])


@pytest.mark.parametrize("stored", [np.float32, np.uint16])
@pytest.mark.parametrize("window", [(None, None), ((0, 2), None), (None, (0, 3))])
def test_raw_window_of_a_3d_file_raises(tmp_path, stored, window):
    """A cube is not a Bayer mosaic: FitsReadError naming the shape, whatever the storage and window."""
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.arange(2 * 4 * 6).reshape(2, 4, 6).astype(stored)).writeto(path)
    try:
        read_raw_window(path, rows=window[0], cols=window[1])
    except FitsReadError as exc:
        assert "2-D" in str(exc) and "(2, 4, 6)" in str(exc)
    else:
        raise AssertionError("read_raw_window read a 3-D file without FitsReadError")


def test_signed_16bit_and_scaled_data_use_astropy_semantics(tmp_path):
    data = np.array([[-32768, -1], [0, 32767]], dtype=np.int16)
    hdu = fits.PrimaryHDU(data)
    hdu.header["BSCALE"] = 2.0
    hdu.header["BZERO"] = 10.0
    path = tmp_path / "scaled.fits"
    hdu.writeto(path)
    with fits.open(path) as hdul:
        expected = hdul[0].data.astype(np.float32)
    np.testing.assert_array_equal(read_fits(path).data, expected)
    np.testing.assert_array_equal(read_fits(path).data, data.astype(np.float32) * 2 + 10)
    with pytest.raises(FitsReadError, match="not an unsigned 16-bit"):
        read_raw_uint16(path)


def test_write_raw_uint16_round_trip_has_device_layout(tmp_path):
    data = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    path = write_raw_uint16(data, tmp_path / "x.fits", fits.Header({"EXPTIME": 60.0}))
    header = read_header(path)
    assert header["BITPIX"] == 16 and header["BZERO"] == 32768 and header["BSCALE"] == 1
    assert header["EXPTIME"] == 60.0
    np.testing.assert_array_equal(read_raw_uint16(path)[0], data)


@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_rgb_written_as_three_planes(tmp_path, layout):
    rgb = np.random.default_rng(2).random((5, 7, 3)).astype(np.float32)
    data = rgb if layout == "hwc" else np.moveaxis(rgb, -1, 0)
    path = write_fits(data, tmp_path / "rgb.fits", fits.Header({"OBJECT": "M 31", "BZERO": 32768}))
    with fits.open(path) as hdul:
        hdr = hdul[0].header
        assert (hdr["NAXIS"], hdr["NAXIS1"], hdr["NAXIS2"], hdr["NAXIS3"]) == (3, 7, 5, 3)
        assert hdr["BITPIX"] == -32 and "BZERO" not in hdr
        assert hdr["OBJECT"] == "M 31"
        np.testing.assert_array_equal(hdul[0].data[1], rgb[..., 1])


def test_write_fits_float32_and_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "m.fits"
    write_fits(np.zeros((4, 4)), path)
    write_fits(np.full((4, 4), 2.5), path)
    data, header = read_fits(path)
    assert header["BITPIX"] == -32
    np.testing.assert_array_equal(data, 2.5)
    assert [p.name for p in path.parent.iterdir()] == ["m.fits"]  # no temporary left behind


def test_nan_survives_round_trip(tmp_path):
    data = np.ones((3, 3), np.float32)
    data[1, 1] = np.nan
    out = read_fits(write_fits(data, tmp_path / "nan.fits")).data
    assert np.isnan(out[1, 1]) and np.nansum(out) == 8


@pytest.mark.parametrize("cut", [100, 2880, 2880 + 10, "last data byte"])
def test_truncated_files_raise_project_error(raw_frame, tmp_path, cut):
    path, _ = raw_frame
    blob = path.read_bytes()
    if cut == "last data byte":
        layout = read_layout(path)
        cut = layout.data_offset + layout.data_nbytes - 1
    bad = tmp_path / "bad.fits"
    bad.write_bytes(blob[:cut])
    with pytest.raises(FitsReadError, match="truncated") as info:
        read_fits(bad)
    assert "bad.fits" in str(info.value)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty"),
        (b"\x89PNG\r\n" + b"\0" * 4000, "not a FITS file"),
        ((b"SIMPLE  =                    T".ljust(80) + b"\xff" * 80 + b"END".ljust(80)).ljust(2880), "non-ASCII"),
        (b"SIMPLE  =                    T".ljust(2880, b" ") * 3, "truncated"),
    ],
)
def test_corrupt_files_raise_project_error(tmp_path, content, problem):
    bad = tmp_path / "corrupt.fits"
    bad.write_bytes(content)
    with pytest.raises(FitsReadError, match=problem):
        read_fits(bad)


def test_missing_file_and_headers_without_image(tmp_path):
    with pytest.raises(FitsReadError, match="cannot be read"):
        read_fits(tmp_path / "nope.fits")
    empty = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])]).writeto(empty)
    with pytest.raises(FitsReadError, match="no image"):
        read_fits(empty)


def test_layout_offsets_match_astropy(raw_frame):
    path, _ = raw_frame
    layout = read_layout(path)
    with fits.open(path) as hdul:
        info = hdul[0].fileinfo()
    assert layout.data_offset == info["datLoc"]
    assert layout.shape == (37, 53) and layout.is_raw_uint16


def test_real_seestar_frame_matches_astropy(realdata):
    path = sorted(realdata("seestar_m94_s2").glob("*.fit"))[0]
    fast, header = read_fits(path)
    with fits.open(path) as hdul:
        reference = hdul[0].data.astype(np.float32)
    assert header["BAYERPAT"].strip() == "GRBG"
    assert fast.shape == (1920, 1080)
    np.testing.assert_array_equal(fast, reference)


def test_raw_writer_reproduces_the_real_device_header(tmp_path, header_from_dump, realdata):
    """Written with the real DWARF 3 light header, the file's header equals the dump card for card."""
    dump = header_from_dump(realdata("dwarf3_reference_text", "typ-light_IC434.txt"))
    path = write_raw_uint16(np.zeros((2180, 3856), np.uint16), tmp_path / "light.fits", dump)
    written = read_header(path)
    assert list(written.keys()) == list(dump.keys())
    for key in dump:
        assert written[key] == dump[key], key
        assert written.comments[key] == dump.comments[key], key
    assert path.stat().st_size == 2880 + 2180 * 3856 * 2 + (-(2180 * 3856 * 2)) % 2880
