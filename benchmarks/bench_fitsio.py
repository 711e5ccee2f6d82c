"""Read speed of a full-size DWARF 3 frame (3856x2180, 16-bit, BZERO = 32768): our fast path vs astropy.

Run: ``python benchmarks/bench_fitsio.py [--repeat 7]``. The frame is written to a temporary folder and read
from the page cache, so this measures decoding, not the disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine, print_table, save  # noqa: E402

from dwarf3gpu.fitsio import read_fits, read_raw_uint16, read_raw_window, write_raw_uint16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    data = np.random.default_rng(0).integers(0, 65536, size=(2180, 3856), dtype=np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frame.fits"
        write_raw_uint16(data, path)
        candidates = {
            "dwarf3gpu read_raw_window (uint16, the pipeline's raw reader)": lambda: read_raw_window(path),
            "dwarf3gpu read_raw_uint16 (uint16)": lambda: read_raw_uint16(path),
            "dwarf3gpu read_fits (float32, fast path)": lambda: read_fits(path),
            "dwarf3gpu read_fits (float32, fast=False)": lambda: read_fits(path, fast=False),
            "astropy fits.getdata (uint16, reference)": lambda: fits.getdata(path),
            "astropy fits.getdata -> float32 (reference)": lambda: fits.getdata(path).astype(np.float32),
        }
        rows = []
        mb = path.stat().st_size / 1e6
        for name, func in candidates.items():
            best, median = best_of(func, args.repeat)
            rows.append({"reader": name, "best_ms": best * 1e3, "median_ms": median * 1e3, "MB_per_s": mb / best})
    m = machine()
    print_table(f"FITS read, 3856x2180 uint16, {m['cpu']} ({m['cores']} cores)", rows)
    print("saved", save("fitsio", rows))


if __name__ == "__main__":
    main()
