"""The CUDA launch target on a real GPU (``@pytest.mark.gpu``; skipped with the reason elsewhere, see conftest.py).

Every kernel comparison of ``test_kernels.py`` also runs on CUDA, through the ``cuda`` parametrisation of the
``ops``/``kernel_ops`` fixtures (same tolerances: bit-identical except the sigma-clip mean, 1e-6 relative). This
module holds only what is GPU-specific: the target's description and compilation, launch checks with CuPy arrays,
stage operations whose results stay on the device (CuPy arrays in and out, ``out=`` views of a device tile
buffer), and simulated sessions stacked with ``backend="cuda"`` giving the CPU backend's coverage and rejected maps
exactly and its master within float32 tolerance, on several render paths and with a dark.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from dwarf3gpu.backends import KernelStageOps, get_backend, kernel_source
from dwarf3gpu.calibrate import DarkCalibration
from dwarf3gpu.clip import clip_settings
from dwarf3gpu.config import StackConfig
from dwarf3gpu.pipeline import stack_session

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def target():
    """The CUDA launch target on device 0."""
    from dwarf3gpu.backends.cuda import CudaTarget

    return CudaTarget()


@pytest.fixture(scope="module")
def gpu(target):
    """The stage operations on CUDA."""
    return KernelStageOps(target)


def test_backend_choice_picks_cuda():
    for name in ("cuda", "auto"):
        ops = get_backend(name)
        assert isinstance(ops, KernelStageOps) and ops.name == "cuda" and ops.implementation == "cuda kernels"
        assert ops.fallback_reason == ""


def test_describe_names_the_gpu(gpu, target):
    info = gpu.describe()
    assert info["name"] == "cuda" and info["device"] and info["memory_bytes"] > 0
    assert info["implementation"] == "cuda kernels" and info["fallback_reason"] == ""
    assert set(target.compile_all()) == set(kernel_source.load_signatures())
    assert 0 < gpu.memory_budget() < info["memory_bytes"]


def test_launch_checks_argument_types_on_gpu(target):
    import cupy

    mosaic = cupy.arange(16, dtype=cupy.float32).reshape(4, 4)
    out = cupy.empty((3, 2, 2), cupy.float32)
    target.launch("d3_debayer_superpixel", (1, 1, 1), (32, 8, 1), mosaic, np.int32(4), np.int32(4), np.int32(0), out)
    assert float(out[0, 0, 0]) == 0.0 and float(out[2, 1, 1]) == 15.0  # RGGB: R at (0, 0), B at (1, 1) of a cell
    with pytest.raises(TypeError, match="numpy.int32"):
        target.launch("d3_debayer_superpixel", (1, 1, 1), (32, 8, 1), mosaic, 4, np.int32(4), np.int32(0), out)
    with pytest.raises(TypeError, match="C-contiguous float32 array, got numpy.ndarray"):  # a host array
        target.launch("d3_debayer_superpixel", (1, 1, 1), (32, 8, 1), np.zeros((4, 4), np.float32), np.int32(4),
                      np.int32(4), np.int32(0), out)
    with pytest.raises(TypeError, match="C-contiguous"):
        target.launch("d3_debayer_superpixel", (1, 1, 1), (32, 8, 1), mosaic, np.int32(4), np.int32(4), np.int32(0),
                      cupy.empty((3, 2, 4), cupy.float32)[:, :, ::2])


def test_stage_operations_stay_on_the_device(gpu):
    """From the uploaded raw window to the clipped tile every result is a CuPy array; warps write into views of a
    device tile buffer."""
    import cupy

    rng = np.random.default_rng(1)
    shape = (64, 80)
    raw = rng.integers(0, 65536, shape, dtype=np.uint16)
    calibration = DarkCalibration(rng.normal(0, 30, shape).astype(np.float32), rng.random(shape) < 0.02,
                                  identity="t", record={})
    dark = gpu.on_target(calibration)
    assert all(isinstance(a, cupy.ndarray) for a in (dark.offset, dark.hot, dark.hot_rows, dark.hot_cols))
    window = gpu.upload(raw.astype(np.float32))
    assert isinstance(window, cupy.ndarray)
    calibrated = gpu.calibrate_window(window, (0, 0), dark)
    assert isinstance(calibrated, cupy.ndarray)
    assert np.array_equal(gpu.download(calibrated), gpu.download(window))  # in place
    assert not np.array_equal(gpu.download(window), raw.astype(np.float32))
    A = np.array([[0.98, -0.17, 3.3], [0.17, 0.98, -2.1]])
    results = [gpu.debayer_bilinear(window, "RGGB"), gpu.debayer_mhc(window, "RGGB", (1, 1)),
               gpu.debayer_superpixel(window, "RGGB"), *gpu.warp_affine(window, A, shape, method="bicubic"),
               *gpu.warp_bayer_planes(window, "RGGB", A, shape), *gpu.warp_lattice(gpu.upload(raw), "RGGB", A, shape)]
    assert all(isinstance(r, cupy.ndarray) for r in results)
    rows, cols = 32, 40
    data_buf = cupy.zeros((2, 3 * rows * cols), cupy.float32)
    valid_buf = cupy.zeros((2, rows * cols), cupy.bool_)
    weight_buf = cupy.zeros((2, rows * cols), cupy.float32)
    out = (data_buf[1].reshape(3, rows, cols), valid_buf[1].reshape(rows, cols), weight_buf[1].reshape(rows, cols))
    gpu.warp_lattice(gpu.upload(raw), "RGGB", A, (rows, cols), out_origin=(16, 20), src_size=shape, out=out)
    gpu.normalise(out[0], np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.5, 0.5]))
    assert bool(valid_buf[1].any()) and not bool(valid_buf[0].any()) and not bool(data_buf[0].any())
    stack = gpu.upload(rng.normal(100, 5, (9, 3, 500)).astype(np.float32))
    mean, coverage, rejected = (cupy.empty((3, 500), cupy.float32), cupy.empty((1, 500), cupy.int16),
                                cupy.empty((3, 500), cupy.int16))
    gpu.clip_into(stack, None, None, None, clip_settings(), mean, coverage, rejected)
    assert int(coverage.min()) == 9 and np.isfinite(gpu.download(mean)).all()


@pytest.mark.parametrize("session_kind, settings", [
    ("lights", {}), ("lights", {"demosaic": "mhc"}), ("lights", {"debayer": "bayer-first"}),
    ("lights", {"debayer": "none"}), ("darks", {}),
], ids=["lattice", "mhc", "bayer-first", "cfa", "darks-lattice"])
def test_pipeline_master_matches_cpu(small_session, dark_session, big_budget, tmp_path, session_kind, settings):
    session = small_session if session_kind == "lights" else dark_session
    results = {}
    for name in ("cpu", "cuda"):
        results[name] = stack_session(session.session_dir, tmp_path / name,
                                      StackConfig(memory_budget=big_budget, backend=name, **settings), workers=2,
                                      use_cache=False)
    assert results["cuda"].manifest["backend"]["name"] == "cuda"
    assert results["cuda"].manifest["stack"]["tile_plan"]["tile_buffers"] == "device"
    assert results["cuda"].kept == results["cpu"].kept
    for key in ("coverage", "rejected_map"):  # the same clip decisions
        assert np.array_equal(fits.getdata(results["cpu"].outputs[key]), fits.getdata(results["cuda"].outputs[key]))
    cpu, gpu = (fits.getdata(results[name].outputs["master_linear"]) for name in ("cpu", "cuda"))
    assert cpu.shape == gpu.shape
    assert np.array_equal(np.isnan(cpu), np.isnan(gpu))
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-3, equal_nan=True)
