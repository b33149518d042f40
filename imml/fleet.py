"""
The fleet: every ML host the balancer knows (L{imml.host.Backend}), and the
one place their state changes.

L{Fleet} logs every health transition, counts each request on a host from
L{Fleet.start} to L{Fleet.finish}, learns from its answers, and tells its
observers (the dispatcher) that the fleet changed and its subscribers (the
forwarder) that a host went down with requests on it.

Hosts come from host sources: the configuration (L{CONFIG}), each DNS pool,
whatever else finds hosts.  Each source offers the whole list of hosts it
finds now (L{Fleet.offer}); the fleet is every source's hosts, in the order
the sources first offered (or as L{Fleet.order} puts them), a host offered
by two sources counted once (the first source's settings).  A host that
joins later than the fleet was made starts slow; one that no source offers
any more drains and leaves.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from attrs import define, field
from twisted.logger import Logger

from .backends import BackendAddress
from .classify import INTERACTIVE
from .health import DOWN, UP, Health, Transition
from .host import TASK_BLOCK, TASK_FALL, TASK_MAX_BLOCK, Backend, BackendSettings, Load, TaskHealth

__all__ = ["CONFIG", "Backend", "BackendSettings", "Fleet", "Load"]

#: The host source of the configuration: C{--backends}, C{IMML_BACKENDS}
#: or the file's C{[[hosts]]} (and the hosts added by L{Fleet.add}).
CONFIG = "config"

Hosts = Iterable[tuple[BackendAddress, BackendSettings]]


@define(eq=False)
class Fleet:
    """
    The ordered list of hosts, and the one place their state changes.
    """

    backends: list[Backend]
    clock: object
    rise: int = 2
    fall: int = 3
    log: Logger = field(factory=Logger)
    _observers: list[Callable[[], None]] = field(factory=list)
    _host_observers: list[Callable[[], None]] = field(factory=list)
    _down: list[Callable[[Load], None]] = field(factory=list)
    #: Per host source, the hosts it offers, in the order sources first offered.
    _offers: dict[str, list[tuple[BackendAddress, BackendSettings]]] = field(factory=dict)
    #: Per source, why the hosts it no longer offers leave (None: it no longer lists them).
    _whys: dict[str, Optional[str]] = field(factory=dict)
    #: Which source each host was last taken from.
    _sources: dict[BackendAddress, str] = field(factory=dict)

    @classmethod
    def from_addresses(
        cls,
        addresses: Iterable[BackendAddress],
        clock: Any,
        rise: int = 2,
        fall: int = 3,
        settings: Callable[[BackendAddress], BackendSettings] = lambda a: BackendSettings(),
    ) -> "Fleet":
        fleet = cls([], clock, rise, fall)
        offered = fleet._offers[CONFIG] = []
        for address in addresses:
            offered.append((address, settings(address)))
            fleet.backends.append(fleet._new(address, len(fleet.backends), settings(address)))
        return fleet

    def _new(self, address: BackendAddress, index: int, settings: BackendSettings) -> Backend:
        health = Health(rise=self.rise, fall=self.fall, since=self.clock.seconds())
        return Backend(address, index, settings, health, now=self.clock.seconds)

    def add(self, address: BackendAddress, settings: Optional[BackendSettings] = None) -> Backend:
        """
        Add a host to the configuration's (it is unknown until checked).
        """
        self.offer(CONFIG, [*self._offers.get(CONFIG, []), (address, settings or BackendSettings())])
        return next(b for b in self.backends if b.address == address)

    def observe(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback()} whenever a host may have become usable: on every
        change, a request's end (a slot freed) included.
        """
        self._observers.append(callback)

    def when_hosts_change(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback()} whenever the hosts change: one joins or leaves,
        its health, draining or settings change; not when a request starts
        or ends on it (that is every request: see L{observe}).
        """
        self._host_observers.append(callback)

    def when_down(self, callback: Callable[[Load], None]) -> None:
        """
        Call C{callback(load)} for each request on a host when it goes down
        (it stalled, or went away): its sender may try elsewhere at once.
        """
        self._down.append(callback)

    def set_thresholds(self, rise: int, fall: int) -> None:
        """
        Checks in a row that bring a host up (C{rise}) or take it down
        (C{fall}), for every host now and to come.
        """
        self.rise, self.fall = rise, fall
        for backend in self.backends:
            backend.health.rise, backend.health.fall = rise, fall

    def woken(self, backend: Backend) -> None:
        """
        A Wake-on-LAN packet was sent to C{backend}.
        """
        backend.woken = self.clock.seconds()

    def changed(self, hosts: bool = True) -> None:
        """
        Tell the observers the fleet changed; and those of the hosts
        (L{when_hosts_change}) too unless no host changed (C{hosts} false:
        a request's end, an agreement verdict).
        """
        for callback in list(self._observers):
            callback()
        if hosts:
            for callback in list(self._host_observers):
                callback()

    @property
    def any_up(self) -> bool:
        return any(b.health.up and not b.draining for b in self.backends)

    def _transition(self, backend: Backend, transition: Optional[Transition]) -> None:
        if transition is None:
            return
        self.log.info(
            "ML host {label} is {new} (was {old}): {reason}",
            label=backend.label,
            backend=str(backend.address),
            old=transition.old,
            new=transition.new,
            reason=transition.reason,
            imml_event="health",
        )
        if transition.new == UP:
            backend.woken = None
            if transition.old == DOWN:
                backend.limiter.restart()
        elif transition.new == DOWN:
            # Requests on a host that stalled or went away go elsewhere now,
            # rather than wait out the response timeout.
            for load in list(backend.loads):
                for callback in list(self._down):
                    callback(load)
        self.changed()

    def check_passed(self, backend: Backend) -> None:
        """
        C{backend} passed a health check.  It comes up after C{rise} passes
        in a row, or after this one when no other host is up (requests
        would only wait longer).
        """
        alone = not any(b.health.up and not b.draining for b in self.backends if b is not backend)
        self._transition(backend, backend.health.check_passed(self.clock.seconds(), alone))

    def check_failed(self, backend: Backend, reason: str) -> None:
        self._transition(backend, backend.health.check_failed(self.clock.seconds(), reason))

    def request_failed(self, backend: Backend, reason: str) -> None:
        """
        A real request could not reach C{backend}: it is down at once.
        """
        self._transition(backend, backend.health.request_failed(self.clock.seconds(), reason))

    def drain(self, backend: Backend, why: str = "asked to") -> None:
        """
        Give C{backend} no new requests; those in flight finish.
        """
        if not backend.draining:
            backend.draining = True
            backend.drain_changed = self.clock.seconds()
            self._tell(backend, "is draining: {why}", "drain", why=why)
            self.changed()

    def enable(self, backend: Backend) -> None:
        """
        Give C{backend} requests again after L{drain}.
        """
        if backend.draining and not backend.leaving:
            backend.draining = False
            backend.drain_changed = self.clock.seconds()
            self._tell(backend, "takes requests again", "enable")
            self.changed()

    def reconfigure(self, hosts: Hosts) -> None:
        """
        Make the configuration's hosts those listed, in that order (see
        L{offer}).
        """
        self.offer(CONFIG, hosts)

    def offer(self, source: str, hosts: Hosts, why: Optional[str] = None) -> None:
        """
        Host source C{source} (its name: L{CONFIG}, C{dns+NAME:PORT}, ...)
        now finds the hosts listed, in that order.  Hosts already known keep
        their state and statistics and take the new settings; new hosts
        join (unknown until checked, starting slow); hosts no source offers
        any more drain and leave once their last request is answered,
        saying C{why} (by default, that C{source} no longer lists them).
        """
        self._offers[source] = list(hosts)
        self._whys[source] = why
        self._merge()

    def order(self, sources: Iterable[str]) -> None:
        """
        Put the hosts of C{sources} first, in that order, then the other
        sources' (as they first offered); a source that has offered nothing
        yet takes its place now, for the hosts it will offer.
        """
        offers = {source: self._offers.get(source, []) for source in sources}
        offers.update(self._offers)
        if list(offers) != list(self._offers):
            self._offers = offers
            self._merge()

    def withdraw(self, source: str) -> None:
        """
        Host source C{source} is gone: the hosts only it offered drain and
        leave.
        """
        if self._offers.pop(source, None) is not None:
            self._merge()

    def _merge(self) -> None:
        wanted: dict[BackendAddress, tuple[str, BackendSettings]] = {}
        for source, offered in self._offers.items():
            for address, settings in offered:
                wanted.setdefault(address, (source, settings))
        known = {b.address: b for b in self.backends}
        backends = []
        for index, (address, (source, settings)) in enumerate(wanted.items()):
            backend = known.get(address)
            if backend is None:
                backend = self._new(address, index, settings)
                backend.limiter.restart()
                self._tell(backend, "joins ({source})", "join", source=source)
            else:
                backend.index, backend.settings = index, settings
                backend.limiter.slots = settings.slots
                if backend.leaving:
                    backend.leaving = backend.draining = False
                    backend.drain_changed = self.clock.seconds()
            backends.append(backend)
        for backend in self.backends:
            if backend.address not in wanted and not backend.leaving:
                backend.leaving = True
                source = self._sources.get(backend.address, CONFIG)
                why = self._whys.get(source) or (
                    "removed from the configuration" if source == CONFIG else f"{source} no longer lists it"
                )
                self.drain(backend, why)
            if backend.leaving:
                backend.index = len(backends)
                if backend.in_flight:
                    backends.append(backend)
                else:
                    self._leaves(backend)
        self.backends[:] = backends
        self._sources = {address: source for address, (source, _) in wanted.items()}
        self.changed()

    def _leaves(self, backend: Backend) -> None:
        self._tell(backend, "leaves", "leave")

    def _tell(self, backend: Backend, what: str, event: str, **fields: Any) -> None:
        """
        Log C{event} of C{backend}: C{what} (a template) follows its label
        (C{NAME (ADDRESS)}); the event's C{backend} is its address.
        """
        self.log.info("ML host {label} " + what, label=backend.label, backend=str(backend), imml_event=event, **fields)

    def start(self, backend: Backend, task: Optional[str], owner: object = None) -> Load:
        """
        A request of C{task} is sent to C{backend}: it counts in the host's
        C{in_flight} until L{finish}.  It starts being served at once unless
        the host already has its proven limit of requests (a learned limit
        probing for more, a search past the limit, batch work in the room
        past a limit), and more than it was seen to run at once: then it
        waits inside the host until one ends.
        """
        backend.in_flight += 1
        now = backend.last_start = self.clock.seconds()
        starts: Optional[float] = now
        limiter = backend.limiter
        limiter.holds(backend.in_flight, now)
        if backend.in_flight > max(limiter.proven, limiter.side_by_side):
            starts = None
            backend.queued_inside += 1
        joined = frozenset(backend.loads) if backend.in_flight > limiter.side_by_side else None
        backend.started += 1
        shares = limiter.shares() if limiter.slots is None else None  # (slots measure nothing)
        load = Load(backend, task, now, backend.in_flight, starts, owner, joined, backend.started, shares)
        backend.loads.add(load)
        return load

    def finish(self, load: Load, seconds: Optional[float] = None, error: Optional[str] = None) -> None:
        """
        A request is over: C{seconds} is its service time when the host
        answered it, C{error} names what went wrong otherwise (both None:
        the balancer gave up on it).  Once a request that was being served
        ends, the one that waited longest inside the host is served.
        """
        backend = load.backend
        if load not in backend.loads:
            return
        busy = backend.in_flight >= backend.limit
        over = backend.in_flight > backend.limit
        backend.loads.remove(load)
        backend.in_flight -= 1
        backend.limiter.holds(backend.in_flight, self.clock.seconds())
        if load.starts is None:
            backend.queued_inside -= 1
        elif backend.queued_inside:
            waiting = min((w for w in backend.loads if w.starts is None), key=lambda w: w.sent)
            waiting.starts = self.clock.seconds()
            backend.queued_inside -= 1
        left = backend.leaving and not backend.in_flight and backend in self.backends
        if left:
            self.backends.remove(backend)
            self._leaves(backend)
        task = load.task
        if error is not None:
            backend.stats.errors[error] += 1
            backend.stats.record_outcome(failed=True)
            backend.limiter.failed()
        elif seconds is not None:
            if load.joined is not None and load.joined <= backend.loads:
                # answered before every request it joined: it ran at once
                backend.limiter.ran_at_once(load.in_flight)
            if task == INTERACTIVE and seconds >= 0:
                alone = backend.service_time(task)
                if alone is not None:
                    backend.stats.record_search(
                        seconds, alone * backend.stretch(load.in_flight), alone, self.clock.seconds()
                    )
            backend.stats.served += 1
            backend.stats.record_outcome(failed=False)
            # a search sent past the limit (the room a search may take)
            # frees no slot of it: its answer says nothing of how often
            # slots free up, nor how long one is held
            holds_slot = load.in_flight <= backend.limit
            if holds_slot:
                backend.stats.record_answer(self.clock.seconds(), busy)
            # The service time is averaged over what each answer says of
            # the host's unloaded time (Limit.answered): its own time, or
            # its time beside others over the stretch measured at their
            # number; nothing when it waited for a model to load or was
            # slowed where nothing is measured, nor when it was measured
            # across a clock set back (negative).
            if seconds >= 0:
                now = self.clock.seconds()
                alone = load.in_flight == 1 and load.number == backend.started
                unloaded = backend.limiter.answered(task, seconds, load.in_flight, now, busy, alone, over, load.shares)
                if unloaded == seconds or (task or "other") not in backend.stats.service_time:
                    backend.stats.record_time(task, seconds, now, holds_slot)
                elif unloaded is not None:
                    # beside others: the time it would have taken alone,
                    # which says nothing of how long it held its slot
                    backend.stats.record_time(task, unloaded, now, holds_slot=False)
        self.changed(hosts=left)

    def task_failed(self, backend: Backend, task: Optional[str]) -> None:
        """
        C{backend} failed a request of C{task} that another host then
        answered.  After L{TASK_FALL} such failures in a row the task is not
        sent to that host for a while (longer each time), as long as another
        host serves it.
        """
        health = backend.tasks.setdefault(task, TaskHealth())
        health.failures += 1
        if health.failures >= TASK_FALL:
            now = self.clock.seconds()
            health.blocked_until = now + health.block
            self.log.warn(
                "ML host {backend} fails {task} requests that other hosts answer; sending it none for {seconds:g} s",
                backend=str(backend),
                task=task,
                seconds=health.block,
                imml_event="task-blocked",
            )
            health.block = min(health.block * 2, TASK_MAX_BLOCK)
            health.failures = 0

    def task_succeeded(self, backend: Backend, task: Optional[str]) -> None:
        health = backend.tasks.get(task)
        if health is not None:
            health.failures = 0
            if health.blocked_until <= self.clock.seconds():
                health.block = TASK_BLOCK
