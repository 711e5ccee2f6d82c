"""The CPU build: ``kernels/*.cu`` compiled as C++ with OpenMP and loaded with ctypes, a launch target.

The kernel files are compiled unchanged, in one translation unit, with ``kernels/cpu_shim.h`` defining the
CUDA names they use; every entry point gets a launcher ``launch_<name>(gx, gy, gz, bx, by, bz, args...)``,
generated here from the parsed signature, that runs the grid as an OpenMP loop over blocks. The library is
built once per source hash into the user cache (``$XDG_CACHE_HOME/dwarf3gpu/cpu-build/<hash>/kernels.so``,
default ``~/.cache``), atomically, so concurrent processes never see a partial file.

It is both a fast CPU fallback and the oracle that tests the GPU kernels' exact logic on machines without a
GPU. :meth:`CpuBuildTarget.launch` checks every argument against the C signature the way a CuPy launch must
be checked (:func:`dwarf3gpu.backends.kernel_source.check_args`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BackendUnavailableError
from ..clip import ClipSettings
from ..resources import default_memory_budget
from . import kernel_source

__all__ = [
    "CXX_FLAGS",
    "CpuBuildTarget",
    "CLIP_KERNEL_MAX_FRAMES",
    "cache_root",
    "find_compiler",
    "generate_launchers",
    "build",
    "is_built",
    "load",
    "unavailable_reason",
]

CXX_FLAGS = ("-x", "c++", "-std=c++17", "-O3", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared",
             "-ftls-model=initial-exec") + (("-msse4.1",) if platform.machine().lower() in ("x86_64", "amd64") else ())
"""Compiler flags of the CPU build. ``-ffp-contract=off``: no fused multiply-add, as the GPU's ``--fmad=false``.
``-msse4.1`` on x86-64 (every x86-64 CPU since 2008): ``floor`` becomes one instruction instead of a libm call,
about 10 % of the lattice resampler's time (measured)."""

_LIBRARY = "kernels.so"
_SOURCE = "kernels_cpu.cpp"

_CTYPES = {
    "int": ctypes.c_int32,
    "unsigned int": ctypes.c_uint32,
    "long long": ctypes.c_int64,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}

_LAUNCHER = """
extern "C" void launch_{name}(unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                              unsigned int by, unsigned int bz, {params}) {{
    d3_run_grid(gx, gy, gz, bx, by, bz, [=] {{ {name}({args}); }});
}}
"""


def cache_root() -> Path:
    """Folder of the CPU builds: ``$XDG_CACHE_HOME/dwarf3gpu/cpu-build`` (default ``~/.cache/dwarf3gpu/cpu-build``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dwarf3gpu" / "cpu-build"


def find_compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else ``g++`` or ``c++`` on the PATH; None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def _compiler_version(compiler: str) -> str:
    """First line of ``<compiler> --version`` (part of the cache key)."""
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return (result.stdout or result.stderr).splitlines()[0] if (result.stdout or result.stderr) else compiler


def generate_launchers(signatures: dict[str, kernel_source.Signature], files: Sequence[Path]) -> str:
    """The C++ translation unit of the CPU build: the shim, every kernel file, then one launcher per kernel.

    Parameters
    ----------
    signatures : dict
        Kernel name -> signature (:func:`dwarf3gpu.backends.kernel_source.load_signatures`).
    files : sequence of pathlib.Path
        The ``.cu`` files, included in this order.

    Returns
    -------
    str
        C++ source text.
    """
    lines = ['#include "cpu_shim.h"']
    lines += [f'#include "{path.name}"' for path in files]
    lines.append('\nextern "C" void d3_set_num_threads(int n) { d3_cpu_threads = n; }')
    for sig in signatures.values():
        args = ", ".join(p.name for p in sig.params)
        lines.append(_LAUNCHER.format(name=sig.name, params=sig.c_declaration(), args=args).rstrip())
    return "\n".join(lines) + "\n"


def _build_plan(directory: Path, root: Path | None) -> tuple[str, str, Path]:
    """The compiler, the generated translation unit and the library path of the CPU build of ``directory``."""
    compiler = find_compiler()
    if compiler is None:
        raise BackendUnavailableError("no C++ compiler found (set CXX or install g++) to build the CPU kernels")
    source = generate_launchers(kernel_source.load_signatures(directory), kernel_source.kernel_files(directory))
    key = kernel_source.sources_hash(directory, extra="\0".join([_compiler_version(compiler), *CXX_FLAGS, source]))
    return compiler, source, Path(root or cache_root()) / key[:24] / _LIBRARY


def is_built(directory: Path | None = None, root: Path | None = None) -> bool:
    """True when the CPU build of the current sources is in the cache (False too without a compiler)."""
    try:
        return _build_plan(Path(directory or kernel_source.kernel_dir()).resolve(), root)[2].is_file()
    except BackendUnavailableError:
        return False


def build(directory: Path | None = None, root: Path | None = None) -> Path:
    """Compile the CPU target (if not cached yet) and return the shared library's path.

    Parameters
    ----------
    directory : pathlib.Path, optional
        Kernel sources (default :func:`dwarf3gpu.backends.kernel_source.kernel_dir`).
    root : pathlib.Path, optional
        Cache folder (default :func:`cache_root`).

    Returns
    -------
    pathlib.Path
        ``<root>/<hash>/kernels.so``, the hash covering the sources, the generated launchers, the compiler's
        version and the flags. The generated ``kernels_cpu.cpp`` lies beside it.

    Raises
    ------
    BackendUnavailableError
        No C++ compiler, or the compilation failed (the compiler's messages are in the error).
    """
    directory = Path(directory or kernel_source.kernel_dir()).resolve()
    compiler, source, library = _build_plan(directory, root)
    if library.is_file():
        return library
    target = library.parent
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".build-") as tmp:
        cpp, so = Path(tmp) / _SOURCE, Path(tmp) / _LIBRARY
        cpp.write_text(source)
        command = [compiler, *CXX_FLAGS, f"-I{directory}", str(cpp), "-o", str(so)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BackendUnavailableError(
                f"building the CPU kernels failed ({' '.join(command)}):\n{(result.stderr or result.stdout)[-4000:]}"
            )
        os.replace(cpp, target / _SOURCE)
        os.replace(so, library)
    return library


#: Most frames per tile the CPU build's clip kernel takes: up to these counts it measured faster than the NumPy
#: reference on one core (benchmarks/RESULTS.md, bench_kernels). The kernel's time is its per-pixel gather and
#: sort whatever the options; NumPy sorts many pixels at once with SIMD and pays most for the MAD, so with a std
#: spread or a mean centre it catches up at fewer frames.
CLIP_KERNEL_MAX_FRAMES = {"median/mad_std": 256, "other": 128}


class CpuBuildTarget:
    """The loaded CPU build, a launch target: kernels run by name with checked arguments, on NumPy arrays.

    Parameters
    ----------
    library : pathlib.Path
        Shared library from :func:`build`.
    signatures : dict
        Kernel name -> signature of the sources it was built from.
    """

    name = "cpu"
    xp = np

    def __init__(self, library: Path, signatures: dict[str, kernel_source.Signature]):
        self.path = Path(library)
        self.signatures = signatures
        self._lib = ctypes.CDLL(str(self.path))
        self._functions = {}
        for name, sig in signatures.items():
            function = getattr(self._lib, f"launch_{name}")
            function.argtypes = [ctypes.c_uint32] * 6 + [
                ctypes.c_void_p if p.pointer else _CTYPES[p.ctype] for p in sig.params
            ]
            function.restype = None
            self._functions[name] = function
        self._lib.d3_set_num_threads.argtypes = [ctypes.c_int]

    def to_host(self, array: np.ndarray) -> np.ndarray:
        """``array`` itself (the build runs on the host)."""
        return np.asarray(array)

    def bind_thread(self) -> None:
        """Nothing: the build runs on the host."""

    def memory_budget(self) -> int:
        """See :func:`dwarf3gpu.resources.default_memory_budget` (a share of the available RAM)."""
        return default_memory_budget()

    def describe(self) -> dict[str, Any]:
        """Processor, NumPy and OpenCV versions and the library."""
        import cv2

        return {"name": self.name, "device": platform.processor() or platform.machine(), "numpy": np.__version__,
                "opencv": cv2.__version__, "cpu_build": self.path.parent.name}

    def clip_kernel_max_frames(self, settings: ClipSettings) -> int:
        """See :data:`CLIP_KERNEL_MAX_FRAMES` (beyond, the NumPy reference clips faster)."""
        return CLIP_KERNEL_MAX_FRAMES["median/mad_std" if settings.median and settings.mad_std else "other"]

    def set_threads(self, n: int) -> None:
        """Use ``n`` OpenMP threads per launch (0: OpenMP's default, ``OMP_NUM_THREADS`` or every core)."""
        self._lib.d3_set_num_threads(int(n))

    def launch(self, name: str, grid: Sequence[int], block: Sequence[int], *args: Any) -> None:
        """Run kernel ``name`` over ``grid`` blocks of ``block`` threads, like a CUDA launch.

        Parameters
        ----------
        name : str
            Kernel entry point.
        grid, block : sequence of int
            1 to 3 positive sizes each (x, y, z).
        *args
            The kernel's arguments: NumPy scalars of exactly the C types, C-contiguous NumPy arrays of the
            pointee dtypes (see :func:`dwarf3gpu.backends.kernel_source.check_args`).

        Raises
        ------
        KeyError
            Unknown kernel.
        TypeError
            An argument does not match the C signature (e.g. a Python int for an ``int``).
        ValueError
            A grid or block size that is not 1 to 3 positive integers.
        """
        if name not in self.signatures:
            raise KeyError(f"unknown kernel {name!r}; known: {', '.join(sorted(self.signatures))}")
        sig = self.signatures[name]
        kernel_source.check_args(sig, args, np.ndarray)
        dims = [_dims(grid, "grid"), _dims(block, "block")]
        values = [a.ctypes.data if p.pointer else a.item() for p, a in zip(sig.params, args)]
        self._functions[name](*dims[0], *dims[1], *values)


def _dims(sizes: Sequence[int], what: str) -> tuple[int, int, int]:
    """(x, y, z) from 1 to 3 positive integers."""
    sizes = tuple(int(s) for s in sizes)
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1 or max(sizes) >= 2**32:
        raise ValueError(f"{what} must be 1 to 3 positive sizes below 2**32, got {sizes}")
    return sizes + (1,) * (3 - len(sizes))


_LOADED: dict[Path, CpuBuildTarget] = {}


def load(directory: Path | None = None, root: Path | None = None) -> CpuBuildTarget:
    """Build (when needed) and load the CPU kernels; memoized per library file.

    Parameters
    ----------
    directory : pathlib.Path, optional
        Kernel sources (default :func:`dwarf3gpu.backends.kernel_source.kernel_dir`).
    root : pathlib.Path, optional
        Cache folder (default :func:`cache_root`).

    Raises
    ------
    BackendUnavailableError
        No sources, no compiler, or the build failed.
    """
    directory = Path(directory or kernel_source.kernel_dir()).resolve()
    library = build(directory, root)
    if library not in _LOADED:
        _LOADED[library] = CpuBuildTarget(library, kernel_source.load_signatures(directory))
    return _LOADED[library]


def unavailable_reason(directory: Path | None = None, root: Path | None = None) -> str:
    """Why the CPU kernels cannot run here ("" when they can; this builds them if needed)."""
    try:
        load(directory, root)
    except BackendUnavailableError as exc:
        return str(exc)
    return ""
