"""
When to probe one child and what its answers mean.

A L{HealthWatch} asks the probe (for Immich ML, :mod:`~imml.mac.readiness`'s
``/ping``) every ``ready_interval`` seconds until the child first answers,
then every ``ping_interval`` seconds.  The first answer makes the child
ready; after that, ``ping_failures`` failed checks in a row make it
unresponsive, and a child that is not ready within ``start_timeout``
seconds of its start has failed to start.  Either way the watch stops and
says the child is unhealthy; restarting it is the supervisor's business.
A probe that raises or fails counts as a failed check; a crash of the
watch itself is logged, never raised into the reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

# The supervisor's namespace, as before this was split out of it: the
# events keep the system they are logged under.
log = Logger(namespace="imml.mac.supervisor")


class HealthWatch:
    """
    Probe one child until it is unhealthy or the watch is stopped; see the
    module docstring.  One watch per child: a new child gets a new watch.

    @param clock: provides C{callLater} and C{seconds}.
    @param probe: a 0-argument callable returning a Deferred that fires
        C{True} when the child answers as healthy.
    @param name: the child's name, for the log lines.
    @param pid: the child's pid, for the log lines.
    @param started_at: when the child was started, in C{clock} seconds.
    @param on_ready: called with no arguments the first time the child
        answers, after L{ready} has become C{True}.
    @param on_unhealthy: called with no arguments, once, when the child
        stopped answering or was not ready in time.
    """

    def __init__(
        self,
        clock: Any,
        probe: Callable[[], defer.Deferred],
        name: str,
        pid: Optional[int],
        started_at: float,
        ready_interval: float,
        ping_interval: float,
        ping_failures: int,
        start_timeout: float,
        on_ready: Callable[[], None],
        on_unhealthy: Callable[[], None],
    ) -> None:
        self.clock = clock
        self.probe = probe
        self.name = name
        self.pid = pid
        self.started_at = started_at
        self.ready_interval = ready_interval
        self.ping_interval = ping_interval
        self.ping_failures = ping_failures
        self.start_timeout = start_timeout
        self._on_ready = on_ready
        self._on_unhealthy = on_unhealthy
        #: Whether the child has answered once.
        self.ready = False
        #: Failed checks in a row since the child was ready.
        self.failures = 0
        self._stopped = False
        self._call: Optional[IDelayedCall] = None

    def start(self) -> None:
        """
        Make the first check after C{ready_interval} seconds.
        """
        self._schedule(self.ready_interval)

    def stop(self) -> None:
        """
        Make no more checks, and ignore the answer of one in flight.
        """
        self._stopped = True
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _schedule(self, delay: float) -> None:
        self._call = self.clock.callLater(delay, self._check)

    def _check(self) -> None:
        self._call = None
        if self._stopped:
            return
        d = defer.maybeDeferred(self.probe)
        d.addErrback(lambda failure: False)
        d.addCallback(self._checked)
        d.addErrback(
            lambda failure: log.failure(
                "{name}: health check crashed", failure, imml_event="check-crashed", name=self.name
            )
        )

    def _checked(self, healthy: object) -> None:
        if self._stopped:
            return
        now = self.clock.seconds()
        if healthy is True:
            self.failures = 0
            if not self.ready:
                self.ready = True
                log.info(
                    "{name}: pid {pid} is ready after {seconds:.1f} s",
                    imml_event="child-ready",
                    name=self.name,
                    pid=self.pid,
                    seconds=now - self.started_at,
                )
                self._on_ready()
        elif self.ready:
            self.failures += 1
            log.warn(
                "{name}: pid {pid} did not answer its health check ({failures} of {limit})",
                imml_event="child-ping-failed",
                name=self.name,
                pid=self.pid,
                failures=self.failures,
                limit=self.ping_failures,
            )
            if self.failures >= self.ping_failures:
                log.error(
                    "{name}: pid {pid} stopped answering: restarting it",
                    imml_event="child-unresponsive",
                    name=self.name,
                    pid=self.pid,
                    failures=self.failures,
                )
                self._unhealthy()
                return
        elif now - self.started_at >= self.start_timeout:
            log.error(
                "{name}: pid {pid} was not ready within {timeout:.0f} s: restarting it",
                imml_event="child-start-timeout",
                name=self.name,
                pid=self.pid,
                timeout=self.start_timeout,
            )
            self._unhealthy()
            return
        self._schedule(self.ping_interval if self.ready else self.ready_interval)

    def _unhealthy(self) -> None:
        self.stop()
        self._on_unhealthy()
