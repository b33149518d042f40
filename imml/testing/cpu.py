"""
A host's processor as Immich's ML service uses it, simulated: what makes a
real host unlike a set of slots.

Each C{/predict} does two kinds of work.  Its I{Python} work (reading the
form, decoding the picture, encoding the answer) holds the interpreter's
lock, so all requests together get at most one core for it.  Its
I{inference} runs in a pool of C{threads} threads (Immich's
C{MACHINE_LEARNING_REQUEST_THREADS}) without that lock, each inference
using up to C{parallelism} cores (ONNX Runtime's intra-op threads).  Every
request running shares the host's C{cores} (a container's CPU quota may make
that a fraction of one) with the others, in proportion to the threads it
keeps busy: processor sharing.  A quota is smooth, or, as Linux enforces it,
by C{period}: the service may use C{cores} times the period in CPU-seconds
in each period, at the speed of the C{machine}'s cores, then waits for the
next period, so a request started early in a period is quick and one that
meets the end of it is slow.  When more than one request runs and together
they want more than the cores, a share C{waste} of the CPU they get does no
work: ONNX Runtime's intra-op threads busy-wait for each other while the
system runs another request's threads.  When an inference ends and no other
is running, its threads C{spin} a while before they sleep, on the cores no
work wants (between two requests, and beside the next one's Python work):
that costs a host with cores to spare nothing, but under a quota it spends
the period's CPU, so a quota-held host running one request at a time does
less than one kept busy with two.

So, as on a real host, each request takes longer with more in flight, and
throughput rises only while one request's Python work can overlap another's
inference, up to where the cores are full; with C{waste}, past that point it
falls.  L{SharedCPU} is driven by a clock (a
L{twisted.internet.task.Clock} in tests, the reactor in a fake host
process): it says when each request's work is done.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional

from attrs import define, field, frozen, validators
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["CPUProfile", "HEAVY", "LIGHT", "PROFILES", "SharedCPU", "Work"]

#: Work left below this many CPU-seconds is done (floating point dust).
_EPSILON = 1e-9

_PYTHON, _QUEUED, _INFERRING, _DONE = "python", "queued for a thread", "inferring", "done"


@frozen
class CPUProfile:
    """
    The processor of a host and the cost of its model.

    @ivar cores: cores the service may use (a CPU quota of 15 % of one core
        is 0.15).
    @ivar threads: inferences at once (C{MACHINE_LEARNING_REQUEST_THREADS};
        Immich's default is the host's core count).
    @ivar parallelism: cores one inference can use at most.
    @ivar python: CPU-seconds of Python work per request.
    @ivar inference: CPU-seconds of inference per request.
    @ivar waste: The share of the CPU lost while more than one request runs
        and they want more than the C{cores}.
    @ivar period: None for a smooth share of C{cores}; else the seconds of
        the quota's period: in each, the service may use C{cores} times
        C{period} CPU-seconds on up to C{machine} cores (Linux's CPU
        bandwidth control; its default period is 0.1 s).
    @ivar machine: the cores of the machine, with a C{period}.
    @ivar spin: seconds an inference's threads keep spinning once it ends,
        until another inference starts, on the cores no work wants.
    """

    cores: float = field(default=2.0, validator=validators.gt(0))
    threads: int = field(default=2, validator=validators.ge(1))
    parallelism: float = field(default=2.0, validator=validators.gt(0))
    python: float = field(default=0.004, validator=validators.ge(0))
    inference: float = field(default=0.019, validator=validators.ge(0))
    waste: float = field(default=0.0, validator=[validators.ge(0), validators.lt(1)])
    period: Optional[float] = field(default=None, validator=validators.optional(validators.gt(0)))
    machine: float = field(default=2.0, validator=validators.gt(0))
    spin: float = field(default=0.0, validator=validators.ge(0))

    @property
    def speed(self) -> float:
        """
        The most cores the service runs on at a time.
        """
        return self.cores if self.period is None else self.machine

    def alone(self) -> float:
        """
        Seconds one request takes with nothing else running (with a
        C{period}: one that the end of a period does not stop).
        """
        return self.python / min(1.0, self.speed) + self.inference / min(self.parallelism, self.speed)


# Both profiles are fitted (with a jitter of 0.5) to the real service:
# Immich ML 2.7.5 (onnxruntime 1.24, CPU) on a 2-core machine with its
# default 2 request threads, driven directly with Immich's CLIP visual
# request and a 15 KB JPEG by bench/realhost.py beside a fake host with the
# profile (bench/README.md, "Real hosts", December 2026).  A request's
# handling (HTTP, the form, decoding and resizing the picture, the answer)
# takes 4-6 ms.  Immich gives each model 2 intra-op threads, and the second
# spins while the first computes: an inference keeps 2 cores busy even when
# its operators run on one thread (parallelism 2.0, the spinning counted in
# its CPU-seconds), and both spin on for about 10 ms after it, between two
# requests and beside the next one's handling: held to 0.4 cores by a
# cgroup, the service spends 26-28 ms of CPU per light image one at a time
# and 22-24 ms two at a time, and does 14-15 images/s one at a time against
# 16-18 with more.  With 2 or more
# requests contending for the cores, the threads' busy-waiting wastes a
# share of them.  The fake host's own handling adds about 2 ms to an answer
# alone (0.3 ms at full load), which the light profile leaves out: its
# processor alone takes 12 ms for the 14 ms a client sees.

#: A light image model whose operators are too small for ONNX Runtime to
#: split (as the light model of issue 12's measurement): alone 13-14 ms per
#: image and 68-70 images/s; 2 in flight 75-85/s, 3 to 6 in flight 82-88/s,
#: at 70 ms each with 6.
LIGHT = CPUProfile(cores=2.0, threads=2, parallelism=2.0, python=0.0045, inference=0.0155, waste=0.12, spin=0.01)
#: A heavy image model (130-145 ms of inference alone, its products split
#: over both threads): one request fills the cores, and with 2 or more in
#: flight the waste costs about a sixth of the throughput: alone 154-167 ms
#: and 5.9-6.4 images/s, then 4.9-5.9/s.
HEAVY = CPUProfile(cores=2.0, threads=2, parallelism=2.0, python=0.006, inference=0.30, waste=0.15, spin=0.01)
#: The profiles by name (C{python -m imml.testing --cpu NAME}).
PROFILES = {"light": LIGHT, "heavy": HEAVY}


@define(eq=False)
class Work:
    """
    One request's work on a L{SharedCPU}.
    """

    python: float
    inference: float
    done: Callable[[], None]
    state: str = _PYTHON
    #: CPU-seconds left in the present phase.
    left: float = 0.0
    #: Cores it gets now.
    rate: float = 0.0


@define(eq=False)
class SharedCPU:
    """
    A host's cores shared by the requests running on it (see the module's
    description).  L{submit} a request's work; its C{done} is called when
    both its phases are through.
    """

    clock: IReactorTime
    profile: CPUProfile = LIGHT
    _python: list[Work] = field(factory=list)
    _inferring: list[Work] = field(factory=list)
    _queued: deque[Work] = field(factory=deque)
    _since: float = 0.0
    _call: Optional[IDelayedCall] = None
    #: Cores in use since C{_since} (the work done, and the waste).
    _using: float = 0.0
    #: With a quota's period: which period it is, and the CPU-seconds used in it.
    _period: int = 0
    _used: float = 0.0
    #: Until when the threads of the last inference spin, and on how many cores.
    _spin_until: float = float("-inf")
    _spinning: float = 0.0

    @property
    def running(self) -> int:
        """
        Requests whose work is under way or waiting for a thread.
        """
        return len(self._python) + len(self._inferring) + len(self._queued)

    def busy(self) -> float:
        """
        Cores in use now.
        """
        spinning = self._spinning if self.clock.seconds() < self._spin_until else 0.0
        return sum(w.rate for w in self._python) + sum(w.rate for w in self._inferring) + spinning

    def submit(self, python: float, inference: float, done: Callable[[], None]) -> Work:
        """
        Start a request's work: C{python} then C{inference} CPU-seconds.
        """
        self._advance()
        work = Work(python, inference, done, left=python)
        self._python.append(work)
        self._settle()
        return work

    def cancel(self, work: Work) -> None:
        """
        The request went away: its work stops.
        """
        if work.state == _DONE:
            return
        self._advance()
        for group in (self._python, self._inferring):
            if work in group:
                group.remove(work)
        if work in self._queued:
            self._queued.remove(work)
        work.state = _DONE
        self._settle()

    # -- the simulation -----------------------------------------------------

    def _advance(self) -> None:
        """
        Account the work done since the last change, at the rates then.
        """
        now = self.clock.seconds()
        elapsed = max(0.0, now - self._since)
        self._since = now
        if elapsed:
            for work in self._python:
                work.left -= work.rate * elapsed
            for work in self._inferring:
                work.left -= work.rate * elapsed
            self._used += self._using * elapsed
            self._used += self._spinning * max(0.0, min(now, self._spin_until) - (now - elapsed))
        period = self.profile.period
        if period is not None:
            # (a timer set for a period's end may fire a hair before it)
            index = math.floor(now / period + _EPSILON)
            if index != self._period:
                self._period, self._used = index, 0.0

    def _settle(self) -> None:
        """
        Move the requests whose phase is through, share the cores anew, and
        set the timer for the next phase to end.
        """
        finished: list[Work] = []
        moved = True
        while moved:
            moved = False
            for work in [w for w in self._python if w.left <= _EPSILON]:
                self._python.remove(work)
                work.state, work.left = _QUEUED, work.inference
                self._queued.append(work)
                moved = True
            for work in [w for w in self._inferring if w.left <= _EPSILON]:
                self._inferring.remove(work)
                work.state = _DONE
                finished.append(work)
                moved = True
                if not self._inferring:
                    self._spin_until = self.clock.seconds() + self.profile.spin
            while self._queued and len(self._inferring) < self.profile.threads:
                work = self._queued.popleft()
                work.state = _INFERRING
                self._inferring.append(work)
                moved = True
        self._share()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        soonest = min(
            (w.left / w.rate for w in self._python + self._inferring if w.rate > 0),
            default=None,
        )
        now = self.clock.seconds()
        if self._spinning and now < self._spin_until:
            # the threads go to sleep
            soonest = self._spin_until - now if soonest is None else min(soonest, self._spin_until - now)
        period = self.profile.period
        if period is not None and (self._python or self._inferring):
            # the quota runs out, or the next period begins
            turn = (self._period + 1) * period - now
            using = self._using + (self._spinning if now < self._spin_until else 0.0)
            if using > 0:
                turn = min(turn, (self._budget() - self._used) / using)
            soonest = turn if soonest is None else min(soonest, turn)
        if soonest is not None:
            self._call = self.clock.callLater(max(soonest, 0.0), self._tick)
        for work in finished:
            work.done()

    def _share(self) -> None:
        """
        Each running request gets cores in proportion to the threads it
        keeps busy: the Python work of all requests is one thread (the
        interpreter's lock), each inference C{parallelism} threads; less
        the profile's C{waste} while requests contend for the cores.
        """
        profile = self.profile
        python = 1.0 if self._python else 0.0
        demand = python + profile.parallelism * len(self._inferring)
        cores = profile.speed
        if profile.period is not None and self._used >= self._budget() - _EPSILON:
            cores = 0.0  # the quota is spent until the next period
        self._using = min(demand, cores)
        # the threads of the last inference spin on the cores no work wants,
        # until another inference starts or they go to sleep
        if self._inferring:
            self._spin_until = float("-inf")
        self._spinning = max(0.0, min(profile.parallelism, cores - self._using))
        scale = 1.0 if demand <= cores else cores / demand
        if demand > cores and len(self._python) + len(self._inferring) > 1:
            scale *= 1.0 - profile.waste
        for work in self._python:
            work.rate = scale * python / len(self._python)
        for work in self._inferring:
            work.rate = scale * profile.parallelism

    def _budget(self) -> float:
        """
        CPU-seconds the quota allows in one period.
        """
        return self.profile.cores * (self.profile.period or 0.0)

    def _tick(self) -> None:
        self._call = None
        self._advance()
        self._settle()
