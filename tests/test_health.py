from typing import Callable

import pytest
from twisted.internet import error, task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

from imml.backends import BackendAddress
from imml.fleet import Backend, Fleet
from imml.health import DOWN, UNKNOWN, UP, BadAnswer, Health, HealthChecker, describe_failure


def test_first_check_decides_at_once() -> None:
    h = Health(rise=3, fall=3)
    assert h.state == UNKNOWN and not h.up
    assert h.check_passed(1.0).new == UP
    h = Health(rise=3, fall=3)
    assert h.check_failed(1.0, "connection refused").new == DOWN


def test_rise_and_fall() -> None:
    h = Health(rise=2, fall=3)
    h.check_passed(0)
    assert h.check_failed(1, "x") is None
    assert h.check_failed(2, "x") is None
    t = h.check_failed(3, "timed out")
    assert (t.old, t.new, t.reason) == (UP, DOWN, "health check failed: timed out")
    assert h.since == 3
    assert h.check_passed(4) is None
    assert h.check_failed(5, "x") is None  # a failure resets the rise count
    assert h.check_passed(6) is None
    assert h.check_passed(7).new == UP


def test_a_pass_resets_the_fall_count() -> None:
    h = Health(rise=1, fall=2)
    h.check_passed(0)
    h.check_failed(1, "x")
    h.check_passed(2)
    assert h.check_failed(3, "x") is None
    assert h.up


def test_a_failed_request_takes_a_host_down_at_once() -> None:
    h = Health(rise=2, fall=3)
    h.check_passed(0)
    assert h.request_failed(1, "connection refused").new == DOWN


def collect(events: list[LogEvent]) -> Callable[[], None]:
    observer = events.append
    globalLogPublisher.addObserver(observer)
    return lambda: globalLogPublisher.removeObserver(observer)


def test_checker_checks_on_an_interval_and_logs_transitions() -> None:
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("a"), BackendAddress("b")], clock, rise=1, fall=1)
    answers = {"a": True, "b": False}
    calls = []

    def ping(backend: Backend) -> Deferred[None]:
        calls.append(backend.address.host)
        if answers[backend.address.host]:
            return succeed(None)
        return fail(ConnectionRefusedError())

    events = []
    stop = collect(events)
    try:
        checker = HealthChecker(fleet, ping, clock, interval=5)
        checker.start()
        assert [b.health.state for b in fleet.backends] == [UP, DOWN]
        answers.update(a=False, b=True)
        clock.advance(5)
        assert [b.health.state for b in fleet.backends] == [DOWN, UP]
        assert calls == ["a", "b", "a", "b"]
        checker.stop()
        clock.advance(50)
        assert len(calls) == 4
    finally:
        stop()
    health = [(e["backend"], e["old"], e["new"]) for e in events if e.get("imml_event") == "health"]
    assert health == [("a:3003", UNKNOWN, UP), ("b:3003", UNKNOWN, DOWN), ("a:3003", UP, DOWN), ("b:3003", DOWN, UP)]


def test_checker_survives_a_broken_ping_and_skips_overlapping_checks() -> None:
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("a")], clock)
    pending = []

    def ping(backend: Backend) -> Deferred[None]:
        if not pending:
            d = Deferred()
            pending.append(d)
            return d
        raise RuntimeError("bug in the pinger")

    checker = HealthChecker(fleet, ping, clock, interval=1)
    checker.start()
    clock.advance(1)  # still running: not checked again
    assert len(pending) == 1
    pending[0].callback(None)
    assert fleet.backends[0].health.up
    clock.advance(1)  # the pinger raises: logged as a failed check, timer survives
    assert fleet.backends[0].health._fails == 1
    clock.advance(1)
    assert fleet.backends[0].health._fails == 2
    checker.stop()


_LOST = [Failure(error.ConnectionLost())]


@pytest.mark.parametrize(
    "exception, phrase",
    [
        (error.ConnectionRefusedError(), "connection refused"),
        (error.DNSLookupError(), "name does not resolve"),
        (error.TimeoutError(), "timed out"),
        (error.ConnectingCancelledError(None), "timed out"),
        (error.NoRouteError(), "cannot connect"),
        (ResponseNeverReceived(_LOST), "connection lost before an answer"),
        (RequestTransmissionFailed(_LOST), "connection lost before an answer"),
        (ResponseFailed(_LOST), "connection lost mid-answer"),
        (BadAnswer("status 503"), "status 503"),
        (ValueError("x"), "ValueError"),
    ],
)
def test_failures_are_described_in_a_few_stable_words(exception: Exception, phrase: str) -> None:
    """
    The HTTP client's failures, as C{twisted.web.client} names them, and
    the connection's.
    """
    assert describe_failure(exception) == phrase


def test_one_passing_check_brings_a_host_up_when_no_other_is():
    h = Health(rise=3, fall=3)
    h.check_failed(0, "connection refused")
    assert h.check_passed(1) is None
    assert h.rising
    h = Health(rise=3, fall=3)
    h.check_failed(0, "connection refused")
    t = h.check_passed(1, alone=True)
    assert (t.old, t.new, t.reason) == (DOWN, UP, "health check passed, and no other host is up")
    assert not h.rising


class Pings:
    """
    A ping that answers as the hosts named in C{answering} do now, and
    remembers when it checked each host.
    """

    def __init__(self, clock: task.Clock, answering: set[str]) -> None:
        self.clock, self.answering = clock, answering
        self.times: dict[str, list[float]] = {}

    def __call__(self, backend: Backend) -> Deferred[None]:
        host = backend.address.host
        self.times.setdefault(host, []).append(round(self.clock.seconds(), 3))
        if host in self.answering:
            return succeed(None)
        return fail(error.ConnectionRefusedError())


def checked(rise: int = 2, fall: int = 3) -> tuple[task.Clock, Fleet, Pings, list[bool], HealthChecker]:
    """
    Host a up, host b down, and a checker every 5 s while up, 2 s while
    down, 1 s while requests wait (C{waiting[0]}).
    """
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("a"), BackendAddress("b")], clock, rise=rise, fall=fall)
    pings = Pings(clock, {"a"})
    waiting = [False]
    checker = HealthChecker(
        fleet, pings, clock, interval=5, down_interval=2, fast_interval=1, waiting=lambda: waiting[0]
    )
    checker.start()
    return clock, fleet, pings, waiting, checker


def test_a_down_host_is_checked_every_down_interval():
    clock, fleet, pings, waiting, checker = checked()
    clock.pump([0.25] * 40)
    assert [b.health.state for b in fleet.backends] == [UP, DOWN]
    assert pings.times == {"a": [0, 5, 10], "b": [0, 2, 4, 6, 8, 10]}
    checker.stop()
    clock.pump([1] * 10)
    assert pings.times["b"][-1] == 10


def test_a_down_host_is_checked_every_fast_interval_while_requests_wait():
    clock, fleet, pings, waiting, checker = checked()
    clock.pump([0.25] * 14)  # 3.5 s: b was last checked at 2 s
    waiting[0] = True
    checker.requests_wait()  # b's last check is over a second ago: at once
    clock.advance(0)
    clock.pump([0.25] * 12)  # 6.5 s
    assert pings.times["b"] == [0, 2, 3.5, 4.5, 5.5, 6.5]
    waiting[0] = False  # nothing waits any more: every 2 s again
    clock.pump([0.25] * 14)  # 10 s
    assert pings.times["b"] == [0, 2, 3.5, 4.5, 5.5, 6.5, 8.5]
    assert pings.times["a"] == [0, 5, 10]  # a host that is up: as before
    checker.stop()


def test_with_another_host_up_a_returning_host_still_needs_rise_passes():
    clock, fleet, pings, waiting, checker = checked(rise=3)
    clock.pump([0.25] * 13)  # 3.25 s
    pings.answering.add("b")
    clock.pump([0.25] * 3)  # 4 s: its first pass; it is on its way up, checked every second
    b = fleet.backends[1]
    assert not b.up
    clock.pump([0.25] * 4)  # 5 s: the second
    assert not b.up
    clock.pump([0.25] * 4)  # 6 s: the third brings it up
    assert b.up and b.health.since == 6
    assert pings.times["b"] == [0, 2, 4, 5, 6]
    clock.pump([0.25] * 20)  # then every 5 s, as any host that is up
    assert pings.times["b"] == [0, 2, 4, 5, 6, 11]
    checker.stop()


def test_interval_changes_apply_to_the_next_checks():
    clock, fleet, pings, waiting, checker = checked()
    clock.advance(1)
    checker.set_down_interval(3)  # b: 3 s after its check at 0
    checker.set_interval(4)  # a: 4 s after its check at 0
    clock.pump([0.25] * 28)  # 8 s
    assert pings.times == {"a": [0, 4, 8], "b": [0, 3, 6]}
    waiting[0] = True
    checker.set_fast_interval(0.5)  # b was last checked at 6 s: at once
    clock.advance(0)
    clock.pump([0.25] * 4)  # 9 s
    assert pings.times["b"] == [0, 3, 6, 8, 8.5, 9]
    checker.set_down_interval(10)  # never longer than the interval of a host that is up
    waiting[0] = False
    clock.pump([0.25] * 16)  # 13 s
    assert pings.times["b"] == [0, 3, 6, 8, 8.5, 9, 13]
    checker.stop()


def test_a_host_that_joins_is_checked_at_the_next_tick():
    clock, fleet, pings, waiting, checker = checked()
    fleet.add(BackendAddress("c"))
    clock.advance(2)
    assert pings.times["c"] == [2]
    assert fleet.backends[2].health.state == DOWN
    checker.stop()
