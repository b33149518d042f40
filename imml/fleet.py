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
from .health import Health, Transition
from .interfaces import IBackendView

#: Weight of the newest sample in a host's moving average of service time.
EWMA_ALPHA = 0.2


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
    """

    served: int = 0
    errors: Counter = field(factory=Counter)
    service_time: dict = field(factory=dict)

    def record_time(self, task: Optional[str], seconds: float) -> None:
        key = task or "other"
        old = self.service_time.get(key)
        self.service_time[key] = seconds if old is None else old + EWMA_ALPHA * (seconds - old)


@implementer(IBackendView)
@define(eq=False)
class Backend:
    """
    One ML host and what the balancer has observed of it.
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

    @property
    def weight(self) -> float:
        return self.settings.weight

    @property
    def tier(self) -> int:
        return self.settings.tier

    @property
    def limit(self) -> Optional[int]:
        return self.settings.slots

    @property
    def up(self) -> bool:
        return self.health.up

    def has_free_slot(self) -> bool:
        limit = self.limit
        return limit is None or self.in_flight < limit

    def service_time(self, task: Optional[str]) -> Optional[float]:
        return self.stats.service_time.get(task or "other")

    def serves(self, task: Optional[str]) -> bool:
        tasks = self.settings.tasks
        return tasks is None or task is None or task in tasks

    def usable_for(self, task: Optional[str]) -> bool:
        """
        Whether the host may be given a new request of C{task}.
        """
        return self.health.up and not self.draining and self.serves(task)

    def __str__(self) -> str:
        return str(self.address)


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
    _observers: list = field(factory=list)

    @classmethod
    def from_addresses(
        cls,
        addresses: Iterable[BackendAddress],
        clock,
        rise: int = 2,
        fall: int = 3,
        settings: Callable[[BackendAddress], BackendSettings] = lambda a: BackendSettings(),
    ) -> "Fleet":
        backends = [
            Backend(address, index, settings(address), Health(rise=rise, fall=fall, since=clock.seconds()))
            for index, address in enumerate(addresses)
        ]
        return cls(backends, clock, rise, fall)

    def observe(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback()} whenever a host may have become usable.
        """
        self._observers.append(callback)

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
        now = self.clock.seconds()
        backends = []
        for index, (address, settings) in enumerate(hosts):
            backend = known.get(address)
            if backend is None:
                backend = Backend(address, index, settings, Health(rise=self.rise, fall=self.fall, since=now))
                self.log.info("ML host {backend} joins", backend=str(address), imml_event="join")
            else:
                backend.index, backend.settings = index, settings
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

    def started(self, backend: Backend) -> None:
        backend.in_flight += 1

    def finished(self, backend: Backend, task: Optional[str], seconds: Optional[float], error: Optional[str] = None) -> None:
        """
        A request on C{backend} is over: C{seconds} is its service time when
        the host answered it, C{error} names what went wrong otherwise.
        """
        backend.in_flight -= 1
        if backend.leaving and not backend.in_flight and backend in self.backends:
            self.backends.remove(backend)
            self.log.info("ML host {backend} leaves", backend=str(backend), imml_event="leave")
        if error is not None:
            backend.stats.errors[error] += 1
        elif seconds is not None:
            backend.stats.served += 1
            backend.stats.record_time(task, seconds)
        self.changed()
