"""The GPU build without a GPU: NVRTC compiles every kernel for sm_80 and sm_90, and the backend choice falls back.

NVRTC needs no driver or device, so with ``pip install '.[cuda12]'`` (CuPy + NVRTC wheels) this runs on any Linux
x86-64 machine (CI included): every ``kernels/*.cu`` is compiled with the source text and options
:class:`~dwarf3gpu.backends.cuda.CudaBackend` gives ``cupy.RawModule`` (:func:`~dwarf3gpu.backends.kernels.read_source`,
:func:`~dwarf3gpu.backends.cuda.kernel_options` plus the option RawModule adds). Without CuPy/NVRTC those tests skip
with the reason. A stand-in ``cupy`` module checks what CudaBackend hands to RawModule and that launches are
checked against the C signatures; the fallback tests run everywhere.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dwarf3gpu.backends import CpuBackend, cuda, get_backend, kernels
from dwarf3gpu.errors import BackendUnavailableError

KERNEL_FILES = kernels.kernel_files()


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


@needs_nvrtc
@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_each_kernel_compiles_with_nvrtc(path, arch):
    ptx = cuda.compile_for_arch(path, arch).decode()
    entries = set(kernels.parse_signatures(path.read_text(), str(path)))
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
    assert isinstance(backend, CpuBackend) and backend.fallback_reason == reason
    assert backend.describe()["fallback_reason"] == reason
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
    monkeypatch.setattr(cuda, "_MODULES", {})
    return built, launched


def test_backend_hands_rawmodule_the_source_and_options(monkeypatch):
    built, launched = _fake_cupy(monkeypatch)
    backend = get_backend("cuda", device=0)
    assert isinstance(backend, cuda.CudaBackend)
    backend.compile_all()
    backend.compile_all()  # memoized: one module per file
    assert len(built) == len(KERNEL_FILES)
    assert {code for code, _ in built} == {kernels.read_source(p) for p in KERNEL_FILES}
    assert all(options == cuda.kernel_options() for _, options in built)
    assert cuda.kernel_options()[: len(kernels.NVRTC_OPTIONS)] == kernels.NVRTC_OPTIONS
    x = np.zeros(8, np.float32)
    out = [np.zeros(1, np.int32), np.zeros(1, np.float64), np.zeros(1, np.float64)]
    backend.launch("d3_segment_moments", (1, 1, 1), (1, 1, 1), x, np.int32(8), np.int32(8), np.float64(0), *out)
    assert launched and launched[-1][0] == "d3_segment_moments"
    with pytest.raises(TypeError, match="numpy.int32"):
        backend.launch("d3_segment_moments", (1, 1, 1), (1, 1, 1), x, 8, np.int32(8), np.float64(0), *out)
    with pytest.raises(BackendUnavailableError, match="device 3 does not exist"):
        get_backend("cuda", device=3)
    assert isinstance(get_backend("auto", device=3), CpuBackend)  # auto falls back, saying why


def test_no_cupy_import_outside_backends():
    package = Path(cuda.__file__).resolve().parents[1]
    for path in package.rglob("*.py"):
        if path.parent.name == "backends":
            continue
        text = path.read_text()
        assert "import cupy" not in text and "from cupy" not in text, path
