"""
Steering a running balancer: the configuration file and its reload, and
the graceful stop.

- L{remember_command_line} (called by the options) keeps what the command
  line said, so that L{reparse} can merge the file, as it is then, again.
- L{Reloader} re-reads the options and the file on C{SIGHUP} and when the
  file's content changes: hosts join, leave (after draining) or keep their
  state; settings that can change at run time do; a bad file is rejected
  with a logged reason and the old configuration stays in force.
  A setting that cannot take its new value (a listener that cannot
  listen there) keeps the old one, with a logged reason.
- L{GracefulStop} closes the proxy listener, makes C{/ping} answer 503,
  and waits for every accepted request to be answered, up to
  C{--drain-timeout}.  L{OrderedStop} stops the tree's services one after
  another, so nothing the requests need stops before they are answered;
  C{SIGINT} or C{SIGTERM} again meanwhile stops at once
  (L{GracefulStop.hurry}).

Events: C{reload}, C{reload-rejected}, C{reload-kept}, C{stop-draining},
C{stop-drained}, C{stop-timeout}, C{stop-now}.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from typing import Any, Callable, Iterable, Optional

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from .config import ConfigError

log = Logger()

#: What a request still under way is told when the balancer stops at once.
STOPPED = "the balancer stopped before this request was answered"

#: Options whose host list a reload takes from the file instead.
_HOSTS = {"backends", "hosts", "config", "given", "config-digest"}


def _defaults(options: usage.Options) -> dict:
    values = {p[0]: p[2] for p in options.optParameters}
    values.update({f[0]: 0 for f in getattr(options, "optFlags", [])})
    values.update(getattr(options, "repeated", {}))
    return values


def _digest(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def remember_command_line(options: usage.Options, given: Iterable[str]) -> None:
    """
    Keep, before the options are checked and C{--config} is merged in, what
    the command line set (C{options["given"]}: the options named C{given},
    whatever their values, the defaults' too) and a digest of the
    configuration file (C{options["config-digest"]}), so that a reload can
    parse them again with the file as it is then.
    """
    if "given" not in options:
        options["given"] = {name: options[name] for name in given}
    options["config-digest"] = _digest(options["config"]) if options.get("config") else None


def reparse(options: usage.Options) -> usage.Options:
    """
    The options as they would be parsed now: the same command line, the
    configuration file as it is now.

    @raise usage.UsageError: when they cannot be used.
    """
    new = type(options)()
    new.update(options["given"])
    new["given"] = options["given"]
    new.postOptions()
    return new


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class OrderedStop(service.MultiService):
    """
    A L{service.MultiService} that stops its children one after another,
    last started first, each once the one before has stopped.

    twistd stops the tree on C{SIGINT} or C{SIGTERM}; while it stops, the
    same signals again call C{hurry} (if given) instead of the reactor's
    handler, which would only fail to stop a reactor already stopping.
    """

    def __init__(self, clock: Any = None, hurry: Optional[Callable[[str], None]] = None) -> None:
        """
        @param clock: the reactor, that C{hurry} is called in.
        @param hurry: called with the signal's name.
        """
        super().__init__()
        self.clock, self.hurry = clock, hurry

    def stopService(self) -> Deferred:
        service.Service.stopService(self)
        previous = {}
        if self.hurry is not None and _in_main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                previous[number] = signal.signal(number, self._again)
        d = Deferred.fromCoroutine(self._stop_in_turn())

        def restore(result: Any) -> Any:
            for number, handler in previous.items():
                signal.signal(number, handler)
            return result

        return d.addBoth(restore)

    def _again(self, number: int, frame: Any) -> None:
        assert self.hurry is not None
        self.clock.callFromThread(self.hurry, signal.Signals(number).name)

    async def _stop_in_turn(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=repr(child))


class GracefulStop(service.Service):
    """
    Stops first: closes the listener, then waits until no request is being
    answered, in flight or queued, or C{timeout} seconds pass.
    """

    #: Seconds between looks at whether the requests are answered.
    poll = 0.05

    def __init__(
        self, listener: service.Service, gate: Any, fleet: Any, dispatcher: Any, clock: Any, timeout: float
    ) -> None:
        """
        @param gate: the balancer's resource: it counts requests being
            answered (C{active}) and answers C{/ping} with 503 once
            C{stopping}.
        """
        self.listener, self.gate, self.fleet, self.dispatcher = listener, gate, fleet, dispatcher
        self.clock, self.timeout = clock, timeout
        self._hurried = False

    def set_timeout(self, seconds: float) -> None:
        self.timeout = seconds

    def busy(self) -> tuple[int, int, int]:
        """
        Requests being answered, in flight on hosts, and queued.
        """
        in_flight = sum(b.in_flight for b in self.fleet.backends)
        return self.gate.active, in_flight, self.dispatcher.queue_depth

    def hurry(self, why: str) -> None:
        """
        Stop at once (C{why}: the signal sent again): every request being
        answered gets a 503 now, or is cut if its answer is already on its
        way, and what it had under way (tries on hosts, its place in the
        queue) is cancelled.
        """
        active, in_flight, queued = self.busy()
        log.warn(
            "{why} again while stopping: stopping at once; {active} requests cancelled "
            "({in_flight} in flight, {queued} queued)",
            why=why,
            active=active,
            in_flight=in_flight,
            queued=queued,
            imml_event="stop-now",
        )
        self._hurried = True
        # The waiting first: a slot freed by a cancelled request must not
        # go to one of them.
        self.dispatcher.refuse_waiting(STOPPED)
        self.gate.stop_now(STOPPED)

    def stopService(self) -> Deferred:
        super().stopService()
        self._hurried = False
        self.gate.stop_accepting()
        active, in_flight, queued = self.busy()
        log.info(
            "stopping: no new connections; waiting up to {timeout} s for {active} requests "
            "({in_flight} in flight, {queued} queued)",
            timeout=self.timeout,
            active=active,
            in_flight=in_flight,
            queued=queued,
            imml_event="stop-draining",
        )
        d = maybeDeferred(self.listener.stopService) if self.listener.running else succeed(None)
        d.addCallback(lambda _: Deferred.fromCoroutine(self._drain()))
        return d

    async def _drain(self) -> None:
        started = self.clock.seconds()
        deadline = started + self.timeout
        while any(self.busy()) and not self._hurried:
            if self.clock.seconds() >= deadline:
                active, in_flight, queued = self.busy()
                log.warn(
                    "stopping after {timeout} s with {active} requests unanswered "
                    "({in_flight} in flight, {queued} queued)",
                    timeout=self.timeout,
                    active=active,
                    in_flight=in_flight,
                    queued=queued,
                    imml_event="stop-timeout",
                )
                return
            d = Deferred()
            self.clock.callLater(self.poll, d.callback, None)
            await d
        if self._hurried:
            return
        log.info(
            "every request answered after {seconds:.3f} s; stopping",
            seconds=self.clock.seconds() - started,
            imml_event="stop-drained",
        )


class Reloader(service.Service):
    """
    Re-reads the options and the configuration file on C{SIGHUP} and, with
    C{--config}, whenever the file's content changes (looked at every
    C{interval} seconds).
    """

    interval = 2.0

    def __init__(
        self,
        options: Any,
        clock: Any,
        fleet: Any,
        appliers: dict[str, Callable[[Any], None]],
        hosts: Callable[[Any], None],
        signals: bool = True,
    ) -> None:
        """
        @param fleet: whose hosts the reload says joined, left or stayed.
        @param appliers: for each option that can change at run time, what
            applies a new value (through the component that owns it); one
            that may fail returns a L{Deferred}, and on its failure the
            option keeps its old value.
        @param hosts: makes the hosts of the options given the fleet's: the
            configuration's (C{options["hosts"]}, through
            L{imml.sources.HostSources.set}), and the hosts found that they do
            not pin or exclude.
        """
        self.options, self.clock, self.fleet, self.signals = options, clock, fleet, signals
        self.appliers = appliers
        self.set_hosts = hosts
        self._seen = options.get("config-digest")
        self._loop: Optional[LoopingCall] = None
        self._previous = None

    def startService(self) -> None:
        super().startService()
        if self.signals and hasattr(signal, "SIGHUP") and _in_main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._sighup)
        if self.options.get("config"):
            self._loop = LoopingCall(self._poll)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("watching {path} failed", f, path=self.options["config"])
            )

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _sighup(self, signum: int, frame: Any) -> None:
        self.clock.callFromThread(self.reload, "SIGHUP")

    def _poll(self) -> None:
        digest = _digest(self.options["config"])
        if digest != self._seen:
            self._seen = digest
            self.reload("file changed")

    def reload(self, trigger: str) -> bool:
        """
        Apply the options and configuration file as they are now.

        @return: whether the new configuration is in force.
        """
        try:
            new = reparse(self.options)
        except (usage.UsageError, ConfigError) as e:
            log.error(
                "configuration not reloaded ({trigger}): {reason}; the old one stays in force",
                trigger=trigger,
                reason=str(e),
                imml_event="reload-rejected",
            )
            return False
        try:
            self._apply(new, trigger)
        except Exception:
            log.failure("applying the reloaded configuration failed", imml_event="reload-rejected")
            return False
        return True

    def _kept(self, failure: Failure, options: usage.Options, name: str, old: Any) -> None:
        """
        Option C{name} could not take its new value: it keeps C{old}, and
        the next reload tries again.
        """
        value, options[name] = options[name], old
        log.error(
            "--{option} stays {old!r}, not {value!r}: {reason}",
            option=name,
            old=old,
            value=value,
            reason=failure.getErrorMessage(),
            imml_event="reload-kept",
        )

    def _apply(self, new: usage.Options, trigger: str) -> None:
        fleet = self.fleet
        before = {str(b.address) for b in fleet.backends if not b.leaving}
        self.set_hosts(new)
        after = {str(b.address) for b in fleet.backends if not b.leaving}
        changed, restart = [], []
        for name in sorted(_defaults(new)):
            old = self.options[name]
            if name in _HOSTS or new[name] == old:
                continue
            if name in self.appliers:
                result = self.appliers[name](new[name])
                if isinstance(result, Deferred):
                    result.addErrback(self._kept, new, name, old)
                # (A failure known at once has put the old value back.)
                if new[name] != old:
                    changed.append(name)
            else:
                restart.append(name)
        self.options = new
        log.info(
            "configuration reloaded ({trigger}): {joined} joined, {left} leaving, {kept} kept; "
            "changed {changed}; needing a restart {restart}",
            trigger=trigger,
            joined=sorted(after - before),
            left=sorted(before - after),
            kept=sorted(after & before),
            changed=changed,
            restart=restart,
            imml_event="reload",
        )
