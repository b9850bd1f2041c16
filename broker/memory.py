"""Giving memory back to the system once a burst of requests has passed.

Request bodies of megabytes are read into buffers that glibc's malloc takes from its heaps
(after the first large free it stops using mmap for them) and, once freed, keeps: a storm of
large or malformed requests left the broker at 270 MB instead of its 50 MB for good.
``malloc_trim(0)`` hands the free pages of every heap back; it costs well under a
millisecond when there is nothing to return. On a C library without it this does nothing.

Between two such returns the heap should not shrink and regrow with every message: glibc
gives back the top of its heap on a ``free`` once more than its trim threshold (twice its
mmap threshold, which starts at 128 KB and rises to the largest mapped block freed so far)
is free there. With messages of a megabyte that was nearly every message, and every page of
the regrown heap was faulted in again. :func:`raise_malloc_thresholds` frees one 8 MB block
at start, which raises both thresholds the way glibc raises them itself (to 8 and 16 MB),
so they stay dynamic and the periodic trim still returns everything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("broker.memory")


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()
_RAISE_TO = 8 << 20


def raise_malloc_thresholds() -> None:
    """Free one mapped block of 8 MB: glibc's mmap threshold rises to it and its trim
    threshold to twice that (glibc only; otherwise a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        malloc, free = libc.malloc, libc.free
    except (OSError, AttributeError):  # not glibc: nothing to raise
        return
    malloc.argtypes, malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], None
    free(malloc(_RAISE_TO))  # if malloc fails, free(NULL) does nothing


def release_free_memory() -> None:
    """Return the allocator's free pages to the system (glibc only; otherwise a no-op)."""
    if _TRIM is not None:
        _TRIM(0)
