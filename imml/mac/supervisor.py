"""
Supervise one child process: procmon's shape, with a stop that waits.

The child runs in a process group of its own (:mod:`~imml.mac.process_group`),
its output is logged line by line (:mod:`~imml.mac.child_protocol`) and,
given a probe, its health is watched (:mod:`~imml.mac.health_watch`).  This
module holds the life cycle and the restart policy.

Life of a child
---------------
started -> (its probe answers) ready -> (probe fails ``ping_failures``
times in a row, or never answers within ``start_timeout``) terminated ->
ended -> restarted after ``restart_delay(attempt)`` seconds.  The attempt
count goes back to zero once a child has run for ``stable_after`` seconds,
so a service that dies once a day restarts at once, and one that dies at
start-up backs off.  When the leader exits by itself, whatever it left in
its group is terminated too before a new child starts.

:meth:`Supervisor.stopService` sends SIGTERM to the group, SIGKILL after
``stop_timeout`` seconds, and returns a Deferred that fires only when the
child has been reaped and its output pipes are closed.  Should imml-mac die
without a stop, the group stops itself the same way (see
:mod:`~imml.mac.process_group`).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from imml.mac.child_protocol import LineLogger, exit_status
from imml.mac.health_watch import HealthWatch
from imml.mac.process_group import CHILD_FDS, Command, await_empty_group, signal_group

log = Logger()


class Supervisor(service.Service):
    """
    Keep one child running; see the module docstring.

    @param reactor: provides C{spawnProcess}, C{callLater} and C{seconds}.
    @param command: the L{Command} to run.
    @param probe: C{None}, or a 0-argument callable returning a Deferred
        that fires C{True} when the child answers as healthy.
    @param restart_delay: C{attempt -> seconds}, C{attempt} counting quick
        deaths in a row from 0.
    @param kill: C{os.killpg}-like; injectable for tests.
    """

    def __init__(
        self,
        reactor: Any,
        command: Command,
        name: str = "child",
        probe: Optional[Callable[[], defer.Deferred]] = None,
        restart_delay: Callable[[int], float] = backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0),
        stable_after: float = 60.0,
        stop_timeout: float = 10.0,
        ready_interval: float = 0.5,
        ping_interval: float = 10.0,
        ping_failures: int = 3,
        start_timeout: float = 300.0,
        kill: Callable[[int, int], None] = os.killpg,
    ) -> None:
        self.reactor = reactor
        self.command = command
        self.setName(name)
        self.probe = probe
        self.restart_delay = restart_delay
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.ready_interval = ready_interval
        self.ping_interval = ping_interval
        self.ping_failures = ping_failures
        self.start_timeout = start_timeout
        self._kill = kill
        self.process: Optional[IProcessTransport] = None
        self._pid: Optional[int] = None
        self.attempt = 0
        self.started_at: Optional[float] = None
        self._health: Optional[HealthWatch] = None
        self._terminating = False
        self._ending = False
        self._restart_call: Optional[IDelayedCall] = None
        self._kill_call: Optional[IDelayedCall] = None
        self._ready_waiters: list[defer.Deferred] = []
        self._end_waiters: list[defer.Deferred] = []
        self._readiness: list[Callable[[bool], None]] = []
        self._serving = False

    @property
    def pid(self) -> Optional[int]:
        """
        The current child's pid, also its process group id (Twisted forgets
        C{process.pid} once it has reaped the process; we keep it until the
        child has ended).
        """
        return None if self.process is None else self._pid

    @property
    def ready(self) -> bool:
        """
        Whether the current child has answered its probe (until it has ended).
        """
        return self._health is not None and self._health.ready

    @property
    def failures(self) -> int:
        """
        The current child's failed health checks in a row since it was ready.
        """
        return 0 if self._health is None else self._health.failures

    # Service

    def startService(self) -> None:
        service.Service.startService(self)
        self._spawn()

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        self._cancel("_restart_call")
        self._stop_watch()
        if self.process is None:
            return defer.succeed(None)
        log.info("{name}: stopping pid {pid}", imml_event="child-stopping", name=self.name, pid=self.pid)
        ended = self.whenEnded()
        self._terminate()
        return ended

    def whenReady(self) -> defer.Deferred:
        """
        A Deferred that fires with the pid the next time a child becomes ready.
        """
        d = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def watch_readiness(self, callback: Callable[[bool], None]) -> None:
        """
        Call C{callback(True)} each time a child becomes ready, and
        C{callback(False)} when it no longer serves: it stopped answering,
        is being stopped, or ended.
        """
        self._readiness.append(callback)

    def _tell_readiness(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        for callback in list(self._readiness):
            try:
                callback(serving)
            except Exception:
                log.failure("{name}: a readiness watcher failed", name=self.name)

    def whenEnded(self) -> defer.Deferred:
        """
        A Deferred that fires with the pid when the current child has ended
        (at once if there is none).
        """
        if self.process is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._end_waiters.append(d)
        return d

    # Starting

    def _spawn(self) -> None:
        self._restart_call = None
        executable, args = self.command.spawn_args(grace=self.stop_timeout)
        child = LineLogger(self.name, self._leader_exited, self._ended)
        self.started_at = self.reactor.seconds()
        self._health = None
        self._terminating = False
        self._ending = False
        try:
            self.process = self.reactor.spawnProcess(
                child,
                executable,
                args,
                env=self.command.env,
                path=self.command.cwd,
                usePTY=False,
                childFDs=CHILD_FDS,
            )
        except Exception:
            log.failure(
                "{name}: could not start {argv}",
                imml_event="child-spawn-failed",
                name=self.name,
                argv=list(self.command.argv),
            )
            self.process = None
            self._restart_later()
            return
        self._pid = self.process.pid
        log.info(
            "{name}: started pid {pid}: {argv}",
            imml_event="child-started",
            name=self.name,
            pid=self.process.pid,
            argv=list(self.command.argv),
            attempt=self.attempt,
        )
        if self.probe is not None:
            self._health = HealthWatch(
                self.reactor,
                self.probe,
                name=self.name,
                pid=self._pid,
                started_at=self.started_at,
                ready_interval=self.ready_interval,
                ping_interval=self.ping_interval,
                ping_failures=self.ping_failures,
                start_timeout=self.start_timeout,
                on_ready=self._became_ready,
                on_unhealthy=self._terminate,
            )
            self._health.start()

    # Health

    def _became_ready(self) -> None:
        self._tell_readiness(True)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self._pid)

    def _stop_watch(self) -> None:
        if self._health is not None:
            self._health.stop()

    # Stopping

    def _signal(self, signum: int) -> None:
        """
        Send C{signum} to the current child's process group, if there is a
        child.
        """
        if self.process is None:
            return
        signal_group(self._kill, self._pid, self.process, signum)

    def _terminate(self) -> None:
        if self.process is None or self._terminating:
            return
        self._terminating = True
        self._tell_readiness(False)
        self._stop_watch()
        self._signal(signal.SIGTERM)
        self._kill_call = self.reactor.callLater(self.stop_timeout, self._kill_group)

    def _kill_group(self) -> None:
        self._kill_call = None
        log.warn(
            "{name}: pid {pid} still there {timeout:.0f} s after SIGTERM: sending SIGKILL",
            imml_event="child-killed",
            name=self.name,
            pid=self.pid,
            timeout=self.stop_timeout,
        )
        self._signal(signal.SIGKILL)

    def _leader_exited(self, child: LineLogger, reason: Failure) -> None:
        # The leader is gone; anything it left in its group (gunicorn,
        # workers) must go too, or processEnded never comes: they hold the
        # pipes.
        if child.transport is self.process and not self._terminating:
            self._terminate()

    def _ended(self, child: LineLogger, reason: Failure) -> None:
        if child.transport is not self.process or self._ending:
            return
        self._ending = True
        self._tell_readiness(False)
        self._cancel("_kill_call")
        self._stop_watch()
        pid = self._pid
        code, signum = exit_status(reason)
        runtime = self.reactor.seconds() - self.started_at
        # Nothing of this child may outlive it: KILL what is left of its
        # group, and wait until the group is empty (the pipes can close a
        # moment before a process is really gone).
        try:
            self._kill(pid, signal.SIGKILL)
        except OSError:
            pass
        deadline = self.reactor.seconds() + self.stop_timeout
        await_empty_group(
            self.reactor,
            self._kill,
            pid,
            deadline,
            lambda: self._finish(pid, code, signum, runtime),
            self.name,
        )

    def _finish(self, pid: int, code: Optional[int], signum: Optional[int], runtime: float) -> None:
        self.process = None
        self._health = None
        self._ending = False
        log.info(
            "{name}: pid {pid} ended (exit code {exit_code}, signal {signal}) after {runtime:.1f} s",
            imml_event="child-ended",
            name=self.name,
            pid=pid,
            exit_code=code,
            signal=signum,
            runtime=runtime,
        )
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(pid)
        if not self.running:
            return
        if runtime >= self.stable_after:
            self.attempt = 0
        self._restart_later()

    def _restart_later(self) -> None:
        delay = self.restart_delay(self.attempt)
        self.attempt += 1
        log.info(
            "{name}: restarting in {delay:.2f} s",
            imml_event="child-restart-scheduled",
            name=self.name,
            delay=delay,
            attempt=self.attempt - 1,
        )
        self._restart_call = self.reactor.callLater(delay, self._spawn)

    def _cancel(self, attribute: str) -> None:
        call = getattr(self, attribute)
        setattr(self, attribute, None)
        if call is not None and call.active():
            call.cancel()
