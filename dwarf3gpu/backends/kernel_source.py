"""The CUDA C kernel sources: where they are, how they read, what their entry points take.

The same ``kernels/*.cu`` files compile for the GPU (NVRTC, :data:`NVRTC_OPTIONS`) and for the CPU (g++ with
OpenMP, :mod:`dwarf3gpu.backends.cpu_build`). This module is shared by both launch targets:

- :func:`kernel_dir` finds the sources: ``$DWARF3GPU_KERNEL_DIR``, then the installed package's
  ``dwarf3gpu/kernels`` (the wheel ships the sources, never binaries), then the source tree's ``kernels/``;
- :func:`read_source` prefixes a source with ``#line 1 "<path>"`` so compiler errors point into the file;
- :func:`parse_signatures` reads every ``extern "C" __global__ void name(type arg, ...)`` entry point;
- :func:`check_args` checks launch arguments against a signature exactly (CuPy would silently pass a Python
  int as ``long long`` and a float as ``double``);
- :func:`grid_1d` and :func:`grid_2d` give the launch geometry of the "one thread per output element" kernels.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BackendUnavailableError

__all__ = [
    "KERNEL_DIR_ENV",
    "NVRTC_OPTIONS",
    "BLOCK_1D",
    "BLOCK_2D",
    "Param",
    "Signature",
    "candidate_dirs",
    "kernel_dir",
    "kernel_files",
    "read_source",
    "sources_hash",
    "parse_signatures",
    "load_signatures",
    "define_value",
    "check_args",
    "grid_1d",
    "grid_2d",
]

KERNEL_DIR_ENV = "DWARF3GPU_KERNEL_DIR"
"""Environment variable naming a folder of kernel sources that overrides the packaged ones."""

NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")
"""NVRTC options of the GPU build (add ``-I<kernel_dir>``). ``--fmad=false`` keeps ``a * b + c`` two rounded
operations as in NumPy (the CPU build uses ``-ffp-contract=off`` for the same reason)."""

BLOCK_1D = 256
"""Threads per block of the 1-D kernels."""

BLOCK_2D = (32, 8)
"""(x = columns, y = rows) threads per block of the 2-D image kernels."""

_SCALAR_DTYPES = {
    "int": np.dtype(np.int32),
    "unsigned int": np.dtype(np.uint32),
    "long long": np.dtype(np.int64),
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
}
_POINTER_DTYPES = {
    **_SCALAR_DTYPES,
    "unsigned char": np.dtype(np.uint8),
    "unsigned short": np.dtype(np.uint16),
}
_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class Param:
    """One parameter of a kernel entry point.

    Attributes
    ----------
    ctype : str
        Normalised C type, e.g. ``int``, ``const float*``.
    name : str
        Parameter name.
    dtype : numpy.dtype
        NumPy dtype of the scalar, or of the array's elements for a pointer.
    pointer : bool
        True for a pointer (an array argument).
    const : bool
        True for a pointer to const (the kernel only reads the array).
    """

    ctype: str
    name: str
    dtype: np.dtype
    pointer: bool
    const: bool


@dataclass(frozen=True)
class Signature:
    """A kernel entry point: its name, parameters and source file."""

    name: str
    params: tuple[Param, ...]
    path: str

    def c_declaration(self) -> str:
        """The parameter list as C, e.g. ``const float* x, int n``."""
        return ", ".join(f"{p.ctype} {p.name}" for p in self.params)


def candidate_dirs() -> list[Path]:
    """Folders searched for the sources, in order."""
    here = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get(KERNEL_DIR_ENV):
        candidates.append(Path(os.environ[KERNEL_DIR_ENV]))
    candidates += [here.parent / "kernels", here.parents[1] / "kernels"]
    return candidates


def kernel_dir() -> Path:
    """Return the folder holding the kernel sources.

    Looks in ``$DWARF3GPU_KERNEL_DIR``, then the installed package (``dwarf3gpu/kernels``), then the source
    tree (``kernels/`` beside the package); the first folder holding a ``.cu`` file wins.

    Returns
    -------
    pathlib.Path
        The folder.

    Raises
    ------
    BackendUnavailableError
        No candidate holds kernel sources; the message lists every path tried.
    """
    tried = candidate_dirs()
    for folder in tried:
        if folder.is_dir() and any(folder.glob("*.cu")):
            return folder
    listed = "; ".join(str(p) for p in tried)
    raise BackendUnavailableError(
        f"the CUDA C kernel sources (kernels/*.cu) were not found; looked in: {listed}. Reinstall dwarf3gpu "
        f"(the wheel ships them as dwarf3gpu/kernels) or set {KERNEL_DIR_ENV} to the folder holding them."
    )


def kernel_files(directory: Path | None = None) -> list[Path]:
    """The ``*.cu`` kernel sources of ``directory`` (default :func:`kernel_dir`), sorted by name."""
    return sorted((directory or kernel_dir()).glob("*.cu"))


def read_source(path: str | os.PathLike) -> str:
    """Return a source's text prefixed with ``#line 1 "<path>"`` so compiler messages name the file.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.cu`` (or header) file.

    Returns
    -------
    str
        The prefixed text.
    """
    path = Path(path).resolve()
    quoted = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'#line 1 "{quoted}"\n' + path.read_text()


def sources_hash(directory: Path | None = None, extra: str = "") -> str:
    """sha256 (hex) of every source file (``*.cu``, ``*.cuh``, ``*.h``) of ``directory`` and ``extra``.

    Parameters
    ----------
    directory : pathlib.Path, optional
        Kernel folder (default :func:`kernel_dir`).
    extra : str, optional
        Anything else the build depends on (compiler version, options).
    """
    directory = directory or kernel_dir()
    digest = hashlib.sha256(extra.encode())
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".cu", ".cuh", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _parse_param(text: str, kernel: str, path: str) -> Param:
    """One ``type name`` of a parameter list."""
    match = re.fullmatch(r"\s*(const\s+)?([A-Za-z_][\w ]*?)\s*(\*?)\s*(?:__restrict__\s*)?(\w+)\s*", text)
    if match is None:
        raise ValueError(f"{path}: kernel {kernel}: cannot parse the parameter {text.strip()!r}")
    const, base, star, name = bool(match.group(1)), " ".join(match.group(2).split()), bool(match.group(3)), match.group(4)
    table = _POINTER_DTYPES if star else _SCALAR_DTYPES
    if base not in table or (const and not star):
        kinds = ", ".join(sorted(table)) + (" (const allowed)" if star else "")
        raise ValueError(f"{path}: kernel {kernel}: parameter {name!r} has the unsupported type "
                         f"{text.strip()!r}; supported {'pointee' if star else 'scalar'} types: {kinds}")
    ctype = ("const " if const else "") + base + ("*" if star else "")
    return Param(ctype, name, table[base], star, const)


def parse_signatures(source: str, path: str = "<source>") -> dict[str, Signature]:
    """Parse the ``extern "C" __global__ void name(...)`` entry points of a kernel source.

    Parameters
    ----------
    source : str
        CUDA C text.
    path : str, optional
        File name for the messages.

    Returns
    -------
    dict
        Kernel name -> :class:`Signature`, in source order.

    Raises
    ------
    ValueError
        A parameter type that has no NumPy counterpart here (so no launch could check it).
    """
    text = _COMMENTS.sub(" ", source)
    signatures = {}
    for match in _ENTRY.finditer(text):
        name, params = match.group(1), match.group(2).strip()
        parts = params.split(",") if params and params != "void" else []
        signatures[name] = Signature(name, tuple(_parse_param(p, name, path) for p in parts), path)
    return signatures


def load_signatures(directory: Path | None = None) -> dict[str, Signature]:
    """Signatures of every kernel of every ``*.cu`` file of ``directory`` (default :func:`kernel_dir`).

    Raises
    ------
    ValueError
        Two files define the same kernel, or a parameter type is unsupported.
    """
    found: dict[str, Signature] = {}
    for path in kernel_files(directory):
        for name, signature in parse_signatures(path.read_text(), str(path)).items():
            if name in found:
                raise ValueError(f"kernel {name} is defined in both {found[name].path} and {path}")
            found[name] = signature
    return found


def define_value(name: str, directory: Path | None = None) -> int:
    """The integer value of ``#define <name> <value>`` in the kernel sources (e.g. ``D3_CLIP_MAX_FRAMES``).

    Raises
    ------
    KeyError
        No source defines it.
    """
    pattern = re.compile(rf"^\s*#\s*define\s+{re.escape(name)}\s+\(?(-?\d+)\)?\s*$", re.M)
    directory = directory or kernel_dir()
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".cu", ".cuh")):
        match = pattern.search(path.read_text())
        if match:
            return int(match.group(1))
    raise KeyError(f"no kernel source in {directory} defines {name}")


def _describe(arg: Any) -> str:
    """Short description of an argument for error messages."""
    if isinstance(arg, np.generic):
        return f"numpy.{arg.dtype.name} {arg!r}"
    if hasattr(arg, "dtype") and hasattr(arg, "shape"):
        return f"{type(arg).__module__}.{type(arg).__name__} of dtype {arg.dtype} and shape {tuple(arg.shape)}"
    return f"Python {type(arg).__name__} {arg!r}"


def check_args(signature: Signature, args: Sequence[Any], array_type: type | tuple[type, ...] = np.ndarray) -> None:
    """Check launch arguments against a kernel's C signature, exactly.

    A scalar parameter needs a NumPy scalar of exactly its type (``int`` -> ``numpy.int32``, ``float`` ->
    ``numpy.float32``, ``double`` -> ``numpy.float64``, ...): a Python ``int`` or ``float`` is rejected,
    because CuPy would pass it as ``long long`` or ``double`` whatever the kernel expects. A pointer needs a
    C-contiguous array of ``array_type`` with exactly the pointee's dtype, writeable unless the pointer is to
    const.

    Parameters
    ----------
    signature : Signature
        The kernel's parameters.
    args : sequence
        The arguments, in order.
    array_type : type or tuple of type, optional
        Array class of the target (``numpy.ndarray`` for the CPU build, ``cupy.ndarray`` for the GPU).

    Raises
    ------
    TypeError
        Wrong number of arguments, or an argument of the wrong kind, dtype or layout; the message names the
        kernel, the parameter, its C type and what to pass instead.
    """
    if len(args) != len(signature.params):
        names = ", ".join(p.name for p in signature.params)
        raise TypeError(f"kernel {signature.name} takes {len(signature.params)} arguments ({names}), "
                        f"got {len(args)}")
    for param, arg in zip(signature.params, args):
        where = f"kernel {signature.name}, argument {param.name!r} (C type {param.ctype})"
        if param.pointer:
            if not isinstance(arg, array_type):
                raise TypeError(f"{where} needs a C-contiguous {param.dtype.name} array, got {_describe(arg)}")
            if arg.dtype != param.dtype:
                raise TypeError(f"{where} needs dtype {param.dtype.name}, got {_describe(arg)}; convert it with "
                                f".astype({param.dtype.name})")
            if not arg.flags.c_contiguous:
                raise TypeError(f"{where} needs a C-contiguous array, got a strided view; pass "
                                "ascontiguousarray(...)")
            if not param.const and not getattr(arg.flags, "writeable", True):
                raise TypeError(f"{where} is written by the kernel, but the array is read-only")
        elif not (isinstance(arg, np.generic) and arg.dtype == param.dtype):
            raise TypeError(f"{where} needs numpy.{param.dtype.name}, got {_describe(arg)}; pass "
                            f"numpy.{param.dtype.name}(...)")


def grid_1d(n: int, block: int = BLOCK_1D) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Launch geometry for ``n`` threads on the x axis.

    Returns
    -------
    grid, block : tuple of int
        ``((ceil(n / block), 1, 1), (block, 1, 1))``; the kernel skips threads with index >= n.
    """
    if n < 1:
        raise ValueError(f"a launch needs at least one thread, got n = {n}")
    return ((n + block - 1) // block, 1, 1), (block, 1, 1)


def grid_2d(rows: int, cols: int, block: tuple[int, int] = BLOCK_2D) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Launch geometry for one thread per pixel of a ``rows x cols`` image (x = column, y = row).

    Returns
    -------
    grid, block : tuple of int
        ``((ceil(cols / bx), ceil(rows / by), 1), (bx, by, 1))``; the kernel skips threads outside the image.

    Raises
    ------
    ValueError
        An empty image, or more rows than a grid's y axis can cover.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"a launch needs at least one pixel, got {rows} x {cols}")
    grid_y = (rows + block[1] - 1) // block[1]
    if grid_y > _MAX_GRID_YZ:
        raise ValueError(f"{rows} rows need {grid_y} blocks along y, more than the {_MAX_GRID_YZ} CUDA allows")
    return ((cols + block[0] - 1) // block[0], grid_y, 1), (block[0], block[1], 1)
