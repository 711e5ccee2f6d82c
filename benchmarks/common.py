"""Shared helpers for the benchmark scripts: machine description, timing, result files, and a clip through a
backend's stage operations.

Benchmarks print a table and append a dated JSON record to ``benchmarks/results/``; the human summary lives in
``benchmarks/RESULTS.md``. They are measurements, never tests: nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str | int]:
    """Describe the machine: CPU model, core count, memory, Python and NumPy versions."""
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def best_of(func: Callable[[], object], repeat: int = 5) -> tuple[float, float]:
    """Run ``func`` ``repeat`` times; return (best, median) wall-clock seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def stage_clip(ops: Any, stack3: Any, valid3: Any, settings: Any) -> tuple[Any, Any, Any]:
    """Sigma-clip an (N, C, L) stack through ``ops.clip_into`` (any :class:`~dwarf3gpu.backends.base.StageOps`).

    ``stack3`` float32 (N, C, L) and ``valid3`` bool (N, 1 or C, L) or None are arrays of ``ops.xp``; ``settings``
    comes from :func:`dwarf3gpu.clip.clip_settings`. The outputs are allocated here, on ``ops.xp``: ``mean``
    float32 (C, L), ``coverage`` (1 or C, L, as ``valid3``) and ``rejected`` (C, L), with the counts' dtype of
    :func:`dwarf3gpu.clip.sigma_clip_mask_aware`. Nothing is downloaded (on CUDA the launches may still run).
    """
    from dwarf3gpu.clip import count_dtype

    xp = ops.xp
    n_frames, channels, pixels = stack3.shape
    counts = count_dtype(n_frames)
    mean = xp.empty((channels, pixels), xp.float32)
    coverage = xp.empty((channels if valid3 is None else valid3.shape[1], pixels), counts)
    rejected = xp.empty((channels, pixels), counts)
    ops.clip_into(stack3, valid3, None, None, settings, mean, coverage, rejected)
    return mean, coverage, rejected


def save(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Write ``rows`` with the date and machine to ``results/<name>-<date>.json`` and return the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc)
    path = RESULTS_DIR / f"{name}-{stamp:%Y%m%dT%H%M%S}.json"
    record = {"benchmark": name, "date": stamp.isoformat(timespec="seconds"), "machine": machine(), "rows": rows}
    record.update(extra or {})
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[dict]) -> None:
    """Print rows (dicts with the same keys) as an aligned text table."""
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(title)
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
