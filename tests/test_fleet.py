"""
What the fleet learns from answers: throughput at the limit, fair service
times.
"""

from twisted.internet import task

from imml.backends import BackendAddress
from imml.fleet import BackendSettings, Fleet


def test_throughput_is_measured_from_answers_while_the_host_is_kept_busy():
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("fast")], clock, settings=lambda a: BackendSettings(slots=2))
    fast = fleet.backends[0]
    fleet.check_passed(fast)
    fleet.started(fast)
    fleet.started(fast)
    for _ in range(20):  # an answer every 20 ms, and the freed slot refilled at once
        clock.advance(0.02)
        fleet.finished(fast, "clip-visual", 0.04, in_flight=2)
        fleet.started(fast)
    assert abs(fast.throughput - 50.0) < 0.5
    # answers while the host is not kept busy say nothing of its throughput
    clock.advance(0.02)
    fleet.finished(fast, "clip-visual", 0.04, in_flight=2)
    clock.advance(1.0)
    fleet.finished(fast, "clip-visual", 0.04, in_flight=1)
    assert abs(fast.throughput - 50.0) < 0.5


def _medium_host():
    """A host that has answered an image in 150 ms."""
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("medium")], clock)
    medium = fleet.backends[0]
    fleet.check_passed(medium)
    fleet.started(medium)
    fleet.finished(medium, "clip-visual", 0.15, in_flight=1)
    return clock, fleet, medium


def test_a_queued_answer_does_not_count_as_service_time():
    clock, fleet, medium = _medium_host()
    fleet.started(medium)
    fleet.started(medium)
    fleet.finished(medium, "clip-visual", 0.30, in_flight=2)  # waited inside the host
    assert medium.service_time("clip-visual") == 0.15
    fleet.finished(medium, "clip-visual", 0.16, in_flight=1)
    assert 0.15 < medium.service_time("clip-visual") < 0.16


class _OnHost:
    def __init__(self, task, sent):
        self.task, self.sent, self.starts = task, sent, sent

    def host_down(self):
        pass


def test_the_next_answer_is_expected_from_what_runs_on_the_host():
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("fast")], clock, settings=lambda a: BackendSettings(slots=2))
    fast = fleet.backends[0]
    fleet.check_passed(fast)
    assert fast.next_answer_in() is None  # nothing on it
    fleet.started(fast)
    fleet.finished(fast, "clip-visual", 0.04, in_flight=1)
    fleet.started(fast)
    fleet.finished(fast, "clip-textual", 0.01, in_flight=1)
    clock.advance(1.0)
    fast.attempts.add(_OnHost("clip-visual", clock.seconds()))
    clock.advance(0.015)
    fast.attempts.add(_OnHost("clip-visual", clock.seconds()))
    assert abs(fast.next_answer_in() - 0.025) < 1e-9  # the first image's 40 ms, 15 ms in
    fast.attempts.add(_OnHost("clip-textual", clock.seconds()))
    assert abs(fast.next_answer_in() - 0.01) < 1e-9  # a text search is quicker
    clock.advance(0.5)
    assert fast.next_answer_in() == 0.0  # overdue: any moment now


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
    fleet.started(medium)
    first = _OnHost("clip-visual", clock.seconds())
    medium.take(first)
    assert first.starts == clock.seconds()  # a slot of its own
    clock.advance(0.05)
    fleet.started(medium)
    second = _OnHost("clip-visual", clock.seconds())
    medium.take(second)
    assert second.starts is None
    assert abs(medium.next_answer_in() - 0.10) < 1e-9  # the first's
    clock.advance(0.12)  # the first is late
    medium.release(first)
    fleet.finished(medium, "clip-visual", 0.17, in_flight=1)
    assert second.starts == clock.seconds()
    # sent 170 ms ago, started now: a whole service time to go
    assert abs(medium.next_answer_in() - medium.service_time("clip-visual")) < 1e-9
    medium.release(second)
    assert medium.next_answer_in() is None and medium._queued == 0


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
    for host in fleet.backends:
        fleet.check_passed(host)
        fleet.started(host)
        fleet.started(host)
    for _ in range(10):
        clock.advance(0.02)
        for host in fleet.backends:
            fleet.finished(host, "clip-visual", 0.04, in_flight=2)
            fleet.started(host)
    before = (fast.throughput, fast.service_time("clip-visual"), fast.slot_time)
    clock.rightNow -= 600  # the clock is set back ten minutes
    for host in fleet.backends:
        fleet.finished(host, "clip-visual", -599.96, in_flight=2)  # measured across it
        fleet.started(host)
    assert (fast.throughput, fast.service_time("clip-visual"), fast.slot_time) == before
    assert fast.stats.served == 11
    # nor does a learned limit shrink after it
    clock.advance(0.02)
    fleet.finished(learning, "clip-visual", 0.04, in_flight=2)
    assert learning.limit >= 2
