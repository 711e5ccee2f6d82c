"""Compute backends: where the heavy per-pixel work runs.

``get_backend("auto" | "cpu" | "cuda")`` returns an object with the stage operations (debayer, warp, sigma
clipping). The pipeline receives it explicitly and calls only its operations, so a GPU backend plugs in without
touching the pipeline. ``auto`` picks CUDA when it can run and otherwise the CPU, saying why; an explicit
``cuda`` that cannot run raises :class:`~dwarf3gpu.errors.BackendUnavailableError` (exit code 3).
"""

from __future__ import annotations

from ..errors import BackendUnavailableError, ConfigError
from .base import Backend
from .cpu import CpuBackend

__all__ = ["Backend", "CpuBackend", "get_backend", "BACKEND_NAMES"]

BACKEND_NAMES = ("auto", "cpu", "cuda")


def get_backend(name: str = "auto") -> Backend:
    """Return the compute backend called ``name``.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda"}
        ``auto`` uses CUDA when available, else the CPU (the reason is in ``backend.fallback_reason``).

    Returns
    -------
    Backend
        The backend object.

    Raises
    ------
    BackendUnavailableError
        ``cuda`` was asked for and cannot run.
    ConfigError
        Unknown name.
    """
    if name not in BACKEND_NAMES:
        raise ConfigError(f"--backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    if name == "cpu":
        return CpuBackend()
    reason = cuda_unavailable_reason()
    if name == "cuda":
        raise BackendUnavailableError(f"the CUDA backend cannot run: {reason}. Use --backend cpu (or auto).")
    return CpuBackend(fallback_reason=reason)


def cuda_unavailable_reason() -> str:
    """Why the CUDA backend cannot run here (it is not implemented in this release)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install 'dwarf3gpu[cuda12]' on a machine with an NVIDIA GPU)"
    return "the CUDA kernels are not part of this release yet; processing runs on the CPU"
