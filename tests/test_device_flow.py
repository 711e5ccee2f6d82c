"""The GPU backend's stacking data flow, run on the CPU: tiles kept in "device" arrays.

CI has no GPU, so :class:`~dwarf3gpu.backends.cuda.CudaBackend` never runs here. What its stacking loop does
differently from the CPU backend -- tile buffers allocated with the backend's array module
(``stack_tiles(xp=backend.xp)``), the lattice renders written into device views from the uploaded raw window,
``isfinite`` and the clip on the device, the results brought back with ``asnumpy`` -- is exercised with a stand-in
array module: NumPy arrays of a subclass that, like CuPy's, refuse to mix with host arrays in any ufunc (CuPy raises
``TypeError`` on implicit host/device conversion). A backend built like ``CudaBackend`` (the same ``KernelOps`` on
that module, launched through the CPU build of the kernels) must then stack a session to the CPU backend's master,
bit for bit.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from astropy.io import fits

import dwarf3gpu.pipeline as pipeline
from dwarf3gpu.backends import CpuBackend, native
from dwarf3gpu.backends.kernel_ops import KernelOps
from dwarf3gpu.backends.kernels import define_value
from dwarf3gpu.config import StackConfig


class DeviceArray(np.ndarray):
    """A "device" array: any ufunc that mixes it with a host (plain NumPy) array of rank > 0 raises."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        arrays = list(inputs) + list(kwargs.get("out", ()))
        if any(type(a) is np.ndarray and a.ndim > 0 for a in arrays):
            raise TypeError(f"{ufunc.__name__}: implicit conversion between host and device arrays")
        plain = [a.view(np.ndarray) if isinstance(a, DeviceArray) else a for a in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(a.view(np.ndarray) for a in kwargs["out"])
        return _device(getattr(ufunc, method)(*plain, **kwargs))


def _device(value):
    if isinstance(value, tuple):
        return tuple(_device(v) for v in value)
    return value.view(DeviceArray) if isinstance(value, np.ndarray) else value


def _device_module() -> types.SimpleNamespace:
    """The CuPy calls the backend code makes, on DeviceArray ("uploads" are copies)."""

    def asarray(a, dtype=None):
        if isinstance(a, DeviceArray) and (dtype is None or a.dtype == dtype):
            return a
        return np.array(np.asarray(a), dtype=dtype).view(DeviceArray)

    def ascontiguousarray(a, dtype=None):
        a = asarray(a, dtype)
        return a if a.flags.c_contiguous else np.ascontiguousarray(a.view(np.ndarray)).view(DeviceArray)

    return types.SimpleNamespace(
        ndarray=DeviceArray, float32=np.float32, float64=np.float64, int32=np.int32, uint8=np.uint8,
        uint16=np.uint16, bool_=np.bool_,
        empty=lambda shape, dtype=np.float32: np.empty(shape, dtype).view(DeviceArray),
        zeros=lambda shape, dtype=np.float32: np.zeros(shape, dtype).view(DeviceArray),
        asarray=asarray, ascontiguousarray=ascontiguousarray,
        isfinite=np.isfinite, sum=lambda a, dtype=None: np.sum(a.view(np.ndarray), dtype=dtype),
        asnumpy=lambda a: np.array(a.view(np.ndarray) if isinstance(a, DeviceArray) else a),
    )


class DeviceFlowBackend(CpuBackend):
    """CudaBackend's stacking path with the stand-in module: KernelOps on "device" arrays, launched through the
    CPU build; the other stages stay the CPU backend's (as CudaBackend's return host arrays)."""

    name = "device-standin"

    def __init__(self, memory_budget: int):
        super().__init__()
        self._memory_budget = memory_budget
        kernels = native.load()
        self.xp = _device_module()
        self.device_ops = KernelOps(kernels.launch, self.xp, define_value("D3_CLIP_MAX_FRAMES"))

    def memory_budget(self) -> int:
        return self._memory_budget

    def warp_lattice(self, mosaic, pattern, matrix, out_shape, out=None, **kwargs):
        if out is None:  # a single render (the reference frame's noise): host arrays, as CudaBackend returns
            return super().warp_lattice(mosaic, pattern, matrix, out_shape, **kwargs)
        assert all(isinstance(a, DeviceArray) for a in out), "the stacking loop must hand device views"
        self.device_renders = getattr(self, "device_renders", 0) + 1
        return self.device_ops.warp_lattice(mosaic, pattern, matrix, out_shape, out=out, **kwargs)

    def clip_into(self, stack, *args, **kwargs):
        assert isinstance(stack, DeviceArray), "the tile must be clipped where it lives"
        self.device_ops.clip_into(stack, *args, **kwargs)


def test_the_standin_refuses_to_mix_host_and_device():
    xp = _device_module()
    device = xp.zeros(4, np.float32)
    with pytest.raises(TypeError, match="implicit conversion"):
        device += np.ones(4, np.float32)
    device += xp.asarray(np.ones(4, np.float32))
    assert isinstance(device, DeviceArray) and float(xp.sum(device)) == 4.0


@pytest.mark.parametrize("settings", [{}, {"demosaic": "bilinear"}, {"debayer": "none"}],
                         ids=["lattice", "bilinear", "cfa"])
def test_device_resident_tiles_give_the_cpu_master(small_session, big_budget, settings, tmp_path, monkeypatch):
    """The default path renders into the device tile (every render counted); the other paths render on the host
    and are copied into it; all give the CPU backend's outputs bit for bit over several tiles."""
    try:
        native.load()
    except Exception as exc:  # no C++ compiler: the CPU build cannot stand in for the GPU
        pytest.skip(f"needs the CPU build of the kernels: {exc}")
    sim = small_session
    config = StackConfig(memory_budget=48 << 20, **settings)  # several tiles
    cpu = pipeline.stack_session(sim.session_dir, tmp_path / "cpu", config, workers=2, use_cache=False)
    backend = DeviceFlowBackend(memory_budget=big_budget)
    monkeypatch.setattr(pipeline, "get_backend", lambda *a, **k: backend)
    dev = pipeline.stack_session(sim.session_dir, tmp_path / "dev", config, workers=2, use_cache=False)
    lattice = not settings
    expected_renders = len(dev.kept) * dev.manifest["stack"]["tile_plan"]["n_tiles"] if lattice else 0
    assert getattr(backend, "device_renders", 0) == expected_renders
    assert dev.manifest["stack"]["tile_plan"]["tile_buffers"] == "device"
    assert cpu.manifest["stack"]["tile_plan"]["tile_buffers"] == "host"
    assert dev.manifest["stack"]["tile_plan"]["n_tiles"] > 1
    for key in ("master_linear", "coverage", "rejected_map"):
        a, b = fits.getdata(cpu.outputs[key]), fits.getdata(dev.outputs[key])
        assert np.array_equal(a, b, equal_nan=True), key
