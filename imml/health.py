"""
Health: a host's up/down verdict (L{Health}, pure state with rise and fall
thresholds) and the active checker (L{HealthChecker}) that GETs ``/ping`` on
every host, more often while it is down, and most often while requests wait
for a host.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from attrs import define, field, frozen
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

from .tls import describe_tls

UP = "up"
DOWN = "down"
#: Not yet checked: not given requests.
UNKNOWN = "unknown"


@frozen
class Transition:
    """
    A change of a host's verdict, and why.
    """

    old: str
    new: str
    reason: str


@define
class Health:
    """
    A host's verdict from the checks and requests it has seen.

    A host starts unknown (not given requests): its first check brings it up
    or down at once.  After that it takes C{rise} passing checks in a row to
    come back up (one, when no other host is up: see L{check_passed}) and
    C{fall} failing checks in a row to go down; a connection failure on a
    real request takes it down at once.
    """

    rise: int = 2
    fall: int = 3
    state: str = UNKNOWN
    since: float = 0.0
    tested: bool = False
    last_check: Optional[float] = None
    last_result: Optional[str] = None
    _passes: int = 0
    _fails: int = 0

    @property
    def up(self) -> bool:
        return self.state == UP

    @property
    def rising(self) -> bool:
        """
        Whether the host is down but passed its last check: on its way up.
        """
        return self.state != UP and self._passes > 0

    def _move(self, new: str, now: float, reason: str) -> Optional[Transition]:
        if new == self.state:
            return None
        old, self.state, self.since = self.state, new, now
        self._passes = self._fails = 0
        return Transition(old, new, reason)

    def check_passed(self, now: float, alone: bool = False) -> Optional[Transition]:
        """
        A check passed.

        @param alone: no other host is up.  Then one passing check brings
            the host up: waiting for C{rise} would only keep every request
            waiting longer.
        """
        self.last_check, self.last_result = now, "pong"
        self._fails = 0
        self._passes += 1
        if not self.tested or self._passes >= self.rise:
            self.tested = True
            return self._move(UP, now, "health check passed")
        if alone:
            return self._move(UP, now, "health check passed, and no other host is up")
        return None

    def check_failed(self, now: float, reason: str) -> Optional[Transition]:
        self.last_check, self.last_result = now, reason
        self._passes = 0
        self._fails += 1
        if not self.tested or self._fails >= self.fall:
            self.tested = True
            return self._move(DOWN, now, f"health check failed: {reason}")
        return None

    def request_failed(self, now: float, reason: str) -> Optional[Transition]:
        """
        A real request could not reach the host: down at once.
        """
        self.tested = True
        return self._move(DOWN, now, reason)


Ping = Callable[[object], Deferred]

#: Seconds by which a timer may fire early and still count as on time (the
#: clock's arithmetic is in floats).
_SLACK = 1e-9


@define(eq=False)
class HealthChecker:
    """
    Checks every host of a fleet with C{ping}, a function of a backend
    returning a Deferred that fires with None when the host answered
    C{pong} and fails otherwise.  A failure of the check machinery itself is
    logged and never stops the checks.

    Each host is checked again some seconds after its last check ended (as
    HAProxy's C{inter}, C{downinter} and C{fastinter}): C{interval} while it
    is up; C{down_interval} while it is down; C{fast_interval} while it is
    down and requests wait for a host (C{waiting()}), or once it passed a
    check on its way back up.  None of them is ever longer than
    C{interval}: a host that is down is never checked less often than one
    that is up.
    """

    fleet: object
    ping: Ping
    clock: object
    interval: float = 5.0
    down_interval: float = 2.0
    fast_interval: float = 1.0
    #: Whether requests wait for a host now.
    waiting: Callable[[], bool] = lambda: False
    log: Logger = field(factory=Logger)
    #: The checks under way, by host.
    _checks: dict[Any, Deferred] = field(factory=dict)
    #: When each host's last check ended.
    _ended: dict[Any, float] = field(factory=dict)
    #: Calls L{_tick} when the next host is due.
    _timer: Optional[IDelayedCall] = None
    _running: bool = False

    def start(self) -> None:
        """
        Check every host now, and then each on its interval.
        """
        self._running = True
        self.check_all()
        self._schedule()

    def stop(self) -> Deferred:
        """
        Check no more; fires once the checks under way are over.
        """
        self._running = False
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        return DeferredList([self._checks[b] for b in list(self._checks)])

    def set_interval(self, seconds: float) -> None:
        """
        Check a host that is up C{seconds} after its last check, from now on.
        """
        self.interval = seconds
        self._schedule()

    def set_down_interval(self, seconds: float) -> None:
        """
        Check a host that is down C{seconds} after its last check, from now on.
        """
        self.down_interval = seconds
        self._schedule()

    def set_fast_interval(self, seconds: float) -> None:
        """
        Check a host that is down C{seconds} after its last check while
        requests wait, or once it is on its way up, from now on.
        """
        self.fast_interval = seconds
        self._schedule()

    def requests_wait(self, info: object = None) -> None:
        """
        A request has to wait: the hosts that are down are checked every
        C{fast_interval} from now on, as long as requests wait (the first
        at once, if its last check is that long ago).
        """
        # Only a host that is down is checked sooner while requests wait.
        if not all(b.health.up for b in self.fleet.backends):
            self._schedule()

    def fleet_changed(self) -> None:
        """
        The fleet changed: a host that joined is checked at once.
        """
        self._schedule()

    def interval_for(self, backend: Any, waiting: Optional[bool] = None) -> float:
        """
        Seconds from the end of C{backend}'s last check to its next.

        @param waiting: whether requests wait (asked of C{waiting()} when
            not given).
        """
        health = backend.health
        if health.up:
            return self.interval
        seconds = min(self.down_interval, self.interval)
        if health.rising or (self.waiting() if waiting is None else waiting):
            seconds = min(seconds, self.fast_interval)
        return seconds

    def _due(self, backend: Any, waiting: bool) -> float:
        ended = self._ended.get(backend)
        if ended is None:
            return float("-inf")  # never checked (it just joined): now
        return ended + self.interval_for(backend, waiting)

    def _schedule(self) -> None:
        """
        Set the timer for the first host due, and for C{interval} from now
        at the latest (hosts that join are checked then).
        """
        if not self._running:
            return
        now = self.clock.seconds()
        waiting = self.waiting()
        when = now + self.interval
        for backend in self.fleet.backends:
            if backend not in self._checks:
                when = min(when, self._due(backend, waiting))
        when = max(when, now)
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return  # soon enough (a tick with nothing due only sets the timer again)
            timer.cancel()
        self._timer = self.clock.callLater(when - now, self._tick)

    def _tick(self) -> None:
        """
        Check the hosts that are due, then set the timer again.
        """
        self._timer = None
        try:
            now = self.clock.seconds()
            waiting = self.waiting()
            backends = list(self.fleet.backends)
            for gone in set(self._ended).difference(backends):
                del self._ended[gone]
            for backend in backends:
                if backend not in self._checks and self._due(backend, waiting) <= now + _SLACK:
                    self.check(backend)
        except Exception:
            self.log.failure("the health check timer failed")
        finally:
            self._schedule()

    def check_all(self) -> Deferred:
        """
        Check every host now.  (Never fails: each check logs its own
        faults, so the checks go on.)
        """
        return DeferredList([self.check(backend) for backend in self.fleet.backends])

    def check(self, backend: Any) -> Deferred:
        """
        Check one host now, unless a check of it is already under way.
        """
        if backend in self._checks:
            return succeed(None)
        d = self._checks[backend] = ensureDeferred(self._check(backend))
        if d.called:
            del self._checks[backend]
        return d

    async def _check(self, backend: Any) -> None:
        try:
            try:
                await self.ping(backend)
            except Exception as e:
                self.fleet.check_failed(backend, describe_failure(e))
            else:
                self.fleet.check_passed(backend)
        except Exception:
            self.log.failure("health check of {backend} failed unexpectedly", backend=str(backend.address))
        finally:
            self._checks.pop(backend, None)
            self._ended[backend] = self.clock.seconds()
            self._schedule()


def describe_failure(error: BaseException) -> str:
    """
    A short, stable phrase for why a host could not be reached or answered
    badly, for logs and error bodies.
    """
    for reason in (error, *(f.value for f in getattr(error, "reasons", ()))):
        tls = describe_tls(reason)  # a certificate that did not verify
        if tls is not None:
            return tls
    if isinstance(error, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ierror.DNSLookupError):
        return "name does not resolve"
    if isinstance(error, (ierror.TimeoutError, ierror.ConnectingCancelledError)):
        return "timed out"
    if isinstance(error, ierror.ConnectError):
        return "cannot connect"
    if isinstance(error, (ResponseNeverReceived, RequestTransmissionFailed)):
        return "connection lost before an answer"
    if isinstance(error, ResponseFailed):
        return "connection lost mid-answer"
    if isinstance(error, BadAnswer):
        return error.args[0]
    return type(error).__name__


class BadAnswer(Exception):
    """
    A host answered, but not as a healthy Immich ML host does.
    """


__all__ = ["Health", "HealthChecker", "Transition", "UP", "DOWN", "UNKNOWN", "BadAnswer", "describe_failure"]
