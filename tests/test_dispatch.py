"""
The dispatcher with a task.Clock: late binding, priorities, bounds.
"""

from twisted.internet import task
from twisted.internet.defer import CancelledError

from imml.backends import BackendAddress
from imml.classify import RequestInfo
from imml.dispatch import Dispatcher, NoBackendAvailable
from imml.fleet import BackendSettings, Fleet, Load
from imml.limits import Limit
from imml.strategies import LeastConnections, ShortestDelay

BATCH = RequestInfo(b"POST", b"/predict", "clip-visual")
SEARCH = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
OCR = RequestInfo(b"POST", b"/predict", "ocr")


def make(n=2, slots=10, tasks=None, queue_timeout=10.0, max_queue=100):
    clock = task.Clock()
    fleet = Fleet.from_addresses(
        [BackendAddress(f"h{i}") for i in range(n)],
        clock,
        settings=lambda a: BackendSettings(slots=slots, tasks=tasks.get(a.host) if tasks else None),
    )
    for b in fleet.backends:
        fleet.check_passed(b)
    return clock, fleet, Dispatcher(fleet, LeastConnections(), clock, queue_timeout, max_queue)


class Got(list):
    """
    What an acquire fired with: the host (or the failure), and the request's
    load on it.
    """

    load = None


def result(d):
    box = Got()

    def got(value):
        if isinstance(value, Load):
            box.load, value = value, value.backend
        box.append(value)

    d.addBoth(got)
    return box


def test_backends_provide_the_strategies_view():
    from zope.interface.verify import verifyObject

    from imml.interfaces import IBackendView

    clock, fleet, dispatcher = make()
    verifyObject(IBackendView, fleet.backends[0])


def test_free_slot_is_bound_at_once_and_counted():
    clock, fleet, dispatcher = make()
    got = result(dispatcher.acquire(BATCH))
    assert got == [fleet.backends[0]]
    assert fleet.backends[0].in_flight == 1
    fleet.finish(got.load, 0.5)
    assert fleet.backends[0].in_flight == 0
    assert fleet.backends[0].service_time("clip-visual") == 0.5


def test_waits_for_a_slot_and_binds_late():
    clock, fleet, dispatcher = make(slots=1)
    a, b = (result(dispatcher.acquire(BATCH)) for _ in range(2))
    c = result(dispatcher.acquire(BATCH))
    assert c == [] and dispatcher.queue_depth == 1
    fleet.finish(b.load, 0.1)
    assert c == [b[0]] and dispatcher.queue_depth == 0


def test_the_oldest_wait_is_that_of_the_request_waiting_longest():
    clock, fleet, dispatcher = make(n=1, slots=1)
    first = result(dispatcher.acquire(BATCH))
    assert dispatcher.oldest_wait() is None
    clock.advance(1)
    early = result(dispatcher.acquire(BATCH))
    clock.advance(2)
    result(dispatcher.acquire(SEARCH))  # ahead in the queue, but it came later
    clock.advance(0.5)
    assert dispatcher.oldest_wait() == 2.5
    fleet.finish(first.load, 0.1)  # the search is served; the first waits on
    assert dispatcher.oldest_wait() == 2.5
    clock.advance(8)  # past its queue timeout (10 s): nobody waits now
    assert early[0].check(NoBackendAvailable) and dispatcher.oldest_wait() is None


def test_interactive_requests_go_ahead_of_batch_work():
    clock, fleet, dispatcher = make(n=1, slots=1)
    first = result(dispatcher.acquire(BATCH))
    waiting = [result(dispatcher.acquire(BATCH)) for _ in range(3)]
    search = result(dispatcher.acquire(SEARCH))
    fleet.finish(first.load, 0.1)
    assert search == [fleet.backends[0]]
    assert all(w == [] for w in waiting)
    fleet.finish(search.load, 0.01)
    assert waiting[0] == [fleet.backends[0]] and waiting[1] == []


def test_a_request_waits_while_no_host_is_up_and_is_served_when_one_comes_back():
    clock, fleet, dispatcher = make(n=1)
    fleet.request_failed(fleet.backends[0], "connection refused")
    got = result(dispatcher.acquire(BATCH))
    clock.advance(5)
    assert got == []
    fleet.check_passed(fleet.backends[0])  # no other host is up: one pass brings it back (not rise=2)
    assert got == [fleet.backends[0]]


def test_the_wait_is_bounded_with_a_reason():
    clock, fleet, dispatcher = make(n=1, queue_timeout=7)
    fleet.request_failed(fleet.backends[0], "connection refused")
    got = result(dispatcher.acquire(BATCH))
    clock.advance(6.9)
    assert got == []
    clock.advance(0.2)
    assert got[0].check(NoBackendAvailable)
    assert "no ML host came up within 7 s" == str(got[0].value)
    assert dispatcher.queue_depth == 0


def test_busy_hosts_give_another_reason():
    clock, fleet, dispatcher = make(n=1, slots=1, queue_timeout=3)
    result(dispatcher.acquire(BATCH))
    got = result(dispatcher.acquire(BATCH))
    clock.advance(3)
    assert "busy" in str(got[0].value)


def test_each_waiting_request_gets_its_own_full_wait():
    clock, fleet, dispatcher = make(n=1, slots=1, queue_timeout=3)
    result(dispatcher.acquire(BATCH))
    first = result(dispatcher.acquire(BATCH))
    clock.advance(1)
    second = result(dispatcher.acquire(SEARCH))
    third = result(dispatcher.acquire(BATCH))
    clock.advance(1.9)
    assert first == [] and second == [] and third == []
    clock.advance(0.2)
    assert first[0].check(NoBackendAvailable) and second == [] and third == []
    clock.advance(0.8)
    assert second == [] and third == []
    clock.advance(0.2)
    assert second[0].check(NoBackendAvailable) and third[0].check(NoBackendAvailable)
    assert dispatcher.queue_depth == 0
    assert not clock.getDelayedCalls()


def test_a_request_refused_at_its_deadline_may_wait_again():
    clock, fleet, dispatcher = make(n=1, slots=1, queue_timeout=3)
    result(dispatcher.acquire(BATCH))
    again = []

    def retry(failure):
        again.append(result(dispatcher.acquire(BATCH)))

    dispatcher.acquire(BATCH).addErrback(retry)
    clock.advance(3)
    assert len(again) == 1 and again[0] == [] and dispatcher.queue_depth == 1
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3)
    assert again[0][0].check(NoBackendAvailable)


def test_the_queue_is_bounded():
    clock, fleet, dispatcher = make(n=1, slots=1, max_queue=2)
    for _ in range(3):
        result(dispatcher.acquire(BATCH))
    got = result(dispatcher.acquire(BATCH))
    assert got[0].check(NoBackendAvailable) and "queue is full" in str(got[0].value)


def test_cancelling_a_wait_leaves_the_queue():
    clock, fleet, dispatcher = make(n=1, slots=1)
    result(dispatcher.acquire(BATCH))
    d = dispatcher.acquire(BATCH)
    got = result(d)
    d.cancel()
    assert dispatcher.queue_depth == 0
    assert not clock.getDelayedCalls()
    assert got[0].check(Exception)


def test_a_host_that_failed_the_request_is_avoided_while_another_is_up():
    clock, fleet, dispatcher = make(n=2)
    h0, h1 = fleet.backends
    assert result(dispatcher.acquire(BATCH, avoid=[h0])) == [h1]
    # every usable host already failed it: try them again rather than fail
    assert result(dispatcher.acquire(BATCH, avoid=[h0, h1])) in ([h0], [h1])


def test_tasks_go_only_to_hosts_that_serve_them():
    clock, fleet, dispatcher = make(n=2, tasks={"h0": frozenset({"clip-visual", "clip-textual"})})
    for _ in range(3):
        assert result(dispatcher.acquire(OCR)) == [fleet.backends[1]]


def test_draining_hosts_take_no_new_work():
    clock, fleet, dispatcher = make(n=2)
    fleet.drain(fleet.backends[0])
    for _ in range(3):
        assert result(dispatcher.acquire(BATCH)) == [fleet.backends[1]]


class Broken:
    name = "broken"

    def choose(self, request, candidates):
        raise ZeroDivisionError()


def test_a_broken_strategy_does_not_lose_requests():
    clock, fleet, dispatcher = make(n=2)
    dispatcher.set_strategy(Broken())
    assert result(dispatcher.acquire(BATCH)) == [fleet.backends[0]]


class Liar:
    name = "liar"

    def choose(self, request, candidates):
        return candidates[0]


def test_a_strategy_choosing_a_full_host_leaves_the_request_waiting():
    clock, fleet, dispatcher = make(n=1, slots=1)
    dispatcher.set_strategy(Liar())
    result(dispatcher.acquire(BATCH))
    got = result(dispatcher.acquire(BATCH))
    assert got == [] and fleet.backends[0].in_flight == 1


class Patient:
    """
    Takes a free host for a request of C{task} with at least C{ahead[task]}
    requests waiting ahead of it (never, for a task not named), and notes
    what it was asked.
    """

    name = "patient"

    def __init__(self, **ahead):
        self.ahead = ahead
        self.asked = []

    def choose(self, request, candidates):
        self.asked.append((request.task, request.ahead))
        if request.ahead < self.ahead.get(request.task.replace("-", "_"), float("inf")):
            return None
        return next((c for c in candidates if c.has_free_slot()), None)


def waiting_behind_two(strategy, *infos):
    """Two hosts of one slot, both busy, C{infos} waiting, in that order."""
    clock, fleet, dispatcher = make(n=2, slots=1)
    busy = [result(dispatcher.acquire(BATCH)) for _ in range(2)]
    dispatcher.set_strategy(strategy)
    waiting = [result(dispatcher.acquire(info)) for info in infos]
    assert dispatcher.queue_depth == len(infos) and strategy.asked == []
    return fleet, dispatcher, busy, waiting


def test_alike_requests_kept_waiting_are_two_questions_to_the_strategy():
    strategy = Patient()
    fleet, dispatcher, busy, waiting = waiting_behind_two(strategy, *[BATCH] * 4)
    fleet.finish(busy[1].load, 0.1)
    # the first waits; so does the last, and with it those between
    assert strategy.asked == [("clip-visual", 0), ("clip-visual", 3)]
    assert dispatcher.queue_depth == 4 and fleet.backends[1].in_flight == 0


def test_the_first_alike_request_the_strategy_sends_to_a_free_host_is_sent():
    # the first waits, the last would not: each is asked in turn
    strategy = Patient(clip_visual=2)
    fleet, dispatcher, busy, waiting = waiting_behind_two(strategy, *[BATCH] * 4)
    fleet.finish(busy[1].load, 0.1)
    assert strategy.asked == [("clip-visual", 0), ("clip-visual", 3), ("clip-visual", 1), ("clip-visual", 2)]
    assert [len(w) for w in waiting] == [0, 0, 1, 0] and waiting[2] == [fleet.backends[1]]


def test_a_request_the_strategy_sends_at_once_costs_one_question():
    strategy = Patient(clip_visual=0)
    fleet, dispatcher, busy, waiting = waiting_behind_two(strategy, *[BATCH] * 4)
    fleet.finish(busy[1].load, 0.1)
    assert strategy.asked == [("clip-visual", 0)] and waiting[0] == [fleet.backends[1]]


def test_a_request_with_a_host_to_avoid_is_asked_about_on_its_own():
    strategy = Patient()
    clock, fleet, dispatcher = make(n=2, slots=1)
    busy = [result(dispatcher.acquire(BATCH)) for _ in range(2)]
    dispatcher.set_strategy(strategy)
    first = result(dispatcher.acquire(BATCH))
    retry = result(dispatcher.acquire(BATCH, avoid=[fleet.backends[0]]))
    last = result(dispatcher.acquire(BATCH))
    fleet.finish(busy[1].load, 0.1)
    assert strategy.asked == [("clip-visual", 0), ("clip-visual", 2), ("clip-visual", 1)]
    assert first == retry == last == []


def test_alike_requests_are_asked_about_again_once_another_is_sent():
    strategy = Patient()
    clock, fleet, dispatcher = make(n=2, slots=2)
    busy = [result(dispatcher.acquire(BATCH)) for _ in range(4)]
    dispatcher.set_strategy(strategy)
    waiting = [result(dispatcher.acquire(info)) for info in (BATCH, OCR, BATCH, BATCH)]
    fleet.finish(busy[0].load, 0.1)  # a slot frees: every request waits
    strategy.asked.clear()
    strategy.ahead = {"ocr": 1}
    fleet.finish(busy[1].load, 0.1)  # another: the OCR request takes one
    assert strategy.asked == [
        ("clip-visual", 0),
        ("clip-visual", 3),
        ("ocr", 1),
        # the fleet changed: the image requests are asked about again
        ("clip-visual", 1),
        ("clip-visual", 2),
    ]
    assert [len(got) for got in waiting] == [0, 1, 0, 0]


def test_a_host_that_goes_down_while_a_request_is_bound_gets_no_more():
    # Binding the first request brings news (its host refused the
    # connection of another): that host is down, and the request behind
    # is not given its free slot, though the pump had taken it for a
    # candidate.
    clock, fleet, dispatcher = make(n=2, slots=2)
    h0, h1 = fleet.backends
    busy = {h: [fleet.start(h, "clip-visual") for _ in range(2)] for h in (h0, h1)}
    first, second = dispatcher.acquire(BATCH), result(dispatcher.acquire(BATCH))

    def refused(load):
        fleet.request_failed(h1, "connection refused")
        fleet.finish(busy[h1][0], None, "connection refused")
        return load

    first.addCallback(refused)
    fleet.finish(busy[h0][0], 0.04)
    assert result(first) == [h0]
    assert second == [] and dispatcher.queue_depth == 1
    assert not h1.up and h1.in_flight == 1


def test_while_people_search_paced_hosts_keep_no_batch_work_from_a_free_host():
    # Batch work kept from the hosts it is paced on, while people search,
    # is not kept from a host free and not paced, whichever host the
    # strategy's turn gives each request.
    for turn in range(3):
        clock, fleet, dispatcher = warmed(n=3, slots=2)
        fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.01)
        h0, h1, h2 = fleet.backends
        loads = {h2: [fleet.start(h2, "clip-visual") for _ in range(2)]}
        clock.advance(1)
        loads.update({h: [fleet.start(h, "clip-visual") for _ in range(2)] for h in (h0, h1)})
        waiting = [result(dispatcher.acquire(BATCH)) for _ in range(3)]
        for host in (h0, h1):
            fleet.finish(loads[host][0], 0.04)
        assert not any(waiting)  # each free slot is on a host just started on
        dispatcher.strategy._turn = turn
        fleet.finish(loads[h2][0], 0.04)
        assert h2.in_flight == 2, turn
        assert sum(1 for got in waiting if got == [h2]) == 1


def test_requests_of_other_kinds_are_asked_about_apart():
    strategy = Patient(ocr=1)
    fleet, dispatcher, busy, waiting = waiting_behind_two(strategy, BATCH, OCR, BATCH, OCR)
    fleet.finish(busy[1].load, 0.1)
    # the image requests wait; the first OCR request takes the free host
    assert strategy.asked == [("clip-visual", 0), ("clip-visual", 2), ("ocr", 1)]
    assert [len(w) for w in waiting] == [0, 1, 0, 0] and waiting[1] == [fleet.backends[1]]


def warmed(n=1, slots=2, seconds=0.04):
    """A fleet whose hosts have each answered one batch request."""
    clock, fleet, dispatcher = make(n=n, slots=slots)
    for b in fleet.backends:
        fleet.finish(fleet.start(b, "clip-visual"), seconds)
    return clock, fleet, dispatcher


def test_while_people_search_batch_starts_on_a_host_are_paced():
    # 2 slots, about 40 ms each: starts at least half of 20 ms apart
    clock, fleet, dispatcher = warmed()
    host = fleet.backends[0]
    search = result(dispatcher.acquire(SEARCH))
    fleet.finish(search.load, 0.01)
    pace = host.slot_time / 2 / 2
    assert 0.005 < pace < 0.01
    clock.advance(1)
    first = result(dispatcher.acquire(BATCH))
    second = result(dispatcher.acquire(BATCH))
    assert first == [host] and second == []
    clock.advance(pace - 0.0001)
    assert second == []
    clock.advance(0.0002)
    assert second == [host] and host.in_flight == 2


def test_searches_are_not_paced_and_nothing_is_paced_without_them():
    clock, fleet, dispatcher = warmed()
    a, b = result(dispatcher.acquire(BATCH)), result(dispatcher.acquire(BATCH))
    assert a and b  # nobody searched: both start at once
    for got in (a, b):
        fleet.finish(got.load, 0.04)
    clock.advance(1)
    batch = result(dispatcher.acquire(BATCH))
    search = result(dispatcher.acquire(SEARCH))
    assert batch and search  # a search right after a batch start is not held
    fleet.finish(batch.load, 0.04)
    fleet.finish(search.load, 0.01)
    clock.advance(dispatcher.pace_while_searching + 1)
    a, b = result(dispatcher.acquire(BATCH)), result(dispatcher.acquire(BATCH))
    assert a and b  # the last search is long past


def test_pacing_leaves_single_slot_hosts_alone_and_no_timer_behind():
    # one slot: the next batch request starts as soon as the last one ends
    clock, fleet, dispatcher = warmed(slots=1)
    fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.01)
    a = result(dispatcher.acquire(BATCH))
    fleet.finish(a.load, 0.0)
    assert result(dispatcher.acquire(BATCH)) == a
    clock, fleet, dispatcher = warmed()
    fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.01)
    clock.advance(1)
    assert result(dispatcher.acquire(BATCH))
    paced = dispatcher.acquire(BATCH)
    paced.addErrback(lambda f: f.trap(CancelledError))
    assert clock.getDelayedCalls()
    paced.cancel()
    assert dispatcher.queue_depth == 0 and not clock.getDelayedCalls()


def test_a_clock_set_back_holds_batch_work_for_one_pace_at_most():
    clock, fleet, dispatcher = warmed()
    host = fleet.backends[0]
    fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.01)
    clock.advance(1)
    fleet.finish(result(dispatcher.acquire(BATCH)).load, 0.04)  # bound now...
    clock.rightNow -= 3600  # ... and the clock goes back an hour
    pace = host.slot_time / 2 / 2
    waiting = result(dispatcher.acquire(BATCH))
    clock.advance(pace + 0.0001)
    assert waiting == [host]


class _Measured(Limit):
    """A learned limit whose every level has been measured."""

    def knows(self, level: int) -> bool:
        return True

    def stretch(self, in_flight: int) -> float:
        return float(max(in_flight, 1))  # the host's processor is full


def test_while_people_search_long_batch_work_leaves_a_slot_free_for_them():
    """
    A heavy model: a batch request holds a host with a learned limit of 2
    for 300 ms.  While people search, batch work keeps one of its slots
    free, so the next search starts at once rather than behind a batch
    request; with nobody searching, or with short batch requests, both
    slots are batch work's.  Configured slots are kept as they are.
    """

    def fleet_of(seconds, slots=None):
        clock = task.Clock()
        fleet = Fleet.from_addresses([BackendAddress("gpu")], clock, settings=lambda a: BackendSettings(slots=slots))
        [host] = fleet.backends
        fleet.check_passed(host)
        fleet.finish(fleet.start(host, "clip-visual"), seconds)
        fleet.finish(fleet.start(host, "clip-textual"), seconds / 5)
        if slots is None:
            host.limiter = _Measured(learned=2)  # a limit of 2, measured
        dispatcher = Dispatcher(fleet, LeastConnections(), clock, 60.0, 100)
        dispatcher.pace_while_searching = 10.0
        return clock, fleet, host, dispatcher

    clock, fleet, host, dispatcher = fleet_of(0.3)
    # nobody searched: batch work takes both slots
    a, b = result(dispatcher.acquire(BATCH)), result(dispatcher.acquire(BATCH))
    assert a == [host] and b == [host]
    fleet.finish(a.load, 0.3)
    fleet.finish(b.load, 0.3)
    fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.06)  # someone searches
    clock.advance(1)
    first, second = result(dispatcher.acquire(BATCH)), result(dispatcher.acquire(BATCH))
    assert first == [host] and second == []  # one slot left free
    search = result(dispatcher.acquire(SEARCH))
    assert search == [host] and host.in_flight == 2  # the search starts at once
    fleet.finish(search.load, 0.06)
    clock.advance(dispatcher.pace_while_searching + 1)  # people stopped searching
    assert second == [] and dispatcher.queue_depth == 1
    fleet.finish(first.load, 0.3)
    assert second == [host]
    assert result(dispatcher.acquire(BATCH)) == [host] and host.in_flight == 2

    # short batch requests (a light model) are only paced
    clock, fleet, host, dispatcher = fleet_of(0.03)
    fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.006)
    clock.advance(1)
    first = result(dispatcher.acquire(BATCH))
    clock.advance(1)
    assert first == [host] and result(dispatcher.acquire(BATCH)) == [host]

    # a limit tried for the first time is left to be measured
    clock, fleet, host, dispatcher = fleet_of(0.3)
    host.limiter = Limit(learned=2)
    fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.06)
    clock.advance(1)
    first = result(dispatcher.acquire(BATCH))
    clock.advance(1)
    assert first == [host] and result(dispatcher.acquire(BATCH)) == [host]

    # configured slots are kept
    clock, fleet, host, dispatcher = fleet_of(0.3, slots=2)
    fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.06)
    clock.advance(1)
    first = result(dispatcher.acquire(BATCH))
    clock.advance(1)
    assert first == [host] and result(dispatcher.acquire(BATCH)) == [host]


def test_a_search_runs_beside_batch_work_past_a_learned_limit_when_that_is_no_slower():
    """
    A heavy model on a real host: its learned limit holds at one image (300
    ms alone; a second in flight only shares the processor), and two
    requests were seen to run there at once.  A search runs beside an
    image at once, past the limit, which takes about twice a search alone
    rather than the image's rest.
    Batch work never goes past the limit; nor does a search on a host with
    configured slots, on one not seen to run two requests at once (it may
    queue the second inside), or with a strategy that does not weigh the
    room.
    """

    def fleet_of(slots=None, strategy=None, side_by_side=2):
        clock = task.Clock()
        fleet = Fleet.from_addresses([BackendAddress("cpu")], clock, settings=lambda a: BackendSettings(slots=slots))
        [host] = fleet.backends
        fleet.check_passed(host)
        fleet.finish(fleet.start(host, "clip-visual"), 0.3)
        fleet.finish(fleet.start(host, "clip-textual"), 0.06)
        if slots is None:
            host.limiter = _Measured(learned=1, side_by_side=side_by_side)
        dispatcher = Dispatcher(fleet, strategy or ShortestDelay(), clock, 60.0, 100)
        return clock, fleet, host, dispatcher

    clock, fleet, host, dispatcher = fleet_of()
    image = result(dispatcher.acquire(BATCH))
    clock.advance(0.05)
    # beside the image: 2 x 60 ms, sooner than its 250 ms left and 60 ms
    search = result(dispatcher.acquire(SEARCH))
    assert search == [host] and host.in_flight == 2
    batch = result(dispatcher.acquire(BATCH))
    assert batch == [] and dispatcher.queue_depth == 1
    fleet.finish(image.load, 0.3)
    assert batch == [], "the search still runs: the limit is one"
    fleet.finish(search.load, 0.12)
    assert batch == [host] and host.in_flight == 1

    # near the image's expected end too: when it ends is an estimate (an
    # image may take half as long again), what running beside it costs is
    # bounded
    clock.advance(0.29)
    search = result(dispatcher.acquire(SEARCH))
    assert search == [host] and host.in_flight == 2

    for clock, fleet, host, dispatcher in [
        fleet_of(slots=1),
        fleet_of(side_by_side=1),
        fleet_of(strategy=LeastConnections()),
    ]:
        image = result(dispatcher.acquire(BATCH))
        clock.advance(0.05)
        search = result(dispatcher.acquire(SEARCH))
        assert search == [] and host.in_flight == 1
        fleet.finish(image.load, 0.3)
        assert search == [host]


def test_an_idle_host_once_found_slow_is_tried_again_by_batch_work_not_searches():
    """
    A host whose answers were slow gets no work from shortest-delay while a
    faster one has room; once it has had nothing for RETRY_IDLE seconds, a
    batch request tries it again (its estimates unknown), and its answer
    starts them afresh.  Searches still go by what is known.
    """
    from imml.host import RETRY_IDLE

    clock, fleet, _ = make(slots=4)
    dispatcher = Dispatcher(fleet, ShortestDelay(), clock, 10.0, 100, pace_while_searching=0)
    fast, slow = fleet.backends
    for backend, seconds in ((fast, 0.01), (slow, 0.5)):
        for info in (BATCH, SEARCH):
            fleet.finish(fleet.start(backend, info.task), seconds)
    running = fleet.start(fast, BATCH.task)  # the fast host has room for more

    def served(info):
        got = result(dispatcher.acquire(info))
        fleet.finish(got.load, 0.01 if got[0] is fast else 0.05)
        return got[0]

    assert served(BATCH) is fast  # the slow host is shunned ...
    clock.advance(RETRY_IDLE / 2)
    assert served(BATCH) is fast
    clock.advance(RETRY_IDLE)
    assert slow.untried()
    assert served(SEARCH) is fast  # ... by searches also once idle ...
    assert served(BATCH) is slow  # ... but batch work tries it again
    assert slow.service_time("clip-visual") == 0.05  # afresh: not 0.5 moved a fifth of the way
    assert not slow.untried()
    assert served(BATCH) is fast
    fleet.finish(running, 0.01)


class _Roomy(Limit):
    """A learned limit with room for C{depth} requests past it (L{Limit.room})."""

    depth = 1

    def room(self, now: float) -> int:
        return self.depth if self.ramp is None else 0


class _Deep(_Roomy):
    depth = 3


def test_batch_work_that_would_wait_goes_past_a_limit_with_room():
    """
    A real host with a learned limit of two and room for a third: while
    nobody searches, the batch request that would wait takes the room at
    once, and the request at the head of the queue takes it again when an
    answer frees it; the next waits.  A host without room makes it wait,
    and so does a search in the last seconds.
    """

    def fleet_of(*limits):
        clock = task.Clock()
        fleet = Fleet.from_addresses([BackendAddress(f"h{i}") for i in range(len(limits))], clock)
        for host, limit in zip(fleet.backends, limits):
            fleet.check_passed(host)
            host.limiter = limit
        return clock, fleet, Dispatcher(fleet, ShortestDelay(), clock, 60.0, 100)

    clock, fleet, dispatcher = fleet_of(_Roomy(learned=2))
    [host] = fleet.backends
    first, second, third, fourth = (result(dispatcher.acquire(BATCH)) for _ in range(4))
    assert first == second == third == [host] and host.in_flight == 3
    assert fourth == [] and dispatcher.queue_depth == 1
    fleet.finish(first.load, 0.05)
    assert fourth == [host] and host.in_flight == 3
    fleet.finish(second.load, 0.05)
    assert host.in_flight == 2 and dispatcher.queue_depth == 0

    # of two hosts at their limits, the one with room
    clock, fleet, dispatcher = fleet_of(Limit(learned=1), _Roomy(learned=1))
    plain, roomy = fleet.backends
    for _ in range(2):
        dispatcher.acquire(BATCH)
    assert plain.in_flight == roomy.in_flight == 1
    assert result(dispatcher.acquire(BATCH)) == [roomy] and roomy.in_flight == 2
    assert result(dispatcher.acquire(BATCH)) == [] and dispatcher.queue_depth == 1

    # a free host far slower than waiting for a busy one: the room there
    clock, fleet, dispatcher = fleet_of(_Roomy(learned=1), Limit(learned=1))
    fast, slow = fleet.backends
    fleet.finish(fleet.start(fast, "clip-visual"), 0.01)
    fleet.finish(fleet.start(slow, "clip-visual"), 0.5)
    assert result(dispatcher.acquire(BATCH)) == [fast]
    assert result(dispatcher.acquire(BATCH)) == [fast] and fast.in_flight == 2 and slow.in_flight == 0

    # no room: the request waits
    clock, fleet, dispatcher = fleet_of(Limit(learned=2))
    for _ in range(2):
        dispatcher.acquire(BATCH)
    assert result(dispatcher.acquire(BATCH)) == [] and dispatcher.queue_depth == 1

    # someone searched: the room is left to searches
    clock, fleet, dispatcher = fleet_of(_Roomy(learned=2))
    [host] = fleet.backends
    fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.01)
    batch = [result(dispatcher.acquire(BATCH)) for _ in range(3)]
    for _ in range(10):
        clock.advance(0.01)  # batch starts are paced while people search
    assert batch[0] == batch[1] == [host] and batch[2] == [] and host.in_flight == 2
    clock.advance(dispatcher.pace_while_searching + 1)
    fleet.finish(batch[0].load, 0.05)
    assert batch[2] == [host] and host.in_flight == 2
    assert result(dispatcher.acquire(BATCH)) == [host] and host.in_flight == 3


def test_a_deeper_room_is_taken_by_short_batch_work_only():
    """
    A real host with room for three requests past its learned limit of two:
    batch work that would wait takes all of it while its requests are short
    (a light model); the sixth waits.  Where they are long (a heavy model:
    a search that comes would wait behind all of them), it takes one; and
    none where one may already wait inside at the limit: a limit of three
    on a host seen to run two at once.
    """
    for seconds, learned, room in ((0.02, 2, 3), (0.3, 2, 1), (0.3, 3, 0)):
        clock = task.Clock()
        fleet = Fleet.from_addresses([BackendAddress("cpu")], clock)
        [host] = fleet.backends
        fleet.check_passed(host)
        host.limiter = _Deep(learned=learned, side_by_side=2)
        fleet.finish(fleet.start(host, "clip-visual"), seconds)
        dispatcher = Dispatcher(fleet, ShortestDelay(), clock, 60.0, 100)
        batch = [result(dispatcher.acquire(BATCH)) for _ in range(6)]
        bound = learned + room
        assert host.in_flight == bound
        assert batch[:bound] == [[host]] * bound and batch[bound:] == [[]] * (6 - bound)


def test_a_search_runs_at_once_beside_batch_work_in_a_deep_room():
    """
    Batch work fills a real host's room of three past its learned limit of
    two: a search that comes runs at once beside those five, sharing the
    processor, rather than waiting for three answers; a second search at
    once waits (one past the room's requests, as one past a limit).  On a
    host seen to run only its two at once, the first waits.
    """
    for at_once, joins in ((8, True), (2, False)):
        clock = task.Clock()
        fleet = Fleet.from_addresses([BackendAddress("cpu")], clock)
        [host] = fleet.backends
        fleet.check_passed(host)
        host.limiter = _Deep(learned=2)
        host.limiter.ran_at_once(at_once)
        fleet.finish(fleet.start(host, "clip-visual"), 0.02)
        fleet.finish(fleet.start(host, "clip-textual"), 0.005)
        dispatcher = Dispatcher(fleet, ShortestDelay(), clock, 60.0, 100)
        for _ in range(5):
            dispatcher.acquire(BATCH)
        assert host.in_flight == 5
        search = result(dispatcher.acquire(SEARCH))
        assert (search == [host]) is joins and host.in_flight == (6 if joins else 5)
        second = result(dispatcher.acquire(SEARCH))
        assert second == [] and host.in_flight == (6 if joins else 5)


def test_a_slow_host_s_room_is_weighed_against_waiting_for_a_fast_one():
    """
    Both hosts with a learned limit of one and room for one more, the slow
    host at its limit: the fast host's limit and room are taken; once they
    are full, the slow host's room
    (half a second a request) is not, when the fast host answers in ten
    milliseconds: the request waits for it.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("fast"), BackendAddress("slow")], clock)
    fast, slow = fleet.backends
    for host, seconds in ((fast, 0.01), (slow, 0.5)):
        fleet.check_passed(host)
        host.limiter = _Roomy(learned=1)
        fleet.finish(fleet.start(host, "clip-visual"), seconds)
    dispatcher = Dispatcher(fleet, ShortestDelay(), clock, 60.0, 100)
    fleet.start(slow, "clip-visual")  # the slow host at its limit
    first = result(dispatcher.acquire(BATCH))
    second = result(dispatcher.acquire(BATCH))
    assert first == second == [fast] and fast.in_flight == 2
    third = result(dispatcher.acquire(BATCH))
    assert third == [] and slow.in_flight == 1 and dispatcher.queue_depth == 1
    clock.advance(0.01)
    fleet.finish(first.load, 0.01)
    assert third == [fast] and fast.in_flight == 2 and slow.in_flight == 1


class _Curve(Limit):
    """A learned limit whose levels were measured: each stretches requests as C{curve} says."""

    curve: dict = {2: 1.6, 3: 1.8}

    def knows(self, level: int) -> bool:
        return True

    def stretch(self, in_flight: int) -> float:
        return self.curve.get(in_flight, 1.0)


def _fast_and_slower(fill_near: float) -> tuple:
    """
    A fast real host (10 ms an image alone) with a limit of two, and a
    slower one (30 ms) with a limit of three, running one image; a
    dispatcher over them.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("fast"), BackendAddress("slow")], clock)
    fast, slow = fleet.backends
    for host, seconds, learned in ((fast, 0.01, 2), (slow, 0.03, 3)):
        fleet.check_passed(host)
        host.limiter = _Curve(learned=learned)
        fleet.finish(fleet.start(host, "clip-visual"), seconds)
    fleet.start(slow, "clip-visual")
    return clock, fleet, Dispatcher(fleet, ShortestDelay(fill_near=fill_near), clock, 60.0, 100)


def test_batch_work_that_would_wait_fills_a_slower_host_up_to_its_limit():
    """
    The fast host full, a second image on the slower host answers in 48 ms
    and slows the first, against about 32 ms waiting for the fast host: the
    rule before waits.  A request waiting does no work, and 48 ms is within
    three and a half times the fast host's 16 ms: the slower host takes
    it, and the next (54 ms); then its limit is reached, and the request
    after waits for the first slot that frees.
    """
    clock, fleet, dispatcher = _fast_and_slower(fill_near=0.0)
    fast, slow = fleet.backends
    assert [result(dispatcher.acquire(BATCH)) for _ in range(3)] == [[fast], [fast], []]

    clock, fleet, dispatcher = _fast_and_slower(fill_near=3.5)
    fast, slow = fleet.backends
    first, second, third, fourth, fifth = (result(dispatcher.acquire(BATCH)) for _ in range(5))
    assert first == second == [fast] and third == fourth == [slow] and slow.in_flight == 3
    assert fifth == [] and dispatcher.queue_depth == 1
    clock.advance(0.016)
    fleet.finish(first.load, 0.016)
    assert fifth == [fast] and dispatcher.queue_depth == 0

    # while people search (a search came lately), batch work is told so,
    # and waits for the fast host instead
    clock, fleet, dispatcher = _fast_and_slower(fill_near=3.5)
    fast, slow = fleet.backends
    seen = []

    class Seeing(ShortestDelay):
        def choose(self, request, candidates):
            seen.append((request.interactive, request.searching))
            return super().choose(request, candidates)

    dispatcher.strategy = Seeing(fill_near=3.5)
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    assert result(dispatcher.acquire(search)) == [fast]
    for _ in range(3):
        clock.advance(0.05)  # past the pace of batch work while people search
        dispatcher.acquire(BATCH)
    assert fast.in_flight == 2 and slow.in_flight == 1 and dispatcher.queue_depth == 2
    assert seen[0] == (True, False) and seen[1:] and all(s == (False, True) for s in seen[1:])


def test_while_people_search_batch_work_keeps_to_what_a_host_was_seen_to_run_at_once():
    """
    A host that runs two requests at a time, whose learned limit grew to
    three (a third request, waiting inside, keeps both busy between an
    answer and the next request's arrival): while people search, batch
    work keeps to the two it was seen to run at once, so that the next
    search starts at once rather than behind a batch request inside the
    host; once nobody searches, batch work takes all three.  A host seen
    to run three at once keeps three, and so does one seen to run one at
    a time (a real host's batch requests seldom show more), or whose limit
    is being tried for the first time, or where searches are slower.
    """

    def fleet_of(at_once, limit=None, searches=(0.01,)):
        clock = task.Clock()
        fleet = Fleet.from_addresses([BackendAddress(f"h{i}") for i in range(len(searches))], clock)
        for host, search in zip(fleet.backends, searches):
            fleet.check_passed(host)
            host.limiter = limit or _Measured(learned=3)
            host.limiter.ran_at_once(at_once)
            fleet.finish(fleet.start(host, "clip-textual"), search)
        dispatcher = Dispatcher(fleet, LeastConnections(), clock, 60.0, 100)
        fleet.finish(result(dispatcher.acquire(SEARCH)).load, 0.01)  # someone searches
        return clock, fleet, fleet.backends[0], dispatcher

    def batch_of(clock, dispatcher, count=3):
        batch = []
        for _ in range(count):
            clock.advance(1)  # (batch starts are paced while people search)
            batch.append(result(dispatcher.acquire(BATCH)))
        return batch

    clock, fleet, host, dispatcher = fleet_of(2)
    batch = batch_of(clock, dispatcher)
    assert batch[0] == batch[1] == [host] and batch[2] == [] and host.in_flight == 2
    search = result(dispatcher.acquire(SEARCH))
    assert search == [host] and host.in_flight == 3  # the search starts at once
    fleet.finish(batch[0].load, 0.02)
    clock.advance(1)
    assert batch[2] == [] and host.in_flight == 2  # batch work keeps to two
    fleet.finish(search.load, 0.02)  # after the batch request it joined
    clock.advance(1)
    assert batch[2] == [host] and host.in_flight == 2 and host.limiter.side_by_side == 2
    clock.advance(dispatcher.pace_while_searching)  # people stopped searching
    assert result(dispatcher.acquire(BATCH)) == [host] and host.in_flight == 3

    for at_once, limit in ((3, None), (1, None), (2, Limit(learned=3))):
        clock, fleet, host, dispatcher = fleet_of(at_once, limit)
        batch = batch_of(clock, dispatcher)
        assert batch == [[host]] * 3 and host.in_flight == 3

    # where searches are quicker elsewhere, batch work takes all three
    clock, fleet, host, dispatcher = fleet_of(2, searches=(0.05, 0.01))
    slow, quick = fleet.backends
    batch_of(clock, dispatcher, 6)
    assert slow.in_flight == 3 and quick.in_flight == 2 and dispatcher.queue_depth == 1
