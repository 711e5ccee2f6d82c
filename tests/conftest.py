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
