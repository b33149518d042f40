"""
What the fleet learns from answers: throughput at the limit, fair service
times.
"""

import pytest
from twisted.internet import task

from imml.backends import BackendAddress
from imml.classify import RequestInfo
from imml.fleet import BackendSettings, Fleet
from imml.limits import Limit
from imml.strategies import ShortestDelay


def test_throughput_is_measured_from_answers_while_the_host_is_kept_busy():
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("fast")], clock, settings=lambda a: BackendSettings(slots=2))
    fast = fleet.backends[0]
    fleet.check_passed(fast)
    loads = [fleet.start(fast, "clip-visual"), fleet.start(fast, "clip-visual")]
    for _ in range(20):  # an answer every 20 ms, and the freed slot refilled at once
        clock.advance(0.02)
        fleet.finish(loads.pop(0), 0.04)
        loads.append(fleet.start(fast, "clip-visual"))
    assert abs(fast.throughput - 50.0) < 0.5
    # answers while the host is not kept busy say nothing of its throughput
    clock.advance(0.02)
    fleet.finish(loads.pop(0), 0.04)
    clock.advance(1.0)
    fleet.finish(loads.pop(0), 0.04)
    assert abs(fast.throughput - 50.0) < 0.5
    assert fast.in_flight == 0 and fast.loads == set()


def test_the_limit_is_told_how_long_a_host_held_it_not_the_time_it_had_none():
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("slow")], clock)
    slow = fleet.backends[0]
    fleet.check_passed(slow)
    for _ in range(3):  # 50 ms with a request, then 30 ms with none
        load = fleet.start(slow, "clip-visual")
        clock.advance(0.05)
        fleet.finish(load, 0.05)
        clock.advance(0.03)
    fleet.start(slow, "clip-visual")
    assert slow.limiter.at_limit == pytest.approx(0.15)


def test_the_limit_is_told_when_a_host_has_more_than_its_limit():
    """
    The time a host with a learned limit holds more requests than that
    (the room past it, a search) is kept apart from its limit's
    measurement; the limit is told which answers were given then, and
    the share of the host each request had while it ran.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("cpu")], clock)
    cpu = fleet.backends[0]
    fleet.check_passed(cpu)
    told = []

    class Told(Limit):
        def answered(self, *args):
            told.append((args[6], args[7]))  # over the limit when it answered; the shares when sent
            return super().answered(*args)

    cpu.limiter = Told()
    first = fleet.start(cpu, "clip-visual")
    second = fleet.start(cpu, "clip-visual")  # past a limit of one
    clock.advance(0.04)
    fleet.finish(first, 0.04)
    clock.advance(0.03)
    fleet.finish(second, 0.07)
    assert cpu.limiter.at_limit == pytest.approx(0.03)  # not the 40 ms with two
    assert told == [(True, ()), (False, ())]  # both sent before the host held any
    assert cpu.limiter.shares() == pytest.approx((0.0, 0.03, 0.02))  # 30 ms alone, 40 ms shared by two


def _medium_host():
    """A host that has answered an image in 150 ms."""
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("medium")], clock)
    medium = fleet.backends[0]
    fleet.check_passed(medium)
    fleet.finish(fleet.start(medium, "clip-visual"), 0.15)
    return clock, fleet, medium


def test_a_queued_answer_does_not_count_as_service_time():
    clock, fleet, medium = _medium_host()
    first, second = fleet.start(medium, "clip-visual"), fleet.start(medium, "clip-visual")
    assert (first.in_flight, second.in_flight) == (1, 2)
    fleet.finish(second, 0.30)  # sent with another on the host: waited inside it
    assert medium.service_time("clip-visual") == 0.15
    fleet.finish(first, 0.16)
    assert 0.15 < medium.service_time("clip-visual") < 0.16


def test_the_next_answer_is_expected_from_what_runs_on_the_host():
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("fast")], clock, settings=lambda a: BackendSettings(slots=3))
    fast = fleet.backends[0]
    fleet.check_passed(fast)
    assert fast.next_answer_in() is None  # nothing on it
    fleet.finish(fleet.start(fast, "clip-visual"), 0.04)
    fleet.finish(fleet.start(fast, "clip-textual"), 0.01)
    clock.advance(1.0)
    fleet.start(fast, "clip-visual")
    clock.advance(0.015)
    fleet.start(fast, "clip-visual")
    assert abs(fast.next_answer_in() - 0.025) < 1e-9  # the first image's 40 ms, 15 ms in
    fleet.start(fast, "clip-textual")
    assert abs(fast.next_answer_in() - 0.01) < 1e-9  # a text search is quicker
    clock.advance(0.5)
    assert fast.next_answer_in() == 0.0  # overdue: any moment now


class _Halving(Limit):
    """A real host measured to take twice as long per request with two on it."""

    def stretch(self, in_flight: int) -> float:
        return 2.0 if in_flight >= 2 else 1.0


def test_on_a_real_host_the_next_answer_is_expected_at_its_time_under_load():
    """
    Two images share a real host's processor, each taking twice its 100 ms
    alone: the first is expected 200 ms after it started, not overdue after
    100.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("real")], clock)
    real = fleet.backends[0]
    real.limiter = _Halving(learned=2)
    fleet.check_passed(real)
    fleet.finish(fleet.start(real, "clip-visual"), 0.1)
    clock.advance(1.0)
    fleet.start(real, "clip-visual")
    assert abs(real.next_answer_in() - 0.1) < 1e-9  # alone: its 100 ms
    fleet.start(real, "clip-visual")
    clock.advance(0.15)
    assert abs(real.next_answer_in() - 0.05) < 1e-9  # 200 ms with another, 150 ms in


def test_a_request_sent_past_the_proven_limit_waits_inside_the_host_until_one_ends():
    """
    A learned limit raised to where the host queued before (a probe): the
    request sent into the last slot waits inside the host, so it is not the
    next to answer; when the first ends it starts, and its answer is
    expected a whole service time later.
    """
    clock, fleet, medium = _medium_host()
    medium.limiter.learned, medium.limiter.ceiling = 2, 2  # probing at 2
    assert (medium.limit, medium.proven_limit) == (2, 1)
    first = fleet.start(medium, "clip-visual")
    assert first.starts == clock.seconds()  # a slot of its own
    clock.advance(0.05)
    second = fleet.start(medium, "clip-visual")
    assert second.starts is None and medium.queued_inside == 1
    assert abs(medium.next_answer_in() - 0.10) < 1e-9  # the first's
    clock.advance(0.12)  # the first is late
    fleet.finish(first, 0.17)
    assert second.starts == clock.seconds()
    # sent 170 ms ago, started now: a whole service time to go
    assert abs(medium.next_answer_in() - medium.service_time("clip-visual")) < 1e-9
    fleet.finish(second)  # the balancer gave up on it
    assert medium.next_answer_in() is None and medium.queued_inside == 0 and medium.in_flight == 0


def test_a_request_answered_before_every_one_it_joined_shows_the_host_runs_them_at_once():
    """
    A search sent beside an image on a real host is answered first: the
    host runs two at once, and a request past its proven limit starts at
    once there.  On a host that queues the second request inside, it can
    only be answered after the first: nothing is learned.  The host coming
    back up forgets it.
    """
    clock, fleet, medium = _medium_host()
    image = fleet.start(medium, "clip-visual")
    clock.advance(0.05)
    queued = fleet.start(medium, "clip-visual")
    clock.advance(0.10)
    fleet.finish(image, 0.15)
    clock.advance(0.15)
    fleet.finish(queued, 0.25)
    assert medium.limiter.side_by_side == 1, "the second waited for the first"

    image = fleet.start(medium, "clip-visual")
    clock.advance(0.05)
    search = fleet.start(medium, "clip-textual")
    clock.advance(0.06)
    fleet.finish(search, 0.06)
    assert medium.limiter.side_by_side == 2
    fleet.finish(image, 0.2)
    # past the proven limit of one, a second request now starts at once
    medium.limiter.learned, medium.limiter.ceiling = 2, 2
    first, second = fleet.start(medium, "clip-visual"), fleet.start(medium, "clip-textual")
    assert medium.proven_limit == 1 and second.starts == clock.seconds() and medium.queued_inside == 0
    fleet.finish(first, 0.15)
    fleet.finish(second, 0.03)
    fleet.request_failed(medium, "connection refused")
    assert not medium.up
    fleet.check_passed(medium)
    assert medium.up and medium.limiter.side_by_side == 1


def test_answers_given_alone_count_however_long_they_took():
    """
    A host held to a CPU quota answers quickly at the start of each period
    and slowly at its end: its quickest answers are not its usual ones.
    Answers given alone, start to end, are its service time, whatever
    their spread; an answer that shared the host with another says little.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("quota")], clock)
    [host] = fleet.backends
    fleet.check_passed(host)
    for seconds in [0.02, 0.09] * 20:
        load = fleet.start(host, "clip-visual")
        clock.advance(seconds)
        fleet.finish(load, seconds)
    assert 0.045 < host.service_time("clip-visual") < 0.065
    # one that another request joined is not alone, however it went
    before = host.service_time("clip-visual")
    first = fleet.start(host, "clip-visual")
    second = fleet.start(host, "clip-visual")
    clock.advance(0.3)
    fleet.finish(first, 0.3)
    fleet.finish(second, 0.3)
    assert host.service_time("clip-visual") == before


def test_searches_past_the_limit_free_no_slot_of_it():
    """
    A heavy host at its limit of one image answers one every 200 ms; a
    search sent past the limit between two answers frees no slot for the
    images waiting: the host's throughput, by which they reckon their wait,
    stays five a second, and the slot time that of an image.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("cpu")], clock, settings=lambda a: BackendSettings(slots=1))
    [host] = fleet.backends
    fleet.check_passed(host)
    image = fleet.start(host, "clip-visual")
    for _ in range(20):
        clock.advance(0.1)
        search = fleet.start(host, "clip-textual")  # past the limit
        clock.advance(0.05)
        fleet.finish(search, 0.05)
        clock.advance(0.05)
        fleet.finish(image, 0.2)
        image = fleet.start(host, "clip-visual")
    assert abs(host.throughput - 5.0) < 0.1
    assert abs(host.slot_time - 0.2) < 1e-9


def test_a_host_going_down_tells_the_subscribers_of_each_request_on_it():
    clock, fleet, medium = _medium_host()
    told = []
    fleet.when_down(told.append)
    on_it = [fleet.start(medium, "clip-visual", owner=name) for name in ("a", "b")]
    fleet.check_failed(medium, "timed out")
    fleet.check_failed(medium, "timed out")
    assert told == []
    fleet.check_failed(medium, "timed out")  # fall=3: down
    assert sorted(load.owner for load in told) == ["a", "b"] and set(told) == set(on_it)


def test_times_measured_across_a_clock_set_back_teach_nothing():
    clock = task.Clock()
    clock.advance(1000)
    fleet = Fleet.from_addresses(
        [BackendAddress("fast"), BackendAddress("learning")],
        clock,
        settings=lambda a: BackendSettings(slots=2 if a.host == "fast" else None),
    )
    fast, learning = fleet.backends
    learning.limiter.learned = 2
    loads = {}
    for host in fleet.backends:
        fleet.check_passed(host)
        loads[host] = [fleet.start(host, "clip-visual"), fleet.start(host, "clip-visual")]
    for _ in range(10):
        clock.advance(0.02)
        for host in fleet.backends:
            fleet.finish(loads[host].pop(0), 0.04)
            loads[host].append(fleet.start(host, "clip-visual"))
    before = (fast.throughput, fast.service_time("clip-visual"), fast.slot_time)
    clock.rightNow -= 600  # the clock is set back ten minutes
    for host in fleet.backends:
        fleet.finish(loads[host].pop(0), -599.96)  # measured across it
        loads[host].append(fleet.start(host, "clip-visual"))
    assert (fast.throughput, fast.service_time("clip-visual"), fast.slot_time) == before
    assert fast.stats.served == 11
    # nor does a learned limit shrink after it
    clock.advance(0.02)
    fleet.finish(loads[learning].pop(0), 0.04)
    assert learning.limit >= 2


def test_the_hosts_observers_hear_of_hosts_not_of_every_request():
    """
    What follows the hosts (the health checker, the agreement check) hears
    when one joins, changes health or leaves, not when a request ends on
    one: that is every request, and the dispatcher alone needs it.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("a")], clock)
    [a] = fleet.backends
    every, hosts = [], []
    fleet.observe(lambda: every.append(1))
    fleet.when_hosts_change(lambda: hosts.append(1))
    fleet.check_passed(a)
    assert (len(every), len(hosts)) == (1, 1)
    fleet.finish(fleet.start(a, "clip-visual"), 0.1)
    assert (len(every), len(hosts)) == (2, 1)
    b = fleet.add(BackendAddress("b"))
    assert len(hosts) == 2
    load = fleet.start(b, "clip-visual")
    fleet.reconfigure([(a.address, a.settings)])  # b leaves once its request ends
    heard = len(hosts)
    assert heard > 2
    fleet.finish(load, 0.1)
    assert len(hosts) == heard + 1 and fleet.backends == [a]


def test_the_fleet_keeps_how_much_longer_than_expected_a_hosts_searches_take():
    """
    A host held to a CPU quota: a search alone takes 6 ms, but one sent
    beside an image often waits for the quota's next period (80 ms more).
    The host's searches are then surprising, and say so; on a host whose
    searches beside an image take what its stretch says, they are not.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("quota"), BackendAddress("fast")], clock)
    quota, fast = fleet.backends
    for host in (quota, fast):
        fleet.check_passed(host)
        search = fleet.start(host, "clip-textual")
        clock.advance(0.006)
        fleet.finish(search, 0.006)  # alone: its unloaded time
    assert quota.search_surprise == fast.search_surprise == 1.0
    for _ in range(10):
        for host, seconds in ((quota, 0.086), (fast, 0.006)):
            image = fleet.start(host, "clip-visual")
            search = fleet.start(host, "clip-textual")
            clock.advance(seconds)
            fleet.finish(search, seconds)
            fleet.finish(image, 0.05)
    assert quota.search_surprise > 5.0
    assert fast.search_surprise == 1.0


def test_a_hosts_surprise_rises_at_once_and_is_forgotten_slowly():
    """
    A host held to a CPU quota by periods: of its searches beside an image,
    one in three waits for the quota's next period (80 ms more than the
    6 ms expected).  The host's surprise is that search's at once, and
    each search after it that did not wait lowers it a fifth of the way
    only: a search's goal is its tail.  (As an average, the one that
    waited would have counted a fifth, and the next two would have made
    the host look nearly as good as one that never waits.)
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("quota")], clock)
    (quota,) = fleet.backends
    fleet.check_passed(quota)
    search = fleet.start(quota, "clip-textual")
    clock.advance(0.006)
    fleet.finish(search, 0.006)  # alone: its unloaded time

    def beside_an_image(seconds):
        image = fleet.start(quota, "clip-visual")
        search = fleet.start(quota, "clip-textual")
        clock.advance(seconds)
        fleet.finish(search, seconds)
        fleet.finish(image, 0.05)

    beside_an_image(0.006)
    assert quota.search_surprise == 1.0
    beside_an_image(0.086)
    worst = quota.search_surprise
    assert worst >= 1.0 + 0.080 / 0.006 - 0.01
    beside_an_image(0.006)
    beside_an_image(0.006)
    assert quota.search_surprise == pytest.approx(1.0 + (worst - 1.0) * 0.8 * 0.8, rel=0.01)
    beside_an_image(0.046)  # waited, less long: the surprise stays above its
    assert quota.search_surprise >= 1.0 + 0.040 / 0.006 - 0.01
    # forgotten with time: halved in 30 s, nearly gone in three minutes
    before = quota.search_surprise
    clock.advance(30)
    assert quota.search_surprise == pytest.approx(1.0 + (before - 1.0) / 2)
    clock.advance(150)
    assert quota.search_surprise < 1.0 + (before - 1.0) / 30


def test_searches_come_back_to_a_host_after_one_surprising_search():
    """
    A fast host answers searches in 10 ms, a slower one in 25 ms.  One
    search on the fast host takes 1.5 s (its model was loading): searches
    go to the slower host for a while, and to the fast host again within
    two minutes, with no search sent there meanwhile.
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("fast"), BackendAddress("slow")], clock)
    fast, slow = fleet.backends
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)
    strategy = ShortestDelay()

    def searched(host, seconds):
        load = fleet.start(host, "clip-textual")
        clock.advance(seconds)
        fleet.finish(load, seconds)

    for host, seconds in ((fast, 0.010), (slow, 0.025)):
        fleet.check_passed(host)
        for _ in range(5):
            searched(host, seconds)
    assert strategy.choose(search, fleet.backends) is fast
    searched(fast, 1.5)
    assert strategy.choose(search, fleet.backends) is slow
    for _ in range(24):  # a search every 5 s, all on the slower host
        clock.advance(5)
        assert fast.search_surprise > 1.0
        if strategy.choose(search, fleet.backends) is fast:
            break
        searched(slow, 0.025)
    else:
        raise AssertionError("searches never came back to the fast host")
    assert clock.seconds() < 125
