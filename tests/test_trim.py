"""
The balancer gives the C library's free memory back to the system
(imml/trim.py): a heap fragmented by long-lived requests among short ones
does not keep its freed pages resident.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from support import bounded, rig
from twisted.internet.task import Clock

from imml.trim import EVERY, give_back_free_memory, malloc_trim

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")

# A heap fragmented as a balancer's is after a host stalled: many blocks
# freed, a few kept among them (so the heap's top cannot shrink), then the
# free pages given back.  Prints the resident memory, in bytes, after the
# blocks were freed and after the trim.
FRAGMENT = """
import os
from imml.trim import malloc_trim

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

blocks = [bytearray(4000) for _ in range(10000)]
kept = blocks[::50]
del blocks
freed = resident()
malloc_trim()()
print(freed, resident(), len(kept))
"""


@glibc
def test_the_pages_freed_between_live_blocks_go_back_to_the_system():
    done = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, timeout=60, check=True)
    freed, trimmed, _ = (int(n) for n in done.stdout.split())
    # 9,800 blocks of 4 kB were freed between the kept ones: about 39 MB.
    assert freed - trimmed > 20_000_000, (freed, trimmed)


def test_the_trim_runs_every_30_seconds_while_the_balancer_runs():
    clock, trims = Clock(), []
    timer = give_back_free_memory(clock, trim=lambda: trims.append(clock.seconds()))
    timer.startService()
    clock.pump([EVERY / 2] * 7)
    timer.stopService()
    clock.pump([EVERY] * 3)
    assert EVERY == 30.0
    assert trims == [0.0, 30.0, 60.0, 90.0]


class _NoMallocTrim:
    """A C library without malloc_trim (musl's, macOS's)."""


def test_nothing_trims_where_the_c_library_cannot(monkeypatch):
    monkeypatch.setattr("imml.trim.ctypes.CDLL", lambda name: _NoMallocTrim())
    assert malloc_trim() is None
    assert give_back_free_memory(Clock()) is None


@glibc
@bounded(30)
async def test_a_balancer_gives_back_free_memory_while_it_runs():
    async with await rig([{"name": "a"}]) as r:
        timer = r.service.getServiceNamed("give-back-free-memory")
        assert timer.running and timer.step == EVERY
    assert not timer.running
