"""Machine resources: the memory available for stacking, the cores this process may use, and running work on them."""

from __future__ import annotations

import os
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable, Sequence

__all__ = ["available_memory", "default_memory_budget", "default_workers", "for_each", "with_threads"]


#: Default memory budget: this share of the available RAM ...
DEFAULT_BUDGET_FRACTION = 0.5


#: ... capped at this many bytes: square tiles of a few hundred thousand pixels already stack at full speed, and
#: with the interpreter and the finished master the whole process then stays under 2 GB (benchmarks/RESULTS.md).
DEFAULT_BUDGET_CAP = 1 << 30


#: Used when the available RAM cannot be read.
FALLBACK_AVAILABLE = 4 << 30


def default_workers() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int:
    """Bytes of RAM available now: MemAvailable, lowered by a cgroup (container) limit when one is set."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            available = FALLBACK_AVAILABLE
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return int(available)


def default_memory_budget() -> int:
    """Default budget: ``DEFAULT_BUDGET_FRACTION`` (50 %) of the available RAM, at most ``DEFAULT_BUDGET_CAP``
    (1 GiB). The available RAM is /proc/meminfo's MemAvailable (else ``os.sysconf`` free pages, else 4 GiB),
    lowered to the room left under a cgroup v2 memory limit when there is one."""
    return int(min(DEFAULT_BUDGET_FRACTION * available_memory(), DEFAULT_BUDGET_CAP))


def for_each(executor: Executor | None, function: Callable[[Any], None], items: Sequence) -> None:
    """``function(item)`` for every item, in ``executor`` when given (exceptions propagate)."""
    if executor is None:
        for item in items:
            function(item)
    else:
        for _ in executor.map(function, items):
            pass


def with_threads(workers: int | None, n_tasks_hint: int, call: Callable[[Executor | None], None]) -> None:
    """Run ``call(executor)`` with a private thread pool of ``workers`` threads (None: all cores), or none."""
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or n_tasks_hint < 2:
        call(None)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        call(pool)
