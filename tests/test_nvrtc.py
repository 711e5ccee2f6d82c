"""The GPU build without a GPU: NVRTC compiles every kernel file for sm_80 and sm_90, and the backend choice falls back.

NVRTC needs no driver or device, so with ``pip install '.[cuda12]'`` (CuPy + NVRTC wheels) this runs on any Linux
x86-64 machine (CI included): every ``kernels/*.cu`` (calibrate.cu, debayer.cu, sigma_clip.cu, warp.cu) is compiled
with the source text and options :class:`~dwarf3gpu.backends.cuda.CudaTarget` gives ``cupy.RawModule``
(:func:`~dwarf3gpu.backends.kernel_source.read_source`, :func:`~dwarf3gpu.backends.cuda.kernel_options` plus the
option RawModule adds). Without CuPy/NVRTC those tests skip with the reason. A stand-in ``cupy`` module checks what
CudaTarget hands to RawModule and that launches are checked against the C signatures; the fallback tests run
everywhere.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dwarf3gpu.backends import KernelStageOps, ReferenceStageOps, cuda, get_backend, kernel_source
from dwarf3gpu.errors import BackendUnavailableError

KERNEL_FILES = kernel_source.kernel_files()
REPO_KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _nvrtc_reason() -> str:
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        return f"CuPy is not importable ({type(exc).__name__}: {exc}); pip install '.[cuda12]'"
    try:
        cuda.nvrtc_version()
    except Exception as exc:
        return f"NVRTC is not loadable ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc-cu12"
    return ""


needs_nvrtc = pytest.mark.skipif(bool(_nvrtc_reason()), reason=_nvrtc_reason() or "-")


def test_every_kernel_file_is_compiled():
    """The files compiled below are every ``.cu`` of the kernel folder, the dark calibration's among them."""
    assert [p.name for p in KERNEL_FILES] == sorted(p.name for p in REPO_KERNELS.glob("*.cu"))
    assert {"calibrate.cu", "debayer.cu", "sigma_clip.cu", "warp.cu"} <= {p.name for p in KERNEL_FILES}


@needs_nvrtc
@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_each_kernel_compiles_with_nvrtc(path, arch):
    ptx = cuda.compile_for_arch(path, arch).decode()
    entries = set(kernel_source.parse_signatures(path.read_text(), str(path)))
    assert entries, path
    for name in entries:
        assert f".entry {name}(" in ptx, f"{name} missing from the {arch} PTX"
    assert f".target {arch}" in ptx


@needs_nvrtc
def test_nvrtc_cubin_and_errors_name_the_file(tmp_path):
    assert cuda.compile_for_arch(KERNEL_FILES[0], "sm_80", method="cubin")[:4] == b"\x7fELF"
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void d3_bad(float* x) { x[0] = undefined_name; }\n')
    from cupy.cuda.compiler import CompileException

    with pytest.raises(CompileException, match="bad.cu"):
        cuda.compile_for_arch(bad, "sm_80")


def test_auto_falls_back_to_cpu_with_the_reason():
    reason = cuda.unavailable_reason()
    if not reason:
        pytest.skip("a GPU is usable here; the fallback is not exercised")
    backend = get_backend("auto")
    assert isinstance(backend, (KernelStageOps, ReferenceStageOps)) and backend.name == "cpu"
    # the CUDA reason, then (without a C++ compiler) why the CPU build is not used either
    assert backend.fallback_reason.startswith(reason)
    assert backend.describe()["fallback_reason"] == backend.fallback_reason
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert "CuPy is not installed" in reason
    else:
        assert "no CUDA driver/GPU" in reason
    with pytest.raises(BackendUnavailableError, match="cannot run") as info:
        get_backend("cuda")
    assert info.value.exit_code == 3 and reason in str(info.value)


def _fake_cupy(monkeypatch, devices: int = 1):
    """A stand-in ``cupy`` (NumPy arrays, a recording RawModule) and a usable-looking CUDA probe."""
    built, launched = [], []

    class RawModule:
        def __init__(self, code, options):
            built.append((code, options))

        def get_function(self, name):
            return lambda grid, block, args: launched.append((name, grid, block, args))

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    runtime = types.SimpleNamespace(getDeviceCount=lambda: devices)
    fake = types.SimpleNamespace(ndarray=np.ndarray, RawModule=RawModule, asnumpy=np.asarray, __version__="fake",
                                 cuda=types.SimpleNamespace(Device=Device, runtime=runtime))
    for name in dir(np):
        if not name.startswith("_") and not hasattr(fake, name):
            setattr(fake, name, getattr(np, name))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: "")
    # CudaTarget memoizes its RawModules per device, file and options in this module-level dict (no public way to
    # start from an empty one): a fresh dict, so the stand-in's modules are built here and forgotten afterwards.
    monkeypatch.setattr(cuda, "_MODULES", {})
    return built, launched


def test_target_hands_rawmodule_the_source_and_options(monkeypatch):
    built, launched = _fake_cupy(monkeypatch)
    backend = get_backend("cuda", device=0)
    assert isinstance(backend, KernelStageOps) and isinstance(backend.target, cuda.CudaTarget)
    assert backend.name == "cuda" and backend.implementation == "cuda kernels" and backend.xp is sys.modules["cupy"]
    target = backend.target
    target.compile_all()
    target.compile_all()  # memoized: one module per file
    assert len(built) == len(KERNEL_FILES)
    assert {code for code, _ in built} == {kernel_source.read_source(p) for p in KERNEL_FILES}
    assert all(options == cuda.kernel_options() for _, options in built)
    assert cuda.kernel_options()[: len(kernel_source.NVRTC_OPTIONS)] == kernel_source.NVRTC_OPTIONS
    mosaic, out = np.zeros((4, 4), np.float32), np.zeros((3, 2, 2), np.float32)
    target.launch("d3_debayer_superpixel", (1, 1, 1), (32, 8, 1), mosaic, np.int32(4), np.int32(4), np.int32(0), out)
    assert launched and launched[-1][0] == "d3_debayer_superpixel"
    with pytest.raises(TypeError, match="numpy.int32"):
        target.launch("d3_debayer_superpixel", (1, 1, 1), (32, 8, 1), mosaic, 4, np.int32(4), np.int32(0), out)
    with pytest.raises(KeyError, match="unknown kernel"):
        target.launch("d3_segment_moments", (1, 1, 1), (1, 1, 1))
    # the stage operations launch through the target: the repair kernel for a window holding a hot pixel
    window = np.zeros((6, 6), np.float32)
    from dwarf3gpu.calibrate import DarkCalibration

    hot = np.zeros((6, 6), bool)
    hot[2, 3] = True
    backend.calibrate_window(window, (0, 0), backend.on_target(DarkCalibration(None, hot, identity="t", record={})))
    assert launched[-1][0] == "d3_repair_hot"
    with pytest.raises(BackendUnavailableError, match="device 3 does not exist"):
        get_backend("cuda", device=3)
    fallback = get_backend("auto", device=3)  # auto falls back, saying why
    assert fallback.name == "cpu" and "device 3 does not exist" in fallback.fallback_reason


def test_no_cupy_import_outside_backends():
    package = Path(cuda.__file__).resolve().parents[1]
    for path in package.rglob("*.py"):
        if path.parent.name == "backends":
            continue
        text = path.read_text()
        assert "import cupy" not in text and "from cupy" not in text, path
