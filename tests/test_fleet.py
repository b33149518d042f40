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


def test_a_queued_answer_does_not_count_as_service_time():
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("medium")], clock)
    medium = fleet.backends[0]
    fleet.check_passed(medium)
    fleet.started(medium)
    fleet.finished(medium, "clip-visual", 0.15, in_flight=1)
    fleet.started(medium)
    fleet.started(medium)
    fleet.finished(medium, "clip-visual", 0.30, in_flight=2)  # waited inside the host
    assert medium.service_time("clip-visual") == 0.15
    fleet.finished(medium, "clip-visual", 0.16, in_flight=1)
    assert 0.15 < medium.service_time("clip-visual") < 0.16


class _OnHost:
    def __init__(self, task, sent):
        self.task, self.sent = task, sent

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
