"""
One ML host as the balancer sees it: its settings (L{BackendSettings}),
what was observed of its answers (L{Stats}, L{TaskHealth}), the requests on
it (L{Load}), and L{Backend}, which holds all of that and is what
strategies see (L{imml.interfaces.IBackendView}).  Only the L{imml.fleet.Fleet}
changes a backend.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

from attrs import define, field, frozen
from zope.interface import implementer

from .backends import BackendAddress
from .health import Health
from .interfaces import IBackendView
from .limits import Limit
from .tls import TLSSettings

#: Weight of the newest sample in a host's moving averages.
EWMA_ALPHA = 0.2
#: A service-time average older than this many seconds is not trusted: the
#: host may have warmed up (or gone cold) since.
STALE_AFTER = 60.0
#: A host with nothing in flight that answered nothing for this many
#: seconds is tried again: batch work sees it as untried (its estimates
#: unknown, L{imml.dispatch}), and its next answer starts its estimates
#: afresh.  A host once found slow (one answer that met the end of a CPU
#: quota's period) would otherwise get no work, and so no answer to show
#: it is faster.
RETRY_IDLE = 10.0
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
#: How far a search's surprise (one plus how much longer than expected it
#: took, in its unloaded times) lowers a host's, when lower; and the most
#: one search counts for.
SURPRISE_ALPHA = 0.2
MAX_SURPRISE = 20.0
#: Seconds in which what a host's surprise has beyond 1 halves, searches
#: or none: a host that searches shun (one search that met a model load, a
#: host held to a CPU quota) gets one again in a minute or two.
SURPRISE_HALF_LIFE = 30.0


@frozen
class BackendSettings:
    """
    Per-host settings.  The defaults are those of a host named only in
    C{IMML_BACKENDS}.

    @ivar slots: the most requests in flight on the host, or None for no
        fixed limit.
    @ivar tasks: the tasks the host serves, or None for all.
    @ivar name: what the operator calls the host (C{name} in the
        configuration file), for people; None when it has none.
    @ivar tls: how an C{https://} host's connections are verified and
        which client certificate they present; None for a plain host.
    @ivar headers: extra request headers sent to the host with every
        request and health check (for an authenticating proxy in front of
        it), as C{(name, value)} bytes; their values are never shown.
    @ivar reference: its answers are the right ones: the agreement check
        (L{imml.agreement}) compares the others with it.
    """

    weight: float = 1.0
    slots: Optional[int] = None
    tasks: Optional[frozenset] = None
    tier: int = 0
    mac: Optional[str] = None
    name: Optional[str] = None
    tls: Optional[TLSSettings] = None
    headers: tuple[tuple[bytes, bytes], ...] = field(default=(), repr=False)
    reference: bool = False

    @property
    def header_names(self) -> list[str]:
        """
        The names of the extra headers, for people (never their values).
        """
        return [name.decode("ascii") for name, _ in self.headers]


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
    #: When its answers resumed after more than L{MODEL_TTL} seconds
    #: without one (or began): when it last stopped being cold.
    warmed: float = float("-inf")
    _last_busy_answer: Optional[float] = None
    #: One plus how much longer than expected its searches took lately, in
    #: their unloaded times, as of C{surprised} (L{record_search},
    #: L{surprise}).
    search_surprise: float = 1.0
    surprised: float = 0.0

    @property
    def last_sample(self) -> Optional[float]:
        """
        When the last service time was taken, or None before the first.
        """
        return max(self.updated.values()) if self.updated else None

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

    def record_time(self, task: Optional[str], seconds: float, now: float = 0.0, holds_slot: bool = True) -> None:
        """
        Take a sample; C{holds_slot}: the request held one of the host's
        slots (not a search sent past its limit), so it counts in the slot
        time too.  One slow answer (a model loading) moves the average at
        most to three times what it was.
        """
        key = task or "other"
        last = self.last_sample
        if last is None or now - last > MODEL_TTL:
            self.warmed = now
        old = self.service_time.get(key)
        if old is None or now - self.updated.get(key, now) > RETRY_IDLE:
            self.service_time[key] = seconds
        else:
            self.service_time[key] = old + EWMA_ALPHA * (min(seconds, 3 * old + 0.001) - old)
        self.updated[key] = now
        if holds_slot:
            slot = self.slot_time
            if slot is None or last is None or now - last > RETRY_IDLE:
                self.slot_time = seconds
            else:
                self.slot_time = slot + EWMA_ALPHA * (min(seconds, 3 * slot + 0.001) - slot)

    def surprise(self, now: float) -> float:
        """
        One plus how much longer than expected the host's searches took
        lately, in their unloaded times, at C{now}: what is beyond 1 halves
        every L{SURPRISE_HALF_LIFE} seconds.
        """
        value = self.search_surprise
        if value == 1.0 or now <= self.surprised:
            return value
        return 1.0 + (value - 1.0) * 0.5 ** ((now - self.surprised) / SURPRISE_HALF_LIFE)

    def record_search(self, seconds: float, expected: float, alone: float, now: float) -> None:
        """
        A search took C{seconds} where C{expected} seconds were expected,
        and C{alone} seconds is its unloaded time: its surprise is one plus
        the time it took beyond the expected, in unloaded times (a wait
        for a CPU quota's next period adds time, whatever the load), at
        most L{MAX_SURPRISE}.

        The host's surprise, as of C{now} (L{surprise}), rises at once to a
        higher one, and falls by L{SURPRISE_ALPHA} of the way to a lower
        one: a search's goal is its tail, and on a host held to a quota by
        periods only some searches wait for the next period.  An average
        of them lets searches back after a few that did not wait, and the
        next one waits again.
        """
        if alone > 0:
            surprise = min(1.0 + max(seconds - expected, 0.0) / alone, MAX_SURPRISE)
            current = self.surprise(now)
            if surprise > current:
                self.search_surprise = surprise
            else:
                self.search_surprise = current + SURPRISE_ALPHA * (surprise - current)
            self.surprised = now

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
    @ivar owner: whoever sent it (the balancer's job), for the
        subscribers of L{Fleet.when_down}.
    @ivar joined: the requests it joined on the host, when it was sent
        with more in flight than the host was seen to run at once; else
        None.
    """

    backend: Backend
    task: Optional[str]
    sent: float
    in_flight: int
    starts: Optional[float]
    owner: object = None
    joined: Optional[frozenset] = None
    #: The how-manieth request started on the host it is.
    number: int = 0
    #: The host's clock of shares when it was sent (L{imml.limits.Limit.shares}).
    shares: Optional[tuple] = None


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
    #: When it last began or stopped draining.
    drain_changed: float = float("-inf")
    #: Removed from the configuration: leaves once its last request is answered.
    leaving: bool = False
    stats: Stats = field(factory=Stats)
    limiter: Limit = field()
    tasks: dict = field(factory=dict)
    loads: set[Load] = field(factory=set)
    woken: Optional[float] = None
    #: When the last request was started on it.
    last_start: float = float("-inf")
    #: Requests expected to wait inside the host for one of its slots.
    queued_inside: int = 0
    #: Requests started on it so far.
    started: int = 0
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
    def label(self) -> str:
        """
        The host for people: C{NAME (ADDRESS)} when it has a name (a DNS
        pool's hosts have theirs), else its address.
        """
        name = self.settings.name
        return f"{name} ({self.name})" if name else self.name

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
    def side_by_side(self) -> int:
        return self.limiter.side_by_side

    @property
    def search_surprise(self) -> float:
        return self.stats.surprise(self._now())

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
        last = self.stats.last_sample
        return self.health.up and (last is None or self._now() - last > MODEL_TTL)

    def untried(self) -> bool:
        """
        Whether the host is to be tried again: nothing in flight, and no
        answer for L{RETRY_IDLE} seconds (it has answered before).
        """
        if self.in_flight:
            return False
        last = self.stats.last_sample
        return last is not None and self._now() - last > RETRY_IDLE

    def stretch(self, in_flight: int) -> float:
        return self.limiter.stretch(in_flight)

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
        to be answered: each one's recent service time for its task,
        stretched by the others in flight (L{stretch}), or else the host's
        slot time, less how long it has been served (those waiting inside
        the host for a slot are not first); 0 when one is overdue; None when
        none is in flight or nothing is known.
        """
        # those waiting inside the host are not the first to end
        served = [load for load in self.loads if load.starts is not None]
        if not served:
            return None
        now = self._now()
        stretch = self.limiter.stretch(len(served))
        # the requests of a task, most often all of them, are expected to
        # take as long: each task's time is looked up once
        expected: dict = {}
        soonest = None
        for load in served:
            task = load.task
            if task in expected:
                took = expected[task]
            else:
                alone = self.service_time(task)
                took = expected[task] = alone * stretch if alone is not None else self.stats.slot_time
            if took is not None:
                end = load.starts + took
                if soonest is None or end < soonest:
                    soonest = end
        return None if soonest is None else max(soonest - now, 0.0)

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
