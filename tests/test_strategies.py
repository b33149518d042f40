"""
The strategies are pure decisions: tested with plain views and numbers.
"""

from collections import Counter
from typing import Optional

import pytest
from attrs import define
from zope.interface.verify import verifyObject

from imml.classify import RequestInfo
from imml.interfaces import IBackendView, IStrategy, IStrategyFactory
from imml.strategies import (
    BUILTIN,
    Failover,
    LeastConnections,
    RoundRobin,
    ShortestDelay,
    UnknownStrategy,
    strategy_named,
)
from imml.testing import FakeBackendView

REQUEST = RequestInfo(b"POST", b"/predict", "clip-visual")
UNLIMITED = 1000


def view(index, limit=UNLIMITED, proven=None, **kw):
    """
    Host C{index} (at C{host<index>:3003}), with room for any load unless
    C{limit} is given.
    """
    return FakeBackendView(f"host{index}", index=index, limit=limit, proven_limit=proven, **kw)


def fleet(n, **kw):
    return [view(i, **kw) for i in range(n)]


def take(strategy, views, times):
    """
    Choose C{times} times, each chosen host keeping its request.
    """
    counts = Counter()
    for _ in range(times):
        chosen = strategy.choose(REQUEST, views)
        if chosen is None:
            break
        chosen.in_flight += 1
        counts[chosen.index] += 1
    return counts


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtins_provide_the_interface(name):
    strategy = strategy_named(name)
    verifyObject(IStrategy, strategy)
    assert strategy.name == name
    verifyObject(IStrategyFactory, BUILTIN[name])
    verifyObject(IBackendView, view(0))


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_no_free_slot_means_wait(name):
    views = fleet(2, limit=1, in_flight=1)
    assert strategy_named(name).choose(REQUEST, views) is None


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_only_hosts_with_free_slots_are_chosen(name):
    views = [view(0, limit=1, in_flight=1), view(1, limit=2, in_flight=1), view(2, limit=1, in_flight=1)]
    assert strategy_named(name).choose(REQUEST, views) is views[1]


def test_round_robin_takes_turns_whatever_the_load():
    strategy = RoundRobin()
    views = fleet(3)
    views[0].in_flight = 50
    order = [strategy.choose(REQUEST, views).index for _ in range(6)]
    assert order == [0, 1, 2, 0, 1, 2]


def test_round_robin_follows_weights_smoothly():
    strategy = RoundRobin()
    views = [view(0, weight=3), view(1, weight=1)]
    order = [strategy.choose(REQUEST, views).index for _ in range(8)]
    assert Counter(order) == {0: 6, 1: 2}
    # smooth: never three of the heavy host's turns... in a row twice over
    assert "1" in "".join(map(str, order[:4]))


def test_least_connections_evens_out_load():
    views = fleet(3)
    views[0].in_flight = 4
    counts = take(LeastConnections(), views, 8)
    assert [v.in_flight for v in views] == [4, 4, 4]
    assert counts == {1: 4, 2: 4}


def test_least_connections_spreads_ties():
    strategy = LeastConnections()
    views = fleet(3)
    chosen = {strategy.choose(REQUEST, views).index for _ in range(3)}
    assert chosen == {0, 1, 2}


def test_least_connections_by_weight():
    views = [view(0, weight=2), view(1, weight=1)]
    take(LeastConnections(), views, 6)
    assert [v.in_flight for v in views] == [4, 2]


def test_failover_sends_everything_to_the_first_host():
    views = fleet(3)
    assert take(Failover(), views, 10) == {0: 10}


def test_failover_respects_tiers_then_order():
    views = [view(0, tier=1), view(1, tier=0), view(2, tier=0)]
    assert Failover().choose(REQUEST, views) is views[1]


def test_failover_spills_over_when_the_first_host_is_full():
    views = [view(0, limit=2), view(1)]
    assert take(Failover(), views, 5) == {0: 2, 1: 3}


class Mine:
    """
    A third-party strategy: always the last candidate.
    """

    name = "last"

    def choose(self, request, candidates):
        return candidates[-1]


def test_a_dotted_path_selects_a_third_party_strategy():
    from zope.interface import classImplements

    classImplements(Mine, IStrategy)
    strategy = strategy_named(f"{__name__}.Mine")
    assert isinstance(strategy, Mine)
    assert strategy.choose(REQUEST, fleet(3)).index == 2


def test_unknown_names_list_the_choices():
    with pytest.raises(UnknownStrategy) as e:
        strategy_named("fastest")
    assert "least-connections" in str(e.value) and "'fastest'" in str(e.value)
    with pytest.raises(UnknownStrategy) as e:
        strategy_named("no.such.module.Strategy")
    assert "cannot be loaded" in str(e.value)
    with pytest.raises(UnknownStrategy) as e:
        strategy_named("collections.Counter")
    assert "IStrategy" in str(e.value)


PLUGIN = """
from imml.strategies import StrategyFactory, Failover

class Backwards(Failover):
    name = "backwards"
    def choose(self, request, candidates):
        return max(candidates, key=lambda c: c.index)

backwards = StrategyFactory("backwards", Backwards, "last host first")
"""


def test_a_twisted_plugin_selects_a_third_party_strategy(tmp_path, monkeypatch):
    import twisted.plugins

    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "imml_test_backwards.py").write_text(PLUGIN)
    monkeypatch.setattr(twisted.plugins, "__path__", list(twisted.plugins.__path__) + [str(plugins)])
    monkeypatch.syspath_prepend(str(tmp_path))
    from imml.strategies import available

    assert "backwards" in available()
    strategy = strategy_named("backwards")
    assert strategy.choose(REQUEST, fleet(3)).index == 2


@define(eq=False)
class TimedView(FakeBackendView):
    """
    A host with one service time, C{seconds}, for every task.
    """

    seconds: Optional[float] = None

    def service_time(self, task):
        return self.seconds


def timed(index, limit=UNLIMITED, proven=None, **kw):
    return TimedView(f"host{index}", index=index, limit=limit, proven_limit=proven, **kw)


def sed_request(ahead=0):
    return RequestInfo(b"POST", b"/predict", "clip-visual", ahead=ahead)


def test_shortest_delay_prefers_the_fastest_free_host():
    views = [timed(0, limit=1, seconds=0.6), timed(1, limit=1, seconds=0.04), timed(2, limit=1, seconds=0.15)]
    assert ShortestDelay().choose(sed_request(), views) is views[1]


def test_shortest_delay_waits_for_a_fast_host_rather_than_take_a_slow_one():
    fast = timed(0, limit=2, in_flight=2, seconds=0.04)
    slow = timed(1, limit=1, seconds=0.6)
    medium = timed(2, limit=1, seconds=0.15)
    strategy = ShortestDelay()
    assert strategy.choose(sed_request(ahead=0), [fast, slow, medium]) is None
    # with enough requests queued ahead, the medium host is worth it ...
    assert strategy.choose(sed_request(ahead=6), [fast, slow, medium]) is medium
    # ... and the slow one only when the queue is long indeed
    assert strategy.choose(sed_request(ahead=6), [fast, slow]) is None
    assert strategy.choose(sed_request(ahead=40), [fast, slow]) is slow


def test_shortest_delay_waits_for_a_slot_by_what_holds_the_slots():
    """
    A text search (10 ms) waiting for the fast host's slot waits for image
    requests (40 ms) to finish, not for other text searches.
    """
    fast = timed(0, limit=2, in_flight=2, seconds=0.01, slot_time=0.04)
    medium = timed(1, limit=1, seconds=0.06, slot_time=0.15)
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    # about 20 ms for a slot on the fast host, 10 ms there: 30 ms, against
    # 60 ms on the medium host
    assert ShortestDelay().choose(search, [fast, medium]) is None
    fast.slot_time = 0.2  # slots held far longer: the medium host is sooner
    assert ShortestDelay().choose(search, [fast, medium]) is medium


def test_shortest_delay_tries_hosts_it_knows_nothing_about():
    known = timed(0, limit=4, seconds=0.05)
    new = timed(1, limit=1, seconds=None)
    assert ShortestDelay().choose(sed_request(), [known, new]) is new


def test_shortest_delay_penalises_errors_and_follows_weights():
    a = timed(0, limit=1, seconds=0.05, error_rate=0.5)
    b = timed(1, limit=1, seconds=0.1)
    assert ShortestDelay().choose(sed_request(), [a, b]) is b
    c = timed(2, limit=1, seconds=0.1, weight=4.0)
    assert ShortestDelay().choose(sed_request(), [a, b, c]) is c


def test_shortest_delay_spreads_over_equal_hosts():
    views = fleet(3, limit=10)
    counts = take(ShortestDelay(), views, 9)
    assert counts == {0: 3, 1: 3, 2: 3}


def test_shortest_delay_waits_by_the_hosts_measured_throughput():
    """
    A learned limit may exceed a host's real slots (one request then waits
    inside it): the wait follows the answers per second it really gives.
    """
    fast = timed(0, limit=3, in_flight=3, seconds=0.045, slot_time=0.05, throughput=50.0)
    medium = timed(1, limit=1, seconds=0.15, slot_time=0.15)
    # 2 slots to free at 50/s, then 45 ms: 85 ms, against 150 ms
    assert ShortestDelay().choose(sed_request(ahead=1), [fast, medium]) is None
    # 4 slots to free: 125 ms, not clearly sooner than 150 ms: the free
    # host is taken
    assert ShortestDelay().choose(sed_request(ahead=3), [fast, medium]) is medium


def test_shortest_delay_keeps_a_free_host_busy_unless_waiting_is_clearly_sooner():
    busy = timed(0, limit=2, in_flight=2, seconds=0.010, throughput=200.0)
    free = timed(1, limit=2, seconds=0.016)
    # waiting: 5 ms for a slot, then 10 ms; the free host: 16 ms
    assert ShortestDelay().choose(sed_request(), [busy, free]) is free
    free.seconds = 0.030
    assert ShortestDelay().choose(sed_request(), [busy, free]) is None
    assert (
        ShortestDelay(patience=1.0, slack=0.0, near=1.0).choose(sed_request(), [busy, timed(1, limit=2, seconds=0.016)])
        is None
    )


def test_batch_work_keeps_a_free_host_busy_whose_answers_are_hardly_slower():
    """
    A real fast host at its limit of three answers each request in 36 ms
    (12 ms alone, stretched three times), one of them every 12 ms; an idle
    slower host answers in 80 ms.  Waiting is sooner (12 + 36 ms), yet the
    slower host's answer takes little more than twice the fast host's own:
    left idle while batch work waits, it is throughput lost.  A host whose
    answers take several times longer is kept for when the wait is long.
    """
    fast = timed(0, limit=3, in_flight=3, seconds=0.012, answer_in=0.012, stretches={3: 3.0}, throughput=83.0)
    slower = timed(1, limit=1, seconds=0.080)
    assert ShortestDelay().choose(sed_request(), [fast, slower]) is slower
    slower.seconds = 0.150
    assert ShortestDelay().choose(sed_request(), [fast, slower]) is None
    assert ShortestDelay(near=1.0).choose(sed_request(), [fast, timed(1, limit=1, seconds=0.080)]) is None


def test_batch_work_waits_no_more_readily_with_more_waiting_ahead_of_it():
    """
    The balancer keeps alike requests between two kept waiting unasked
    (L{imml.interfaces.IRequestInfo.ahead}): a request with more ahead of
    it takes a free host at least as readily, even where the busy host it
    would wait for changes with the queue (here: a quick one with little
    throughput for a short queue, then the one with the most).
    """

    def choices(ahead):
        busy = [
            timed(0, limit=1, in_flight=1, seconds=0.1, answer_in=0.0, throughput=0.5),
            timed(1, limit=1, in_flight=1, seconds=2.0, answer_in=0.2, throughput=10.0),
            timed(2, limit=1, in_flight=1, seconds=0.1, answer_in=2.37, throughput=100.0),
        ]
        free = timed(3, limit=1, seconds=4.0)
        return ShortestDelay().choose(sed_request(ahead=ahead), [*busy, free]) is free

    taken = [choices(ahead) for ahead in range(60)]
    first = taken.index(True)
    assert first > 0 and all(taken[first:])


def lasting_queue(slow_seconds=0.070, slow_in_flight=1, limit=3, second=1.6):
    """
    A real fast host at its limit of four (14 ms an image alone, 49 ms at
    four), and a slower real host running C{slow_in_flight} images within a
    limit of C{limit} (its room included), a second image stretching each
    C{second} times and a third 2.4 times.
    """
    fast = timed(0, limit=4, in_flight=4, seconds=0.014, answer_in=0.005, stretches={4: 3.5}, throughput=85.0)
    slow = timed(1, limit=limit, in_flight=slow_in_flight, seconds=slow_seconds, stretches={2: second, 3: 2.4})
    return fast, slow


def test_batch_work_that_would_wait_fills_a_slower_host_already_running():
    """
    A second image on the slower host answers in 112 ms and slows the one
    there: 154 ms of the batch's time, against about 55-70 ms waiting for
    the fast host, which the rule before takes.  But a request waiting in
    the balancer does no work: the slower host, already running, takes it
    (the head of the queue as every request behind it), as its 112 ms are
    within three and a half times the fast host's 49 ms.
    """
    fast, slow = lasting_queue()
    assert ShortestDelay(fill_near=0.0).choose(sed_request(ahead=0), [fast, slow]) is None
    assert all(ShortestDelay().choose(sed_request(ahead=ahead), [fast, slow]) is slow for ahead in range(60))
    # while people search, hosts are left less loaded for their searches
    searching = RequestInfo(b"POST", b"/predict", "clip-visual", searching=True)
    assert ShortestDelay().choose(searching, [fast, slow]) is None


def test_batch_work_that_would_wait_fills_a_host_up_to_its_limit_and_no_idle_one():
    # the third slot, room past a learned limit or not: 168 ms, within 171
    fast, slow = lasting_queue(slow_in_flight=2)
    assert ShortestDelay().choose(sed_request(), [fast, slow]) is slow
    # no free slot: nothing to fill
    fast, full = lasting_queue(slow_in_flight=2, limit=2)
    assert ShortestDelay().choose(sed_request(ahead=3), [fast, full]) is None
    # nor is an idle host filled: whether to start it is the rule before
    fast, idle = lasting_queue(slow_in_flight=0)
    idle.seconds = 0.16
    assert ShortestDelay().choose(sed_request(ahead=3), [fast, idle]) is None


def test_batch_work_that_would_wait_leaves_a_host_several_times_slower_alone():
    """
    A second image on a host of 150 ms alone answers in 240 ms, more than
    three and a half times the fast host's 49 ms: its answers would make
    the tail.
    """
    fast, slower = lasting_queue(slow_seconds=0.150)
    assert ShortestDelay().choose(sed_request(ahead=3), [fast, slower]) is None
    fast, slower = lasting_queue(slow_seconds=0.150)
    assert ShortestDelay(fill_near=5.0).choose(sed_request(ahead=3), [fast, slower]) is slower


def test_a_search_takes_whatever_is_sooner_without_patience():
    """
    Patience keeps a free host busy for batch work; a search, which a person
    waits for, takes whichever is expected sooner.
    """
    busy = timed(0, limit=2, in_flight=2, seconds=0.010, throughput=100.0)
    free = timed(1, limit=1, seconds=0.030)
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    # waiting: 10 ms for a slot, then 10 ms; the free host: 30 ms
    assert ShortestDelay().choose(sed_request(), [busy, free]) is free
    assert ShortestDelay().choose(search, [busy, free]) is None
    free.seconds = 0.019
    assert ShortestDelay().choose(search, [busy, free]) is free


def test_a_search_counts_the_wait_inside_a_host_probing_its_limit():
    """
    A learned limit raised to probe for more: a request sent into that last
    slot may wait inside the host for a slot.  A batch request takes it as
    free; a search counts the wait.
    """
    # the medium host's second slot is a probe: a search there would wait
    # about 150 ms behind an image
    fast = timed(0, limit=2, in_flight=2, seconds=0.01, slot_time=0.04, throughput=50.0)
    medium = timed(1, limit=2, proven=1, in_flight=1, seconds=0.0375, slot_time=0.15, throughput=6.7)
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    assert ShortestDelay().choose(search, [fast, medium]) is None
    assert ShortestDelay().choose(sed_request(ahead=6), [fast, medium]) is medium
    medium.in_flight = 0
    # free now: 37.5 ms there, against 20 ms for a fast slot and 10 ms
    assert ShortestDelay().choose(search, [fast, medium]) is None
    medium.seconds = 0.025
    assert ShortestDelay().choose(search, [fast, medium]) is medium
    medium.seconds = 0.0375
    # the fast host's third slot is a probe: about 20 ms inside it, then
    # 10 ms, beats 37.5 ms on the medium host
    fast = timed(0, limit=3, proven=2, in_flight=2, seconds=0.01, slot_time=0.04, throughput=50.0)
    medium.in_flight = 0
    assert ShortestDelay().choose(search, [fast, medium]) is fast


def test_a_search_past_the_proven_limit_of_a_host_that_runs_requests_at_once_costs_its_stretch():
    """
    A host seen to run three requests at once (a real host): a search sent
    there as the third runs at once, twice as slow as alone, and does not
    wait 100 ms for a request to end, as it might on a host with slots.
    """
    fast = timed(0, limit=3, proven=2, in_flight=2, seconds=0.01, answer_in=0.1, stretches={3: 2.0}, throughput=20.0)
    medium = timed(1, limit=1, seconds=0.0375)
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    assert ShortestDelay().choose(search, [fast, medium]) is medium
    fast.side_by_side = 3
    assert ShortestDelay().choose(search, [fast, medium]) is fast


def test_shortest_delay_guesses_a_new_tasks_time_from_the_hosts_other_work():
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    fast = timed(0, limit=2, in_flight=2, seconds=0.01, slot_time=0.04, throughput=50.0)
    medium = timed(1, limit=1, seconds=0.0375, slot_time=0.15)
    slow = timed(2, limit=1, seconds=None, slot_time=0.6)  # never ran a text search
    assert ShortestDelay().choose(search, [fast, slow]) is None  # not 10 ms on the slow host: 150
    fast.throughput = 10.0
    assert ShortestDelay().choose(search, [fast, medium, slow]) is medium


def test_shortest_delay_waits_for_the_slot_that_frees_first():
    """
    The medium host's image has 20 ms left: a search waits for it rather
    than for the fast host, whose two images have just started.
    """
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    fast = timed(0, limit=2, in_flight=2, seconds=0.01, slot_time=0.04, throughput=50.0, answer_in=0.039)
    medium = timed(1, limit=1, in_flight=1, seconds=0.0375, slot_time=0.15, throughput=6.7, answer_in=0.02)
    slow = timed(2, limit=1, seconds=0.15, slot_time=0.6)
    assert ShortestDelay().choose(search, [fast, medium, slow]) is None
    fast.answer_in = 0.005  # ... unless the fast host is about to answer: 15 ms, not 57.5
    medium.in_flight = 0
    medium.answer_in = None
    assert ShortestDelay().choose(search, [fast, medium, slow]) is None
    fast.answer_in = 0.039
    assert ShortestDelay().choose(search, [fast, medium, slow]) is medium


# -- real hosts: requests on a host slow each other down ---------------------

BATCH = RequestInfo(b"POST", b"/predict", "clip-visual")


def real_pair(fast_in_flight: int, slow_service: float = 0.052) -> list[FakeBackendView]:
    """
    A fast real host (14 ms alone, its requests stretched by the others as
    measured on a light model) at its limit of 3, or below it, and an idle
    slow one.
    """
    fast = FakeBackendView(
        "fast:3003",
        0,
        limit=3,
        in_flight=fast_in_flight,
        throughput=93.0,
        service_times={"clip-visual": 0.014},
        answer_in=0.010,
        stretches={2: 1.6, 3: 2.2, 4: 2.9},
    )
    slow = FakeBackendView("slow:3003", 1, limit=1, service_times={"clip-visual": slow_service})
    return [fast, slow]


def test_a_busy_real_host_is_waited_for_only_when_that_is_sooner_at_its_load():
    """
    The fast host's next request would take 14 ms x 2.2 at its limit, after
    about 10 ms of waiting: the idle slow host's 52 ms is not clearly
    slower, so it takes the request; a slow host of 600 ms is not worth it.
    """
    strategy = ShortestDelay()
    fast, slow = real_pair(fast_in_flight=3)
    assert strategy.choose(BATCH, [fast, slow]) is slow
    fast, slower = real_pair(fast_in_flight=3, slow_service=0.6)
    assert strategy.choose(BATCH, [fast, slower]) is None  # wait for the fast host


def test_a_free_real_host_is_taken_at_its_cost_under_load():
    strategy = ShortestDelay()
    fast, slow = real_pair(fast_in_flight=2)  # 14 ms x 2.2 = 31 ms: sooner than 52
    assert strategy.choose(BATCH, [fast, slow]) is fast
    fast.stretches[3] = 4.0  # 56 ms: the idle slow host is sooner
    assert strategy.choose(BATCH, [fast, slow]) is slow


def test_batch_work_counts_the_time_it_adds_to_the_requests_on_a_real_host():
    """
    A real fast host (14 ms an image alone) with three images on it: a
    fourth would take 48 ms itself (stretch 3.4), and slow the three others
    from 2.6 to 3.4 times their own time, 83 ms of the batch's time in all.
    An idle slow host answers in 62 ms and slows nobody: it takes the
    image.  A search counts its own time only, and takes the fast host.
    """
    stretches = {1: 1.0, 2: 1.84, 3: 2.59, 4: 3.43}
    fast = timed(0, limit=5, in_flight=3, seconds=0.014, stretches=stretches, side_by_side=4)
    slow = timed(1, limit=1, seconds=0.062)
    assert ShortestDelay().choose(sed_request(), [fast, slow]) is slow
    search = RequestInfo(b"POST", b"/predict", "clip-visual", interactive=True)
    assert ShortestDelay().choose(search, [fast, slow]) is fast
    # with one image on it, a second slows that one little: the fast host
    fast.in_flight = 1
    assert ShortestDelay().choose(sed_request(), [fast, slow]) is fast
    # a host with slots (no stretch): a request costs its own time only
    slots = timed(0, limit=5, in_flight=3, seconds=0.014)
    assert ShortestDelay().choose(sed_request(), [slots, slow]) is slots


def test_a_search_shuns_a_host_where_searches_took_far_longer_than_expected():
    """
    An idle slow host held to a CPU quota: searches there are expected to
    take 7 ms, but beside its images they have taken six times that.  The
    fast host, with its images, is sooner.
    """
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    fast = timed(0, limit=4, proven=3, in_flight=3, seconds=0.007, stretches={4: 3.4}, side_by_side=4)
    quota = timed(1, limit=2, in_flight=1, seconds=0.007, stretches={2: 2.0})
    assert ShortestDelay().choose(search, [fast, quota]) is quota
    quota.search_surprise = 6.0
    assert ShortestDelay().choose(search, [fast, quota]) is fast


def test_a_hosts_surprise_is_time_added_to_a_search_there_not_a_factor():
    """
    Searches on a busy heavy host have lately taken 70 ms (two unloaded
    times) more than expected.  Waiting 100 ms for an image to end, then
    70 ms beside the other, plus those 70: 240 ms, sooner than 250 on an
    idle medium host.  (As a factor on the 70 ms it would be 310.)
    """
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    heavy = timed(0, limit=2, in_flight=2, seconds=0.035, answer_in=0.1, stretches={2: 2.0}, throughput=6.0)
    heavy.search_surprise = 3.0
    medium = timed(1, limit=1, seconds=0.25)
    assert ShortestDelay().choose(search, [heavy, medium]) is None  # waits for the heavy host
    heavy.search_surprise = 4.0  # 105 ms more: 275
    assert ShortestDelay().choose(search, [heavy, medium]) is medium
