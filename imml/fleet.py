"""
The fleet: every ML host the balancer knows, and what it has observed of
each (health, requests in flight, service times, errors).

L{Backend} provides L{imml.interfaces.IBackendView}, the read-only face that
strategies see.  Only the balancer's own machinery changes a backend's state,
through L{Fleet}, which logs every health transition and tells its observers
(the dispatcher) that the fleet changed.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Optional

from attrs import define, field, frozen
from twisted.logger import Logger
from zope.interface import implementer

from .backends import BackendAddress
from .health import DOWN, UP, Health, Transition
from .limits import Limit
from .interfaces import IBackendView

#: Weight of the newest sample in a host's moving averages.
EWMA_ALPHA = 0.2
#: A service-time average older than this many seconds is not trusted: the
#: host may have warmed up (or gone cold) since.
STALE_AFTER = 60.0
#: Immich ML unloads a model after this many idle seconds (its default
#: MACHINE_LEARNING_MODEL_TTL): a host that answered nothing for longer is
#: cold, and its next answer will be slow.
MODEL_TTL = 300.0
#: A task that failed on a host but then succeeded elsewhere, this many times
#: in a row, is not sent to that host for a while.
TASK_FALL = 3
#: How long, at first, in seconds; doubled each time, up to TASK_MAX_BLOCK.
TASK_BLOCK = 30.0
TASK_MAX_BLOCK = 600.0


@frozen
class BackendSettings:
    """
    Per-host settings.  The defaults are those of a host named only in
    C{IMML_BACKENDS}.

    @ivar slots: the most requests in flight on the host, or None for no
        fixed limit.
    @ivar tasks: the tasks the host serves, or None for all.
    """

    weight: float = 1.0
    slots: Optional[int] = None
    tasks: Optional[frozenset] = None
    tier: int = 0
    mac: Optional[str] = None


@define
class Stats:
    """
    Counters and moving averages of one host's answers.

    @ivar service_time: per task, a moving average of service times, in
        seconds.
    @ivar updated: per task, when the average last took a sample.
    @ivar error_rate: a moving average of failures (0: none, 1: all).
    """

    served: int = 0
    errors: Counter = field(factory=Counter)
    service_time: dict = field(factory=dict)
    updated: dict = field(factory=dict)
    error_rate: float = 0.0
    #: A moving average of the service times of all tasks together: how long
    #: a request holds a slot on this host.
    slot_time: Optional[float] = None
    #: A moving average of the time between two answers while the host is
    #: kept at its limit: its throughput is the inverse.
    gap: Optional[float] = None
    _last_busy_answer: Optional[float] = None

    @property
    def throughput(self) -> Optional[float]:
        return 1.0 / self.gap if self.gap else None

    def record_answer(self, now: float, busy: bool) -> None:
        """
        An answer came at C{now}; C{busy}: the host was at its limit.
        """
        if not busy:
            self._last_busy_answer = None
            return
        last, self._last_busy_answer = self._last_busy_answer, now
        if last is not None and now >= last:  # (not across a clock set back)
            gap = now - last
            self.gap = gap if self.gap is None else self.gap + EWMA_ALPHA * (gap - self.gap)

    def record_time(self, task: Optional[str], seconds: float, now: float = 0.0) -> None:
        """
        Take a sample.  One slow answer (a model loading) moves the average
        at most to three times what it was.
        """
        key = task or "other"
        old = self.service_time.get(key)
        if old is None:
            self.service_time[key] = seconds
        else:
            self.service_time[key] = old + EWMA_ALPHA * (min(seconds, 3 * old + 0.001) - old)
        self.updated[key] = now
        slot = self.slot_time
        self.slot_time = seconds if slot is None else slot + EWMA_ALPHA * (min(seconds, 3 * slot + 0.001) - slot)

    def record_outcome(self, failed: bool) -> None:
        self.error_rate += EWMA_ALPHA * ((1.0 if failed else 0.0) - self.error_rate)


@define
class TaskHealth:
    """
    Whether one task works on one host: failures of that task that another
    host then answered, and the block they earned.
    """

    failures: int = 0
    blocked_until: float = 0.0
    block: float = TASK_BLOCK


@define(eq=False)
class Load:
    """
    One request on one host, as the fleet counts it (L{Fleet.start}).

    @ivar task: the request's task.
    @ivar sent: when it was sent.
    @ivar in_flight: requests on the host once it was sent, itself included.
    @ivar starts: when the host started serving it, or None while it waits
        inside the host for a slot (sent past the host's proven limit).
    @ivar owner: whoever sent it (the balancer's attempt), for the
        subscribers of L{Fleet.when_down}.
    """

    backend: Backend
    task: Optional[str]
    sent: float
    in_flight: int
    starts: Optional[float]
    owner: object = None


@implementer(IBackendView)
@define(eq=False)
class Backend:
    """
    One ML host and what the balancer has observed of it.

    Only the L{Fleet} changes it; strategies and the status page read it.

    @ivar loads: the requests now on this host (L{Fleet.start}).
    @ivar woken: when a Wake-on-LAN packet was last sent to it, or None.
    """

    address: BackendAddress
    index: int
    settings: BackendSettings = field(factory=BackendSettings)
    health: Health = field(factory=Health)
    in_flight: int = 0
    draining: bool = False
    #: Removed from the configuration: leaves once its last request is answered.
    leaving: bool = False
    stats: Stats = field(factory=Stats)
    limiter: Limit = field()
    tasks: dict = field(factory=dict)
    loads: set[Load] = field(factory=set)
    woken: Optional[float] = None
    #: Requests expected to wait inside the host for one of its slots.
    queued_inside: int = 0
    #: The time now, as the fleet's clock says (for staleness).
    _now: Callable[[], float] = field(default=lambda: 0.0, repr=False)

    #: C{host:port}, as logs, records and headers name the host.
    name: str = field(init=False)
    #: The same, as bytes, for the C{X-Imml-Backend} header.
    header: bytes = field(init=False, repr=False)

    @limiter.default
    def _limiter(self) -> Limit:
        return Limit(self.settings.slots)

    def __attrs_post_init__(self) -> None:
        self.name = str(self.address)
        self.header = self.name.encode("ascii")

    @property
    def weight(self) -> float:
        return self.settings.weight

    @property
    def tier(self) -> int:
        return self.settings.tier

    @property
    def limit(self) -> int:
        return self.limiter.value

    @property
    def proven_limit(self) -> int:
        return self.limiter.proven

    @property
    def up(self) -> bool:
        return self.health.up

    @property
    def waking(self) -> bool:
        return self.woken is not None and not self.health.up

    @property
    def error_rate(self) -> float:
        return self.stats.error_rate

    @property
    def cold(self) -> bool:
        """
        Up, but no answer for longer than Immich ML keeps its models loaded
        (or none yet): the next request pays for loading a model.
        """
        updated = self.stats.updated
        return self.health.up and (not updated or self._now() - max(updated.values()) > MODEL_TTL)

    def has_free_slot(self) -> bool:
        return self.in_flight < self.limiter.value

    def service_time(self, task: Optional[str]) -> Optional[float]:
        key = task or "other"
        updated = self.stats.updated.get(key)
        if updated is None or self._now() - updated > STALE_AFTER:
            return None
        return self.stats.service_time.get(key)

    def next_answer_in(self) -> Optional[float]:
        """
        Seconds until the first request in flight on the host is expected
        to be answered: each one's recent service time for its task (or the
        host's slot time), less how long it has been served (those waiting
        inside the host for a slot are not first); 0 when one is overdue;
        None when none is in flight or nothing is known.
        """
        soonest = None
        if self.loads:
            now = self._now()
            for load in self.loads:
                if load.starts is None:
                    continue  # waiting inside the host: not the first to end
                expected = self.service_time(load.task) or self.stats.slot_time
                if expected is not None:
                    left = load.starts + expected - now
                    if soonest is None or left < soonest:
                        soonest = left
        return None if soonest is None else max(soonest, 0.0)

    @property
    def slot_time(self) -> Optional[float]:
        return self.stats.slot_time

    @property
    def throughput(self) -> Optional[float]:
        return self.stats.throughput

    def serves(self, task: Optional[str]) -> bool:
        tasks = self.settings.tasks
        return tasks is None or task is None or task in tasks

    def task_blocked(self, task: Optional[str], now: float) -> bool:
        health = self.tasks.get(task)
        return health is not None and health.blocked_until > now

    def usable_for(self, task: Optional[str]) -> bool:
        """
        Whether the host may be given a new request of C{task}.
        """
        return self.health.up and not self.draining and self.serves(task)

    def __str__(self) -> str:
        return self.name


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
    _down: list[Callable[[Load], None]] = field(factory=list)

    @classmethod
    def from_addresses(
        cls,
        addresses: Iterable[BackendAddress],
        clock,
        rise: int = 2,
        fall: int = 3,
        settings: Callable[[BackendAddress], BackendSettings] = lambda a: BackendSettings(),
    ) -> "Fleet":
        fleet = cls([], clock, rise, fall)
        for address in addresses:
            fleet.backends.append(fleet._new(address, len(fleet.backends), settings(address)))
        return fleet

    def _new(self, address: BackendAddress, index: int, settings: BackendSettings) -> Backend:
        health = Health(rise=self.rise, fall=self.fall, since=self.clock.seconds())
        return Backend(address, index, settings, health, now=self.clock.seconds)

    def add(self, address: BackendAddress, settings: BackendSettings = BackendSettings()) -> Backend:
        """
        Add a host at the end of the list (it is unknown until checked).
        """
        backend = self._new(address, len(self.backends), settings)
        self.backends.append(backend)
        self.log.info("ML host {backend} joins", backend=str(address), imml_event="join")
        self.changed()
        return backend

    def observe(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback()} whenever a host may have become usable.
        """
        self._observers.append(callback)

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

    def changed(self) -> None:
        for callback in list(self._observers):
            callback()

    @property
    def any_up(self) -> bool:
        return any(b.health.up and not b.draining for b in self.backends)

    def _transition(self, backend: Backend, transition: Optional[Transition]) -> None:
        if transition is None:
            return
        self.log.info(
            "ML host {backend} is {new} (was {old}): {reason}",
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
        self._transition(backend, backend.health.check_passed(self.clock.seconds()))

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
            self.log.info("ML host {backend} is draining: {why}", backend=str(backend), why=why, imml_event="drain")
            self.changed()

    def enable(self, backend: Backend) -> None:
        """
        Give C{backend} requests again after L{drain}.
        """
        if backend.draining and not backend.leaving:
            backend.draining = False
            self.log.info("ML host {backend} takes requests again", backend=str(backend), imml_event="enable")
            self.changed()

    def reconfigure(self, hosts: Iterable[tuple[BackendAddress, BackendSettings]]) -> None:
        """
        Make the fleet the hosts listed, in that order.  Hosts already known
        keep their state and statistics and take the new settings; new hosts
        join (unknown until checked); hosts no longer listed drain and leave
        once their last request is answered.
        """
        hosts = list(hosts)
        wanted = {address: settings for address, settings in hosts}
        known = {b.address: b for b in self.backends}
        backends = []
        for index, (address, settings) in enumerate(hosts):
            backend = known.get(address)
            if backend is None:
                backend = self._new(address, index, settings)
                self.log.info("ML host {backend} joins", backend=str(address), imml_event="join")
            else:
                backend.index, backend.settings = index, settings
                backend.limiter.slots = settings.slots
                if backend.leaving:
                    backend.leaving = backend.draining = False
            backends.append(backend)
        for backend in self.backends:
            if backend.address not in wanted:
                backend.leaving = True
                backend.index = len(backends)
                self.drain(backend, "removed from the configuration")
                if backend.in_flight:
                    backends.append(backend)
                else:
                    self.log.info("ML host {backend} leaves", backend=str(backend), imml_event="leave")
        self.backends[:] = backends
        self.changed()

    def start(self, backend: Backend, task: Optional[str], owner: object = None) -> Load:
        """
        A request of C{task} is sent to C{backend}: it counts in the host's
        C{in_flight} until L{finish}.  It starts being served at once unless
        the host already has its proven limit of requests (a learned limit
        probing for more): then it waits inside the host until one ends.
        """
        backend.in_flight += 1
        now = self.clock.seconds()
        starts: Optional[float] = now
        if backend.in_flight > backend.limiter.proven:
            starts = None
            backend.queued_inside += 1
        load = Load(backend, task, now, backend.in_flight, starts, owner)
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
        backend.loads.remove(load)
        backend.in_flight -= 1
        if load.starts is None:
            backend.queued_inside -= 1
        elif backend.queued_inside:
            waiting = min((w for w in backend.loads if w.starts is None), key=lambda w: w.sent)
            waiting.starts = self.clock.seconds()
            backend.queued_inside -= 1
        if backend.leaving and not backend.in_flight and backend in self.backends:
            self.backends.remove(backend)
            self.log.info("ML host {backend} leaves", backend=str(backend), imml_event="leave")
        task = load.task
        if error is not None:
            backend.stats.errors[error] += 1
            backend.stats.record_outcome(failed=True)
            backend.limiter.failed()
        elif seconds is not None:
            backend.stats.served += 1
            backend.stats.record_outcome(failed=False)
            backend.stats.record_answer(self.clock.seconds(), busy)
            # The service time is averaged over fair samples only: an answer
            # that queued inside the host (the wait is in the throughput
            # already) or waited for a model to load says little of it; nor
            # does a time measured across a clock set back (negative).
            if seconds >= 0 and (
                backend.limiter.answered(task, seconds, load.in_flight)
                or (task or "other") not in backend.stats.service_time
            ):
                backend.stats.record_time(task, seconds, self.clock.seconds())
        self.changed()

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
                "ML host {backend} fails {task} requests that other hosts answer; "
                "sending it none for {seconds:g} s",
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
