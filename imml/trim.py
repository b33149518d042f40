"""
Gives back to the system the memory the C library holds free
(L{give_back_free_memory}).

glibc's allocator keeps what a process frees for its next allocations and
returns to the system only the free memory at the top of its heap.  A
balancer's heap fragments: the requests held while a host stalls (their
hedges, their bodies) live for seconds while thousands of others come and
go around them, and the pages freed between them stay resident, a few
megabytes more after each stall.  So every L{EVERY} seconds the balancer
asks glibc (C{malloc_trim}) to give its free pages back; taking them again
costs little.  Where the C library has no C{malloc_trim} (musl, macOS),
nothing is done.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Optional

from twisted.application.internet import TimerService

#: Seconds between two trims.
EVERY = 30.0


def malloc_trim() -> Optional[Callable[[], object]]:
    """
    glibc's C{malloc_trim(0)}, as a call that gives the free pages of every
    arena back to the system, or None where the C library has none.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # no such function; no C library to ask (Windows)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def give_back_free_memory(clock: object, trim: Optional[Callable[[], object]] = None) -> Optional[TimerService]:
    """
    A service that, while running, gives the C library's free memory back
    to the system every L{EVERY} seconds of C{clock} (C{trim}, by default
    L{malloc_trim}'s), or None where there is no way to.
    """
    trim = trim if trim is not None else malloc_trim()
    if trim is None:
        return None
    timer = TimerService(EVERY, trim)
    timer.clock = clock
    timer.setName("give-back-free-memory")
    return timer


__all__ = ["EVERY", "give_back_free_memory", "malloc_trim"]
