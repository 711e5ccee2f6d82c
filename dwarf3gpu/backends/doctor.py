"""``dwarf3 doctor``: what this machine can run, checked for real.

Versions (Python, packages, CuPy, CUDA runtime and driver), the GPU, the C++ compiler and NVRTC; then every kernel
file compiled for every available target (CPU build, NVRTC for sm_80 and sm_90, ``nvcc --ptx`` when on the PATH)
and a small self-test of each runnable target against the NumPy reference. The CLI prints the rows; this module
does the probing (it lives in ``backends/`` because it touches CuPy).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import kernels

__all__ = ["Check", "run_checks", "verdict", "NVRTC_ARCHS"]

NVRTC_ARCHS = ("sm_80", "sm_90")
"""Architectures the NVRTC and nvcc compile checks target (A100, H100)."""

OK, INFO, WARN, FAIL, SKIP = "ok", "info", "warn", "FAIL", "skip"


@dataclass
class Check:
    """One row of the report: ``status`` is ok, info, warn, FAIL or skip."""

    section: str
    item: str
    status: str
    detail: str


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def _versions() -> list[Check]:
    from .. import __version__

    rows = [Check("versions", "python", INFO, f"{platform.python_version()} ({sys.executable})"),
            Check("versions", "dwarf3gpu", INFO, __version__),
            Check("versions", "platform", INFO, platform.platform())]
    for dist in ("numpy", "astropy", "astroalign", "opencv-python-headless", "typer", "rich"):
        rows.append(Check("versions", dist, INFO, _version(dist)))
    return rows


def _cuda_info() -> tuple[list[Check], bool, bool]:
    """CuPy/CUDA/GPU rows, whether NVRTC can compile (no GPU needed) and whether the CUDA backend can run."""
    from .cuda import nvrtc_version, unavailable_reason

    rows = []
    try:
        import cupy
    except ImportError:
        rows.append(Check("cuda", "cupy", WARN, "not installed (pip install 'dwarf3gpu[cuda12]' for an NVIDIA GPU)"))
        return rows, False, False
    except Exception as exc:
        rows.append(Check("cuda", "cupy", FAIL, f"import failed: {type(exc).__name__}: {exc}"))
        return rows, False, False
    rows.append(Check("cuda", "cupy", OK, cupy.__version__))
    runtime = cupy.cuda.runtime
    try:
        rows.append(Check("cuda", "cuda runtime", INFO, str(runtime.runtimeGetVersion())))
    except Exception as exc:
        rows.append(Check("cuda", "cuda runtime", WARN, f"{type(exc).__name__}: {exc}"))
    try:
        driver = runtime.driverGetVersion()
        rows.append(Check("cuda", "cuda driver", INFO if driver else WARN, str(driver) if driver else "none (version 0)"))
    except Exception as exc:
        rows.append(Check("cuda", "cuda driver", WARN, f"none ({type(exc).__name__}: {exc})"))
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:
        count = 0
        rows.append(Check("cuda", "gpu", WARN, f"no CUDA driver/GPU ({exc})"))
    else:
        for index in range(count):
            props = runtime.getDeviceProperties(index)
            name = props.get("name", b"")
            name = name.decode() if isinstance(name, bytes) else str(name)
            rows.append(Check("cuda", f"gpu {index}", OK, f"{name}, {props.get('totalGlobalMem', 0) / 2**30:.1f} GiB, "
                              f"compute capability {props.get('major')}.{props.get('minor')}"))
        if count == 0:
            rows.append(Check("cuda", "gpu", WARN, "the driver reports no GPU"))
    nvrtc_ok = False
    try:
        rows.append(Check("cuda", "nvrtc", OK, ".".join(map(str, nvrtc_version()))))
        nvrtc_ok = True
    except Exception as exc:
        rows.append(Check("cuda", "nvrtc", WARN, f"not usable ({type(exc).__name__}: {exc})"))
    reason = unavailable_reason()
    rows.append(Check("cuda", "cuda backend", OK if not reason else WARN, "usable" if not reason else reason))
    return rows, nvrtc_ok, not reason


def _compilers() -> tuple[list[Check], str | None, str | None]:
    from . import native

    rows = []
    cxx = native.find_compiler()
    if cxx:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()
        rows.append(Check("compilers", "c++", OK, f"{cxx}: {first[0] if first else '?'}"))
    else:
        rows.append(Check("compilers", "c++", WARN, "none (set CXX or install g++): no CPU build of the kernels"))
    nvcc = shutil.which("nvcc")
    rows.append(Check("compilers", "nvcc", INFO if nvcc else SKIP, nvcc or "not on the PATH"))
    return rows, cxx, nvcc


def _compile_checks(cxx: str | None, nvcc: str | None, nvrtc_ok: bool, cache_root: Path | None) -> tuple[list[Check], bool]:
    from . import native

    rows = []
    directory = kernels.kernel_dir()
    files = kernels.kernel_files(directory)
    rows.append(Check("kernels", "sources", OK, f"{len(files)} files in {directory}"))
    native_ok = False
    if cxx:
        try:
            library = native.build(directory, cache_root)
            rows.append(Check("kernels", "cpu build", OK, str(library)))
            native_ok = True
        except Exception as exc:
            rows.append(Check("kernels", "cpu build", FAIL, str(exc)[-800:]))
    else:
        rows.append(Check("kernels", "cpu build", SKIP, "no C++ compiler"))
    for arch in NVRTC_ARCHS:
        if not nvrtc_ok:
            rows.append(Check("kernels", f"nvrtc {arch}", SKIP, "CuPy/NVRTC not available"))
            continue
        from .cuda import compile_for_arch

        failed = []
        for path in files:
            try:
                ptx = compile_for_arch(path, arch, directory)
                if b".entry d3_" not in ptx:
                    failed.append(f"{path.name}: no kernel entry in the PTX")
            except Exception as exc:
                failed.append(f"{path.name}: {str(exc)[-400:]}")
        rows.append(Check("kernels", f"nvrtc {arch}", FAIL if failed else OK,
                          "; ".join(failed) if failed else f"{len(files)} files compiled"))
    for arch in NVRTC_ARCHS:
        if not nvcc:
            rows.append(Check("kernels", f"nvcc {arch}", SKIP, "nvcc is not on the PATH"))
            continue
        failed = []
        with tempfile.TemporaryDirectory() as tmp:
            for path in files:
                result = subprocess.run([nvcc, "--ptx", f"-arch={arch}", *kernels.NVRTC_OPTIONS, "-I", str(directory),
                                         str(path), "-o", str(Path(tmp) / f"{path.stem}.ptx")],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    failed.append(f"{path.name}: {(result.stderr or result.stdout)[-400:]}")
        rows.append(Check("kernels", f"nvcc {arch}", FAIL if failed else OK,
                          "; ".join(failed) if failed else f"{len(files)} files compiled"))
    return rows, native_ok


def _self_test(name: str, debayer_fn: Callable, warp_fn: Callable, lattice_fn: Callable, clip_fn: Callable) -> Check:
    """Compare one target's debayer, warps (affine and the default lattice resampler) and sigma clip with the NumPy
    reference on a small random input."""
    from .. import debayer, stack, warp

    rng = np.random.default_rng(7)
    mosaic = rng.uniform(0, 1000, (37, 53)).astype(np.float32)
    t = np.radians(1.5)
    matrix = np.array([[np.cos(t), -np.sin(t), 1.3], [np.sin(t), np.cos(t), -0.7]])
    frames = rng.normal(100, 5, (9, 2, 37, 53)).astype(np.float32)
    frames[0, :, 5, 5] = 1e4  # an outlier to clip
    problems = []
    try:
        got, want = np.asarray(debayer_fn(mosaic, "RGGB")), debayer.debayer_bilinear(mosaic, "RGGB")
        if not np.array_equal(got, want, equal_nan=True):
            problems.append("debayer differs")
        got, want = warp_fn(mosaic, matrix, (37, 53)), warp.warp_affine(mosaic, matrix, (37, 53))
        if not all(np.array_equal(np.asarray(g), w, equal_nan=True) for g, w in zip(got, want)):
            problems.append("warp differs")
        got, want = lattice_fn(mosaic, "RGGB", matrix, (37, 53)), warp.warp_lattice(mosaic, "RGGB", matrix, (37, 53))
        if not all(np.array_equal(np.asarray(g), w, equal_nan=True) for g, w in zip(got, want)):
            problems.append("lattice warp differs")
        got = clip_fn(frames, None, None, None)
        want = stack.sigma_clip_mask_aware(frames, None, None, None)
        if not (np.array_equal(np.asarray(got.coverage), want.coverage)
                and np.array_equal(np.asarray(got.rejected), want.rejected)
                and np.allclose(np.asarray(got.mean), want.mean, rtol=1e-6, atol=0, equal_nan=True)):
            problems.append("sigma clip differs")
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    return Check("self-test", name, FAIL if problems else OK,
                 "; ".join(problems) if problems else "debayer, warps and sigma clip match the NumPy reference")


def run_checks(cache_root: Path | None = None) -> list[Check]:
    """Every check, in report order (see the module docstring).

    Parameters
    ----------
    cache_root : pathlib.Path, optional
        Cache folder of the CPU kernel build (default: the user cache).
    """
    from .cpu import CpuBackend

    rows = _versions()
    cuda_rows, nvrtc_ok, cuda_ok = _cuda_info()
    rows += cuda_rows
    compiler_rows, cxx, nvcc = _compilers()
    rows += compiler_rows
    try:
        compile_rows, native_ok = _compile_checks(cxx, nvcc, nvrtc_ok, cache_root)
    except Exception as exc:
        compile_rows, native_ok = [Check("kernels", "sources", FAIL, str(exc))], False
    rows += compile_rows
    cpu = CpuBackend()
    rows.append(_self_test("cpu (numpy)", lambda m, p: cpu.debayer_bilinear(m, p),
                           lambda i, a, s: cpu.warp_affine(i, a, s), cpu.warp_lattice, cpu.sigma_clip))
    if native_ok:
        from . import native

        ops = native.native_ops(root=cache_root)
        rows.append(_self_test("cpu kernels (g++/OpenMP)", ops.debayer_bilinear, ops.warp_affine, ops.warp_lattice,
                               ops.sigma_clip))
    else:
        rows.append(Check("self-test", "cpu kernels (g++/OpenMP)", SKIP, "no CPU build"))
    if cuda_ok:
        try:
            from .cuda import CudaBackend

            gpu = CudaBackend()
            rows.append(_self_test("cuda", gpu.debayer_bilinear, gpu.warp_affine, gpu.warp_lattice, gpu.sigma_clip))
        except Exception as exc:
            rows.append(Check("self-test", "cuda", FAIL, f"{type(exc).__name__}: {exc}"))
    else:
        rows.append(Check("self-test", "cuda", SKIP, "the CUDA backend cannot run here"))
    return rows


def verdict(rows: list[Check]) -> tuple[bool, str]:
    """(CPU path works, one-line verdict)."""
    by_item = {(r.section, r.item): r for r in rows}
    cpu_ok = by_item[("self-test", "cpu (numpy)")].status == OK
    cuda = by_item.get(("self-test", "cuda"))
    failures = [f"{r.section}/{r.item}" for r in rows if r.status == FAIL]
    if not cpu_ok:
        return False, "VERDICT: BROKEN - the CPU path fails its self-test; see the FAIL rows."
    gpu = ("GPU path OK" if cuda is not None and cuda.status == OK
           else "GPU path not usable here" + (f" ({by_item[('cuda', 'cuda backend')].detail})"
                                               if ("cuda", "cuda backend") in by_item else " (CuPy not installed)"))
    extra = f"; failures: {', '.join(failures)}" if failures else ""
    return True, f"VERDICT: OK - CPU path works; {gpu}{extra}."
