"""The stage operations on the CUDA C kernels (their CPU build, and CUDA where a GPU is), against the NumPy reference.

The CPU build compiles the very files the GPU runs (kernels/*.cu), so these tests check the GPU kernels' logic
on any machine with a C++ compiler; the ``cuda`` parametrisation of the ``ops``/``kernel_ops`` fixtures (see
conftest.py) runs the same tests on a GPU. Kernel-versus-reference comparisons use ``kernel_ops`` (the kernel
targets only); properties every implementation must have use ``ops`` (the NumPy reference too).

Tolerances: debayer (bilinear, Malvar-He-Cutler, superpixel), dark calibration of a raw window (dark offset and
hot-pixel repair, float32 and uint16), normalisation (against plain ``data * scale + offset`` in float32) and the
warps (bilinear, bicubic, Bayer planes, lattice; image, mask and feather weight) are bit-identical, on odd and tiny
shapes and band origins of both parities. Sigma clipping (``ops.clip_into`` on (N, C, L) arrays against
``clip.sigma_clip_mask_aware``, ``clip.clip_bounds`` and ``clip.clip_into``) has identical coverage, rejection
counts and kept sets, sample by sample (the bounds are bit-identical for median/mad_std; with a std spread they
differ by float64 rounding, which only a sample within ~1e-15 of a bound could notice), on fresh random stacks of 1
to 512 frames (both sort paths), ties, all-invalid pixels, every option, masks, weights and frame weights; means
within 1e-6 relative (float32 rounding of float64 sums taken in another order; near 0, 1e-12 of the data's scale).
Beyond a target's clip-kernel frame limit the reference clips on the host, bit-identically. The clip on strided
tile views is checked against the reference step, and ``tiles.stack_tiles`` gives identical output across tile
sizes, thread pools and OpenMP thread counts.
Also: warps given ``out=`` views write exactly what they return and nothing else, argument type checks, the source
search order, compiler messages naming the file, ``nvcc --ptx`` of every kernel for sm_80 and sm_90, and a built
wheel that ships and finds the sources.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dwarf3gpu import clip
from dwarf3gpu.backends import KernelStageOps, ReferenceStageOps, cpu_backend, cpu_build, get_backend, kernel_source
from dwarf3gpu.calibrate import DarkCalibration, calibrate_window
from dwarf3gpu.clip import (CENFUNCS, CHUNK_SAMPLES, STDFUNCS, ClipResult, clip_bounds, clip_settings, count_dtype,
                            frames_channels_pixels_shape, per_sample_view, sigma_clip_mask_aware)
from dwarf3gpu.debayer import debayer_bilinear, debayer_mhc, debayer_superpixel
from dwarf3gpu.errors import BackendUnavailableError
from dwarf3gpu.tiles import plan_tiles, stack_tiles
from dwarf3gpu.warp import (LATTICE_MARGIN, lattice_chroma_planes, lattice_layout, lattice_planes, source_window,
                            warp_affine, warp_bayer_planes, warp_lattice, warp_lattice_chroma, window_margin)

REPO = Path(__file__).resolve().parents[1]
PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")
METHODS = ("bilinear", "bicubic")
# Shapes that are not multiples of the 32 x 8 block, plus one-pixel edges.
SHAPES = [(37, 53), (9, 1), (1, 9), (1, 1), (2, 3), (3, 2), (5, 5)]
# Band origins of both parities on each axis.
ORIGINS = [(0, 0), (1, 0), (0, 1), (1, 1), (4, 7)]


def seed(*key) -> int:
    """A reproducible seed from test parameters (``hash`` of a str changes from run to run)."""
    return zlib.crc32(repr(key).encode())


def rigid(theta_deg: float, tx: float, ty: float) -> np.ndarray:
    """Rotation about the origin then translation, frame -> reference."""
    t = np.radians(theta_deg)
    return np.array([[np.cos(t), -np.sin(t), tx], [np.sin(t), np.cos(t), ty]])


def host(ops, value):
    """An ``ops.xp`` array, or a tuple of them, on the host."""
    if isinstance(value, tuple):
        return tuple(host(ops, v) for v in value)
    return ops.download(value)


def up(ops, array):
    """A host array on ``ops.xp`` (None stays None)."""
    return None if array is None else ops.upload(array)


def assert_same(actual, expected):
    """Bit-identical arrays of the same dtype and shape (NaN where NaN)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected, strict=True)


def test_ops_are_stage_operations(ops):
    """``ops`` runs the NumPy reference and the kernels on every launch target."""
    assert isinstance(ops, (KernelStageOps, ReferenceStageOps))
    assert ops.name in ("cpu", "cuda") and ops.implementation in ("NumPy reference", "cpu kernels", "cuda kernels")
    assert ops.describe()["implementation"] == ops.implementation and ops.memory_budget() > 0


def test_kernel_ops_run_the_kernels(kernel_ops):
    """``kernel_ops`` runs the kernels only."""
    assert isinstance(kernel_ops, KernelStageOps)
    assert kernel_ops.implementation == f"{kernel_ops.name} kernels" and kernel_ops.xp is kernel_ops.target.xp


# -------------------------------------------------------------------------------------------------- debayer


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # colours absent from tiny bands: NaN
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES)
def test_debayer_bilinear_bit_identical(kernel_ops, pattern, shape):
    rng = np.random.default_rng(seed(pattern, shape))
    mosaic = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    for origin in ORIGINS:
        got = host(kernel_ops, kernel_ops.debayer_bilinear(kernel_ops.upload(mosaic), pattern, origin))
        assert_same(got, debayer_bilinear(mosaic, pattern, origin))


def test_debayer_bilinear_nan_and_float(kernel_ops):
    mosaic = np.random.default_rng(3).normal(0, 1000, (23, 31)).astype(np.float32)
    mosaic[5, 7] = np.nan
    mosaic[0, 0] = -np.inf
    for pattern in PATTERNS:
        got = host(kernel_ops, kernel_ops.debayer_bilinear(kernel_ops.upload(mosaic), pattern, (3, 2)))
        assert_same(got, debayer_bilinear(mosaic, pattern, (3, 2)))


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # colours absent from tiny bands: NaN
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES + [(4, 4), (6, 7), (38, 54)])
def test_debayer_mhc_bit_identical(kernel_ops, pattern, shape):
    """d3_debayer_mhc: the 5x5 filters inside, bilinear on the 2-pixel border, uint16 and float32 mosaics."""
    rng = np.random.default_rng(seed("mhc", pattern, shape))
    mosaics = (rng.integers(0, 65536, size=shape, dtype=np.uint16), rng.normal(0, 1000, shape).astype(np.float32))
    for mosaic in mosaics:
        for origin in ORIGINS:
            got = host(kernel_ops, kernel_ops.debayer_mhc(kernel_ops.upload(mosaic), pattern, origin))
            assert_same(got, debayer_mhc(mosaic, pattern, origin))


def test_debayer_mhc_nan_and_band(kernel_ops):
    """NaN/inf samples propagate as in the reference; a band cut with a 2-pixel margin gives the whole frame's
    interior pixels."""
    mosaic = np.random.default_rng(4).normal(0, 1000, (29, 35)).astype(np.float32)
    mosaic[9, 11] = np.nan
    mosaic[0, 0] = -np.inf
    mosaic[20, 3] = np.inf
    for pattern in PATTERNS:
        for origin in ((3, 2), (0, 0)):
            got = host(kernel_ops, kernel_ops.debayer_mhc(kernel_ops.upload(mosaic), pattern, origin))
            assert_same(got, debayer_mhc(mosaic, pattern, origin))
    whole = host(kernel_ops, kernel_ops.debayer_mhc(kernel_ops.upload(mosaic), "GRBG"))
    band = host(kernel_ops, kernel_ops.debayer_mhc(kernel_ops.upload(mosaic[5:22, 7:30]), "GRBG", (5, 7)))
    assert_same(band[:, 2:-2, 2:-2], whole[:, 7:20, 9:28])


@pytest.mark.parametrize("shape", SHAPES + [(38, 54), (2, 2)])
def test_debayer_superpixel_bit_identical(kernel_ops, shape):
    mosaic = np.random.default_rng(seed("superpixel", shape)).integers(0, 65536, size=shape, dtype=np.uint16)
    for pattern in PATTERNS:
        for src in (mosaic, mosaic.astype(np.float32) - 30000.0):
            got = host(kernel_ops, kernel_ops.debayer_superpixel(kernel_ops.upload(src), pattern))
            assert_same(got, debayer_superpixel(src, pattern))


# --------------------------------------------------------------------------------------- dark calibration


FRAME = (40, 57)
# (row0, row1, col0, col1): the whole frame, tiny windows at the frame's corner, odd and even origins in the
# middle, a window on a hot cluster, a hot pixel whose same-colour neighbours are all hot, and the far frame edges.
WINDOWS = [(0, 40, 0, 57), (0, 1, 0, 1), (0, 2, 0, 3), (3, 8, 5, 10), (7, 31, 9, 40), (10, 13, 20, 22),
           (20, 21, 30, 31), (16, 25, 26, 35), (27, 40, 40, 57), (39, 40, 56, 57), (1, 38, 2, 55), (12, 17, 44, 49)]


def _hot_map(rng: np.random.Generator) -> np.ndarray:
    """A random hot-pixel map with adjacent hot pixels, a fully hot same-colour neighbourhood, hot pixels on the
    frame's edges and corners and on the edges of the WINDOWS."""
    hot = rng.random(FRAME) < 0.04
    hot[10:12, 20:22] = True  # a 2x2 cluster: adjacent hot pixels of every colour
    hot[11, 22:25] = True  # a row of three
    hot[16:25:2, 26:35:2] = True  # (20, 30) and its 8 same-colour neighbours: no usable neighbour
    hot[0, ::7] = hot[-1, 3::5] = hot[::6, 0] = hot[4::9, -1] = True  # frame edges
    hot[0, 0] = hot[0, -1] = hot[-1, 0] = hot[-1, -1] = True  # corners
    hot[7, 15] = hot[30, 20] = hot[15, 9] = hot[25, 39] = True  # edges of the (7, 31, 9, 40) window
    hot[3, 5] = hot[7, 9] = hot[12, 44] = hot[16, 48] = True  # corners of small windows
    return hot


@pytest.mark.parametrize("kind", ["float32-dark", "uint16", "float32"])
def test_calibrate_window_bit_identical(kernel_ops, kind):
    """d3_repair_hot / d3_repair_hot_u16 after the dark offset: the reference's pixels, every window (the uint16
    window takes the median rounded half to even, as the reference)."""
    rng = np.random.default_rng(seed("calibrate", kind))
    raw = rng.integers(0, 65536, FRAME, dtype=np.uint16)
    raw[rng.random(FRAME) < 0.3] = rng.integers(1000, 1004)  # ties: medians of an even count end in .5
    hot = _hot_map(rng)
    offset = rng.normal(0.0, 30.0, FRAME).astype(np.float32) if kind == "float32-dark" else None
    calibration = DarkCalibration(offset, hot, identity="t", record={})
    dark = kernel_ops.on_target(calibration)
    frame = raw if kind == "uint16" else raw.astype(np.float32)
    changed = 0
    for r0, r1, c0, c1 in WINDOWS:
        window = frame[r0:r1, c0:c1].copy()
        want = calibrate_window(window.copy(), (r0, c0), calibration)
        on_target = kernel_ops.upload(window.copy())
        result = kernel_ops.calibrate_window(on_target, (r0, c0), dark)
        got = host(kernel_ops, on_target)
        assert_same(got, want)
        assert_same(host(kernel_ops, result), want)  # in place, and returned
        changed += int((want != (window - offset[r0:r1, c0:c1] if offset is not None else window)).sum())
    assert changed > 50  # hot pixels were repaired
    # a hot pixel without a usable neighbour keeps its (dark-subtracted) value
    lone = host(kernel_ops, kernel_ops.calibrate_window(kernel_ops.upload(frame[20:21, 30:31].copy()), (20, 30), dark))
    assert_same(lone, frame[20:21, 30:31] - offset[20:21, 30:31] if offset is not None else frame[20:21, 30:31])


def test_calibrate_window_without_hot_pixels(ops):
    """Only the dark offset is subtracted where a window holds no hot pixel (and nothing at all without one)."""
    rng = np.random.default_rng(31)
    raw = rng.integers(0, 65536, FRAME, dtype=np.uint16)
    offset = rng.normal(0.0, 30.0, FRAME).astype(np.float32)
    hot = np.zeros(FRAME, bool)
    hot[30, 40] = True
    for dark in (offset, None):
        calibration = ops.on_target(DarkCalibration(dark, hot, identity="t", record={}))
        frame = raw.astype(np.float32) if dark is not None else raw
        window = ops.upload(frame[5:20, 3:31].copy())
        got = host(ops, ops.calibrate_window(window, (5, 3), calibration))
        want = frame[5:20, 3:31] - offset[5:20, 3:31] if dark is not None else frame[5:20, 3:31]
        assert_same(got, want)


# ------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (5, 5), (37, 53)])
@pytest.mark.parametrize("channels", [1, 3])
def test_normalise_per_channel(ops, shape, channels):
    """``data * scale + offset`` per channel, in place, two float32 roundings (no fused multiply-add)."""
    rng = np.random.default_rng(seed("normalise", shape, channels))
    data = rng.normal(1000, 300, (channels,) + shape).astype(np.float32)
    data.flat[0] = np.nan
    offset, scale = rng.normal(0, 50, channels), rng.uniform(0.5, 2.0, channels)
    on_target = ops.upload(data.copy())
    assert ops.normalise(on_target, offset, scale) is None
    want = data * scale.astype(np.float32)[:, None, None] + offset.astype(np.float32)[:, None, None]
    assert_same(host(ops, on_target), want)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (5, 5), (37, 53)])
def test_normalise_per_cfa_colour(ops, pattern, shape):
    """A (1, h, w) CFA tile at ``origin``: each pixel takes its colour's offset and scale."""
    rng = np.random.default_rng(seed("normalise-cfa", pattern, shape))
    data = rng.normal(1000, 300, (1,) + shape).astype(np.float32)
    offset, scale = rng.normal(0, 50, 3), rng.uniform(0.5, 2.0, 3)
    for origin in ORIGINS:
        rows, cols = np.indices(shape)
        colour = np.array(["RGB".index(pattern[2 * ((origin[0] + r) % 2) + (origin[1] + c) % 2])
                           for r, c in zip(rows.ravel(), cols.ravel())]).reshape(shape)
        want = data * scale.astype(np.float32)[colour] + offset.astype(np.float32)[colour]
        on_target = ops.upload(data.copy())
        ops.normalise(on_target, offset, scale, pattern, origin)
        assert_same(host(ops, on_target), want)


# ----------------------------------------------------------------------------------------------------- warp


def _warp_cases():
    return [
        (rigid(17.0, 5.3, -7.1), (50, 70), (2, -3)),
        (rigid(-101.0, 60.2, 20.7), (33, 45), (0, 0)),
        (np.array([[1.02, 0.03, 0.6], [-0.01, 0.97, 1.4]]), (64, 49), (-5, 7)),
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("feather", [0.0, 3.5])
def test_warp_affine_bit_identical(kernel_ops, method, feather):
    rng = np.random.default_rng(5)
    image = rng.normal(1000, 100, (3, 61, 47)).astype(np.float32)
    image[1, 30, 20] = np.nan
    for A, out_shape, out_origin in _warp_cases():
        for src in (image, image[0]):
            got = kernel_ops.warp_affine(kernel_ops.upload(src), A, out_shape, out_origin=out_origin, method=method,
                                         feather_px=feather)
            want = warp_affine(src, A, out_shape, out_origin=out_origin, method=method, feather_px=feather)
            for g, w in zip(host(kernel_ops, got), want):
                assert_same(g, w)


@pytest.mark.parametrize("method", METHODS)
def test_warp_affine_band_and_edges(kernel_ops, method):
    ops = kernel_ops
    frame = np.random.default_rng(6).normal(500, 50, (80, 90)).astype(np.float32)
    A = rigid(9.0, 3.7, -2.2)
    out_shape, out_origin = (21, 37), (30, 25)
    r0, r1, c0, c1 = source_window(A, out_shape, out_origin, frame.shape, window_margin(method))
    band = frame[r0:r1, c0:c1]
    kw = dict(out_origin=out_origin, src_origin=(r0, c0), src_size=frame.shape, method=method, feather_px=2.0)
    got, want = host(ops, ops.warp_affine(ops.upload(band), A, out_shape, **kw)), warp_affine(band, A, out_shape, **kw)
    for g, w in zip(got, want):
        assert_same(g, w)
    whole = host(ops, ops.warp_affine(ops.upload(frame), A, out_shape, out_origin=out_origin, method=method,
                                      feather_px=2.0))
    for g, w in zip(got, whole):
        assert_same(g, w)
    with pytest.raises(ValueError, match="lacks taps"):
        ops.warp_affine(ops.upload(band[3:]), A, out_shape, **{**kw, "src_origin": (r0 + 3, c0)})
    # one-pixel sources and tiles
    for shape in [(1, 1), (1, 6), (6, 1)]:
        src = frame[: shape[0], : shape[1]]
        for out in [(1, 1), (3, 7)]:
            got = host(ops, ops.warp_affine(ops.upload(src), rigid(0.0, 0.0, 0.0), out, method=method))
            for g, w in zip(got, warp_affine(src, rigid(0.0, 0.0, 0.0), out, method=method)):
                assert_same(g, w)


def test_warp_integer_shift_is_exact(ops):
    """An integer translation (how integer alignment is done: an even shift through the normal warps) copies the
    frame's pixels exactly, whatever the method."""
    frame = np.random.default_rng(7).normal(0, 1e4, (40, 50)).astype(np.float32)
    shifted = np.full((40, 50), np.nan, np.float32)
    shifted[:38, 3:] = frame[2:, :47]  # output (X, Y) = frame (X - 3, Y + 2)
    for method in METHODS:
        warped, valid, _ = host(ops, ops.warp_affine(ops.upload(frame), rigid(0.0, 3.0, -2.0), (40, 50),
                                                     method=method))
        inner = valid & np.isfinite(shifted)
        assert inner.sum() > 1000 and not (valid & ~np.isfinite(shifted)).any()
        np.testing.assert_array_equal(warped[inner], shifted[inner])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_warp_bayer_planes_bit_identical(kernel_ops, method, pattern):
    ops = kernel_ops
    mosaic = np.random.default_rng(8).integers(0, 65536, (57, 66), dtype=np.uint16)
    A = rigid(23.0, 4.4, -1.9)
    for out_shape, out_origin, feather in [((41, 55), (3, -2), 0.0), ((40, 31), (0, 1), 4.0), ((1, 1), (5, 5), 0.0)]:
        got = ops.warp_bayer_planes(ops.upload(mosaic), pattern, A, out_shape, out_origin=out_origin, method=method,
                                    feather_px=feather)
        want = warp_bayer_planes(mosaic, pattern, A, out_shape, out_origin=out_origin, method=method,
                                 feather_px=feather)
        for g, w in zip(host(ops, got), want):
            assert_same(g, w)
    out_shape, out_origin = (15, 20), (35, 10)
    r0, r1, c0, c1 = source_window(A, out_shape, out_origin, mosaic.shape, window_margin(method, bayer_planes=True))
    assert r0 >= 2
    r0 -= 1  # an odd band origin
    kw = dict(out_origin=out_origin, src_origin=(r0, c0), src_size=mosaic.shape, method=method, feather_px=3.0)
    got = host(ops, ops.warp_bayer_planes(ops.upload(mosaic[r0:r1, c0:c1]), pattern, A, out_shape, **kw))
    for g, w in zip(got, warp_bayer_planes(mosaic[r0:r1, c0:c1], pattern, A, out_shape, **kw)):
        assert_same(g, w)


#: The lattice warps: name of the stage operation, its reference.
LATTICE_WARPS = {"lattice": ("warp_lattice", warp_lattice), "chroma": ("warp_lattice_chroma", warp_lattice_chroma)}


@pytest.mark.parametrize("variant", LATTICE_WARPS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_warp_lattice_bit_identical(kernel_ops, pattern, variant):
    ops = kernel_ops
    name, warp_lattice = LATTICE_WARPS[variant]
    rng = np.random.default_rng(13)
    mosaic = rng.integers(0, 65536, (77, 93), dtype=np.uint16)
    noisy = rng.normal(1000, 100, (77, 93)).astype(np.float32)
    noisy[40, 50] = np.nan
    cases = [(rigid(17.0, 40.3, -2.6), (70, 80), (3, -2), 0.0), (rigid(-101.0, 20.0, 90.0), (61, 47), (0, 0), 3.5),
             (np.array([[1.02, 0.03, 0.6], [-0.01, 0.97, 1.4]]), (64, 49), (-5, 7), 0.0),
             (rigid(0.0, 2.0, -3.0), (1, 1), (30, 30), 0.0)]
    nan_seen = False
    for src in (mosaic, noisy):
        for A, out_shape, out_origin, feather in cases:
            got = getattr(ops, name)(ops.upload(src), pattern, A, out_shape, out_origin=out_origin, feather_px=feather)
            want = warp_lattice(src, pattern, A, out_shape, out_origin=out_origin, feather_px=feather)
            for g, w in zip(host(ops, got), want):
                assert_same(g, w)
            nan_seen = nan_seen or bool(np.isnan(want[0]).any())
    assert nan_seen  # a NaN sample propagates to the values whose kernels reach it


@pytest.mark.parametrize("pattern", PATTERNS)
def test_lattice_planes_split_exactly(kernel_ops, pattern):
    """d3_lattice_planes (float32) and d3_lattice_planes_u16 against warp.lattice_planes, odd band origins too."""
    xp, target = kernel_ops.xp, kernel_ops.target
    rng = np.random.default_rng(15)
    for shape, origin in [((9, 12), (0, 0)), ((10, 7), (3, 5)), ((1, 1), (1, 0)), ((5, 2), (2, 1))]:
        for band in (rng.integers(0, 65536, shape, dtype=np.uint16), rng.normal(0, 1e3, shape).astype(np.float32)):
            L = lattice_layout(band.shape, origin, pattern)
            got = [xp.empty((L.rows[s], L.cols[s]), xp.float32) for s in (0, 1)] + [xp.zeros((L.n_u, L.n_v), xp.float32)]
            kernel = "d3_lattice_planes_u16" if band.dtype == np.uint16 else "d3_lattice_planes"
            grid, block = kernel_source.grid_2d(*band.shape)
            target.launch(kernel, grid, block, kernel_ops.upload(band), np.int32(shape[0]), np.int32(shape[1]),
                          np.int32(origin[0]), np.int32(origin[1]), np.int32(PATTERNS.index(pattern)), *got)
            for g, w in zip(got, lattice_planes(band, origin, pattern)):
                assert_same(kernel_ops.download(g), w)
            # the colour-difference split, in a frame the band fills to its bottom-right edge (reflected neighbours)
            # and in a bigger one (neighbours clamped to the band)
            for frame in ((origin[0] + shape[0], origin[1] + shape[1]), (origin[0] + shape[0] + 5, origin[1] + 40)):
                got = [xp.empty((L.rows[s], L.cols[s]), xp.float32) for s in (0, 1)] + [xp.zeros((L.n_u, L.n_v), xp.float32)]
                kernel = "d3_lattice_chroma_planes_u16" if band.dtype == np.uint16 else "d3_lattice_chroma_planes"
                target.launch(kernel, grid, block, kernel_ops.upload(band), np.int32(shape[0]), np.int32(shape[1]),
                              np.int32(origin[0]), np.int32(origin[1]), np.int32(frame[0]), np.int32(frame[1]),
                              np.int32(PATTERNS.index(pattern)), *got)
                for g, w in zip(got, lattice_chroma_planes(band, origin, pattern, frame)):
                    assert_same(kernel_ops.download(g), w)


@pytest.mark.parametrize("variant", LATTICE_WARPS)
@pytest.mark.parametrize("pattern", ["GRBG", "BGGR"])
def test_warp_lattice_bands_and_edges(kernel_ops, pattern, variant):
    ops = kernel_ops
    name, warp_lattice = LATTICE_WARPS[variant]
    mosaic = np.random.default_rng(14).integers(0, 65536, (80, 90), dtype=np.uint16)
    A = rigid(9.0, 3.7, -2.2)
    out_shape, out_origin = (21, 37), (30, 25)
    r0, r1, c0, c1 = source_window(A, out_shape, out_origin, mosaic.shape, LATTICE_MARGIN)
    r0, c0 = r0 - 1, c0 - 1  # odd band origins
    kw = dict(out_origin=out_origin, src_origin=(r0, c0), src_size=mosaic.shape, feather_px=2.0)
    band = mosaic[r0:r1, c0:c1]
    got = host(ops, getattr(ops, name)(ops.upload(band), pattern, A, out_shape, **kw))
    want = warp_lattice(band, pattern, A, out_shape, **kw)
    whole = host(ops, getattr(ops, name)(ops.upload(mosaic), pattern, A, out_shape, out_origin=out_origin, feather_px=2.0))
    for g, w, f in zip(got, want, whole):
        assert_same(g, w)
        assert_same(g, f)
    assert got[1].all()
    with pytest.raises(ValueError, match="lacks taps"):
        getattr(ops, name)(ops.upload(band[6:]), pattern, A, out_shape, **{**kw, "src_origin": (r0 + 6, c0)})
    for shape in [(1, 1), (1, 6), (6, 1), (21, 21)]:  # sources too small for the kernels: nothing valid
        src = mosaic[: shape[0], : shape[1]]
        for g, w in zip(host(ops, getattr(ops, name)(ops.upload(src), pattern, rigid(0.0, 0.0, 0.0), (3, 7))),
                        warp_lattice(src, pattern, rigid(0.0, 0.0, 0.0), (3, 7))):
            assert_same(g, w)
    with pytest.raises(ValueError, match="pattern"):
        getattr(ops, name)(ops.upload(mosaic), None, A, out_shape)


@pytest.mark.parametrize("kind", ["affine-rgb", "affine-mono", "bayer-planes", "lattice", "chroma"])
def test_warps_write_into_out_views(ops, kind):
    """Given ``out=`` views of a tile buffer, a warp writes there exactly what it returns (the same values as
    without ``out``) and nothing else of the buffer."""
    xp = ops.xp
    rng = np.random.default_rng(seed("out", kind))
    mosaic = rng.integers(0, 65536, (57, 66), dtype=np.uint16)
    rgb = rng.normal(1000, 100, (3, 57, 66)).astype(np.float32)
    A = rigid(23.0, 4.4, -1.9)
    rows, cols = 29, 37
    kw = dict(out_origin=(3, -2), src_size=(57, 66), feather_px=3.0)
    if kind == "affine-rgb":
        def warp(out):
            return ops.warp_affine(ops.upload(rgb), A, (rows, cols), method="bicubic", out=out, **kw)
    elif kind == "affine-mono":
        def warp(out):
            return ops.warp_affine(ops.upload(rgb[1]), A, (rows, cols), method="bilinear", out=out, **kw)
    elif kind == "bayer-planes":
        def warp(out):
            return ops.warp_bayer_planes(ops.upload(mosaic), "GBRG", A, (rows, cols), method="bicubic", out=out, **kw)
    elif kind == "lattice":
        def warp(out):
            return ops.warp_lattice(ops.upload(mosaic), "GRBG", A, (rows, cols), out=out, **kw)
    else:
        def warp(out):
            return ops.warp_lattice_chroma(ops.upload(mosaic), "RGGB", A, (rows, cols), out=out, **kw)
    image_shape = (rows, cols) if kind in ("affine-mono", "bayer-planes") else (3, rows, cols)
    channels = 3 if len(image_shape) == 3 else 1
    # a tile buffer of three frames: frame 1's blocks are the out arrays, frames 0 and 2 must stay as they are
    data_buf = xp.full((3, channels * rows * cols), -7.0, xp.float32)
    valid_buf = xp.ones((3, rows * cols), xp.bool_)
    weight_buf = xp.full((3, rows * cols), -7.0, xp.float32)
    out = (data_buf[1].reshape(image_shape), valid_buf[1].reshape(rows, cols), weight_buf[1].reshape(rows, cols))
    fresh = host(ops, warp(None))
    returned = host(ops, warp(out))
    written = host(ops, out)
    assert fresh[1].any() and not fresh[1].all()
    for r, w, f in zip(returned, written, fresh):
        assert_same(r, f)
        assert_same(w, f)
    for k in (0, 2):
        assert (host(ops, data_buf[k]) == -7.0).all() and host(ops, valid_buf[k]).all()
        assert (host(ops, weight_buf[k]) == -7.0).all()


# ------------------------------------------------------------------------------------------------- clipping


@pytest.fixture()
def clip_kernel(kernel_ops, monkeypatch):
    """``kernel_ops`` whose clip kernel takes tiles of up to ``D3_CLIP_MAX_FRAMES`` frames, so that the kernel
    itself (not the host fallback beyond the CPU build's speed limit) is compared with the reference."""
    limit = kernel_source.define_value("D3_CLIP_MAX_FRAMES")
    for key in cpu_build.CLIP_KERNEL_MAX_FRAMES:
        monkeypatch.setitem(cpu_build.CLIP_KERNEL_MAX_FRAMES, key, limit)
    return kernel_ops


def kernel_clip(ops, data, valid=None, weights=None, frame_weights=None, **options) -> ClipResult:
    """``sigma_clip_mask_aware(data, valid, weights, frame_weights, **options)`` through ``ops.clip_into`` on the
    (N, C, L) views of the inputs, on the kernel (never the host fallback); host results of the reference's shapes."""
    settings = clip_settings(**options)
    n, channels, pixels = frames_channels_pixels_shape(data.shape)
    assert n <= ops.target.clip_kernel_max_frames(settings), "the host fallback would clip, not the kernel"
    xp, counts = ops.xp, count_dtype(n)
    mean = xp.empty((channels, pixels), xp.float32)
    coverage, rejected = xp.empty((channels, pixels), counts), xp.empty((channels, pixels), counts)
    ops.clip_into(ops.upload(data.reshape(n, channels, pixels)), up(ops, per_sample_view(data, "valid", valid)),
                  up(ops, per_sample_view(data, "weights", weights)), frame_weights, settings, mean, coverage,
                  rejected)
    return ClipResult(*(ops.download(a).reshape(data.shape[1:]) for a in (mean, coverage, rejected)))


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


@pytest.mark.parametrize("cenfunc", CENFUNCS)
@pytest.mark.parametrize("stdfunc", STDFUNCS)
def test_sigma_clip_matches_reference(clip_kernel, cenfunc, stdfunc):
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
        want = sigma_clip_mask_aware(data, **kw)
        assert want.rejected.sum() > 0
        assert_clip_equal(kernel_clip(clip_kernel, data, **kw), want)


def test_sigma_clip_integer_data_and_shapes(clip_kernel):
    """ADU-valued data (ties between samples) and stacks of other ranks and sizes."""
    rng = np.random.default_rng(10)
    for shape in [(40, 1000), (1, 7), (5, 1, 1), (12, 2, 3, 5)]:
        data = _stack(rng, shape, integer=True)
        for cenfunc, stdfunc in [("median", "mad_std"), ("median", "std"), ("mean", "std")]:
            kw = dict(cenfunc=cenfunc, stdfunc=stdfunc, sigma=2.5)
            assert_clip_equal(kernel_clip(clip_kernel, data, **kw), sigma_clip_mask_aware(data, **kw))


def test_clip_beyond_the_kernel_frame_limit_is_the_reference(kernel_ops, monkeypatch):
    """Past the target's clip-kernel frame limit the reference clips on the host: bit-identical results, written
    into the target's arrays; the CPU build's limits are where its kernel measured faster than NumPy."""
    settings = clip_settings(cenfunc="median", stdfunc="mad_std")
    assert kernel_ops.target.clip_kernel_max_frames(settings) >= 256
    assert kernel_ops.target.clip_kernel_max_frames(clip_settings(cenfunc="mean", stdfunc="std")) >= 128
    monkeypatch.setattr(kernel_ops.target, "clip_kernel_max_frames", lambda settings: 10)
    rng = np.random.default_rng(11)
    data = _stack(rng, (11, 3, 40))
    valid = rng.random((11, 1, 40)) > 0.1
    weights = rng.uniform(0.1, 1.0, (11, 1, 40)).astype(np.float32)
    frame_weights = rng.uniform(0.5, 2.0, 11)
    xp = kernel_ops.xp
    for settings in (settings, clip_settings(cenfunc="mean", stdfunc="std", sigma=2.0)):
        got = (xp.empty((3, 40), xp.float32), xp.empty((1, 40), xp.int16), xp.empty((3, 40), xp.int16))
        kernel_ops.clip_into(up(kernel_ops, data), up(kernel_ops, valid), up(kernel_ops, weights), frame_weights,
                             settings, *got)
        want = (np.empty((3, 40), np.float32), np.empty((1, 40), np.int16), np.empty((3, 40), np.int16))
        clip.clip_into(data, valid, weights, frame_weights, settings, *want, None, None)
        assert (want[2] > 0).any()
        for g, w in zip(host(kernel_ops, got), want):
            assert_same(g, w)


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
def test_sigma_clip_random_frame_counts(clip_kernel, n):
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
        want = sigma_clip_mask_aware(data, **kw)
        assert_clip_close(kernel_clip(clip_kernel, data, **kw), want, data)


@pytest.mark.parametrize("n", [7, 40, 150])
@pytest.mark.parametrize("cenfunc, stdfunc", CLIP_OPTIONS)
def test_sigma_clip_kept_sets_identical(clip_kernel, n, cenfunc, stdfunc):
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
        want = sigma_clip_mask_aware(repeated, **kw)
        got = kernel_clip(clip_kernel, repeated, **kw)
        assert_same(got.mean, want.mean)
        assert_same(got.rejected, want.rejected)
        kept = np.isfinite(want.mean).reshape(n, pixels)
        lo, hi = clip_bounds(data, valid, cenfunc=cenfunc, stdfunc=stdfunc, sigma_lower=2.0, sigma_upper=2.5,
                             maxiters=None)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(kept, valid & (data >= lo) & (data <= hi))


def test_sigma_clip_ties_and_degenerate_pixels(clip_kernel):
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
                want = sigma_clip_mask_aware(data, **kw)
                got = kernel_clip(clip_kernel, data, **kw)
            assert_same(got.coverage, want.coverage)
            assert_same(got.rejected, want.rejected)
            np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, equal_nan=True)


def _tile_buffers(rng, n, channels, pixels, spare):
    """The stack_tiles layout: (N, C, P + spare), (N, P + spare) buffers whose first P pixels per plane are the
    tile and whose spare pixels hold NaN and garbage (the kernel must not read them); see ``_tile_views``."""
    data_buf = np.full((n, channels, pixels + spare), np.nan, np.float32)
    valid_buf = np.ones((n, pixels + spare), bool)
    weight_buf = np.full((n, pixels + spare), np.nan, np.float32)
    data = rng.normal(500.0, 15.0, (n, channels, pixels)).astype(np.float32)
    data[rng.random(data.shape) < 0.03] += 900.0
    data_buf[:, :, :pixels] = data
    valid_buf[:, :pixels] = rng.random((n, pixels)) > 0.1
    valid_buf[:, :pixels] &= np.isfinite(data).all(axis=1)
    weight_buf[:, :pixels] = rng.uniform(0.1, 1.0, (n, pixels))
    return data_buf, valid_buf, weight_buf


def _tile_views(buffers, pixels):
    """(N, C, P) data, (N, 1, P) valid and weight views of the first ``pixels`` of each plane of the buffers."""
    data_buf, valid_buf, weight_buf = buffers
    return data_buf[:, :, :pixels], valid_buf[:, None, :pixels], weight_buf[:, None, :pixels]


@pytest.mark.parametrize("n, cenfunc, stdfunc", [(13, "median", "mad_std"), (13, "mean", "std"), (150, "median", "std"),
                                                  (600, "median", "mad_std"), (600, "mean", "std")])
def test_clip_into_matches_the_reference_step(kernel_ops, n, cenfunc, stdfunc):
    """``ops.clip_into``, the clip step stack_tiles takes, on strided tile views with a shared mask and weights,
    (1, P) coverage and chunking (P above one chunk for few frames), against ``clip.clip_into``; beyond the target's
    clip-kernel frame limit the reference clips (bit-identical)."""
    ops, xp = kernel_ops, kernel_ops.xp
    rng = np.random.default_rng(n)
    channels, pixels = 3, (CHUNK_SAMPLES // 3 + 1000 if n == 13 else 500)
    buffers = _tile_buffers(rng, n, channels, pixels, 37)
    data, valid, weights = _tile_views(buffers, pixels)
    on_target = _tile_views([ops.upload(b) for b in buffers], pixels)
    frame_weights = rng.uniform(0.5, 2.0, n)
    cfg = clip_settings(3.0, 2.5, 3.0, 5, cenfunc, stdfunc)
    for use_weights in (False, True):
        w, fw = (weights, frame_weights) if use_weights else (None, None)
        want = (np.full((channels, pixels + 5), -1.0, np.float32)[:, :pixels],
                np.full((1, pixels + 5), -1, np.int16)[:, :pixels],
                np.full((channels, pixels + 5), -1, np.int16)[:, :pixels])
        clip.clip_into(data, valid, w, fw, cfg, *want, None, None)
        got = (xp.full((channels, pixels + 5), -1.0, xp.float32)[:, :pixels],
               xp.full((1, pixels + 5), -1, xp.int16)[:, :pixels],
               xp.full((channels, pixels + 5), -1, xp.int16)[:, :pixels])
        ops.clip_into(on_target[0], on_target[1], on_target[2] if use_weights else None, fw, cfg, *got)
        want, got = ClipResult(*want), ClipResult(*host(ops, got))
        assert (want.rejected > 0).any()
        assert_clip_close(got, want, data)
        if n > ops.target.clip_kernel_max_frames(cfg):
            assert_same(got.mean, want.mean)


def test_clip_into_checks_its_inputs(ops):
    rng = np.random.default_rng(3)
    data, valid, weights = _tile_views(_tile_buffers(rng, 5, 1, 20, 0), 20)
    cfg = clip_settings(3.0, None, None, 5, "median", "mad_std")
    xp = ops.xp
    outputs = (xp.empty((1, 20), xp.float32), xp.empty((1, 20), xp.int16), xp.empty((1, 20), xp.int16))
    bad = weights.copy()
    bad[2, 0, 3] = np.inf
    with pytest.raises(ValueError, match="weights must be finite"):
        ops.clip_into(ops.upload(data), ops.upload(valid), ops.upload(bad), None, cfg, *outputs)


def test_clip_needs_a_bool_mask(ops):
    rng = np.random.default_rng(4)
    data, valid, _ = _tile_views(_tile_buffers(rng, 5, 1, 20, 0), 20)
    xp = ops.xp
    outputs = (xp.empty((1, 20), xp.float32), xp.empty((1, 20), xp.int16), xp.empty((1, 20), xp.int16))
    with pytest.raises(ValueError, match="bool"):
        ops.clip_into(ops.upload(data), ops.upload(valid.astype(np.uint8)), None, None, clip_settings(), *outputs)


class ArrayRenderer:
    """A tile renderer over in-memory frames on ``ops.xp``: copies frame k's part of the tile into the buffer."""

    def __init__(self, ops, data, valid, weight):
        self.data, self.valid, self.weight = (ops.upload(a) for a in (data, valid, weight))

    def render_into(self, k, row0, row1, col0, col1, data, valid, weight):
        data[...] = self.data[k, :, row0:row1, col0:col1]
        valid[...] = self.valid[k, row0:row1, col0:col1]
        weight[...] = self.weight[k, row0:row1, col0:col1]


def test_stack_tiles_is_independent_of_tiles_and_threads(ops):
    """stack_tiles with the clip step of every implementation: identical bytes for any tile size and with a
    thread pool, and the reference clip's decisions on the whole stack."""
    rng = np.random.default_rng(21)
    n, channels, height, width = 13, 3, 70, 41
    data = rng.normal(500.0, 15.0, (n, channels, height, width)).astype(np.float32)
    data[rng.random(data.shape) < 0.03] += 800.0
    data[0, 1, 3, 4] = np.nan
    valid = rng.random((n, height, width)) > 0.05
    weight = np.where(valid, rng.uniform(0.2, 1.0, valid.shape), 0.0).astype(np.float32)
    frame_weights = rng.uniform(0.5, 1.5, n)
    renderer = ArrayRenderer(ops, data, valid, weight)
    settings = clip_settings(cenfunc="median", stdfunc="mad_std")
    results = []
    for shape in ((16, 16), (30, 41), (70, 41)):
        plan = plan_tiles(height, width, n, channels, 1 << 30, workers=1, tile_shape=shape)
        for pool in (None, ThreadPoolExecutor(2)):
            results.append(stack_tiles(plan, renderer, n, (channels, height, width), ops=ops, settings=settings,
                                       frame_weights=frame_weights, executor=pool))
            if pool is not None:
                pool.shutdown()
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_same(a, b)
    # a sample counts where it is valid and all its channels are finite (as the tile driver says)
    want = sigma_clip_mask_aware(data, valid & np.isfinite(data).all(axis=1), weight, frame_weights,
                                 cenfunc="median", stdfunc="mad_std")
    assert_same(results[0].coverage, want.coverage[0])
    assert_same(results[0].rejected, want.rejected)
    np.testing.assert_allclose(results[0].mean, want.mean, rtol=1e-6, equal_nan=True)


def test_results_do_not_depend_on_thread_count(cpu_build_target):
    """The CPU build's OpenMP thread count changes no byte of any stage operation."""
    ops = KernelStageOps(cpu_build_target)
    rng = np.random.default_rng(12)
    data = _stack(rng, (21, 3001))
    big = _stack(rng, (150, 301))
    image = rng.normal(0, 1, (3, 70, 90)).astype(np.float32)
    mosaic = rng.integers(0, 65536, (70, 90), dtype=np.uint16)
    calibration = ops.on_target(DarkCalibration(rng.normal(0, 30, (70, 90)).astype(np.float32),
                                                rng.random((70, 90)) < 0.05, identity="t", record={}))
    A = rigid(31.0, 2.0, 1.0)

    def run():
        out = [kernel_clip(ops, data, cenfunc="mean"), kernel_clip(ops, data, cenfunc="median", stdfunc="mad_std"),
               kernel_clip(ops, big, stdfunc="mad_std"), ops.warp_affine(image, A, (70, 90), method="bicubic"),
               ops.warp_lattice(mosaic, "GBRG", A, (70, 90), feather_px=3.0), (ops.debayer_mhc(mosaic, "BGGR"),),
               (ops.calibrate_window(mosaic.astype(np.float32), (0, 0), calibration),)]
        return [a for group in out for a in group]

    results = []
    try:
        for threads in (1, 2, 0):
            cpu_build_target.set_threads(threads)
            results.append(run())
    finally:
        cpu_build_target.set_threads(0)
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert_same(got, want)


def test_cpu_backend_is_the_cpu_build(monkeypatch):
    """``get_backend("cpu")`` runs the kernels' CPU build; without a C++ compiler, the NumPy reference, saying why."""
    backend = get_backend("cpu")
    if cpu_build.find_compiler() is None:
        assert isinstance(backend, ReferenceStageOps)
    else:
        assert isinstance(backend, KernelStageOps) and isinstance(backend.target, cpu_build.CpuBuildTarget)
        assert backend.implementation == "cpu kernels" and backend.fallback_reason == ""
    monkeypatch.setattr(cpu_build, "find_compiler", lambda: None)
    fallback = cpu_backend(fallback_reason="no GPU")
    assert isinstance(fallback, ReferenceStageOps) and fallback.name == "cpu"
    assert fallback.implementation == "NumPy reference"
    assert fallback.fallback_reason.startswith("no GPU; the CPU build of the kernels is unavailable")
    assert "no C++ compiler" in fallback.describe()["fallback_reason"]


# ------------------------------------------------------------------------------------------ launch checking


def test_launch_checks_argument_types(cpu_build_target):
    lib = cpu_build_target
    mosaic = np.arange(16, dtype=np.float32).reshape(4, 4)
    mosaic.flags.writeable = False  # a const pointer may be read-only
    out = np.empty((3, 2, 2), np.float32)
    good = [mosaic, np.int32(4), np.int32(4), np.int32(0), out]
    lib.launch("d3_debayer_superpixel", (1,), (32, 8), *good)
    assert_same(out, debayer_superpixel(mosaic, "RGGB"))

    def call(index, value):
        args = list(good)
        args[index] = value
        lib.launch("d3_debayer_superpixel", (1,), (32, 8), *args)

    with pytest.raises(TypeError, match=r"d3_debayer_superpixel, argument 'h' \(C type int\) needs numpy.int32, "
                                        r"got Python int"):
        call(1, 4)
    with pytest.raises(TypeError, match="needs numpy.int32, got numpy.int64"):
        call(1, np.int64(4))
    with pytest.raises(TypeError, match="argument 'out'.*needs dtype float32"):
        call(4, np.empty((3, 2, 2), np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        call(4, np.empty((3, 2, 4), np.float32)[:, :, ::2])
    read_only = np.empty((3, 2, 2), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        call(4, read_only)
    with pytest.raises(TypeError, match="needs a C-contiguous float32 array, got Python list"):
        call(0, [0.0] * 16)
    with pytest.raises(TypeError, match="takes 5 arguments"):
        lib.launch("d3_debayer_superpixel", (1,), (32, 8), *good[:-1])
    with pytest.raises(TypeError, match="needs a C-contiguous uint8 array"):
        hot = lib.signatures["d3_repair_hot"]
        kernel_source.check_args(hot, [np.zeros(1, np.float32), *[np.int32(1)] * 4, [0],
                                       np.int32(1), np.zeros(1, np.int32), np.zeros(1, np.int32), np.int32(0),
                                       np.int32(0)])
    with pytest.raises(KeyError, match="unknown kernel 'd3_decode_bzero16'"):
        lib.launch("d3_decode_bzero16", (1,), (256,))
    with pytest.raises(TypeError, match=r"'feather_px' \(C type double\) needs numpy.float64, got Python float"):
        kernel_source.check_args(lib.signatures["d3_warp_affine"],
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
    (sig,) = kernel_source.parse_signatures(source).values()
    assert sig.name == "k"
    assert [(p.ctype, p.name, p.dtype) for p in sig.params] == [
        ("const float*", "x", np.float32), ("unsigned char*", "mask", np.uint8), ("long long", "n", np.int64),
        ("double", "s", np.float64)]
    assert sig.params[0].const and sig.params[1].pointer and not sig.params[2].pointer
    with pytest.raises(ValueError, match="unsupported type"):
        kernel_source.parse_signatures('extern "C" __global__ void k(size_t n) {}')
    names = set(kernel_source.load_signatures(REPO / "kernels"))
    assert {"d3_repair_hot", "d3_repair_hot_u16", "d3_debayer_bilinear", "d3_debayer_mhc", "d3_debayer_superpixel",
            "d3_warp_affine", "d3_warp_bayer_planes", "d3_lattice_planes", "d3_lattice_planes_u16", "d3_warp_lattice",
            "d3_lattice_chroma_planes", "d3_lattice_chroma_planes_u16", "d3_warp_lattice_chroma",
            "d3_sigma_clip"} <= names
    assert not {"d3_decode_bzero16", "d3_luminance_proxy", "d3_segment_moments", "d3_segment_histogram"} & names


def test_geometry():
    assert kernel_source.grid_1d(257) == ((2, 1, 1), (256, 1, 1))
    assert kernel_source.grid_2d(9, 33) == ((2, 2, 1), (32, 8, 1))
    with pytest.raises(ValueError):
        kernel_source.grid_2d(0, 5)
    assert kernel_source.define_value("D3_CLIP_MAX_FRAMES") == 512


# --------------------------------------------------------------------------------------- sources and builds


def test_kernel_dir_search_order(tmp_path, monkeypatch):
    monkeypatch.delenv(kernel_source.KERNEL_DIR_ENV, raising=False)
    assert kernel_source.kernel_dir() == REPO / "kernels"
    for path in (REPO / "kernels").iterdir():
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setenv(kernel_source.KERNEL_DIR_ENV, str(tmp_path))
    assert kernel_source.kernel_dir() == tmp_path
    assert kernel_source.read_source(tmp_path / "calibrate.cu").startswith(f'#line 1 "{tmp_path / "calibrate.cu"}"\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(kernel_source.KERNEL_DIR_ENV, str(empty))
    # no public way to hide the package's own folders: replace the candidate list
    monkeypatch.setattr(kernel_source, "candidate_dirs", lambda: [empty, tmp_path / "nowhere"])
    with pytest.raises(BackendUnavailableError, match=f"looked in: {empty}; {tmp_path / 'nowhere'}"):
        kernel_source.kernel_dir()


def test_compiler_errors_name_the_file(tmp_path):
    if cpu_build.find_compiler() is None:
        pytest.skip("no C++ compiler (g++, c++ or $CXX)")
    for path in (REPO / "kernels").iterdir():
        shutil.copy(path, tmp_path / path.name)
    broken = tmp_path / "broken.cu"
    broken.write_text('#include "common.cuh"\nextern "C" __global__ void d3_broken(int n) { undeclared = n; }\n')
    with pytest.raises(BackendUnavailableError, match=r"broken\.cu:2"):
        cpu_build.build(tmp_path, tmp_path / "cache")


KERNEL_FILES = kernel_source.kernel_files(REPO / "kernels")


def test_kernel_files_are_the_current_set():
    assert {p.name for p in KERNEL_FILES} == {"calibrate.cu", "debayer.cu", "sigma_clip.cu", "warp.cu"}


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_each_kernel_file_compiles_as_cpp(path):
    compiler = cpu_build.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (g++, c++ or $CXX)")
    cpu = subprocess.run([compiler, *cpu_build.CXX_FLAGS, "-fsyntax-only", "-Wall", "-Werror",
                          f"-I{REPO / 'kernels'}", str(path)], capture_output=True, text=True)
    assert cpu.returncode == 0, cpu.stderr


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_each_kernel_file_compiles_with_nvcc(path, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH")
    ptx = tmp_path / f"{path.stem}.ptx"
    result = subprocess.run([nvcc, "--ptx", f"-arch={arch}", *kernel_source.NVRTC_OPTIONS, "-I",
                             str(REPO / "kernels"), str(path), "-o", str(ptx)], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc {arch}: {result.stderr}"
    text = ptx.read_text()
    for name in kernel_source.parse_signatures(path.read_text(), str(path)):
        assert f".entry {name}(" in text, f"{name} missing from the {arch} PTX"


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
    env = {k: v for k, v in os.environ.items() if k != kernel_source.KERNEL_DIR_ENV}
    env["PYTHONPATH"] = str(target)
    code = ("import dwarf3gpu; from dwarf3gpu.backends import kernel_source; "
            "print(dwarf3gpu.__file__); print(kernel_source.kernel_dir()); "
            "print(len(kernel_source.load_signatures()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert Path(out[0]).is_relative_to(target)
    assert Path(out[1]) == target / "dwarf3gpu" / "kernels"
    assert int(out[2]) == len(kernel_source.load_signatures(REPO / "kernels"))
