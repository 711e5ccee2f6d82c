"""Compute backends: where the heavy per-pixel work runs.

``get_backend("auto" | "cpu" | "cuda", device=0)`` returns an object with the stage operations (debayer, warp,
sigma clipping). The pipeline receives it explicitly and calls only its operations, so a GPU backend plugs in
without touching the pipeline. ``auto`` picks CUDA when it can run and otherwise the CPU, saying why; an explicit
``cuda`` that cannot run raises :class:`~dwarf3gpu.errors.BackendUnavailableError` (exit code 3).

CuPy is imported only inside :mod:`dwarf3gpu.backends.cuda` (lazily), never elsewhere.
"""

from __future__ import annotations

from ..errors import BackendUnavailableError, ConfigError
from .base import Backend
from .cpu import CpuBackend

__all__ = ["Backend", "CpuBackend", "get_backend", "cuda_unavailable_reason", "BACKEND_NAMES"]

BACKEND_NAMES = ("auto", "cpu", "cuda")


def get_backend(name: str = "auto", device: int = 0) -> Backend:
    """Return the compute backend called ``name``.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda"}
        ``auto`` uses CUDA when available, else the CPU (the reason is in ``backend.fallback_reason``).
    device : int, optional
        CUDA device ordinal (ignored by the CPU backend).

    Returns
    -------
    Backend
        The backend object.

    Raises
    ------
    BackendUnavailableError
        ``cuda`` was asked for and cannot run.
    ConfigError
        Unknown name or a negative device.
    """
    if name not in BACKEND_NAMES:
        raise ConfigError(f"--backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    if int(device) < 0:
        raise ConfigError(f"--device must be >= 0; got {device}")
    if name == "cpu":
        return CpuBackend()
    reason = cuda_unavailable_reason()
    if not reason:
        from .cuda import CudaBackend

        if name == "cuda":
            return CudaBackend(device=device)
        try:
            return CudaBackend(device=device)
        except BackendUnavailableError as exc:
            return CpuBackend(fallback_reason=str(exc))
    if name == "cuda":
        raise BackendUnavailableError(f"the CUDA backend cannot run: {reason}. Use --backend cpu (or auto).")
    return CpuBackend(fallback_reason=reason)


def cuda_unavailable_reason() -> str:
    """Why the CUDA backend cannot run here ("" when it can).

    Probes, in order: CuPy importable, ``cupy.cuda.runtime.getDeviceCount() > 0`` (a CUDARuntimeError, e.g. no
    driver, reads "no CUDA driver/GPU"), NVRTC loadable.
    """
    from .cuda import unavailable_reason

    return unavailable_reason()
