"""The CUDA backend on a real GPU (``@pytest.mark.gpu``; skipped with the reason elsewhere, see conftest.py).

The kernel comparisons of ``test_kernels.py`` run again through :class:`~dwarf3gpu.backends.cuda.CudaBackend`'s
CuPy/NVRTC build (same tolerances: bit-identical except the sigma-clip mean, 1e-6 relative), and a small
simulated session stacked with ``--backend cuda`` gives the CPU master within float32 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from dwarf3gpu.config import StackConfig
from dwarf3gpu.pipeline import stack_session
from dwarf3gpu.simulate import simulate_session

from .test_kernels import (  # noqa: F401  (collected here again, with the GPU `ops` fixture below)
    test_debayer_bilinear_bit_identical,
    test_debayer_bilinear_nan_and_float,
    test_decode_fused_calibration,
    test_decode_matches_read_fits,
    test_histogram_and_moments,
    test_sigma_clip_frame_limit,
    test_sigma_clip_integer_data_and_shapes,
    test_sigma_clip_matches_reference,
    test_superpixel_and_luminance_bit_identical,
    test_warp_affine_band_and_edges,
    test_warp_affine_bit_identical,
    test_warp_bayer_planes_bit_identical,
    test_warp_integer_shift_is_exact,
    test_warp_lattice_bands_and_edges,
    test_warp_lattice_bit_identical,
)

pytestmark = pytest.mark.gpu


class _HostOps:
    """KernelOps on the GPU with every array result brought back to NumPy (the reference tests compare NumPy)."""

    def __init__(self, ops, cupy):
        self._ops, self._cupy = ops, cupy

    def _host(self, value):
        if isinstance(value, self._cupy.ndarray):
            return self._cupy.asnumpy(value)
        if isinstance(value, tuple):
            items = [self._host(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        return value

    def __getattr__(self, name):
        attr = getattr(self._ops, name)
        if not callable(attr):
            return attr
        return lambda *a, **kw: self._host(attr(*a, **kw))


@pytest.fixture(scope="module")
def gpu():
    from dwarf3gpu.backends import get_backend

    return get_backend("cuda")


@pytest.fixture(scope="module")
def ops(gpu):
    import cupy

    return _HostOps(gpu.ops, cupy)


def test_describe_names_the_gpu(gpu):
    info = gpu.describe()
    assert info["name"] == "cuda" and info["device"] and info["memory_bytes"] > 0
    assert gpu.compile_all()


def test_launch_checks_argument_types_on_gpu(gpu):
    import cupy

    x = cupy.zeros(4, cupy.float32)
    with pytest.raises(TypeError, match="numpy.int32"):
        gpu.launch("d3_segment_moments", (1, 1, 1), (1, 1, 1), x, 4, np.int32(4), np.float64(0),
                   cupy.zeros(1, cupy.int32), cupy.zeros(1, cupy.float64), cupy.zeros(1, cupy.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        gpu.launch("d3_segment_moments", (1, 1, 1), (1, 1, 1), np.zeros(4, np.float32), np.int32(4), np.int32(4),
                   np.float64(0), cupy.zeros(1, cupy.int32), cupy.zeros(1, cupy.float64), cupy.zeros(1, cupy.float64))


def test_pipeline_master_matches_cpu(tmp_path, small_session_config, big_budget):
    sim = simulate_session(tmp_path / "sim", small_session_config)
    masters = {}
    for name in ("cpu", "cuda"):
        result = stack_session(sim.session_dir, tmp_path / name, StackConfig(memory_budget=big_budget, backend=name),
                               workers=2, use_cache=False)
        masters[name] = fits.getdata(result.outputs["master_linear"])
    cpu, gpu = masters["cpu"], masters["cuda"]
    assert cpu.shape == gpu.shape
    assert np.array_equal(np.isnan(cpu), np.isnan(gpu))
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-3, equal_nan=True)
