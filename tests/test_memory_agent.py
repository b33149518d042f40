"""
Tests for L{imml.testing.MemoryAgent}: several fake hosts in memory, routed
by address, driven by a L{Clock}, with no sockets.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import treq
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface.verify import verifyObject

from imml.body import BytesProducer
from imml.testing import ENTRIES, FakeMLHost, MemoryAgent, predict_body

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40


@attrs.define
class Got:
    """What a request got so far: a response, its body, or a failure."""

    deferred: Deferred[Any]
    code: int | None = None
    headers: Headers | None = None
    body: bytes | None = None
    failure: Any = None
    body_failure: Any = None

    @property
    def done(self) -> bool:
        return self.body is not None or self.failure is not None or self.body_failure is not None

    def header(self, name: bytes) -> bytes | None:
        assert self.headers is not None
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


def send(agent: MemoryAgent, method: bytes, url: str, body: bytes = b"", content_type: bytes | None = None) -> Got:
    headers = Headers({b"content-type": [content_type]} if content_type else {})
    d = agent.request(method, url.encode("ascii"), headers, BytesProducer(body) if body else None)
    got = Got(d)

    def response(r: Any) -> None:
        got.code, got.headers = r.code, r.headers
        reading = treq.content(r)
        reading.addCallbacks(lambda b: setattr(got, "body", b), lambda f: setattr(got, "body_failure", f))

    d.addCallbacks(response, lambda f: setattr(got, "failure", f))
    return got


def predict(agent: MemoryAgent, address: str, task: str = "clip-visual", image: bytes = JPEG) -> Got:
    kwargs: dict[str, Any] = {"text": "a cat"} if task == "clip-textual" else {"image": image}
    content_type, body = predict_body(ENTRIES[task], **kwargs)
    return send(agent, b"POST", f"http://{address}/predict", body, content_type)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fleet(clock: Clock, **hosts: dict[str, Any]) -> tuple[MemoryAgent, dict[str, FakeMLHost]]:
    """An agent with one host per keyword: address (as name) -> settings."""
    agent = MemoryAgent()
    made = {}
    for address, settings in hosts.items():
        made[address] = FakeMLHost(clock, **{"name": address, **settings})
        agent.add(address, made[address])
    return agent, made


def test_provides_iagent() -> None:
    verifyObject(IAgent, MemoryAgent())


def test_each_host_gets_only_its_own_requests(clock: Clock) -> None:
    agent = MemoryAgent()
    a, b = FakeMLHost(clock, name="a"), FakeMLHost(clock, name="b")
    agent.add("10.0.0.1:3003", a)
    agent.add("[fd00::2]:3003", b)
    to_a = [predict(agent, "10.0.0.1:3003", "faces"), send(agent, b"GET", "http://10.0.0.1:3003/ping")]
    to_b = [predict(agent, "[fd00::2]:3003", "ocr"), predict(agent, "[fd00::2]:3003", "clip-textual")]
    assert [g.header(b"x-fake-host") for g in to_a] == [b"a", b"a"]
    assert [g.header(b"x-fake-host") for g in to_b] == [b"b", b"b"]
    assert all(g.code == 200 for g in to_a + to_b)
    assert "facial-recognition" in json.loads(to_a[0].body)
    assert [r.task for r in a.received] == ["faces"] and a.pings == 1
    assert [r.task for r in b.received] == ["ocr", "clip-textual"] and b.pings == 0
    assert (a.connections, b.connections) == (2, 2), "one connection per request, to its own host"
    assert a.received[0].headers["host"] == ["10.0.0.1:3003"]
    assert b.received[0].headers["host"] == ["[fd00::2]:3003"]


def test_service_time_under_the_clock(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"nas:3003": {"slots": 1, "service_time": 1.0}})
    first, second = predict(agent, "nas:3003", image=b"1"), predict(agent, "nas:3003", image=b"2")
    assert (hosts["nas:3003"].in_flight, hosts["nas:3003"].queued) == (1, 1)
    clock.advance(0.999)
    agent.flush()
    assert not first.done
    clock.advance(0.001)
    assert not first.done, "nothing moves before the flush"
    agent.flush()
    assert first.code == 200 and first.body and not second.done
    clock.advance(1.0)
    agent.flush()
    assert second.code == 200 and hosts["nas:3003"].served == 2


def test_addresses_are_normalized_like_backend_lists(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"NAS": {}, "[::1]:8080": {}})
    assert send(agent, b"GET", "http://nas:3003/ping").body == b"pong"
    assert send(agent, b"GET", "http://[::1]:8080/ping").body == b"pong"
    assert (hosts["NAS"].pings, hosts["[::1]:8080"].pings) == (1, 1)
    refused = send(agent, b"GET", "http://nas/ping")  # port 80
    assert refused.failure.check(error.ConnectionRefusedError)


def test_no_host_refuses_the_connection(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"10.0.0.1:3003": {}})
    got = send(agent, b"GET", "http://10.0.0.2:3003/ping")
    assert got.failure is not None and got.failure.check(error.ConnectionRefusedError)
    agent.remove("10.0.0.1:3003")
    got = predict(agent, "10.0.0.1:3003")
    assert got.failure.check(error.ConnectionRefusedError)
    assert hosts["10.0.0.1:3003"].received == []


def test_add_and_remove_check_their_address(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"10.0.0.1:3003": {}})
    with pytest.raises(ValueError):
        agent.add("10.0.0.1", FakeMLHost(clock))
    with pytest.raises(KeyError):
        agent.remove("10.0.0.9:3003")


def test_only_plain_http(clock: Clock) -> None:
    agent, _ = fleet(clock, **{"10.0.0.1:443": {}})
    assert send(agent, b"GET", "https://10.0.0.1/ping").failure.check(SchemeNotSupported)


def test_unreachable_hangs_connecting_until_cancelled(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"mac.local:3003": {}})
    agent.unreachable("mac.local:3003")
    got = predict(agent, "mac.local:3003")
    clock.advance(3600)
    agent.flush()
    assert not got.done
    got.deferred.cancel()
    assert got.failure.check(error.ConnectingCancelledError)
    assert hosts["mac.local:3003"].received == [] and hosts["mac.local:3003"].connections == 0


def test_a_host_waking_up_takes_the_requests_still_connecting(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"mac.local:3003": {}})
    agent.unreachable("mac.local:3003")
    waiting = predict(agent, "mac.local:3003")
    agent.flush()
    agent.reachable("mac.local:3003")
    assert waiting.code == 200 and waiting.body
    assert len(hosts["mac.local:3003"].received) == 1


def test_nothing_moves_to_a_host_gone_to_sleep(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"mac.local:3003": {"service_time": 1.0}})
    got = predict(agent, "mac.local:3003")
    assert hosts["mac.local:3003"].in_flight == 1
    agent.unreachable("mac.local:3003")
    clock.advance(1.0)
    agent.flush()
    assert not got.done and hosts["mac.local:3003"].served == 1
    agent.reachable("mac.local:3003")
    agent.flush()
    assert got.code == 200 and got.body


def test_cancelling_a_request_cancels_it_at_the_host(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"10.0.0.1:3003": {"slots": 1, "service_time": 1.0}})
    host = hosts["10.0.0.1:3003"]
    running, queued = predict(agent, "10.0.0.1:3003", image=b"1"), predict(agent, "10.0.0.1:3003", image=b"2")
    running.deferred.cancel()
    assert running.failure is not None
    agent.flush()
    assert (host.cancelled, host.in_flight, host.queued) == (1, 1, 0)
    clock.advance(1.0)
    agent.flush()
    assert queued.code == 200 and host.served == 1


def test_reset_fails_the_request(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"10.0.0.1:3003": {"mode": "reset"}})
    got = predict(agent, "10.0.0.1:3003")
    agent.flush()
    assert got.failure is not None and got.failure.check(ResponseNeverReceived), got.failure
    assert got.failure.value.reasons[0].check(error.ConnectionLost)
    assert len(hosts["10.0.0.1:3003"].received) == 1 and hosts["10.0.0.1:3003"].served == 0


def test_die_mid_answer_fails_the_body(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"10.0.0.1:3003": {"mode": "die-mid-answer", "service_time": 0.5}})
    got = predict(agent, "10.0.0.1:3003")
    clock.advance(0.5)
    agent.flush()
    assert got.code == 200 and got.failure is None
    assert got.body is None and got.body_failure.check(ResponseFailed), got.body_failure
    host = hosts["10.0.0.1:3003"]
    assert (host.served, host.in_flight, host.cancelled) == (0, 0, 0)


def test_hang_answers_nothing_until_cancelled(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"10.0.0.1:3003": {"mode": "hang"}})
    host = hosts["10.0.0.1:3003"]
    got = [predict(agent, "10.0.0.1:3003"), send(agent, b"GET", "http://10.0.0.1:3003/ping")]
    clock.advance(3600)
    agent.flush()
    assert not any(g.done for g in got)
    assert host.cancelled == 0
    for g in got:
        g.deferred.cancel()
        assert g.failure.check(ResponseNeverReceived, CancelledError)
    agent.flush()
    assert host.cancelled == 2


@pytest.mark.parametrize("mode, code", [("error500", 500), ("error503", 503)])
def test_error_modes_answer(clock: Clock, mode: str, code: int) -> None:
    agent, _ = fleet(clock, **{"10.0.0.1:3003": {"mode": mode}})
    got = predict(agent, "10.0.0.1:3003")
    assert got.code == code and got.body


def test_stopping_a_host_drops_its_connections(clock: Clock) -> None:
    agent, hosts = fleet(clock, **{"10.0.0.1:3003": {"mode": "hang"}, "10.0.0.2:3003": {"service_time": 1.0}})
    hung, busy = predict(agent, "10.0.0.1:3003"), predict(agent, "10.0.0.2:3003")
    stopped = hosts["10.0.0.1:3003"].stop()
    agent.flush()
    assert stopped.called
    assert hung.failure.check(ResponseNeverReceived)
    clock.advance(1.0)
    agent.flush()
    assert busy.code == 200
