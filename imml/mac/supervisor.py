"""
Supervise one child process: procmon's shape, with a stop that waits.

How the whole process tree is reached
-------------------------------------
``python -m immich_ml`` starts gunicorn, which starts workers: killing only
the child would orphan them.  :class:`Command` therefore launches every
child through a two-line Python wrapper that calls ``os.setsid()`` and then
``exec``s the real command.  The child keeps its pid, becomes the leader of
a new session and process group whose id is that pid, and everything it
starts stays in that group (gunicorn does not change groups).  Signals go
to the whole group with ``os.killpg``.  This works the same on macOS and
Linux, needs no ``preexec_fn`` (which ``spawnProcess`` does not have) and no
``setsid`` program (which macOS lacks).  The wrapper runs before the child's
own code, so a TERM that arrives before ``setsid`` has run is sent to the
pid alone, the only process there is then.

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
child has been reaped and its output pipes are closed.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, Optional

from attrs import field, frozen
from twisted.application import service
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

SETSID_EXEC = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


@frozen
class Command:
    """
    What to run: C{argv} (C{argv[0]} looked up on the environment's PATH),
    in C{cwd}, with exactly the environment C{env}.
    """

    argv: tuple = field(converter=tuple)
    env: dict = field(factory=dict, hash=False)
    cwd: Optional[str] = None
    launcher: str = sys.executable

    def spawn_args(self) -> tuple[str, list[str]]:
        """
        The executable and arguments for C{spawnProcess}: the setsid wrapper
        run by C{launcher}, then the command.
        """
        return self.launcher, [self.launcher, "-c", SETSID_EXEC, *self.argv]


class _LineLogger(protocol.ProcessProtocol):
    """
    Log the child's output line by line, naming the stream, and report its
    exit and end to the supervisor.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.pid: Optional[int] = None
        self._partial = {"stdout": b"", "stderr": b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def _received(self, stream: str, data: bytes) -> None:
        lines = (self._partial[stream] + data).split(b"\n")
        self._partial[stream] = lines.pop()
        for line in lines:
            self._emit(stream, line)

    def _emit(self, stream: str, line: bytes) -> None:
        log.info(
            "[{name} {pid} {stream}] {line}",
            imml_event="child-output",
            name=self.supervisor.name,
            pid=self.pid,
            stream=stream,
            line=line.rstrip(b"\r").decode("utf-8", "replace"),
        )

    def outReceived(self, data: bytes) -> None:
        self._received("stdout", data)

    def errReceived(self, data: bytes) -> None:
        self._received("stderr", data)

    def processExited(self, reason: Failure) -> None:
        self.supervisor._leader_exited(self, reason)

    def processEnded(self, reason: Failure) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._emit(stream, rest)
        self._partial = {"stdout": b"", "stderr": b""}
        self.supervisor._ended(self, reason)


def _exit_status(reason: Failure) -> tuple[Optional[int], Optional[int]]:
    value = reason.value
    return getattr(value, "exitCode", None), getattr(value, "signal", None)


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
        restart_delay: Callable[[int], float] = backoffPolicy(
            initialDelay=1.0, maxDelay=60.0, factor=2.0
        ),
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
        self.ready = False
        self.failures = 0
        self.started_at: Optional[float] = None
        self._terminating = False
        self._ending = False
        self._restart_call: Optional[IDelayedCall] = None
        self._check_call: Optional[IDelayedCall] = None
        self._kill_call: Optional[IDelayedCall] = None
        self._ready_waiters: list[defer.Deferred] = []
        self._end_waiters: list[defer.Deferred] = []

    @property
    def pid(self) -> Optional[int]:
        """
        The current child's pid, also its process group id (Twisted forgets
        C{process.pid} once it has reaped the process; we keep it until the
        child has ended).
        """
        return None if self.process is None else self._pid

    # Service

    def startService(self) -> None:
        service.Service.startService(self)
        self._spawn()

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        self._cancel("_restart_call")
        self._cancel("_check_call")
        if self.process is None:
            return defer.succeed(None)
        log.info(
            "{name}: stopping pid {pid}", imml_event="child-stopping", name=self.name, pid=self.pid
        )
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
        executable, args = self.command.spawn_args()
        child = _LineLogger(self)
        self.started_at = self.reactor.seconds()
        self.ready = False
        self.failures = 0
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
            self._schedule_check(self.ready_interval)

    # Health

    def _schedule_check(self, delay: float) -> None:
        self._check_call = self.reactor.callLater(delay, self._check)

    def _check(self) -> None:
        self._check_call = None
        process = self.process
        if process is None or self._terminating:
            return
        d = defer.maybeDeferred(self.probe)
        d.addErrback(lambda failure: False)
        d.addCallback(self._checked, process)
        d.addErrback(
            lambda failure: log.failure(
                "{name}: health check crashed", failure, imml_event="check-crashed", name=self.name
            )
        )

    def _checked(self, healthy: object, process: IProcessTransport) -> None:
        if process is not self.process or self._terminating or not self.running:
            return
        now = self.reactor.seconds()
        if healthy is True:
            self.failures = 0
            if not self.ready:
                self.ready = True
                log.info(
                    "{name}: pid {pid} is ready after {seconds:.1f} s",
                    imml_event="child-ready",
                    name=self.name,
                    pid=self._pid,
                    seconds=now - self.started_at,
                )
                waiters, self._ready_waiters = self._ready_waiters, []
                for d in waiters:
                    d.callback(self._pid)
        elif self.ready:
            self.failures += 1
            log.warn(
                "{name}: pid {pid} did not answer its health check ({failures} of {limit})",
                imml_event="child-ping-failed",
                name=self.name,
                pid=self._pid,
                failures=self.failures,
                limit=self.ping_failures,
            )
            if self.failures >= self.ping_failures:
                log.error(
                    "{name}: pid {pid} stopped answering: restarting it",
                    imml_event="child-unresponsive",
                    name=self.name,
                    pid=self._pid,
                    failures=self.failures,
                )
                self._terminate()
                return
        elif now - self.started_at >= self.start_timeout:
            log.error(
                "{name}: pid {pid} was not ready within {timeout:.0f} s: restarting it",
                imml_event="child-start-timeout",
                name=self.name,
                pid=self._pid,
                timeout=self.start_timeout,
            )
            self._terminate()
            return
        self._schedule_check(self.ping_interval if self.ready else self.ready_interval)

    # Stopping

    def _signal(self, signum: int) -> None:
        """
        Send C{signum} to the child's process group; to the pid alone if the
        group does not exist yet (the wrapper has not called setsid).
        """
        if self.process is None:
            return
        try:
            self._kill(self._pid, signum)
            return
        except ProcessLookupError:
            pass
        except PermissionError:
            # Before setsid, on macOS, killpg of a pid that is not yet a group
            # leader may say EPERM rather than ESRCH.
            pass
        try:
            self.process.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass

    def _terminate(self) -> None:
        if self.process is None or self._terminating:
            return
        self._terminating = True
        self._cancel("_check_call")
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

    def _leader_exited(self, child: _LineLogger, reason: Failure) -> None:
        # The leader is gone; anything it left in its group (gunicorn,
        # workers) must go too, or processEnded never comes: they hold the
        # pipes.
        if child.transport is self.process and not self._terminating:
            self._terminate()

    def _ended(self, child: _LineLogger, reason: Failure) -> None:
        if child.transport is not self.process or self._ending:
            return
        self._ending = True
        self._cancel("_kill_call")
        self._cancel("_check_call")
        pid = self._pid
        code, signum = _exit_status(reason)
        runtime = self.reactor.seconds() - self.started_at
        # Nothing of this child may outlive it: KILL what is left of its
        # group, and wait until the group is empty (the pipes can close a
        # moment before a process is really gone).
        try:
            self._kill(pid, signal.SIGKILL)
        except OSError:
            pass
        deadline = self.reactor.seconds() + self.stop_timeout
        self._await_group(pid, deadline, lambda: self._finish(pid, code, signum, runtime))

    def _await_group(self, pgid: int, deadline: float, then: Callable[[], None]) -> None:
        try:
            self._kill(pgid, 0)
        except OSError:
            # ESRCH: the group is empty.  (EPERM: what is left is no longer
            # ours to signal.)
            return then()
        if self.reactor.seconds() >= deadline:
            log.warn(
                "{name}: process group {pgid} still has members after SIGKILL",
                imml_event="child-group-lingers",
                name=self.name,
                pgid=pgid,
            )
            return then()
        self.reactor.callLater(0.05, self._await_group, pgid, deadline, then)

    def _finish(
        self, pid: int, code: Optional[int], signum: Optional[int], runtime: float
    ) -> None:
        self.process = None
        self.ready = False
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
