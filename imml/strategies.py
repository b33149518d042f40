"""
Balancing strategies: pure decisions over the fleet's observed state.

Each strategy provides L{imml.interfaces.IStrategy}.  Use one on its own::

    from imml.strategies import LeastConnections
    chosen = LeastConnections().choose(request, candidates)

or select one for the balancer by name with L{strategy_named}, which also
finds third-party strategies (Twisted plugins providing
L{imml.interfaces.IStrategyFactory}, or a dotted path to a class).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from attrs import define, field
from twisted.plugin import IPlugin
from twisted.python.reflect import namedAny
from zope.interface import implementer

from .interfaces import IBackendView, IRequestInfo, IStrategy, IStrategyFactory


def _free(request: IRequestInfo, candidates: Sequence[IBackendView]) -> list[IBackendView]:
    """
    The candidates that may take C{request} now: a search only below a
    host's proven limit (past it, it might wait inside the host).
    """
    if request.interactive:
        return [c for c in candidates if c.has_free_slot() and c.in_flight < c.proven_limit]
    return [c for c in candidates if c.has_free_slot()]


@implementer(IStrategy)
@define(eq=False)
class RoundRobin:
    """
    Takes hosts in turn, in proportion to their weights (nginx's smooth
    weighted round-robin: with equal weights, plain rotation).
    """

    name = "round-robin"
    _current: dict = field(factory=dict)

    def choose(self, request: IRequestInfo, candidates: Sequence[IBackendView]) -> Optional[IBackendView]:
        free = _free(request, candidates)
        if not free:
            return None
        total = 0.0
        best = None
        for c in free:
            weight = c.weight
            total += weight
            current = self._current.get(c.address, 0.0) + weight
            self._current[c.address] = current
            if best is None or current > self._current[best.address]:
                best = c
        self._current[best.address] -= total
        return best


@implementer(IStrategy)
@define(eq=False)
class LeastConnections:
    """
    Takes the host with the fewest requests in flight relative to its
    weight; ties are taken in turn.
    """

    name = "least-connections"
    _turn: int = 0

    def choose(self, request: IRequestInfo, candidates: Sequence[IBackendView]) -> Optional[IBackendView]:
        free = _free(request, candidates)
        if not free:
            return None
        lowest = min(c.in_flight / c.weight for c in free)
        tied = [c for c in free if c.in_flight / c.weight == lowest]
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen


@implementer(IStrategy)
@define(eq=False)
class Failover:
    """
    Takes the first host, by tier then configured order, that has a free
    slot: all work goes to the first host while it is up, like Immich's own
    list of URLs.
    """

    name = "failover"

    def choose(self, request: IRequestInfo, candidates: Sequence[IBackendView]) -> Optional[IBackendView]:
        free = _free(request, candidates)
        if not free:
            return None
        return min(free, key=lambda c: (c.tier, c.index))


@implementer(IStrategy)
@define(eq=False)
class ShortestDelay:
    """
    Takes the host expected to answer soonest, or waits for one.

    For each candidate it estimates the time to complete a new request of
    the request's task: the host's recent unloaded service time for that
    task (divided by its weight, raised by its recent error rate), stretched
    by the others on the host (L{IBackendView.stretch}: on a real host the
    requests share its processor), plus, when the host has no free slot, the
    expected wait for one given the requests already queued ahead: the first
    slot frees when the soonest request in flight there is expected to end,
    the others at the host's measured throughput when at its limit (or every
    C{slot time / limit}, the slot time being how long requests of any task
    hold one).  A host with no samples yet, or only old ones, is assumed as
    fast, relative to its other work, as the hosts that have samples, so
    that it gets tried.

    A free host is taken unless waiting for a busy one is expected to be
    clearly sooner: more than C{patience} times, and C{slack} seconds,
    sooner.  A wait is an estimate, a free slot is not; and a host left
    idle while requests wait is throughput lost.  Nor is a free host left
    idle for batch work whose cost there is no more than C{near} times what
    a request takes, once it runs, on the busy host where it runs quickest,
    however short the wait for that host: its answer is hardly slower than
    the busy host's own, and while batch work waits (a job's steady
    stream), a host left idle is throughput lost.  (A host several times
    slower, whose answers would make the fleet's tail, is kept for when
    the wait is long.)  And while nobody searches (L{IRequestInfo.searching}:
    searches find hosts less loaded), batch work that would wait takes the
    free host it weighs best when that host already runs requests and
    answers it there within C{fill_near} times what a request takes on the
    busy host once it runs (L{_fills}): a request waiting in the balancer
    does no work, while on a real host one more in flight runs beside the
    others, or waits inside it for a thread with its decoding done, and adds
    a little; the host's limit, its room past a learned limit included, says
    it may take one more.  A search (interactive) takes whichever is
    expected sooner: searches are few, a person waits for each, and a free
    slow host can take several times longer than a short wait for a fast
    one.  When waiting wins, the
    request waits: late binding sends it to the first slot that frees up.

    A batch request's cost on a free slot is its own time plus the time it
    adds to the requests already on the host, which it slows down: on a
    real host, one more request on a fast host already busy can cost the
    batch more than an idle slower host does.  A search counts its own
    time only: a person waits for it, plus the time searches on that host
    have lately taken beyond the expected (L{IBackendView.search_surprise}:
    a host held to a CPU quota by periods may make a search wait for the
    next period), on a free slot and after a wait alike.

    For an interactive request (a search), a free slot above a host's
    L{IBackendView.proven_limit} (a learned limit probing for more, or the
    room the balancer leaves a search past a learned limit) costs what its
    stretch says where the host was seen to run that many requests at once
    (L{IBackendView.side_by_side}: a real host, sharing its processor).
    Elsewhere it may mean waiting inside the host for a slot (a host with
    slots) or running at once beside the others: its cost is the longer of
    the two, and the search takes it when that is no longer than waiting
    in the queue for the same slot.
    """

    name = "shortest-delay"
    #: How much a host's error rate (0 to 1) raises its estimate: at 4, a
    #: host failing half its requests looks three times slower.
    error_penalty: float = 4.0
    #: Batch work waits for a busy host only when that is more than this
    #: many times sooner than a free host ...
    patience: float = 1.5
    #: ... and this many seconds sooner ...
    slack: float = 0.005
    #: ... and the free host costs more than this many times what a request
    #: takes on the busy host once it runs.
    near: float = 2.5
    #: Batch work that would wait takes a free slot on a host already
    #: running requests where its own answer takes no more than this many
    #: times what a request takes on the busy host once it runs.
    fill_near: float = 3.5
    _turn: int = 0

    def choose(self, request: IRequestInfo, candidates: Sequence[IBackendView]) -> Optional[IBackendView]:
        task = request.task
        times = [c.service_time(task) for c in candidates]
        if None in times:
            # A host that has not answered this task yet: as fast, relative
            # to its other work, as the hosts that have (a text search on a
            # slow host is slow too); failing that, as fast as the fastest.
            known = [t for t in times if t is not None]
            fallback = min(known) if known else 0.0
            ratios = [t / c.slot_time for c, t in zip(candidates, times) if t is not None and c.slot_time]
            ratio = min(ratios) if ratios else None
            times = [
                t if t is not None else (c.slot_time * ratio if ratio is not None and c.slot_time else fallback)
                for c, t in zip(candidates, times)
            ]
        interactive = request.interactive
        best = None
        best_key = None
        best_own = 0.0
        wait_cost = float("inf")
        # what a request takes, once it runs, on the busy host where it
        # runs quickest (whichever it would wait for: so that a request
        # with more waiting ahead of it never waits more readily)
        running = float("inf")
        self._turn += 1
        count = len(candidates)
        for i, c in enumerate(candidates):
            slowdown = (1.0 + self.error_penalty * c.error_rate) / c.weight
            t = times[i] * slowdown
            limit = max(c.limit, 1)
            in_flight = c.in_flight
            if c.has_free_slot():
                # on a real host, the requests on it slow each other down
                own = cost = t * c.stretch(in_flight + 1)
                if not interactive:
                    # batch work counts the time it adds to those too: the
                    # time of all the requests on the host grows from
                    # n x stretch(n) to (n + 1) x stretch(n + 1) (just its
                    # own where nothing else runs, or on a host with slots)
                    cost = max(
                        cost, t * ((in_flight + 1) * c.stretch(in_flight + 1) - in_flight * c.stretch(in_flight))
                    )
                else:
                    # plus the time searches have lately taken there beyond
                    # the expected (a host held to a CPU quota by periods)
                    cost += t * (max(c.search_surprise, 1.0) - 1.0)
                    # a search sent past the proven limit, where the host
                    # was not seen to run that many at once, either waits
                    # inside it for a slot and then runs there (a host
                    # with slots) or runs at once beside the others,
                    # sharing the processor (a real host): count the
                    # longer of the two.  Waiting in the queue for that
                    # slot instead costs the first.
                    over = in_flight - max(c.proven_limit, 1) + 1
                    if over > 0 and in_flight >= c.side_by_side:
                        queued = self._wait(c, over, self._rate(c, limit, t)) * slowdown + t * c.stretch(in_flight)
                        wait_cost = min(wait_cost, queued)
                        cost = max(cost, queued)
                key = (cost, in_flight / limit, (i - self._turn) % count)
                if best_key is None or key < best_key:
                    best, best_key, best_own = c, key, own
            else:
                # it needs this many slots to free: those of the requests
                # ahead of it, and its own
                usable = max(c.proven_limit, 1) if interactive else limit
                wait = self._wait(c, in_flight - usable + request.ahead + 1, self._rate(c, limit, t)) * slowdown
                # once a slot frees, it runs with the host at its (proven)
                # limit
                runs = t * c.stretch(usable)
                done = wait + runs
                if interactive:
                    done += t * (max(c.search_surprise, 1.0) - 1.0)
                wait_cost = min(wait_cost, done)
                running = min(running, runs)
        if interactive:
            if best is None or wait_cost < best_key[0]:
                return None
        elif best is None or (
            wait_cost * self.patience + self.slack < best_key[0]
            and best_key[0] > running * self.near
            and (request.searching or not self._fills(best, best_own, running))
        ):
            return None
        return best

    def _fills(self, c: IBackendView, own: float, running: float) -> bool:
        """
        Whether batch work that would wait takes C{c}'s free slot instead:
        C{c}, the free host it weighs best (its slot may be room past a
        learned limit), already runs requests (whether to start an idle
        host is the rule before), and the request's own answer there
        (C{own}, stretched by those on it) takes no more than
        C{fill_near} times C{running}, what a request takes on the busy host
        once it runs: a host several times slower stays out, its answers
        would make the fleet's tail.  No gain by the host's curve is asked
        for: a level a host passes through only for moments, as a slower
        host's second request, measures a few per cent low, and a request
        waiting in the balancer does no work at all.
        """
        return c.in_flight > 0 and own <= running * self.fill_near

    @staticmethod
    def _rate(c: IBackendView, limit: int, t: float) -> Optional[float]:
        """
        Slots free on C{c} at its measured throughput when known, else every
        slot time (or C{t}) / limit.
        """
        rate = c.throughput
        if not rate:
            slot = c.slot_time or t
            rate = limit / slot if slot else None
        return rate

    @staticmethod
    def _wait(c: IBackendView, slots: int, rate: Optional[float]) -> float:
        """
        Seconds until C{slots} slots free up on C{c}: the first when the
        soonest request in flight is expected to end, the others at the
        host's rate.
        """
        first = c.next_answer_in()
        if first is not None:
            return first + (slots - 1) / rate if rate else first
        return slots / rate if rate else 0.0


@implementer(IPlugin, IStrategyFactory)
@define(frozen=True)
class StrategyFactory:
    """
    Names a strategy class.  An instance of it at module level in a
    C{twisted/plugins/} file is a Twisted plugin: C{--strategy NAME} finds it.
    """

    name: str
    make: Callable[[], IStrategy]
    description: str = ""

    def __call__(self) -> IStrategy:
        return self.make()


BUILTIN: dict[str, StrategyFactory] = {
    f.name: f
    for f in [
        StrategyFactory("round-robin", RoundRobin, "hosts in turn, by weight"),
        StrategyFactory("least-connections", LeastConnections, "the host with the fewest requests in flight"),
        StrategyFactory("failover", Failover, "the first host that is up, in configured order"),
        StrategyFactory(
            "shortest-delay", ShortestDelay, "the host expected to answer soonest, from its recent service times"
        ),
    ]
}


class UnknownStrategy(ValueError):
    """
    No strategy goes by the name asked for.
    """


def available() -> dict[str, IStrategyFactory]:
    """
    Every strategy selectable by name: the built-in ones and those of
    installed Twisted plugins.
    """
    from twisted.plugin import getPlugins

    found: dict[str, IStrategyFactory] = dict(BUILTIN)
    for plugin in getPlugins(IStrategyFactory):
        found.setdefault(plugin.name, plugin)
    return found


def strategy_named(name: str) -> IStrategy:
    """
    Make the strategy called C{name}: a built-in name, the name of an
    installed plugin, or the dotted path of a class (or factory) whose
    instances provide L{IStrategy}.

    @raise UnknownStrategy: naming the choices, when nothing matches.
    """
    if name in BUILTIN:
        return BUILTIN[name]()
    factories = available()
    if name in factories:
        strategy = factories[name]()
    elif "." in name:
        try:
            strategy = namedAny(name)()
        except Exception as e:
            raise UnknownStrategy(f"strategy {name!r} cannot be loaded: {e}") from e
    else:
        raise UnknownStrategy(
            f"unknown strategy {name!r}; choose one of {', '.join(sorted(factories))} "
            "or give the dotted path of a class"
        )
    if not IStrategy.providedBy(strategy):
        raise UnknownStrategy(f"strategy {name!r} does not provide imml.interfaces.IStrategy")
    return strategy
