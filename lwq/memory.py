"""Returning freed memory to the operating system between blocks.

glibc raises its mmap threshold after large buffers are freed, so later
buffers of that size come from the heap and stay resident after they are
freed: processing blocks one at a time then creeps up in RSS. ``release``
collects garbage and asks glibc to trim its heap (a no-op elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release() -> None:
    """Free unreachable objects and give the heap's free pages back to the OS."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def trim() -> None:
    """Give the heap's free pages back to the OS (no garbage collection: cheap)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
