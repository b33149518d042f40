"""
The dispatcher: binds each request to a host, late.

A request asks the dispatcher for a host (L{Dispatcher.acquire}).  When the
strategy finds one with a free slot, the request has it at once.  Otherwise
(every eligible host is busy, or none is up) the request waits in one central
queue, interactive work ahead of batch work, and is bound to a host only when
the fleet changes: a slot frees up or a host comes back.  A wait is bounded
by a timeout and the queue by a length; past them the request is refused with
L{NoBackendAvailable}, whose message says why.

While people search (an interactive request came in the last
L{Dispatcher.pace_while_searching} seconds), batch work is paced: it is
started on a host no sooner than half the host's slot interval (its slot time
over its limit) after the previous start there.  A host's slots then end in
turn rather than together, so a search waits for at most about half a batch
request's service time for a slot, not a whole one.  The cost is a few
milliseconds of one slot, once, when two slots' requests would otherwise
start together.

Where batch requests are long (a heavy model: over L{LONG_BATCH} seconds
each at the host's limit), pacing is not enough: while people search, batch
work leaves one of its slots free on the host searches are quickest on (a
learned limit of two or more), so that a search does not wait behind a
batch request there, for a slot or for a thread of the host's pool.  Nor
does batch work there go past what the host was seen to run at once, where
its learned limit grew past that: the request more would wait inside the
host, and a search behind it.  Configured slots are kept as they are.

While nobody searches, batch work sees a host's room past its learned
limit as part of the limit (L{imml.limits.Limit.room}: a host seen to run
one more than its limit at once, or its limit of two or more, where one
request more did not clearly less work; more than one on a real host seen
to run all of them at once, or all but the last).  A request there would
otherwise wait in the balancer, or go to a slower host: in the host it
starts as soon as the host can take it, keeping the host busier; and
waiting for a host in its room is waiting for its next answer.  The
strategy weighs the room as it weighs any slot.  (A search that comes
then may find the room's requests
there, ahead of it, once, before the room is left to searches: so where a
host's batch requests are long, over L{LONG_BATCH}, its room is one
request.)

A search may also go past a learned limit, by one request, or by one past
the batch requests the host runs in its room, up to the most it was seen
to run at once: on a real host it then runs beside the batch requests
there, sharing the processor, rather than waiting for one of them to end.
The strategy sees that room (a view of the host with one slot more) and
weighs it: on a host that queues inside, the search would wait there as
long as in the balancer's queue.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections import deque
from typing import Any, Callable, Collection, Optional, Protocol

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from .classify import INTERACTIVE, RequestInfo
from .fleet import Backend, Fleet, Load
from .interfaces import IBackendView, IStrategy

#: Batch starts on a host are at least this share of its slot interval apart
#: while people search.
PACE = 0.5
#: Batch requests that take longer than this many seconds on a host (at its
#: limit) leave one of its slots free for searches while people search.
LONG_BATCH = 0.1


@implementer(IBackendView)
class _Slots:
    """
    A host as one request sees it: with another limit (batch work while
    people search: one slot less, or what the host was seen to run at
    once; a search: room for one request past the host's proven limit)
    and the proven limit that goes with it.
    """

    __slots__ = ("backend", "limit", "proven_limit")

    def __init__(self, backend: Backend, limit: int, proven: int) -> None:
        self.backend, self.limit, self.proven_limit = backend, limit, proven

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def has_free_slot(self) -> bool:
        return self.backend.in_flight < self.limit

    def __str__(self) -> str:
        return str(self.backend)


@implementer(IBackendView)
class _Untried:
    """
    An idle host that answered nothing for a while (L{Backend.untried}), as
    batch work sees it: its estimates unknown, so that a strategy that
    goes by them tries it again rather than shun it for good.
    """

    __slots__ = ("backend",)

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def service_time(self, task: Optional[str]) -> None:
        return None

    @property
    def slot_time(self) -> None:
        return None

    def __str__(self) -> str:
        return str(self.backend)


class Gate(Protocol):
    """
    Who else decides whether a host may serve a request (the agreement
    check, L{imml.agreement.Agreement}).
    """

    def admits(self, backend: Backend, info: RequestInfo) -> bool:
        """Whether C{backend}, usable for C{info}'s task, may serve it."""

    def why(self, info: RequestInfo) -> Optional[str]:
        """Why no usable host is admitted for C{info}, or None."""


class NoBackendAvailable(Exception):
    """
    No host could take a request.  C{str()} of it is the reason, for the
    client.
    """


@define(eq=False)
class _Waiter:
    info: RequestInfo
    avoid: Collection[Backend]
    deferred: Deferred[Load]
    order: tuple
    #: Who will send the request (see L{Load.owner}).
    owner: object
    #: When it stops waiting (the queue timeout).
    deadline: float
    #: When it began waiting.
    entered: float
    gone: bool = False


def _order(waiter: _Waiter) -> tuple:
    return waiter.order


@define(eq=False)
class Dispatcher:
    """
    @ivar queue_timeout: seconds a request may wait for a host.
    @ivar max_queue: most requests that may wait at once.
    """

    fleet: Fleet
    strategy: IStrategy
    clock: object
    queue_timeout: float = 60.0
    max_queue: int = 1000
    log: Logger = field(factory=Logger)
    #: Called with a request's info whenever it has to wait (to wake hosts).
    _on_wait: list[Callable[[RequestInfo], None]] = field(factory=list)
    #: Seconds after an interactive request during which batch work is
    #: paced (see the module's description); 0: never.
    pace_while_searching: float = 10.0
    #: Waiting requests in queue order.
    _waiting: list = field(factory=list)
    #: The same, in arrival order (so by deadline), including some that
    #: have left: one timer, for the first deadline, serves them all.
    _arrivals: deque = field(factory=deque)
    _timer: object = None
    _sequence: itertools.count = field(factory=itertools.count)
    _pumping: bool = False
    _again: bool = False
    #: When the last interactive request arrived.
    _searched: float = float("-inf")
    #: Calls L{pump} when paced batch work may start.
    _pace_timer: object = None
    #: Whether a usable host may serve a request, besides the fleet's word.
    gate: Optional[Gate] = None

    def __attrs_post_init__(self) -> None:
        self.fleet.observe(self.pump)

    def when_waiting(self, callback: Callable[[RequestInfo], None]) -> None:
        """
        Call C{callback(info)} whenever a request has to wait.
        """
        self._on_wait.append(callback)

    def set_strategy(self, strategy: IStrategy) -> None:
        self.strategy = strategy
        self.pump()

    def set_queue_timeout(self, seconds: float) -> None:
        """
        How long requests that start waiting from now on may wait.
        """
        self.queue_timeout = seconds

    def set_max_queue(self, count: int) -> None:
        self.max_queue = count

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def oldest_wait(self) -> Optional[float]:
        """
        Seconds the request that has waited longest has waited so far, or
        None when none waits.
        """
        if not self._waiting:
            return None
        return max(0.0, self.clock.seconds() - min(w.entered for w in self._waiting))

    def waiting(self) -> list[RequestInfo]:
        """
        The requests waiting now, in queue order.
        """
        return [w.info for w in self._waiting]

    def candidates(self, info: RequestInfo, avoid: Collection[Backend] = ()) -> list[Backend]:
        """
        The hosts that may serve C{info}: usable and admitted by the gate,
        not failing its task (unless every such host is), and not among
        C{avoid} (unless every such host is).
        """
        task = info.task
        usable = [b for b in self.fleet.backends if b.usable_for(task)]
        gate = self.gate
        if gate is not None and usable:
            usable = [b for b in usable if gate.admits(b, info)]
        if task is not None and any(b.tasks for b in usable):
            now = self.clock.seconds()
            working = [b for b in usable if not b.task_blocked(task, now)]
            usable = working or usable
        if avoid:
            fresh = [b for b in usable if b not in avoid]
            if fresh:
                return fresh
        return usable

    def _views(self, info: RequestInfo, candidates: list[Backend], now: float) -> list:
        """
        The candidates as C{info} sees them (batch work: as
        C{info.searching} says, set by L{_choose}).

        A search sees room for one request past the proven limit of each
        host with a learned limit that was seen to run that many requests
        at once (L{imml.limits.Limit.ran_at_once}: a real host, sharing its
        processor) and is not starting slow, or one past the requests it
        runs when batch work is in its room, up to the most it was seen to
        run at once; the strategy weighs running beside the host's requests
        against waiting for one of them to end.

        While people search, batch work sees less of the host searches
        are quickest on, when its limit is learned and measured (a limit
        being tried for the first time is left to be measured): one slot
        less when its batch requests there are long; and no more than it
        was seen to run at once (L{imml.limits.Limit.ran_at_once}) when
        that is several requests but fewer than its limit: a batch request
        past that would wait inside the host (one that runs two at a time
        and whose limit grew to three, as a third request keeps both busy
        between an answer and the next request's arrival), and a search
        sent next would wait behind it there.  (A host seen to run one at
        a time is not judged by it: a real host's batch requests, all
        alike, seldom show that they run at once.)
        """
        if info.interactive:
            return [
                _Slots(b, self._search_room(b), b.proven_limit)
                if b.limiter.slots is None and b.limiter.ramp is None and b.limiter.side_by_side > b.proven_limit
                else b
                for b in candidates
            ]
        views = [_Untried(b) if b.untried() else b for b in candidates]
        if not info.searching:
            for at, b in enumerate(candidates):
                if b.in_flight >= b.limit:
                    room = self._room(b, info.task, now)
                    if room:
                        views[at] = _Slots(b, b.limit + room, b.proven_limit)
            return views
        quickest = self._quickest_for_searches()
        if quickest is None or quickest not in candidates:
            return views
        limiter, limit = quickest.limiter, quickest.limit
        if limiter.slots is not None or limit < 2 or not limiter.knows(limit):
            return views
        kept = limit - 1 if self._long(quickest, info.task) else limit
        if 1 < limiter.side_by_side < kept:
            kept = limiter.side_by_side
        if kept == limit:
            return views
        at = candidates.index(quickest)
        views[at] = _Slots(quickest, kept, max(1, quickest.proven_limit - (limit - kept)))
        return views

    @staticmethod
    def _search_room(backend: Backend) -> int:
        """
        The limit a search sees on a real host: one past its proven limit,
        or one past the batch requests it runs in its room, and no more
        than it was seen to run at once.
        """
        proven, in_flight = backend.proven_limit, backend.in_flight
        if in_flight > proven:
            batch = in_flight - sum(1 for load in backend.loads if load.task == INTERACTIVE)
            proven = max(proven, batch)
        return min(proven + 1, backend.limiter.side_by_side)

    def _quickest_for_searches(self) -> Optional[Backend]:
        """
        The usable host with the shortest search time, if any is known.
        """
        known = [(b.service_time(INTERACTIVE), b.index, b) for b in self.fleet.backends if b.usable_for(INTERACTIVE)]
        known = [k for k in known if k[0] is not None]
        return min(known, key=lambda k: k[:2])[2] if known else None

    @staticmethod
    def _long(backend: Backend, task: Optional[str]) -> bool:
        """
        Whether a batch request of C{task} takes longer than L{LONG_BATCH}
        on C{backend} at its limit.
        """
        alone = backend.service_time(task)
        return alone is not None and alone * backend.stretch(backend.limit) > LONG_BATCH

    def _choose(self, info: RequestInfo, candidates: list[Backend], ahead: int, now: float) -> Optional[Backend]:
        searching = not info.interactive and self._searching(now)
        if ahead or searching:
            info = info.behind(ahead, searching)
        views = self._views(info, candidates, now)
        if not any(v.has_free_slot() for v in views):
            return None
        try:
            chosen = self.strategy.choose(info, views)
        except Exception:
            self.log.failure("strategy {strategy} failed; taking the first free host", strategy=self.strategy.name)
            chosen = next((c for c in views if c.has_free_slot()), None)
        if chosen is not None and (chosen not in views or not chosen.has_free_slot()):
            self.log.error(
                "strategy {strategy} chose {backend}, which cannot take the request; ignoring it",
                strategy=self.strategy.name,
                backend=str(chosen),
            )
            return None
        if isinstance(chosen, (_Slots, _Untried)):
            chosen = chosen.backend
        if chosen is not None and searching:
            ready = self._paced_until(chosen, now)
            if ready > now:
                self._pump_at(ready, now)
                return None
        return chosen

    @staticmethod
    def _paced_until(backend: Backend, now: float) -> float:
        """
        When paced batch work may next start on C{backend}.
        """
        slot, limit, last = backend.slot_time, backend.limit, backend.last_start
        if not slot or limit < 2 or last > now:
            # one slot: its last request has ended; or the clock was set
            # back since the last start, which then says nothing
            return now
        return last + PACE * slot / limit

    def _pump_at(self, when: float, now: float) -> None:
        timer = self._pace_timer
        if timer is not None:
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._pace_timer = self.clock.callLater(when - now, self._paced)

    def _paced(self) -> None:
        self._pace_timer = None
        self.pump()

    def _bind(self, backend: Backend, info: RequestInfo, owner: object) -> Load:
        return self.fleet.start(backend, info.task, owner)

    def acquire(
        self,
        info: RequestInfo,
        avoid: Collection[Backend] = (),
        since: Optional[float] = None,
        owner: object = None,
    ) -> Deferred[Load]:
        """
        A host for C{info}: the request is started there (L{Fleet.start})
        and counts in its C{in_flight} until L{Fleet.finish}.

        @param avoid: hosts that already failed this request.
        @param since: when the request arrived, if earlier than now (a retry
            keeps its place among the requests of its priority).
        @param owner: who sends the request (L{Load.owner}).
        @return: a Deferred firing with the request's L{Load} on its host,
            or failing with L{NoBackendAvailable}.  Cancelling it leaves the
            queue.
        """
        now = self.clock.seconds()
        if info.interactive:
            priority = 0
            self._searched = now
        else:
            priority = 1
        order = (priority, now if since is None else since, next(self._sequence))
        candidates = self.candidates(info, avoid)
        # Its place in the queue.  The strategy sees how many wait ahead: a
        # free slow host may beat waiting behind them.  (A request with a
        # free host of its own, while others wait, is one they could not
        # use.)
        ahead = bisect_left(self._waiting, order, key=_order) if self._waiting else 0
        chosen = None
        # Only a host with a free slot can be chosen: when there is none
        # (the usual case when the fleet is saturated), the strategy need
        # not be asked, but for a search, or batch work at the head of the
        # queue while nobody searches (either may have room past a limit).
        if candidates and (
            info.interactive or any(c.has_free_slot() for c in candidates) or (not ahead and not self._searching(now))
        ):
            chosen = self._choose(info, candidates, ahead, now)
        if chosen is not None:
            d = Deferred()
            d.callback(self._bind(chosen, info, owner))
            return d
        if len(self._waiting) >= self.max_queue:
            d = Deferred()
            d.errback(NoBackendAvailable(f"the balancer's queue is full ({self.max_queue} requests waiting)"))
            return d
        waiter = _Waiter(info, avoid, None, order, owner, now + self.queue_timeout, now)
        waiter.deferred = Deferred(lambda d: self._leave(waiter))
        self._waiting.insert(ahead, waiter)
        self._arrivals.append(waiter)
        if self._timer is None:
            self._timer = self.clock.callLater(self.queue_timeout, self._expire)
        for callback in self._on_wait:
            callback(info)
        return waiter.deferred

    def _leave(self, waiter: _Waiter) -> None:
        if not waiter.gone:
            waiter.gone = True
            self._waiting.remove(waiter)
            if not self._waiting:
                # Nobody waits: no timer left behind.
                self._arrivals.clear()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if self._pace_timer is not None:
                    self._pace_timer.cancel()
                    self._pace_timer = None

    def refuse_waiting(self, reason: str) -> None:
        """
        Refuse every request waiting now, with C{reason} (the balancer
        stops at once).
        """
        for waiter in list(self._waiting):
            self._leave(waiter)
            waiter.deferred.errback(NoBackendAvailable(reason))

    def _expire(self) -> None:
        """
        Refuse the requests that waited past the queue timeout, and set the
        timer for the next deadline.
        """
        self._timer = None
        arrivals = self._arrivals
        now = self.clock.seconds()
        while arrivals and (arrivals[0].gone or arrivals[0].deadline <= now):
            waiter = arrivals.popleft()
            if waiter.gone:
                continue
            self._leave(waiter)
            waiter.deferred.errback(NoBackendAvailable(self._why(waiter)))
        if arrivals and self._timer is None:
            self._timer = self.clock.callLater(max(0.0, arrivals[0].deadline - now), self._expire)

    def _why(self, waiter: _Waiter) -> str:
        if self.candidates(waiter.info, waiter.avoid):
            return f"every ML host stayed busy for {self.queue_timeout:g} s"
        held = self.gate.why(waiter.info) if self.gate is not None else None
        if held is not None:
            return f"{held} within {self.queue_timeout:g} s"
        if any(b.up for b in self.fleet.backends):
            return (
                f"no ML host that serves {waiter.info.task or 'this request'} came up within {self.queue_timeout:g} s"
            )
        return f"no ML host came up within {self.queue_timeout:g} s"

    def pump(self) -> None:
        """
        Bind waiting requests to hosts that can now take them, in queue
        order, until no more can be bound.
        """
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            now = self.clock.seconds()
            # Binding a request changes no host's usability: the requests
            # of one kind have the same candidates all through.
            kinds: dict = {}
            while self._again and self._waiting:
                self._again = False
                ahead = 0
                # since the last bind, by request info: whether the
                # requests alike that wait are all kept waiting
                kept: dict = {}
                queue = list(self._waiting)
                for at, waiter in enumerate(queue):
                    if not any(b.has_free_slot() for b in self.fleet.backends):
                        break  # nothing to bind: the strategy need not be asked
                    if waiter.gone:
                        continue
                    candidates = self._candidates_of(waiter, kinds)
                    alike = self._alike(waiter, now)
                    if not candidates or (alike and kept.get(waiter.info)):
                        ahead += 1
                        continue
                    chosen = self._choose(waiter.info, candidates, ahead, now)
                    if chosen is None:
                        if alike and waiter.info not in kept:
                            kept[waiter.info] = self._last_alike_waits(queue, at, ahead, candidates, now)
                        ahead += 1
                        continue
                    self._leave(waiter)
                    waiter.deferred.callback(self._bind(chosen, waiter.info, waiter.owner))
                    kept.clear()
                    if self._again:
                        kinds.clear()  # the fleet changed meanwhile (a host failed at once)
                if (
                    not self._again
                    and self._waiting
                    and not any(b.has_free_slot() for b in self.fleet.backends)
                    and self._fill_room(now, kinds)
                ):
                    if self._again:
                        kinds.clear()  # the fleet changed meanwhile
                    self._again = True
        finally:
            self._pumping = False

    def _searching(self, now: float) -> bool:
        """
        Whether people search: a search came in the last
        L{pace_while_searching} seconds (batch work is paced, and the room
        past a limit is left to searches).
        """
        return now - self._searched < self.pace_while_searching

    def _alike(self, waiter: _Waiter, now: float) -> bool:
        """
        Whether C{waiter} may be kept waiting with the requests alike (see
        L{_last_alike_waits}): not when it has hosts to avoid; nor batch
        work while people search, which may wait for the pace of the host
        the strategy chose for it, while the strategy may send the requests
        alike to another host.
        """
        return not waiter.avoid and (waiter.info.interactive or not self._searching(now))

    def _last_alike_waits(
        self, queue: list[_Waiter], at: int, ahead: int, candidates: list[Backend], now: float
    ) -> bool:
        """
        The request C{queue[at]} (C{ahead} waiting ahead of it) is kept
        waiting: whether the last of those alike behind it (the same
        request info, no host to avoid) is kept waiting too, and with it
        all those between, who have fewer ahead of them (see
        L{IRequestInfo.ahead}).  Each time a host frees, a queue of alike
        batch requests that wait for a fast host, a slow one free beside,
        is then two questions to the strategy, not one a request.
        """
        info = queue[at].info
        last = None
        between = 0
        for later in queue[at + 1 :]:
            if later.gone:
                continue
            between += 1
            if not later.avoid and later.info == info:
                last = ahead + between
        return last is not None and self._choose(info, candidates, last, now) is None

    def _candidates_of(self, waiter: _Waiter, kinds: dict) -> list[Backend]:
        """
        L{candidates} for C{waiter}, the same for each request of a kind
        (its task and model, no host to avoid) in C{kinds}.
        """
        if waiter.avoid:
            return self.candidates(waiter.info, waiter.avoid)
        info = waiter.info
        kind = (info.task, info.entries)
        candidates = kinds.get(kind)
        if candidates is None:
            candidates = kinds[kind] = self.candidates(info)
        return candidates

    def _fill_room(self, now: float, kinds: dict) -> bool:
        """
        Send the batch request at the head of the queue past a learned
        limit, on a host with room there (see L{_views}), when the strategy
        chooses it: no host has a free slot within its limit, so the queue
        was not asked about.

        @return: whether it was sent.
        """
        waiter = self._waiting[0]
        if waiter.info.interactive or self._searching(now):
            return False
        candidates = self._candidates_of(waiter, kinds)
        chosen = self._choose(waiter.info, candidates, 0, now) if candidates else None
        if chosen is None:
            return False
        self._leave(waiter)
        waiter.deferred.callback(self._bind(chosen, waiter.info, waiter.owner))
        return True

    def _room(self, backend: Backend, task: Optional[str], now: float) -> int:
        """
        The requests past its learned limit C{backend} may take for batch
        work of C{task} while nobody searches (L{imml.limits.Limit.room}):
        one at most where such requests are long there (a search that
        comes would wait behind them all), and none where one may already
        wait inside at the limit (a limit past what the host was seen to
        run at once).
        """
        limiter = backend.limiter
        room = limiter.room(now)
        if room and self._long(backend, task):
            return 0 if limiter.side_by_side < limiter.learned else 1
        return room
