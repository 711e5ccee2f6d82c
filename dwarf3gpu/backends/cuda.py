"""CUDA launch target: the ``kernels/*.cu`` sources compiled with NVRTC through CuPy and launched on an NVIDIA GPU.

Each kernel file becomes one ``cupy.RawModule(code=read_source(path), options=kernel_options(...))``, memoized per
(device, file, options); :meth:`CudaTarget.launch` checks every argument against the kernel's C signature
(:func:`dwarf3gpu.backends.kernel_source.check_args` with ``cupy.ndarray``) before launching. The stage operations
are :class:`~dwarf3gpu.backends.stage_ops.KernelStageOps` on this target (``xp = cupy``): a raw window is
uploaded once per frame and tile, calibrated, rendered and normalised into the tile buffer on the device, the
tile is clipped there, and only each tile's results come back. The default stacking budget is
:data:`DEVICE_BUDGET_FRACTION` of the free device memory. Work is queued on CuPy's default stream, so a worker
thread's file reading overlaps the kernels the other workers queued.

This is the only module (with :func:`dwarf3gpu.backends.cuda_unavailable_reason` and the ``doctor`` probes,
which import it lazily) that imports CuPy.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError
from ..clip import ClipSettings
from . import kernel_source

__all__ = ["CudaTarget", "kernel_options", "compile_for_arch", "nvrtc_version", "unavailable_reason"]

NVRTC_EXTRA = ("--device-as-default-execution-space",)
"""Option CuPy's RawModule adds to every NVRTC compilation; :func:`compile_for_arch` adds it too."""


def kernel_options(directory: Path | None = None) -> tuple[str, ...]:
    """NVRTC options of the GPU build: :data:`~dwarf3gpu.backends.kernel_source.NVRTC_OPTIONS` plus ``-I<kernel_dir>``."""
    return tuple(kernel_source.NVRTC_OPTIONS) + ("-I" + str(Path(directory or kernel_source.kernel_dir()).resolve()),)


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library CuPy loads; raises ImportError or a CuPy error when absent."""
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getVersion())


def unavailable_reason() -> str:
    """Why the CUDA backend cannot run here ("" when it can): CuPy, a driver with a GPU, NVRTC."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'dwarf3gpu[cuda12]' on a machine with an NVIDIA GPU)"
    except Exception as exc:  # a broken CuPy install raises all sorts of errors at import
        return f"CuPy failed to import ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"no CUDA driver/GPU ({exc})"
    except Exception as exc:
        return f"no CUDA driver/GPU ({type(exc).__name__}: {exc})"
    if count < 1:
        return "no CUDA driver/GPU (the driver reports 0 devices)"
    try:
        nvrtc_version()
    except Exception as exc:
        return (f"NVRTC is not usable ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc-cu12 "
                "(or the CUDA toolkit)")
    return ""


def compile_for_arch(path: str | Path, arch: str, directory: Path | None = None, method: str = "ptx") -> bytes:
    """Compile one kernel file with NVRTC for ``arch`` (e.g. ``"sm_80"``) without needing a GPU.

    Same source text (:func:`~dwarf3gpu.backends.kernel_source.read_source`) and options (:func:`kernel_options` plus
    what RawModule adds) as :class:`CudaTarget`; CuPy's NVRTC program wrapper does the compilation, as
    RawModule does, but with an explicit architecture (CuPy's public helpers ask the current device for it).

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.cu`` file.
    arch : str
        ``sm_XY``.
    method : {"ptx", "cubin"}
        What to return.

    Returns
    -------
    bytes
        PTX text or cubin.

    Raises
    ------
    cupy.cuda.compiler.CompileException
        The compiler's messages (naming the file thanks to the ``#line`` prefix).
    """
    from cupy.cuda import compiler

    cc = arch.removeprefix("sm_").removeprefix("compute_")
    arch_option = f"-arch={'compute' if method == 'ptx' else 'sm'}_{cc}"
    options = kernel_options(directory) + NVRTC_EXTRA + (arch_option,)
    program = compiler._NVRTCProgram(kernel_source.read_source(path), str(Path(path).name), method=method)
    compiled, _ = program.compile(options)
    return compiled if isinstance(compiled, bytes) else str(compiled).encode()


_MODULES: dict[tuple[int, str, tuple[str, ...]], Any] = {}

DEVICE_BUDGET_FRACTION = 0.5
"""Share of the free device memory (plus CuPy's cached free blocks) the default stacking budget takes."""


class CudaTarget:
    """The CUDA launch target: the kernels compiled with NVRTC and run on an NVIDIA GPU through CuPy.

    Parameters
    ----------
    device : int
        CUDA device ordinal.

    Raises
    ------
    BackendUnavailableError
        CuPy, the driver or NVRTC cannot run, or ``device`` does not exist.
    """

    name = "cuda"

    def __init__(self, device: int = 0):
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"the CUDA backend cannot run: {reason}")
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if not 0 <= int(device) < count:
            raise BackendUnavailableError(f"CUDA device {device} does not exist (this machine has {count}: 0..{count - 1})")
        self._cupy = cupy
        self.xp = cupy
        self.device = int(device)
        self.directory = kernel_source.kernel_dir()
        self.options = kernel_options(self.directory)
        self.signatures = kernel_source.load_signatures(self.directory)
        self.clip_max_frames = kernel_source.define_value("D3_CLIP_MAX_FRAMES", self.directory)

    def to_host(self, array: Any) -> np.ndarray:
        """``array`` downloaded to the host."""
        return self._cupy.asnumpy(array)

    def bind_thread(self) -> None:
        """Make :attr:`device` the calling thread's current device (CuPy allocates there)."""
        self._cupy.cuda.Device(self.device).use()

    def clip_kernel_max_frames(self, settings: ClipSettings) -> int:
        """``D3_CLIP_MAX_FRAMES`` for a median centre or a MAD spread (the kernel sorts each pixel's samples in
        fixed per-thread arrays); no limit otherwise."""
        return self.clip_max_frames if settings.median or settings.mad_std else 2**31 - 1

    def memory_budget(self) -> int:
        """Default stacking budget: :data:`DEVICE_BUDGET_FRACTION` of the device's free memory (the tiles live
        there), counting the blocks CuPy's pool holds free as free."""
        with self._cupy.cuda.Device(self.device):
            free, _ = self._cupy.cuda.runtime.memGetInfo()
            pooled = self._cupy.get_default_memory_pool().free_bytes()
        return int(DEVICE_BUDGET_FRACTION * (free + pooled))

    # ---------------------------------------------------------------------------------------- kernels

    def module(self, path: Path) -> Any:
        """The RawModule of one kernel file on this device (compiled once per device, file and options)."""
        key = (self.device, str(Path(path).resolve()), self.options)
        if key not in _MODULES:
            with self._cupy.cuda.Device(self.device):
                _MODULES[key] = self._cupy.RawModule(code=kernel_source.read_source(path), options=self.options)
        return _MODULES[key]

    def launch(self, name: str, grid, block, *args) -> None:
        """Run kernel ``name`` (arguments checked against its C signature, then launched on this device)."""
        if name not in self.signatures:
            raise KeyError(f"unknown kernel {name!r}; known: {', '.join(sorted(self.signatures))}")
        sig = self.signatures[name]
        kernel_source.check_args(sig, args, self._cupy.ndarray)
        with self._cupy.cuda.Device(self.device):
            function = self.module(Path(sig.path)).get_function(name)
            function(tuple(int(g) for g in grid), tuple(int(b) for b in block), args)

    def compile_all(self) -> list[str]:
        """Compile every kernel file now (normally lazy); returns the kernel names."""
        with self._cupy.cuda.Device(self.device):
            for name, sig in self.signatures.items():
                self.module(Path(sig.path)).get_function(name)
        return list(self.signatures)

    # ------------------------------------------------------------------------------------------- info

    def describe(self) -> dict[str, Any]:
        """GPU name and memory, CuPy, CUDA runtime, driver and NVRTC versions."""
        cupy = self._cupy
        runtime = cupy.cuda.runtime
        props = runtime.getDeviceProperties(self.device)
        name = props.get("name", b"")
        return {
            "name": self.name,
            "device": name.decode() if isinstance(name, bytes) else str(name),
            "device_index": self.device,
            "compute_capability": f"{props.get('major')}.{props.get('minor')}",
            "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "cupy": cupy.__version__,
            "cuda_runtime": runtime.runtimeGetVersion(),
            "cuda_driver": runtime.driverGetVersion(),
            "nvrtc": ".".join(map(str, nvrtc_version())),
            "host": platform.processor() or platform.machine(),
            "numpy": np.__version__,
        }
