"""
The forwarder: runs a L{imml.job.Job} for each client request, holds the
attempts in flight to the response timeout and hedges the ones far slower
than their host's usual (one timer for all), and reports every attempt and
request to its reporters (L{imml.interfaces.IReporter}: the request log,
metrics, the status page's window).
"""

from __future__ import annotations

from typing import Any, Optional

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from .attempt import Attempt, AttemptState
from .body import RequestBody
from .classify import RequestInfo
from .dispatch import Dispatcher
from .fleet import Fleet, Load
from .interfaces import IReporter
from .job import Job
from .records import AttemptRecord, RequestRecord
from .site import BalancerRequest
from .upstream import Upstream

#: An attempt still unanswered after this many times its host's recent
#: service time for the task (and at least HEDGE_MIN seconds) is sent to
#: another host too: the host may have stalled before its health checks
#: can tell.  The first answer wins.
HEDGE_FACTOR = 8.0
HEDGE_MIN = 1.0
#: Seconds between two looks at the attempts in flight, for the response
#: timeout and the hedge above: one timer for all of them, rather than two
#: per request.
WATCH_EVERY = 0.1


@frozen
class ForwardSettings:
    """
    @ivar max_tries: most hosts one request is sent to.
    @ivar response_timeout: seconds a host has to answer a request
        completely (a cold model load takes tens of seconds).
    """

    max_tries: int = 3
    response_timeout: float = 300.0


@define(eq=False)
class Forwarder:
    """
    Sends requests to hosts chosen by the dispatcher, with retries.
    """

    fleet: Fleet
    dispatcher: Dispatcher
    upstream: Upstream
    clock: Any
    settings: ForwardSettings = field(factory=ForwardSettings)
    reporters: list[IReporter] = field(factory=list)
    log: Logger = field(factory=lambda: Logger(namespace="imml.forward"))
    #: The attempts in flight, looked at every L{WATCH_EVERY} seconds.
    _live: set[Attempt] = field(factory=set)
    _watching: Optional[IDelayedCall] = None

    def __attrs_post_init__(self) -> None:
        self.fleet.when_down(self._host_down)

    def set_max_tries(self, count: int) -> None:
        self.settings = evolve(self.settings, max_tries=count)

    def set_response_timeout(self, seconds: float) -> None:
        self.settings = evolve(self.settings, response_timeout=seconds)

    def forward(self, request: BalancerRequest, info: RequestInfo, body: RequestBody) -> Deferred[None]:
        """
        Answer C{request} from a host.  The returned Deferred fires when the
        request has been answered; cancelling it (the client went away)
        cancels whatever is under way.
        """
        job = Job(self, request, info, body, request.upstream_headers(), self.clock.seconds())
        job.next()
        return job.done

    def _host_down(self, load: Load) -> None:
        if isinstance(load.owner, Job):
            load.owner.host_down(load)

    # -- watching the attempts in flight ------------------------------------

    def watch(self, attempt: Attempt) -> None:
        """
        Hold C{attempt} to the response timeout, and hedge it when it is far
        slower than its host's usual.
        """
        self._live.add(attempt)
        if self._watching is None:
            self._watching = self.clock.callLater(WATCH_EVERY, self._look)

    def _look(self) -> None:
        self._watching = None
        now = self.clock.seconds()
        timeout = self.settings.response_timeout
        live = self._live
        for attempt in list(live):
            elapsed = now - attempt.sent
            if elapsed >= timeout:
                live.discard(attempt)
                attempt.cancel(AttemptState.TIMED_OUT)
            elif elapsed >= HEDGE_MIN and attempt.state is AttemptState.RUNNING:
                job = attempt.job
                expected = attempt.backend.service_time(job.info.task) if job.info.retryable else None
                if expected is not None and elapsed >= HEDGE_FACTOR * expected:
                    job.hedge(attempt, "is far slower than usual with it")
        if live:
            self._watching = self.clock.callLater(WATCH_EVERY, self._look)

    # -- reporting ----------------------------------------------------------

    def over(
        self,
        attempt: Attempt,
        seconds: float,
        status: Optional[int] = None,
        error: Optional[str] = None,
        service_time: Optional[float] = None,
        *,
        outcome: str,
    ) -> None:
        """
        C{attempt} is over, after C{seconds}: the host answered with
        C{status}, or failed with C{error}; C{service_time} when the answer
        is a fair sample of the host's speed.
        """
        self._live.discard(attempt)
        self.fleet.finish(attempt.load, service_time, error)
        if self.reporters:
            record = AttemptRecord(
                attempt.backend.name, attempt.load.task, status, error, seconds, outcome, attempt.hedged
            )
            for reporter in self.reporters:
                reporter.attempt_finished(record)

    def report(self, record: RequestRecord) -> None:
        for reporter in self.reporters:
            reporter.request_finished(record)
