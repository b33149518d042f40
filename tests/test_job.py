"""
One client request's tries, retries, hedges and timeouts, through the
balancer's request path in memory (L{memory.memory_balancer}): raw HTTP in,
fake ML hosts behind an in-memory agent, time on a Clock, no socket.
"""

from __future__ import annotations

import hashlib
import json

from memory import memory_balancer
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)

from imml.forward import HEDGE_FACTOR, HEDGE_MIN
from imml.records import ANSWERED, CANCELLED, FAILED, RETRIED, RequestRecord
from imml.requestlog import RequestLog
from imml.upstream import Upstream


def test_an_answer_comes_from_the_first_host_and_names_it():
    b = memory_balancer({"name": "a", "service_time": 0.05}, {"name": "b"})
    client = b.predict()
    assert client.answer() is None
    b.advance(0.05)
    status, headers, body = client.answer()
    assert status == 200 and headers[b"x-imml-backend"] == b"10.0.0.1:3003"
    assert headers[b"x-fake-host"] == b"a" and "clip" in json.loads(body)
    [record] = b.records.requests
    assert (record.status, record.backend, record.tried) == (200, "10.0.0.1:3003", ("10.0.0.1:3003",))
    assert [a.outcome for a in b.records.attempts] == [ANSWERED]
    assert all(h.in_flight == 0 and h.loads == set() for h in b.fleet.backends)


def test_a_failing_status_is_retried_on_another_host_and_blamed_on_the_first():
    b = memory_balancer({"name": "a", "mode": "error503"}, {"name": "b"})
    status, headers, _ = b.predict().answer()
    assert status == 200 and headers[b"x-fake-host"] == b"b"
    assert [(a.backend, a.status, a.outcome) for a in b.records.attempts] == [
        ("10.0.0.1:3003", 503, RETRIED),
        ("10.0.0.2:3003", 200, ANSWERED),
    ]
    assert b.fleet.backends[0].stats.errors["status 503"] == 1


def test_a_refused_connection_takes_the_host_down_and_uses_up_no_try():
    b = memory_balancer({"name": "a", "listening": False}, {"name": "b"}, max_tries=1)
    status, headers, _ = b.predict().answer()
    assert status == 200 and headers[b"x-fake-host"] == b"b"
    assert not b.fleet.backends[0].up
    assert b.records.attempts[0].error == "connection refused"
    # a host that is gone has not failed the task: nothing is held against it
    assert b.fleet.backends[0].tasks == {}


def test_a_reset_connection_is_retried_and_takes_the_host_down():
    b = memory_balancer({"name": "a", "mode": "reset"}, {"name": "b"})
    status, headers, _ = b.predict().answer()
    assert status == 200 and headers[b"x-fake-host"] == b"b"
    assert not b.fleet.backends[0].up
    assert b.records.attempts[0].error == "connection lost before an answer"


def test_a_host_dying_mid_answer_is_retried_and_the_body_arrives_byte_identical():
    picture = bytes(range(256)) * 64
    b = memory_balancer({"name": "a", "mode": "die-mid-answer"}, {"name": "b"})
    client = b.predict(image=picture)
    status, headers, _ = client.answer()
    assert status == 200 and headers[b"x-fake-host"] == b"b"
    [first], [second] = b.host("a").received, b.host("b").received
    assert first.sha256 == second.sha256 == hashlib.sha256(client.body).hexdigest()
    assert b.records.attempts[0].error == "connection lost mid-answer"


def test_a_host_that_does_not_answer_in_time_is_left_for_another():
    b = memory_balancer({"name": "a", "mode": "hang"}, {"name": "b"}, response_timeout=2.0)
    client = b.predict()
    b.advance(1.9)
    assert client.answer() is None
    b.advance(0.2)
    status, headers, _ = client.answer()
    assert status == 200 and headers[b"x-fake-host"] == b"b"
    assert b.records.attempts[0].error == "timed out" and b.records.attempts[0].outcome == RETRIED
    assert b.host("a").cancelled == 1  # the timed-out request was cancelled at the host
    assert not b.fleet.backends[0].up


def test_an_attempt_far_slower_than_its_host_is_hedged_and_the_first_answer_wins():
    b = memory_balancer({"name": "a", "service_time": 0.05}, {"name": "b"})
    b.predict()
    b.advance(0.1)  # the host's usual: 50 ms
    b.host("a").mode = "hang"  # then it stalls, before a health check can tell
    client = b.predict()
    expected = max(HEDGE_MIN, HEDGE_FACTOR * b.fleet.backends[0].service_time("clip-visual"))
    b.advance(expected - 0.2)
    assert client.answer() is None and not b.host("b").received
    b.advance(0.4)
    status, headers, _ = client.answer()
    assert status == 200 and headers[b"x-fake-host"] == b"b"
    assert b.host("a").cancelled == 1  # the stalled attempt is given up
    assert b.records.attempts[-1].outcome == CANCELLED
    # the record says the stalled attempt was hedged, and only it
    assert [(a.backend, a.hedged) for a in b.records.attempts[1:]] == [
        ("10.0.0.2:3003", False),
        ("10.0.0.1:3003", True),
    ]
    assert all(h.in_flight == 0 for h in b.fleet.backends)
    assert b.fleet.backends[0].up  # hedging is not a health verdict
    [event] = [e for e in b.events if e.get("imml_event") == "redispatch"]
    assert event["backend"] == "10.0.0.1:3003" and "slower" in event["why"]


def test_a_request_on_a_host_that_goes_down_is_sent_elsewhere_at_once():
    b = memory_balancer({"name": "a", "mode": "hang"}, {"name": "b"})
    client = b.predict()
    for _ in range(3):  # fall: 3 failed checks
        b.fleet.check_failed(b.fleet.backends[0], "timed out")
    b.agent.flush()
    status, headers, _ = client.answer()
    assert status == 200 and headers[b"x-fake-host"] == b"b"
    assert b.host("a").cancelled == 1  # given up at once, not left to time out
    assert b.fleet.backends[0].loads == set()
    [record] = b.records.requests
    assert record.tried == ("10.0.0.1:3003", "10.0.0.2:3003")
    [event] = [e for e in b.events if e.get("imml_event") == "redispatch"]
    assert event["backend"] == "10.0.0.1:3003" and event["why"] == "went down with it"


def test_a_client_going_away_cancels_the_host_request_without_blaming_the_host():
    b = memory_balancer({"name": "a", "service_time": 10.0}, {"name": "b"})
    client = b.predict()
    b.advance(1)
    client.go_away()
    b.agent.flush()
    assert b.host("a").cancelled == 1 and not b.host("b").received
    host = b.fleet.backends[0]
    assert host.up and host.in_flight == 0 and not host.stats.errors
    [record] = b.records.requests
    assert record.status == "cancelled"


def test_a_client_going_away_while_a_host_is_being_connected_to_is_not_held_against_it():
    b = memory_balancer({"name": "a"}, {"name": "b"})
    b.agent.unreachable("10.0.0.1:3003")  # asleep: connecting hangs
    client = b.predict()
    b.advance(1)
    client.go_away()
    host = b.fleet.backends[0]
    assert host.up and host.in_flight == 0 and not host.stats.errors
    assert not b.host("b").received  # and nothing was sent elsewhere
    assert [a.outcome for a in b.records.attempts] == [CANCELLED]
    assert [r.status for r in b.records.requests] == ["cancelled"]


def test_a_500_is_retried_once_then_passed_through():
    b = memory_balancer({"name": "a", "mode": "error500"}, {"name": "b", "mode": "error500"}, {"name": "c"})
    status, headers, body = b.predict().answer()
    assert status == 500 and headers[b"x-fake-host"] == b"b" and body == b"Internal Server Error"
    assert [len(b.host(name).received) for name in "abc"] == [1, 1, 0]
    assert all(h.up for h in b.fleet.backends)  # a 500 is about the request, not the host


def test_with_no_host_up_a_request_waits_then_gets_one_503_saying_why():
    b = memory_balancer({"name": "a", "listening": False}, queue_timeout=5.0)
    client = b.predict()
    b.advance(4.9)
    assert client.answer() is None
    b.advance(0.2)
    status, _, body = client.answer()
    assert status == 503 and "no ML host came up within 5 s" in json.loads(body)["detail"]
    assert len(b.records.requests) == 1


def test_each_request_is_one_info_event_of_the_request_log():
    """
    The event a request makes is what C{Logger.info} would make: observers
    filtering by level or namespace, and twistd's formatting, treat it as
    any other.
    """
    events, quiet = [], []
    log = RequestLog(Logger(namespace="imml.forward", observer=events.append))
    record = RequestRecord(
        "POST",
        "/predict",
        "clip-textual",
        200,
        "127.0.0.1:3003",
        ("127.0.0.1:3003",),
        0.0123,
        client="192.0.2.7",
        bytes_in=5210,
        bytes_out=4870,
    )
    log.request_finished(record)
    [event] = events
    assert event["log_level"] is LogLevel.info and event["log_namespace"] == "imml.forward"
    assert event["log_logger"] is log.log and isinstance(event["log_time"], float)
    assert formatEvent(event) == (
        "192.0.2.7 POST /predict clip-textual 200 in 5.2 kB out 4.9 kB via 127.0.0.1:3003 1 try 0.012 s"
    )
    assert (event["status"], event["tries"], event["imml_event"]) == (200, 1, "request")
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    log = RequestLog(Logger(namespace="imml.forward", observer=FilteringLogObserver(quiet.append, [predicate])))
    log.request_finished(record)
    assert quiet == []


# -- answers that stream (past the hold limit, or not retryable) -------------


def test_an_answer_past_the_hold_limit_streams_to_the_client_whole():
    b = memory_balancer({"name": "a", "service_time": 0.05}, {"name": "b"}, hold_limit=100)
    client = b.predict()
    b.advance(0.1)
    status, headers, body = client.answer()
    assert status == 200 and headers[b"x-fake-host"] == b"a" and len(body) > 100
    assert "clip" in json.loads(body) and not client.cut
    assert [a.outcome for a in b.records.attempts] == [ANSWERED]
    assert b.site.resource.active == 0


def test_a_host_dying_while_its_answer_streams_cuts_the_client_once():
    b = memory_balancer({"name": "a", "mode": "die-mid-answer"}, {"name": "b"}, hold_limit=100)
    client = b.predict()
    b.advance(0.1)
    assert client.cut and client.answer() is None  # seen as incomplete, never as whole
    assert len(client.partial()) > 100
    assert not b.host("b").received  # part of it went out: nothing is tried again
    [attempt] = b.records.attempts
    assert attempt.outcome == FAILED and attempt.error == "connection lost mid-answer"
    [record] = b.records.requests
    assert record.status == 200 and b.site.resource.active == 0


def test_a_client_leaving_while_the_answer_streams_cancels_the_attempt():
    b = memory_balancer({"name": "a", "service_time": 0.05}, hold_limit=100)
    client = b.predict()
    b.advance(0.02)
    client.go_away()
    b.advance(0.1)
    assert [a.outcome for a in b.records.attempts] == [CANCELLED]
    assert [r.status for r in b.records.requests] == ["cancelled"]
    assert b.fleet.backends[0].in_flight == 0 and b.site.resource.active == 0


def test_a_request_that_may_not_be_repeated_is_not_sent_elsewhere():
    b = memory_balancer({"name": "a", "mode": "hang"}, {"name": "b"}, response_timeout=2.0)
    client = b.send(b"POST", b"/upload", b"once only")
    b.advance(2.1)
    status, _, body = client.answer()
    assert status == 503 and "timed out" in json.loads(body)["detail"]
    assert b.host("b").connections == 0
    assert [a.outcome for a in b.records.attempts] == [FAILED]


def test_a_hedged_request_answered_first_by_its_own_host_cancels_the_hedge():
    b = memory_balancer({"name": "a", "service_time": 0.05}, {"name": "b", "service_time": 10.0})
    b.predict()
    b.advance(0.1)
    b.host("a").service_time = 3.0  # slow this once, not stalled
    client = b.predict()
    b.advance(max(HEDGE_MIN, HEDGE_FACTOR * 0.05) + 0.2)  # hedged on b...
    assert len(b.host("b").received) == 1
    b.advance(2.0)  # ... and a answers first
    status, headers, _ = client.answer()
    assert status == 200 and headers[b"x-fake-host"] == b"a"
    assert b.host("b").cancelled == 1
    assert sorted((a.outcome, a.hedged) for a in b.records.attempts[1:]) == [(ANSWERED, True), (CANCELLED, False)]


def test_a_fault_of_the_balancers_own_still_answers_the_client(monkeypatch):
    b = memory_balancer({"name": "a"})

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Upstream, "exchange", broken)
    status, _, body = b.predict().answer()
    assert status == 500 and json.loads(body) == {"detail": "internal error in the balancer"}
    assert [e for e in b.events if e.get("log_failure") is not None]
    assert b.site.resource.active == 0
    host = b.fleet.backends[0]  # not the host's fault
    assert host.up and host.in_flight == 0 and not host.stats.errors
