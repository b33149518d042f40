"""
Health: a host's up/down verdict (L{Health}, pure state with rise and fall
thresholds) and the active checker (L{HealthChecker}) that GETs ``/ping`` on
every host on an interval.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from attrs import define, field, frozen
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

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
    or down at once.  After that it takes C{rise} passing checks in a row to come back up
    and C{fall} failing checks in a row to go down; a connection failure on a
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

    def _move(self, new: str, now: float, reason: str) -> Optional[Transition]:
        if new == self.state:
            return None
        old, self.state, self.since = self.state, new, now
        self._passes = self._fails = 0
        return Transition(old, new, reason)

    def check_passed(self, now: float) -> Optional[Transition]:
        self.last_check, self.last_result = now, "pong"
        self._fails = 0
        self._passes += 1
        if not self.tested or self._passes >= self.rise:
            self.tested = True
            return self._move(UP, now, "health check passed")
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


@define(eq=False)
class HealthChecker:
    """
    Checks every host of a fleet on an interval with C{ping}, a function of
    a backend returning a Deferred that fires with None when the host
    answered C{pong} and fails otherwise.  A failure of the check machinery
    itself is logged and never stops the timer.
    """

    fleet: object
    ping: Ping
    clock: object
    interval: float = 5.0
    log: Logger = field(factory=Logger)
    #: The checks under way, by host.
    _checks: dict[Any, Deferred] = field(factory=dict)
    _loop: Optional[LoopingCall] = None

    def start(self) -> None:
        """
        Check every host now, and then every C{interval} seconds.
        """
        self._start(now=True)

    def _start(self, now: bool) -> None:
        self._loop = LoopingCall(self.check_all)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=now).addErrback(
            lambda failure: self.log.failure("the health check timer stopped", failure)
        )

    def stop(self) -> Deferred:
        """
        Check no more; fires once the checks under way are over.
        """
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return DeferredList([self._checks[b] for b in list(self._checks)])

    def set_interval(self, seconds: float) -> None:
        """
        Check every C{seconds} from now on (the next check after C{seconds}).
        """
        self.interval = seconds
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            self._start(now=False)

    def check_all(self) -> Deferred:
        """
        Check every host now.  (Never fails: each check logs its own
        faults, so the timer runs on.)
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


def describe_failure(error: BaseException) -> str:
    """
    A short, stable phrase for why a host could not be reached or answered
    badly, for logs and error bodies.
    """
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
