"""One allocator setting for workloads that cache large activations over and over.

glibc's malloc hands every block above its mmap threshold (at most 32 MB by default) back to the
operating system the moment it is freed, so the next `run_with_cache` of the same size faults all
of that memory in again, page by page. A GPT-2-small cache at 1x1024 is 2.6 GB: on the 2-core
machine of bench/RESULTS.md that churn made `run_with_cache` 1.8-2.1x a plain forward instead of
1.2-1.3x. `keep_freed_memory()` asks malloc to keep freed blocks for reuse instead. It is
process-wide and not undone, and the process's resident memory then stays near its high-water
mark. So glassformer sets it only where caching starts: the first `run_with_cache` of a process
calls `keep_memory_for_caches()`, unless the environment says GLASSFORMER_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
LARGEST = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (glibc's malloc: serve blocks below 2 GiB from the
    heap and do not trim it); True when the allocator took the setting, False where it has no such
    setting (not glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    if mallopt is None:
        return False
    took_mmap = mallopt(M_MMAP_THRESHOLD, ctypes.c_int(LARGEST)) == 1
    took_trim = mallopt(M_TRIM_THRESHOLD, ctypes.c_int(LARGEST)) == 1
    return took_mmap and took_trim


_asked = False  # whether keep_memory_for_caches() has run in this process


def keep_memory_for_caches() -> None:
    """`keep_freed_memory()` once per process, as the first activation cache starts; not at all when
    GLASSFORMER_KEEP_FREED_MEMORY=0 (the process then gives freed memory back, and pays for it)."""
    global _asked
    if not _asked:
        _asked = True
        if os.environ.get("GLASSFORMER_KEEP_FREED_MEMORY", "1") != "0":
            keep_freed_memory()
