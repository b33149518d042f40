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
