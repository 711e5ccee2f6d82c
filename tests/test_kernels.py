"""The CUDA C kernels through their CPU build, against the NumPy reference implementations.

The CPU build compiles the very files the GPU runs (kernels/*.cu), so these tests check the GPU kernels' logic
on any machine with a C++ compiler. Tolerances: decode, debayer (bilinear, superpixel, luminance proxy), warps
(bilinear, bicubic, Bayer planes; image, mask and feather weight) and histograms are bit-identical; sigma
clipping has identical coverage, rejection counts and kept sets, sample by sample (the bounds are bit-identical
for median/mad_std; with a std spread they differ by float64 rounding, which only a sample within ~1e-15 of a
bound could notice), on fresh random stacks of 1 to 512 frames (both sort paths), ties, all-invalid pixels,
every option; means within 1e-6 relative (float32 rounding of float64 sums taken in another order; near 0, 1e-12
of the data's scale); moments within 1e-12. The clip step of ``stack_tiles`` on the kernel is checked against
the reference step on strided tile views and for identical output across tile sizes, thread pools and OpenMP
thread counts.
Also: argument type checks, the source search order, compiler messages naming the file, ``nvcc --ptx`` of
every kernel for sm_80 and sm_90, and a built wheel that ships and finds the sources.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dwarf3gpu import stack as stack_module
from dwarf3gpu.backends import kernels, native
from dwarf3gpu.debayer import debayer_bilinear, debayer_superpixel
from dwarf3gpu.errors import BackendUnavailableError
from dwarf3gpu.fitsio import read_fits, read_layout, write_raw_uint16
from dwarf3gpu.stars import luminance_proxy
from dwarf3gpu.backends.kernels import grid_2d
from dwarf3gpu.warp import (LATTICE_MARGIN, lattice_layout, lattice_planes, shift_integer, source_window, warp_affine, warp_bayer_planes, warp_lattice,
                             window_margin)

REPO = Path(__file__).resolve().parents[1]
PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")
METHODS = ("bilinear", "bicubic")
# Shapes that are not multiples of the 32 x 8 block, plus one-pixel edges.
SHAPES = [(37, 53), (9, 1), (1, 9), (1, 1), (2, 3), (3, 2)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """The CPU build, compiled into a fresh cache folder (skips without a C++ compiler)."""
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler (g++, c++ or $CXX) to build the CPU target of the kernels")
    return native.load(root=tmp_path_factory.mktemp("native-cache"))


@pytest.fixture(scope="module")
def ops(lib):
    """Stage operations on the CPU build."""
    return native.native_ops(root=lib.path.parents[1])


def rigid(theta_deg: float, tx: float, ty: float) -> np.ndarray:
    """Rotation about the origin then translation, frame -> reference."""
    t = np.radians(theta_deg)
    return np.array([[np.cos(t), -np.sin(t), tx], [np.sin(t), np.cos(t), ty]])


def assert_same(actual, expected):
    """Bit-identical arrays of the same dtype and shape (NaN where NaN)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected, strict=True)


# --------------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (3, 1)])
def test_decode_matches_read_fits(ops, tmp_path, shape):
    data = np.random.default_rng(1).integers(0, 65536, size=shape, dtype=np.uint16)
    data.flat[0], data.flat[-1] = 0, 65535
    path = write_raw_uint16(data, tmp_path / "frame.fits")
    layout = read_layout(path)
    stored = np.fromfile(path, ">u2", count=data.size, offset=layout.data_offset).reshape(shape)
    assert_same(ops.decode(stored), read_fits(path).data)
    assert_same(ops.decode(stored.view(np.uint8).ravel(), shape=shape), read_fits(path).data)


def test_decode_fused_calibration(ops):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 65536, size=(29, 41), dtype=np.uint16)
    stored = (data.astype(np.int32) - 32768).astype(">i2")
    dark = rng.normal(500, 20, data.shape).astype(np.float32)
    flat = rng.uniform(0.8, 1.2, data.shape).astype(np.float32)
    value = data.astype(np.float32)
    assert_same(ops.decode(stored, dark=dark), value - dark)
    assert_same(ops.decode(stored, flat=flat), value / flat)
    assert_same(ops.decode(stored, dark=dark, flat=flat), (value - dark) / flat)
    with pytest.raises(ValueError, match="already decoded"):
        ops.decode(data.astype(np.int16))


# -------------------------------------------------------------------------------------------------- debayer


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # colours absent from tiny bands: NaN
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES)
def test_debayer_bilinear_bit_identical(ops, pattern, shape):
    rng = np.random.default_rng(hash((pattern, shape)) % 2**32)
    mosaic = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    for origin in [(0, 0), (1, 0), (0, 1), (1, 1), (4, 7)]:
        assert_same(ops.debayer_bilinear(mosaic, pattern, origin), debayer_bilinear(mosaic, pattern, origin))


def test_debayer_bilinear_nan_and_float(ops):
    mosaic = np.random.default_rng(3).normal(0, 1000, (23, 31)).astype(np.float32)
    mosaic[5, 7] = np.nan
    mosaic[0, 0] = -np.inf
    for pattern in PATTERNS:
        assert_same(ops.debayer_bilinear(mosaic, pattern, (3, 2)), debayer_bilinear(mosaic, pattern, (3, 2)))


@pytest.mark.parametrize("shape", SHAPES + [(38, 54)])
def test_superpixel_and_luminance_bit_identical(ops, shape):
    mosaic = np.random.default_rng(4).integers(0, 65536, size=shape, dtype=np.uint16)
    for pattern in PATTERNS:
        assert_same(ops.debayer_superpixel(mosaic, pattern), debayer_superpixel(mosaic, pattern))
        assert_same(ops.luminance_proxy(mosaic, pattern), luminance_proxy(mosaic, pattern))
    assert_same(ops.luminance_proxy(mosaic, None), luminance_proxy(mosaic, None))


# ----------------------------------------------------------------------------------------------------- warp


def _warp_cases():
    return [
        (rigid(17.0, 5.3, -7.1), (50, 70), (2, -3)),
        (rigid(-101.0, 60.2, 20.7), (33, 45), (0, 0)),
        (np.array([[1.02, 0.03, 0.6], [-0.01, 0.97, 1.4]]), (64, 49), (-5, 7)),
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("feather", [0.0, 3.5])
def test_warp_affine_bit_identical(ops, method, feather):
    rng = np.random.default_rng(5)
    image = rng.normal(1000, 100, (3, 61, 47)).astype(np.float32)
    image[1, 30, 20] = np.nan
    for A, out_shape, out_origin in _warp_cases():
        for src in (image, image[0]):
            got = ops.warp_affine(src, A, out_shape, out_origin=out_origin, method=method, feather_px=feather)
            want = warp_affine(src, A, out_shape, out_origin=out_origin, method=method, feather_px=feather)
            for g, w in zip(got, want):
                assert_same(g, w)


@pytest.mark.parametrize("method", METHODS)
def test_warp_affine_band_and_edges(ops, method):
    frame = np.random.default_rng(6).normal(500, 50, (80, 90)).astype(np.float32)
    A = rigid(9.0, 3.7, -2.2)
    out_shape, out_origin = (21, 37), (30, 25)
    r0, r1, c0, c1 = source_window(A, out_shape, out_origin, frame.shape, window_margin(method))
    band = frame[r0:r1, c0:c1]
    kw = dict(out_origin=out_origin, src_origin=(r0, c0), src_size=frame.shape, method=method, feather_px=2.0)
    got, want = ops.warp_affine(band, A, out_shape, **kw), warp_affine(band, A, out_shape, **kw)
    for g, w in zip(got, want):
        assert_same(g, w)
    whole = ops.warp_affine(frame, A, out_shape, out_origin=out_origin, method=method, feather_px=2.0)
    for g, w in zip(got, whole):
        assert_same(g, w)
    with pytest.raises(ValueError, match="lacks taps"):
        ops.warp_affine(band[3:], A, out_shape, **{**kw, "src_origin": (r0 + 3, c0)})
    # one-pixel sources and tiles
    for shape in [(1, 1), (1, 6), (6, 1)]:
        src = frame[: shape[0], : shape[1]]
        for out in [(1, 1), (3, 7)]:
            got = ops.warp_affine(src, rigid(0.0, 0.0, 0.0), out, method=method)
            for g, w in zip(got, warp_affine(src, rigid(0.0, 0.0, 0.0), out, method=method)):
                assert_same(g, w)


def test_warp_integer_shift_is_exact(ops):
    frame = np.random.default_rng(7).normal(0, 1e4, (40, 50)).astype(np.float32)
    for method in METHODS:
        warped, valid, _ = ops.warp_affine(frame, rigid(0.0, 3.0, -2.0), (40, 50), method=method)
        shifted, shift_valid = shift_integer(frame, 3, -2, (40, 50))
        inner = valid & shift_valid
        assert inner.sum() > 1000
        np.testing.assert_array_equal(warped[inner], shifted[inner])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_warp_bayer_planes_bit_identical(ops, method, pattern):
    mosaic = np.random.default_rng(8).integers(0, 65536, (57, 66), dtype=np.uint16)
    A = rigid(23.0, 4.4, -1.9)
    for out_shape, out_origin, feather in [((41, 55), (3, -2), 0.0), ((40, 31), (0, 1), 4.0), ((1, 1), (5, 5), 0.0)]:
        got = ops.warp_bayer_planes(mosaic, pattern, A, out_shape, out_origin=out_origin, method=method,
                                    feather_px=feather)
        want = warp_bayer_planes(mosaic, pattern, A, out_shape, out_origin=out_origin, method=method,
                                 feather_px=feather)
        for g, w in zip(got, want):
            assert_same(g, w)
    out_shape, out_origin = (15, 20), (35, 10)
    r0, r1, c0, c1 = source_window(A, out_shape, out_origin, mosaic.shape, window_margin(method, bayer_planes=True))
    assert r0 >= 2
    r0 -= 1  # an odd band origin
    kw = dict(out_origin=out_origin, src_origin=(r0, c0), src_size=mosaic.shape, method=method, feather_px=3.0)
    got = ops.warp_bayer_planes(mosaic[r0:r1, c0:c1], pattern, A, out_shape, **kw)
    for g, w in zip(got, warp_bayer_planes(mosaic[r0:r1, c0:c1], pattern, A, out_shape, **kw)):
        assert_same(g, w)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_warp_lattice_bit_identical(ops, pattern):
    rng = np.random.default_rng(13)
    mosaic = rng.integers(0, 65536, (77, 93), dtype=np.uint16)
    noisy = rng.normal(1000, 100, (77, 93)).astype(np.float32)
    noisy[40, 50] = np.nan
    cases = [(rigid(17.0, 40.3, -2.6), (70, 80), (3, -2), 0.0), (rigid(-101.0, 20.0, 90.0), (61, 47), (0, 0), 3.5),
             (np.array([[1.02, 0.03, 0.6], [-0.01, 0.97, 1.4]]), (64, 49), (-5, 7), 0.0), (rigid(0.0, 2.0, -3.0), (1, 1), (30, 30), 0.0)]
    nan_seen = False
    for src in (mosaic, noisy):
        for A, out_shape, out_origin, feather in cases:
            got = ops.warp_lattice(src, pattern, A, out_shape, out_origin=out_origin, feather_px=feather)
            want = warp_lattice(src, pattern, A, out_shape, out_origin=out_origin, feather_px=feather)
            for g, w in zip(got, want):
                assert_same(g, w)
            nan_seen = nan_seen or bool(np.isnan(want[0]).any())
    assert nan_seen  # a NaN sample propagates to the values whose kernels reach it


@pytest.mark.parametrize("pattern", PATTERNS)
def test_lattice_planes_split_exactly(ops, pattern):
    """d3_lattice_planes (float32) and d3_lattice_planes_u16 against warp.lattice_planes, odd band origins too."""
    rng = np.random.default_rng(15)
    for shape, origin in [((9, 12), (0, 0)), ((10, 7), (3, 5)), ((1, 1), (1, 0)), ((5, 2), (2, 1))]:
        for band in (rng.integers(0, 65536, shape, dtype=np.uint16), rng.normal(0, 1e3, shape).astype(np.float32)):
            L = lattice_layout(band.shape, origin, pattern)
            got = [np.empty((L.rows[s], L.cols[s]), np.float32) for s in (0, 1)] + [np.zeros((L.n_u, L.n_v), np.float32)]
            kernel = "d3_lattice_planes_u16" if band.dtype == np.uint16 else "d3_lattice_planes"
            grid, block = grid_2d(*band.shape)
            ops._launch(kernel, grid, block, band, np.int32(shape[0]), np.int32(shape[1]), np.int32(origin[0]),
                        np.int32(origin[1]), np.int32(PATTERNS.index(pattern)), *got)
            for g, w in zip(got, lattice_planes(band, origin, pattern)):
                assert_same(g, w)


@pytest.mark.parametrize("pattern", ["GRBG", "BGGR"])
def test_warp_lattice_bands_and_edges(ops, pattern):
    mosaic = np.random.default_rng(14).integers(0, 65536, (80, 90), dtype=np.uint16)
    A = rigid(9.0, 3.7, -2.2)
    out_shape, out_origin = (21, 37), (30, 25)
    r0, r1, c0, c1 = source_window(A, out_shape, out_origin, mosaic.shape, LATTICE_MARGIN)
    r0, c0 = r0 - 1, c0 - 1  # odd band origins
    kw = dict(out_origin=out_origin, src_origin=(r0, c0), src_size=mosaic.shape, feather_px=2.0)
    band = mosaic[r0:r1, c0:c1]
    got, want = ops.warp_lattice(band, pattern, A, out_shape, **kw), warp_lattice(band, pattern, A, out_shape, **kw)
    whole = ops.warp_lattice(mosaic, pattern, A, out_shape, out_origin=out_origin, feather_px=2.0)
    for g, w, f in zip(got, want, whole):
        assert_same(g, w)
        assert_same(g, f)
    assert got[1].all()
    with pytest.raises(ValueError, match="lacks taps"):
        ops.warp_lattice(band[6:], pattern, A, out_shape, **{**kw, "src_origin": (r0 + 6, c0)})
    for shape in [(1, 1), (1, 6), (6, 1), (21, 21)]:  # sources too small for the kernels: nothing valid
        src = mosaic[: shape[0], : shape[1]]
        for g, w in zip(ops.warp_lattice(src, pattern, rigid(0.0, 0.0, 0.0), (3, 7)),
                        warp_lattice(src, pattern, rigid(0.0, 0.0, 0.0), (3, 7))):
            assert_same(g, w)
    with pytest.raises(ValueError, match="pattern"):
        ops.warp_lattice(mosaic, None, A, out_shape)


# ------------------------------------------------------------------------------------------------- stacking


def _stack(rng, shape, integer=False):
    """Frames of noise with outliers (hot pixels, trails) and a few NaN samples."""
    data = rng.normal(1000, 30, shape)
    data[rng.random(shape) < 0.05] += rng.uniform(200, 5000)
    if integer:
        data = np.round(data)
    data = data.astype(np.float32)
    data[rng.random(shape) < 0.01] = np.nan
    return data


def assert_clip_equal(got, want):
    assert_same(got.coverage, want.coverage)
    assert_same(got.rejected, want.rejected)
    assert got.mean.dtype == np.float32
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("cenfunc", stack_module.CENFUNCS)
@pytest.mark.parametrize("stdfunc", stack_module.STDFUNCS)
def test_sigma_clip_matches_reference(ops, cenfunc, stdfunc):
    rng = np.random.default_rng(9)
    n = 17
    data = _stack(rng, (n, 3, 13, 29))
    data[:, :, 0, 0] = np.nan  # a pixel without samples
    data[:-1, 1, 0, 1] = np.nan  # a pixel with one sample
    valid_shared = rng.random((n, 1, 13, 29)) > 0.2
    valid_full = rng.random(data.shape) > 0.1
    weights = rng.uniform(0, 1, (n, 13, 29)).astype(np.float32)
    frame_weights = rng.uniform(0.5, 2, n)
    cases = [
        dict(),
        dict(valid=valid_shared),
        dict(valid=valid_full, maxiters=None, sigma_lower=2.0, sigma_upper=2.5),
        dict(valid=valid_shared, weights=weights),
        dict(frame_weights=frame_weights, maxiters=1),
        dict(valid=valid_full, weights=weights, frame_weights=frame_weights, sigma=2.0),
    ]
    for kw in cases:
        kw = dict(cenfunc=cenfunc, stdfunc=stdfunc, **kw)
        want = stack_module.sigma_clip_mask_aware(data, **kw)
        assert want.rejected.sum() > 0
        assert_clip_equal(ops.sigma_clip(data, **kw), want)


def test_sigma_clip_integer_data_and_shapes(ops):
    """ADU-valued data (ties between samples) and stacks of other ranks and sizes."""
    rng = np.random.default_rng(10)
    for shape in [(40, 1000), (1, 7), (5, 1, 1), (12, 2, 3, 5)]:
        data = _stack(rng, shape, integer=True)
        for cenfunc, stdfunc in [("median", "mad_std"), ("median", "std"), ("mean", "std")]:
            kw = dict(cenfunc=cenfunc, stdfunc=stdfunc, sigma=2.5)
            assert_clip_equal(ops.sigma_clip(data, **kw), stack_module.sigma_clip_mask_aware(data, **kw))


def test_sigma_clip_frame_limit(ops):
    data = np.random.default_rng(11).normal(0, 1, (ops.clip_max_frames + 1, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="at most"):
        ops.sigma_clip(data, cenfunc="median")
    kw = dict(cenfunc="mean", stdfunc="std")
    assert_clip_equal(ops.sigma_clip(data, **kw), stack_module.sigma_clip_mask_aware(data, **kw))


def _clip_case(rng, n, pixels, kind):
    """(n, pixels) float32 samples: "noise" (with outliers and NaN), "ties" (few distinct integers, MAD often 0),
    "adu" (rounded noise), or "tiny" (values near 0)."""
    if kind == "ties":
        data = rng.integers(0, 4, (n, pixels)).astype(np.float64)
    elif kind == "tiny":
        data = rng.normal(0.0, 1e-3, (n, pixels))
    else:
        data = rng.normal(1000.0, 30.0, (n, pixels))
        if kind == "adu":
            data = np.round(data)
    hit = rng.random(data.shape) < 0.05
    data[hit] += rng.uniform(3.0, 50.0, int(hit.sum())) * max(float(np.std(data)), 1.0)
    data = data.astype(np.float32)
    data[rng.random(data.shape) < 0.02] = np.nan
    data[:, 0] = np.nan  # a pixel without valid samples
    return data


def assert_clip_close(got, want, data):
    """Identical coverage and rejected counts; means within 1e-6 relative, or 1e-12 of the data's scale near 0
    (a kept set of zeros: the reference's updated sums leave ~1e-15 where the kernel sums to exactly 0)."""
    assert_same(got.coverage, want.coverage)
    assert_same(got.rejected, want.rejected)
    assert got.mean.dtype == np.float32
    scale = float(np.nanmax(np.abs(data), initial=0.0))
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, atol=1e-12 * scale, equal_nan=True)


CLIP_OPTIONS = [("median", "mad_std"), ("median", "std"), ("mean", "std"), ("mean", "mad_std")]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9, 40, 63, 64, 65, 127, 128, 129, 200, 300, 512])
def test_sigma_clip_random_frame_counts(ops, n):
    """Fresh random stacks of every size class of the kernel's sort (rank sort up to 128 samples, merged runs of
    64 beyond, the 512 limit), every option, masks, weights, asymmetric bounds and maxiters None/1/5."""
    rng = np.random.default_rng(1000 + n)
    pixels = max(8, 3000 // n)
    for trial, (kind, (cenfunc, stdfunc)) in enumerate(zip(["noise", "ties", "adu", "tiny"] * 2, CLIP_OPTIONS * 2)):
        data = _clip_case(rng, n, pixels, kind)
        kw = dict(cenfunc=cenfunc, stdfunc=stdfunc, sigma_lower=float(rng.choice([1.5, 2.0, 3.0])),
                  sigma_upper=float(rng.choice([1.0, 2.5, 3.0])), maxiters=[None, 1, 5][trial % 3])
        if trial % 2:
            kw["valid"] = rng.random(data.shape) > 0.2
        if trial % 4 == 3:
            kw["weights"] = rng.uniform(0.0, 1.0, data.shape).astype(np.float32)
            kw["frame_weights"] = rng.uniform(0.5, 2.0, n)
        want = stack_module.sigma_clip_mask_aware(data, **kw)
        assert_clip_close(ops.sigma_clip(data, **kw), want, data)


@pytest.mark.parametrize("n", [7, 40, 150])
@pytest.mark.parametrize("cenfunc, stdfunc", CLIP_OPTIONS)
def test_sigma_clip_kept_sets_identical(ops, n, cenfunc, stdfunc):
    """The kept set itself, sample by sample: the stack is repeated once per frame f along the pixels with a
    weight of 1 on frame f only, so each copy's mean is exactly x_f where the sample is kept and NaN where not."""
    rng = np.random.default_rng(n)
    pixels = 40
    for kind in ("noise", "ties", "adu"):
        data = _clip_case(rng, n, pixels, kind)
        valid = rng.random(data.shape) > 0.1
        repeated = np.tile(data, (1, n))
        weights = np.repeat(np.eye(n, dtype=np.float32), pixels, axis=1)
        kw = dict(valid=np.tile(valid, (1, n)), weights=weights, cenfunc=cenfunc, stdfunc=stdfunc, sigma_lower=2.0,
                  sigma_upper=2.5, maxiters=None)
        want = stack_module.sigma_clip_mask_aware(repeated, **kw)
        got = ops.sigma_clip(repeated, **kw)
        assert_same(got.mean, want.mean)
        assert_same(got.rejected, want.rejected)
        kept = np.isfinite(want.mean).reshape(n, pixels)
        lo, hi = stack_module.clip_bounds(data, valid, cenfunc=cenfunc, stdfunc=stdfunc, sigma_lower=2.0,
                                          sigma_upper=2.5, maxiters=None)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(kept, valid & (data >= lo) & (data <= hi))


def test_sigma_clip_ties_and_degenerate_pixels(ops):
    """Equal samples (MAD 0: only samples equal to the median stay), two-valued pixels, one valid sample, all
    invalid, +-0, and huge finite values."""
    n = 30
    cols = [
        np.full(n, 5.0),
        np.r_[np.full(20, 5.0), np.full(10, 9.0)],
        np.r_[np.full(16, 1.0), np.full(14, 2.0)],
        np.r_[7.0, np.full(n - 1, np.nan)],
        np.full(n, np.nan),
        np.r_[np.full(15, 0.0), np.full(15, -0.0)],
        np.r_[np.full(n - 2, 3.0e38), -3.0e38, 1.0],
        np.r_[np.arange(n - 1, dtype=float), np.inf],
    ]
    data = np.stack(cols, axis=1).astype(np.float32)
    for cenfunc, stdfunc in CLIP_OPTIONS:
        for maxiters in (None, 1, 3):
            kw = dict(cenfunc=cenfunc, stdfunc=stdfunc, maxiters=maxiters, sigma=1.0)
            with np.errstate(over="ignore", invalid="ignore"):
                want = stack_module.sigma_clip_mask_aware(data, **kw)
                got = ops.sigma_clip(data, **kw)
            assert_same(got.coverage, want.coverage)
            assert_same(got.rejected, want.rejected)
            np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, equal_nan=True)


def _tile_views(rng, n, channels, pixels, spare):
    """The stack_tiles layout: the first ``pixels`` of each plane of larger (N, C, P + spare), (N, P + spare)
    buffers whose spare pixels hold NaN and garbage (the kernel must not read them)."""
    data_buf = np.full((n, channels, pixels + spare), np.nan, np.float32)
    valid_buf = np.ones((n, pixels + spare), bool)
    weight_buf = np.full((n, pixels + spare), np.nan, np.float32)
    data = rng.normal(500.0, 15.0, (n, channels, pixels)).astype(np.float32)
    data[rng.random(data.shape) < 0.03] += 900.0
    data_buf[:, :, :pixels] = data
    valid_buf[:, :pixels] = rng.random((n, pixels)) > 0.1
    valid_buf[:, :pixels] &= np.isfinite(data).all(axis=1)
    weight_buf[:, :pixels] = rng.uniform(0.1, 1.0, (n, pixels))
    return data_buf[:, :, :pixels], valid_buf[:, None, :pixels], weight_buf[:, None, :pixels]


@pytest.mark.parametrize("n, cenfunc, stdfunc", [(13, "median", "mad_std"), (13, "mean", "std"), (150, "median", "std"),
                                                  (600, "median", "mad_std"), (600, "mean", "std")])
def test_clip_into_matches_the_reference_step(ops, n, cenfunc, stdfunc):
    """KernelOps.clip_into, the clip step stack_tiles takes, on strided tile views with a shared mask and
    weights, (1, P) coverage and chunking (P above one chunk for few frames); beyond the kernel's frame limit a
    median/MAD clip falls back to the reference (bit-identical) and a mean/std clip re-reads the frames."""
    rng = np.random.default_rng(n)
    channels, pixels = 3, (stack_module.CHUNK_SAMPLES // 3 + 1000 if n == 13 else 500)
    data, valid, weights = _tile_views(rng, n, channels, pixels, 37)
    frame_weights = rng.uniform(0.5, 2.0, n)
    cfg = stack_module._settings(3.0, 2.5, 3.0, 5, cenfunc, stdfunc)
    outputs = []
    for clip in (stack_module._clip_into, ops.clip_into):
        for w, fw in ((None, None), (weights, frame_weights)):
            mean = np.full((channels, pixels + 5), -1.0, np.float32)[:, :pixels]
            coverage = np.full((1, pixels + 5), -1, np.int16)[:, :pixels]
            rejected = np.full((channels, pixels + 5), -1, np.int16)[:, :pixels]
            clip(data, valid, w, fw, cfg, mean, coverage, rejected, None, None)
            outputs.append(stack_module.ClipResult(mean, coverage, rejected))
    for want, got in zip(outputs[:2], outputs[2:]):
        assert (want.rejected > 0).any()
        assert_clip_close(got, want, data)
        if n > ops.clip_max_frames and cenfunc == "median":
            assert_same(got.mean, want.mean)


def test_clip_into_checks_its_inputs(ops):
    rng = np.random.default_rng(3)
    data, valid, weights = _tile_views(rng, 5, 1, 20, 0)
    cfg = stack_module._settings(3.0, None, None, 5, "median", "mad_std")
    outputs = (np.empty((1, 20), np.float32), np.empty((1, 20), np.int16), np.empty((1, 20), np.int16))
    bad = weights.copy()
    bad[2, 0, 3] = np.inf
    with pytest.raises(ValueError, match="weights must be finite"):
        ops.clip_into(data, valid, bad, None, cfg, *outputs)
    with pytest.raises(ValueError, match="bool"):
        ops.clip_into(data, valid.astype(np.uint8), None, None, cfg, *outputs)


def test_stack_tiles_with_the_kernel_clip_is_independent_of_tiles_and_threads(ops):
    """stack_tiles with the kernel's clip step: identical bytes for any tile size and with a thread pool, and the
    reference clip's decisions."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(21)
    n, channels, height, width = 13, 3, 70, 41
    data = rng.normal(500.0, 15.0, (n, channels, height, width)).astype(np.float32)
    data[rng.random(data.shape) < 0.03] += 800.0
    data[0, 1, 3, 4] = np.nan
    valid = rng.random((n, height, width)) > 0.05
    weight = np.where(valid, rng.uniform(0.2, 1.0, valid.shape), 0.0).astype(np.float32)
    frame_weights = rng.uniform(0.5, 1.5, n)

    def render(k, row0, row1, col0, col1):
        window = np.s_[row0:row1, col0:col1]
        return data[k][(slice(None),) + window].copy(), valid[k][window].copy(), weight[k][window].copy()

    results = []
    for shape in ((16, 16), (30, 41), (70, 41)):
        plan = stack_module.plan_tiles(height, width, n, channels, 1 << 30, workers=1, tile_shape=shape)
        for pool in (None, ThreadPoolExecutor(2)):
            results.append(stack_module.stack_tiles(plan, render, n, (channels, height, width),
                                                    frame_weights=frame_weights, executor=pool,
                                                    clip=ops.clip_into, cenfunc="median", stdfunc="mad_std"))
            if pool is not None:
                pool.shutdown()
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_same(a, b)
    reference = stack_module.stack_tiles(plan, render, n, (channels, height, width), frame_weights=frame_weights,
                                         cenfunc="median", stdfunc="mad_std")
    assert_same(results[0].coverage, reference.coverage)
    assert_same(results[0].rejected, reference.rejected)
    np.testing.assert_allclose(results[0].mean, reference.mean, rtol=1e-6, equal_nan=True)


def test_results_do_not_depend_on_thread_count(lib, ops):
    rng = np.random.default_rng(12)
    data = _stack(rng, (21, 3001))
    image = rng.normal(0, 1, (3, 70, 90)).astype(np.float32)
    results = []
    big = _stack(rng, (150, 301))
    for threads in (1, 2, 0):
        lib.set_threads(threads)
        results.append((ops.sigma_clip(data, cenfunc="mean"), ops.warp_affine(image, rigid(31.0, 2.0, 1.0), (70, 90)),
                        ops.moments(data), ops.histogram(data, 50, (900.0, 1100.0))[0],
                        ops.sigma_clip(data, cenfunc="median", stdfunc="mad_std"), ops.sigma_clip(big, stdfunc="mad_std")))
    lib.set_threads(0)
    for other in results[1:]:
        for got, want in zip(other[4:], results[0][4:]):
            for g, w in zip(got, want):
                assert_same(g, w)
        assert_same(other[0].mean, results[0][0].mean)
        for g, w in zip(other[1], results[0][1]):
            assert_same(g, w)
        assert other[2] == results[0][2]
        assert_same(other[3], results[0][3])


# ----------------------------------------------------------------------------------------------- statistics


def test_histogram_and_moments(ops):
    rng = np.random.default_rng(13)
    values = rng.normal(1000, 50, 200_003).astype(np.float32)
    values[:100] = np.nan
    values[100:110] = np.inf
    values[110:120] = 900.0  # on the first edge
    values[120:130] = 1100.0  # on the last edge (closed)
    for bins, lo, hi in [(64, 900.0, 1100.0), (7, 950.5, 1000.25), (1, -1e9, 1e9)]:
        counts, edges = ops.histogram(values, bins, (lo, hi))
        want, want_edges = np.histogram(values, bins, range=(np.float64(lo), np.float64(hi)))
        assert_same(counts, want.astype(np.int64))
        assert_same(edges, want_edges)
    finite = values[np.isfinite(values)].astype(np.float64)
    count, mean, std = ops.moments(values, shift=1000.0)
    assert count == finite.size
    np.testing.assert_allclose([mean, std], [finite.mean(), finite.std()], rtol=1e-12)
    assert ops.moments(np.full(10, np.nan, np.float32))[0] == 0


# ------------------------------------------------------------------------------------------ launch checking


def test_launch_checks_argument_types(lib):
    out = np.empty(4, np.float32)
    raw = np.zeros(8, np.uint8)
    dummy = np.zeros(1, np.float32)
    good = [raw, np.int32(4), dummy, np.int32(0), dummy, np.int32(0), out]
    lib.launch("d3_decode_bzero16", (1,), (256,), *good)
    np.testing.assert_array_equal(out, np.float32(32768.0))

    def call(index, value):
        args = list(good)
        args[index] = value
        lib.launch("d3_decode_bzero16", (1,), (256,), *args)

    with pytest.raises(TypeError, match=r"d3_decode_bzero16, argument 'n' \(C type int\) needs numpy.int32, got Python int"):
        call(1, 4)
    with pytest.raises(TypeError, match="needs numpy.int32, got numpy.int64"):
        call(1, np.int64(4))
    with pytest.raises(TypeError, match="argument 'out'.*needs dtype float32"):
        call(6, np.empty(4, np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        call(6, np.empty(8, np.float32)[::2])
    read_only = np.empty(4, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        call(6, read_only)
    with pytest.raises(TypeError, match="needs a C-contiguous uint8 array, got Python list"):
        call(0, [0] * 8)
    with pytest.raises(TypeError, match="takes 7 arguments"):
        lib.launch("d3_decode_bzero16", (1,), (256,), *good[:-1])
    with pytest.raises(TypeError, match=r"'feather_px' \(C type double\) needs numpy.float64, got Python float"):
        kernels.check_args(lib.signatures["d3_warp_affine"],
                           [a if p.name != "feather_px" else 1.5 for p, a in
                            zip(lib.signatures["d3_warp_affine"].params, _warp_args())])


def _warp_args():
    """A well-typed argument list for d3_warp_affine (only its types matter)."""
    f32, u8 = np.zeros(1, np.float32), np.zeros(1, np.uint8)
    i = np.int32(1)
    return [f32, i, i, i, i, i, i, i, np.zeros(6), i, i, i, i, i, np.float64(0.0), f32, u8, f32]


def test_signature_parsing():
    source = """
    // extern "C" __global__ void commented_out(int a)
    extern "C" __global__ void k(const float* x,   // input
                                 unsigned char* mask, long long n, double s /* scale */) {}
    """
    (sig,) = kernels.parse_signatures(source).values()
    assert sig.name == "k"
    assert [(p.ctype, p.name, p.dtype) for p in sig.params] == [
        ("const float*", "x", np.float32), ("unsigned char*", "mask", np.uint8), ("long long", "n", np.int64),
        ("double", "s", np.float64)]
    assert sig.params[0].const and sig.params[1].pointer and not sig.params[2].pointer
    with pytest.raises(ValueError, match="unsupported type"):
        kernels.parse_signatures('extern "C" __global__ void k(size_t n) {}')
    names = set(kernels.load_signatures(REPO / "kernels"))
    assert {"d3_decode_bzero16", "d3_debayer_bilinear", "d3_debayer_superpixel", "d3_luminance_proxy",
            "d3_warp_affine", "d3_warp_bayer_planes", "d3_sigma_clip", "d3_segment_moments",
            "d3_segment_histogram"} <= names


def test_geometry():
    assert kernels.grid_1d(257) == ((2, 1, 1), (256, 1, 1))
    assert kernels.grid_2d(9, 33) == ((2, 2, 1), (32, 8, 1))
    with pytest.raises(ValueError):
        kernels.grid_2d(0, 5)


# --------------------------------------------------------------------------------------- sources and builds


def test_kernel_dir_search_order(tmp_path, monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_DIR_ENV, raising=False)
    assert kernels.kernel_dir() == REPO / "kernels"
    for path in (REPO / "kernels").iterdir():
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    assert kernels.kernel_dir() == tmp_path
    assert kernels.read_source(tmp_path / "decode.cu").startswith(f'#line 1 "{tmp_path / "decode.cu"}"\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(empty))
    monkeypatch.setattr(kernels, "_candidate_dirs", lambda: [empty, tmp_path / "nowhere"])
    with pytest.raises(BackendUnavailableError, match=f"looked in: {empty}; {tmp_path / 'nowhere'}"):
        kernels.kernel_dir()


def test_compiler_errors_name_the_file(lib, tmp_path):
    for path in (REPO / "kernels").iterdir():
        shutil.copy(path, tmp_path / path.name)
    broken = tmp_path / "broken.cu"
    broken.write_text('#include "common.cuh"\nextern "C" __global__ void d3_broken(int n) { undeclared = n; }\n')
    with pytest.raises(BackendUnavailableError, match=r"broken\.cu:2"):
        native.build(tmp_path, tmp_path / "cache")


KERNEL_FILES = kernels.kernel_files(REPO / "kernels")


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_each_kernel_file_compiles_as_cpp(path):
    compiler = native.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (g++, c++ or $CXX)")
    cpu = subprocess.run([compiler, *native.CXX_FLAGS, "-fsyntax-only", "-Wall", "-Werror",
                          f"-I{REPO / 'kernels'}", str(path)], capture_output=True, text=True)
    assert cpu.returncode == 0, cpu.stderr


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_each_kernel_file_compiles_with_nvcc(path, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH")
    ptx = tmp_path / f"{path.stem}.ptx"
    result = subprocess.run([nvcc, "--ptx", f"-arch={arch}", *kernels.NVRTC_OPTIONS, "-I", str(REPO / "kernels"),
                             str(path), "-o", str(ptx)], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc {arch}: {result.stderr}"
    assert ".entry d3_" in ptx.read_text()


@pytest.mark.slow
def test_wheel_ships_and_finds_the_kernels(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dist), "-q"], check=True, capture_output=True)
    (wheel,) = dist.glob("dwarf3gpu-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO / "kernels").iterdir():
        if path.suffix in (".cu", ".cuh", ".h"):
            assert f"dwarf3gpu/kernels/{path.name}" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel), "-q"],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != kernels.KERNEL_DIR_ENV}
    env["PYTHONPATH"] = str(target)
    code = ("import dwarf3gpu; from dwarf3gpu.backends import kernels; "
            "print(dwarf3gpu.__file__); print(kernels.kernel_dir()); print(len(kernels.load_signatures()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert Path(out[0]).is_relative_to(target)
    assert Path(out[1]) == target / "dwarf3gpu" / "kernels"
    assert int(out[2]) == len(kernels.load_signatures(REPO / "kernels"))


def test_cpu_backend_uses_the_cpu_build_bit_identically(monkeypatch):
    """The pipeline's CPU backend runs debayer, warps and the stacking's clip step on the CPU build: debayer and
    warps equal the NumPy reference bit for bit, the clip its decisions (and the build's own clip bit for bit)."""
    from dwarf3gpu.backends.cpu import CpuBackend

    fast, reference = CpuBackend(), CpuBackend(kernels="numpy")
    if fast.describe()["cpu_kernels"].startswith("NumPy"):
        pytest.skip(f"CPU build unavailable: {fast.native_reason}")
    rng = np.random.default_rng(42)
    mosaic = rng.integers(0, 65535, (67, 93)).astype(np.float32)
    A = np.array([[0.98, -0.17, 3.3], [0.17, 0.98, -2.1]])
    np.testing.assert_array_equal(fast.debayer_bilinear(mosaic, "GRBG", origin=(1, 3)),
                                  reference.debayer_bilinear(mosaic, "GRBG", origin=(1, 3)))
    rgb = reference.debayer_bilinear(mosaic, "RGGB")
    for method in ("bilinear", "bicubic"):
        for got, want in zip(fast.warp_affine(rgb, A, (67, 93), method=method, feather_px=5.0, src_size=(67, 93)),
                             reference.warp_affine(rgb, A, (67, 93), method=method, feather_px=5.0, src_size=(67, 93))):
            np.testing.assert_array_equal(got, want)
    for got, want in zip(fast.warp_bayer_planes(mosaic, "RGGB", A, (67, 93), src_size=(67, 93)),
                         reference.warp_bayer_planes(mosaic, "RGGB", A, (67, 93), src_size=(67, 93))):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(fast.warp_lattice(mosaic, "GBRG", A, (67, 93), src_size=(67, 93), feather_px=5.0),
                         reference.warp_lattice(mosaic, "GBRG", A, (67, 93), src_size=(67, 93), feather_px=5.0)):
        np.testing.assert_array_equal(got, want)
    rng = np.random.default_rng(43)
    data, valid, weights = _tile_views(rng, 11, 3, 300, 9)
    cfg = stack_module._settings(3.0, None, None, 5, "median", "mad_std")
    results = []
    for clip in (fast.clip_into, reference.clip_into, native.native_ops().clip_into):
        out = (np.empty((3, 300), np.float32), np.empty((1, 300), np.int16), np.empty((3, 300), np.int16))
        clip(data, valid, weights, None, cfg, *out, None, None)
        results.append(stack_module.ClipResult(*out))
    assert_clip_close(results[0], results[1], data)
    for got, want in zip(results[0], results[2]):
        assert_same(got, want)
    want = (np.empty((3, 300), np.float32), np.empty((1, 300), np.int16), np.empty((3, 300), np.int16))
    stack_module._clip_into(data, valid, weights, None, cfg, *want, None, None)
    for got, ref in zip(results[1], want):
        assert_same(got, ref)
    # beyond the frame count where the build measured faster, the backend clips with NumPy
    from dwarf3gpu.backends import cpu

    assert cpu.kernel_clip_max_frames(True, True) >= 128 and cpu.kernel_clip_max_frames(True, False) >= 128
    monkeypatch.setitem(cpu.KERNEL_CLIP_MAX_FRAMES, "median/mad_std", 10)
    out = (np.empty((3, 300), np.float32), np.empty((1, 300), np.int16), np.empty((3, 300), np.int16))
    fast.clip_into(data, valid, weights, None, cfg, *out, None, None)
    for got, ref in zip(out, want):
        assert_same(got, ref)
