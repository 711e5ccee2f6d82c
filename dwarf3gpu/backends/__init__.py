"""Compute backends: where the heavy per-pixel work runs.

``get_backend("auto" | "cpu" | "cuda", device=0)`` returns the :class:`~dwarf3gpu.backends.base.StageOps` the
pipeline calls: :class:`~dwarf3gpu.backends.stage_ops.KernelStageOps` on a launch target (the CPU build of the
kernels, or CUDA), or :class:`~dwarf3gpu.backends.reference.ReferenceStageOps` (NumPy) on a machine without a C++
compiler. The pipeline receives it explicitly and calls only its operations. ``auto`` picks CUDA when it can run and
otherwise the CPU, saying why; an explicit ``cuda`` that cannot run raises
:class:`~dwarf3gpu.errors.BackendUnavailableError` (exit code 3).

CuPy is imported only inside :mod:`dwarf3gpu.backends.cuda` (lazily), never elsewhere.
"""

from __future__ import annotations

from ..errors import BackendUnavailableError, ConfigError
from .base import LaunchTarget, StageOps
from .reference import ReferenceStageOps
from .stage_ops import KernelStageOps

__all__ = ["StageOps", "LaunchTarget", "KernelStageOps", "ReferenceStageOps", "get_backend", "cpu_backend",
           "cuda_unavailable_reason", "BACKEND_NAMES"]

BACKEND_NAMES = ("auto", "cpu", "cuda")


def cpu_backend(fallback_reason: str = "") -> StageOps:
    """The CPU backend: the CPU build of the kernels, or the NumPy reference when it cannot be built (the reason
    is then in ``fallback_reason``, after the one given)."""
    from .cpu_build import load

    try:
        return KernelStageOps(load(), fallback_reason=fallback_reason)
    except BackendUnavailableError as exc:
        reason = f"{fallback_reason}; " if fallback_reason else ""
        return ReferenceStageOps(fallback_reason=f"{reason}the CPU build of the kernels is unavailable: {exc}")


def get_backend(name: str = "auto", device: int = 0) -> StageOps:
    """Return the stage operations of the backend called ``name``.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda"}
        ``auto`` uses CUDA when available, else the CPU (the reason is in ``fallback_reason``).
    device : int, optional
        CUDA device ordinal (ignored by the CPU backend).

    Returns
    -------
    StageOps
        The stage operations.

    Raises
    ------
    BackendUnavailableError
        ``cuda`` was asked for and cannot run.
    ConfigError
        Unknown name or a negative device.
    """
    if name not in BACKEND_NAMES:
        raise ConfigError(f"must be one of {', '.join(BACKEND_NAMES)}; got {name!r}", setting="backend")
    if int(device) < 0:
        raise ConfigError(f"must be >= 0; got {device}", setting="device")
    if name == "cpu":
        return cpu_backend()
    reason = cuda_unavailable_reason()
    if not reason:
        from .cuda import CudaTarget

        if name == "cuda":
            return KernelStageOps(CudaTarget(device=device))
        try:
            return KernelStageOps(CudaTarget(device=device))
        except BackendUnavailableError as exc:
            return cpu_backend(fallback_reason=str(exc))
    if name == "cuda":
        raise BackendUnavailableError(f"the CUDA backend cannot run: {reason}. Use the CPU backend (or auto).",
                                      setting="backend")
    return cpu_backend(fallback_reason=reason)


def cuda_unavailable_reason() -> str:
    """Why the CUDA backend cannot run here ("" when it can).

    Probes, in order: CuPy importable, ``cupy.cuda.runtime.getDeviceCount() > 0`` (a CUDARuntimeError, e.g. no
    driver, reads "no CUDA driver/GPU"), NVRTC loadable.
    """
    from .cuda import unavailable_reason

    return unavailable_reason()
