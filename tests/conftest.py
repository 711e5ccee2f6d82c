"""Shared test fixtures: where the real data lives, header dumps, and folder hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from astropy.io import fits

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def realdata(*parts: str) -> Path:
    """Path under ../shared/realdata; skip the calling test cleanly when it is absent."""
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available ({path})")
    return path


def header_from_dump(path: Path) -> fits.Header:
    """Parse a text header dump (``#`` lines are comments) with astropy."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))
    return fits.Header.fromstring(text, sep="\n")


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` plus the list of folders: any write shows up as a difference."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests, with the reason, where the CUDA backend cannot run."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    from dwarf3gpu.backends import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU with CuPy: {reason}")
        for item in gpu_items:
            item.add_marker(skip)
