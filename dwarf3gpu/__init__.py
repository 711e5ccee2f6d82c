"""dwarf3gpu: GPU-first, reproducible stacking of DWARF 3 smart-telescope raw FITS sessions.

The public API is listed in ``__all__``; the CLI ``dwarf3`` is a thin layer over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError, Dwarf3Error, FitsReadError, SessionError
from .fitsio import FitsImage, read_fits, read_header, read_raw_uint16, write_fits

__all__ = [
    "__version__",
    "Dwarf3Error",
    "FitsReadError",
    "SessionError",
    "ConfigError",
    "FitsImage",
    "read_fits",
    "read_header",
    "read_raw_uint16",
    "write_fits",
]
