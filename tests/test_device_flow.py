"""The CUDA data flow, run on the CPU: every render path stays in "device" arrays from upload to tile result.

CI has no GPU, so the CUDA launch target never runs here. What differs on CUDA -- tile buffers allocated with the
target's array module, each frame's raw window uploaded once per tile and calibrated, debayered, resampled and
normalised there, the clip run where the tile lives, only each tile's results downloaded -- is exercised with a
stand-in array module: NumPy arrays of a subclass that, like CuPy's, refuse to mix with host arrays in any ufunc
(CuPy raises ``TypeError`` on implicit host/device conversion), and whose uploads (``asarray`` of a host array) and
downloads (``asnumpy``) are counted. :class:`~dwarf3gpu.backends.stage_ops.KernelStageOps` on that module, launched
through the CPU build of the kernels, must stack every ``--debayer``/``--demosaic`` path, with and without a dark, to
the CPU backend's outputs bit for bit, with exactly one raw-window upload per frame and tile and three downloads per
tile (mean, coverage, rejected): any host round trip in a render path would add downloads and fail the test.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest
from astropy.io import fits

import dwarf3gpu.pipeline as pipeline
from dwarf3gpu.backends import KernelStageOps, cpu_backend
from dwarf3gpu.backends.kernel_source import define_value
from dwarf3gpu.clip import ClipSettings
from dwarf3gpu.config import StackConfig

#: Uploads of fewer elements are kernel parameters (a transform, frame weights), not image data.
SMALL_UPLOAD = 64


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


class Transfers:
    """Counts of the stand-in module's uploads and downloads."""

    def __init__(self):
        self.uploads: list[tuple[str, int]] = []  # (dtype name, elements) of every host -> device copy
        self.downloads = 0

    def data_uploads(self, dtype: str) -> int:
        """Uploads of image data (at least SMALL_UPLOAD elements) of ``dtype``."""
        return sum(1 for kind, size in self.uploads if kind == dtype and size >= SMALL_UPLOAD)


def _device_module(transfers: Transfers) -> types.SimpleNamespace:
    """The CuPy calls the stage operations make, on DeviceArray ("uploads" are counted copies)."""

    def asarray(a, dtype=None):
        if isinstance(a, DeviceArray):
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        host = np.asarray(a)
        if host.ndim:
            transfers.uploads.append((host.dtype.name, host.size))
        return np.array(host, dtype=dtype).view(DeviceArray)

    def ascontiguousarray(a, dtype=None):
        a = asarray(a, dtype)
        return a if a.flags.c_contiguous else np.ascontiguousarray(a.view(np.ndarray)).view(DeviceArray)

    def asnumpy(a):
        transfers.downloads += 1
        return np.array(a.view(np.ndarray) if isinstance(a, DeviceArray) else a)

    return types.SimpleNamespace(
        ndarray=DeviceArray, float32=np.float32, float64=np.float64, int32=np.int32, int16=np.int16, uint8=np.uint8,
        uint16=np.uint16, bool_=np.bool_,
        empty=lambda shape, dtype=np.float32: np.empty(shape, dtype).view(DeviceArray),
        zeros=lambda shape, dtype=np.float32: np.zeros(shape, dtype).view(DeviceArray),
        asarray=asarray, ascontiguousarray=ascontiguousarray, asnumpy=asnumpy,
        isfinite=np.isfinite, sum=lambda a, dtype=None: np.sum(a.view(np.ndarray), dtype=dtype),
    )


class StandInTarget:
    """A launch target like the CUDA one: the stand-in array module, kernels launched through the CPU build."""

    name = "device-standin"

    def __init__(self, build, budget: int):
        self.build = build
        self.bound: set[int] = set()
        self.transfers = Transfers()
        self.xp = _device_module(self.transfers)
        self.budget = budget
        self.clip_max_frames = define_value("D3_CLIP_MAX_FRAMES")

    def bind_thread(self):
        self.bound.add(threading.get_ident())

    def launch(self, name, grid, block, *args):
        assert threading.get_ident() in self.bound, f"{name}: launched from a thread not bound to the device"
        for arg in args:
            if isinstance(arg, np.ndarray) and arg.ndim:
                assert isinstance(arg, DeviceArray), f"{name}: a kernel argument lives on the host"
        self.build.launch(name, grid, block, *args)

    def to_host(self, array):
        return self.xp.asnumpy(array)

    def memory_budget(self) -> int:
        return self.budget

    def describe(self) -> dict:
        return {"name": self.name}

    def clip_kernel_max_frames(self, settings: ClipSettings) -> int:
        return self.clip_max_frames if settings.median or settings.mad_std else 2**31 - 1


def test_the_standin_refuses_to_mix_host_and_device():
    xp = _device_module(Transfers())
    device = xp.zeros(4, np.float32)
    with pytest.raises(TypeError, match="implicit conversion"):
        device += np.ones(4, np.float32)
    device += xp.asarray(np.ones(4, np.float32))
    assert isinstance(device, DeviceArray) and float(xp.sum(device)) == 4.0


PATHS = {
    "lattice": {}, "chroma": {"demosaic": "chroma"}, "bilinear": {"demosaic": "bilinear"}, "mhc": {"demosaic": "mhc"},
    "superpixel": {"debayer": "superpixel"}, "bayer-first": {"debayer": "bayer-first"}, "cfa": {"debayer": "none"},
    "integer-bicubic": {"align_mode": "integer", "demosaic": "bilinear", "interpolation": "bicubic"},
}


@pytest.mark.parametrize("session_kind, settings", [("lights", s) for s in PATHS.values()]
                         + [("darks", PATHS["lattice"]), ("darks", PATHS["mhc"]), ("darks", PATHS["cfa"])],
                         ids=[f"lights-{k}" for k in PATHS] + ["darks-lattice", "darks-mhc", "darks-cfa"])
def test_every_render_path_stays_on_the_device(cpu_build_target, small_session, dark_session, big_budget, session_kind,
                                               settings, tmp_path, monkeypatch):
    """Each path gives the CPU backend's master, coverage and rejected map bit for bit over several tiles, with one
    raw-window upload per frame and tile (plus the reference frame's single render) and one download of each tile
    result (plus the single render's data and mask, and the debayered master of ``bayer-first``)."""
    session = small_session if session_kind == "lights" else dark_session
    small = settings.get("debayer") == "superpixel" or session_kind == "darks"
    budget = (30 << 20) if small else 48 << 20  # several tiles
    config = StackConfig(memory_budget=budget, **settings)
    cpu = pipeline.stack_session(session.session_dir, tmp_path / "cpu", config, workers=2, use_cache=False)
    target = StandInTarget(cpu_build_target, big_budget)
    ops = KernelStageOps(target)
    monkeypatch.setattr(pipeline, "get_backend", lambda *a, **k: ops)
    dev = pipeline.stack_session(session.session_dir, tmp_path / "dev", config, workers=2, use_cache=False)

    plan = dev.manifest["stack"]["tile_plan"]
    calibration = dev.manifest["calibration"]
    assert calibration["used"] if session_kind == "darks" else calibration["hot_pixels_from_lights"]
    assert plan["tile_buffers"] == "device" and cpu.manifest["stack"]["tile_plan"]["tile_buffers"] == "host"
    assert plan["n_tiles"] > 1
    for key in ("master_linear", "coverage", "rejected_map"):
        a, b = fits.getdata(cpu.outputs[key]), fits.getdata(dev.outputs[key])
        assert np.array_equal(a, b, equal_nan=True), key

    transfers = target.transfers
    windows = len(dev.kept) * plan["n_tiles"] + 1  # every frame on every tile, and the reference frame alone
    assert transfers.data_uploads("uint16") == windows  # raw windows as read (a dark makes them float32 there)
    # once per run: the dark offset (float32), the hot-pixel map (uint8) and list (int32), the two Lanczos tables;
    # and the master's debayer input for bayer-first
    assert transfers.data_uploads("float32") <= 1 + 2 + (config.debayer == "bayer-first")
    assert transfers.data_uploads("uint8") <= 1 and transfers.data_uploads("int32") <= 2
    downloads = 3 * plan["n_tiles"] + 2 + (config.debayer == "bayer-first")
    assert transfers.downloads == downloads


def test_a_host_round_trip_is_caught(cpu_build_target, small_session, big_budget, tmp_path, monkeypatch):
    """The check above can fail: a renderer that brings each render back to the host and uploads it again (the
    old non-lattice data flow) breaks the download count."""
    from dwarf3gpu import render

    original = render.FrameRenderer.render_into

    def round_trip(self, index, row0, row1, col0, col1, data, valid, weight):
        original(self, index, row0, row1, col0, col1, data, valid, weight)
        data[...] = self.ops.upload(self.ops.download(data))

    target = StandInTarget(cpu_build_target, big_budget)
    ops = KernelStageOps(target)
    monkeypatch.setattr(pipeline, "get_backend", lambda *a, **k: ops)
    monkeypatch.setattr(render.FrameRenderer, "render_into", round_trip)
    dev = pipeline.stack_session(small_session.session_dir, tmp_path / "dev", StackConfig(memory_budget=48 << 20),
                                 workers=2, use_cache=False)
    n_tiles = dev.manifest["stack"]["tile_plan"]["n_tiles"]
    assert target.transfers.downloads > 3 * n_tiles + 2


def test_cpu_backend_is_the_cpu_build(cpu_build_target):
    ops = cpu_backend()
    assert isinstance(ops, KernelStageOps) and ops.xp is np and ops.name == "cpu"
