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

import numpy as np

from . import kernel_source
from .base import StageOps

__all__ = ["Check", "run_checks", "verdict", "NVRTC_ARCHS"]

NVRTC_ARCHS = ("sm_80", "sm_90")
"""Architectures the NVRTC and nvcc compile checks target (A100, H100)."""

OK, INFO, WARN, FAIL, SKIP = "ok", "info", "warn", "FAIL", "skip"

REFERENCE = "cpu: numpy reference"
"""Self-test row of the NumPy reference stage operations (the CPU backend without a C++ compiler)."""

CPU_BUILD = "cpu: kernels (g++/OpenMP build)"
"""Self-test row of the CPU build of the kernels (the CPU backend's default)."""


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
    from . import cpu_build

    rows = []
    cxx = cpu_build.find_compiler()
    if cxx:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()
        rows.append(Check("compilers", "c++", OK, f"{cxx}: {first[0] if first else '?'}"))
    else:
        rows.append(Check("compilers", "c++", WARN, "none (set CXX or install g++): no CPU build of the kernels"))
    nvcc = shutil.which("nvcc")
    rows.append(Check("compilers", "nvcc", INFO if nvcc else SKIP, nvcc or "not on the PATH"))
    return rows, cxx, nvcc


def _compile_checks(cxx: str | None, nvcc: str | None, nvrtc_ok: bool, cache_root: Path | None) -> tuple[list[Check], bool]:
    from . import cpu_build

    rows = []
    directory = kernel_source.kernel_dir()
    files = kernel_source.kernel_files(directory)
    rows.append(Check("kernels", "sources", OK, f"{len(files)} files in {directory}"))
    cpu_build_ok = False
    if cxx:
        try:
            library = cpu_build.build(directory, cache_root)
            rows.append(Check("kernels", "cpu build", OK, str(library)))
            cpu_build_ok = True
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
                result = subprocess.run([nvcc, "--ptx", f"-arch={arch}", *kernel_source.NVRTC_OPTIONS, "-I", str(directory),
                                         str(path), "-o", str(Path(tmp) / f"{path.stem}.ptx")],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    failed.append(f"{path.name}: {(result.stderr or result.stdout)[-400:]}")
        rows.append(Check("kernels", f"nvcc {arch}", FAIL if failed else OK,
                          "; ".join(failed) if failed else f"{len(files)} files compiled"))
    return rows, cpu_build_ok


def _self_test(name: str, ops: StageOps) -> Check:
    """Compare one backend's stage operations (debayers, warps including the default lattice resampler, dark
    calibration, the sigma clip of a tile) with the NumPy reference functions on a small random input."""
    from .. import debayer, warp
    from ..calibrate import DarkCalibration, calibrate_window
    from ..clip import clip_settings, sigma_clip_mask_aware

    rng = np.random.default_rng(7)
    mosaic = rng.uniform(0, 1000, (37, 53)).astype(np.float32)
    t = np.radians(1.5)
    matrix = np.array([[np.cos(t), -np.sin(t), 1.3], [np.sin(t), np.cos(t), -0.7]])
    frames = rng.normal(100, 5, (9, 2, 37 * 53)).astype(np.float32)
    frames[0, :, 5] = 1e4  # an outlier to clip
    problems = []

    def same(got, want) -> bool:
        return all(np.array_equal(ops.download(g), w, equal_nan=True) for g, w in zip(got, want))

    try:
        on_target = ops.upload(mosaic)
        for kind, function in (("bilinear", debayer.debayer_bilinear), ("mhc", debayer.debayer_mhc)):
            method = ops.debayer_mhc if kind == "mhc" else ops.debayer_bilinear
            if not same([method(on_target, "RGGB")], [function(mosaic, "RGGB")]):
                problems.append(f"{kind} debayer differs")
        if not same([ops.debayer_superpixel(on_target, "RGGB")], [debayer.debayer_superpixel(mosaic, "RGGB")]):
            problems.append("superpixel debayer differs")
        if not same(ops.warp_affine(on_target, matrix, (37, 53)), warp.warp_affine(mosaic, matrix, (37, 53))):
            problems.append("warp differs")
        if not same(ops.warp_bayer_planes(on_target, "RGGB", matrix, (37, 53)),
                    warp.warp_bayer_planes(mosaic, "RGGB", matrix, (37, 53))):
            problems.append("Bayer-plane warp differs")
        hot = rng.random((37, 53)) < 0.03
        dark = DarkCalibration(rng.normal(0, 3, (37, 53)).astype(np.float32), hot, "self-test", {})
        if not same([ops.calibrate_window(ops.upload(mosaic.copy()), (0, 0), ops.on_target(dark))],
                    [calibrate_window(mosaic.copy(), (0, 0), dark)]):
            problems.append("dark calibration differs")
        if not same(ops.warp_lattice(on_target, "RGGB", matrix, (37, 53)),
                    warp.warp_lattice(mosaic, "RGGB", matrix, (37, 53))):
            problems.append("lattice warp differs")
        xp = ops.xp
        mean, coverage, rejected = (xp.empty((2, 37 * 53), xp.float32), xp.empty((2, 37 * 53), xp.int16),
                                    xp.empty((2, 37 * 53), xp.int16))
        ops.clip_into(ops.upload(frames), None, None, None, clip_settings(), mean, coverage, rejected)
        want = sigma_clip_mask_aware(frames)
        if not (np.array_equal(ops.download(coverage), want.coverage)
                and np.array_equal(ops.download(rejected), want.rejected)
                and np.allclose(ops.download(mean), want.mean, rtol=1e-6, atol=0, equal_nan=True)):
            problems.append("sigma clip differs")
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    return Check("self-test", name, FAIL if problems else OK,
                 "; ".join(problems) if problems else "debayers, warps, dark calibration and sigma clip match the NumPy reference")


def run_checks(cache_root: Path | None = None) -> list[Check]:
    """Every check, in report order (see the module docstring).

    Parameters
    ----------
    cache_root : pathlib.Path, optional
        Cache folder of the CPU kernel build (default: the user cache).
    """
    from .reference import ReferenceStageOps
    from .stage_ops import KernelStageOps

    rows = _versions()
    cuda_rows, nvrtc_ok, cuda_ok = _cuda_info()
    rows += cuda_rows
    compiler_rows, cxx, nvcc = _compilers()
    rows += compiler_rows
    try:
        compile_rows, cpu_build_ok = _compile_checks(cxx, nvcc, nvrtc_ok, cache_root)
    except Exception as exc:
        compile_rows, cpu_build_ok = [Check("kernels", "sources", FAIL, str(exc))], False
    rows += compile_rows
    rows.append(_self_test(REFERENCE, ReferenceStageOps()))
    if cpu_build_ok:
        from . import cpu_build

        rows.append(_self_test(CPU_BUILD, KernelStageOps(cpu_build.load(root=cache_root))))
    else:
        rows.append(Check("self-test", CPU_BUILD, SKIP, "no CPU build: the CPU backend runs the NumPy reference"))
    if cuda_ok:
        try:
            from .cuda import CudaTarget

            rows.append(_self_test("cuda", KernelStageOps(CudaTarget())))
        except Exception as exc:
            rows.append(Check("self-test", "cuda", FAIL, f"{type(exc).__name__}: {exc}"))
    else:
        rows.append(Check("self-test", "cuda", SKIP, "the CUDA backend cannot run here"))
    return rows


def verdict(rows: list[Check]) -> tuple[bool, str]:
    """(CPU path works, one-line verdict)."""
    by_item = {(r.section, r.item): r for r in rows}
    cpu_build = by_item.get(("self-test", CPU_BUILD))
    cpu_ok = by_item[("self-test", REFERENCE)].status == OK and (cpu_build is None or cpu_build.status != FAIL)
    cuda = by_item.get(("self-test", "cuda"))
    failures = [f"{r.section}/{r.item}" for r in rows if r.status == FAIL]
    if not cpu_ok:
        return False, "VERDICT: BROKEN - the CPU path fails its self-test; see the FAIL rows."
    gpu = ("GPU path OK" if cuda is not None and cuda.status == OK
           else "GPU path not usable here" + (f" ({by_item[('cuda', 'cuda backend')].detail})"
                                               if ("cuda", "cuda backend") in by_item else " (CuPy not installed)"))
    extra = f"; failures: {', '.join(failures)}" if failures else ""
    return True, f"VERDICT: OK - CPU path works; {gpu}{extra}."
