"""
The service tree's building blocks: the listener that says when it listens.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher

from imml.services import Listener, Running


class Port:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred:
        self.listening = False
        return succeed(None)


class Endpoint:
    """An endpoint whose listen() answers as told."""

    def __init__(self, result=None) -> None:
        self.result = result
        self.calls = 0
        self.pending: list[Deferred] = []

    def listen(self, factory) -> Deferred:
        self.calls += 1
        if self.result == "wait":
            d = Deferred()
            self.pending.append(d)
            return d
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(Port())


def outcome(d: Deferred) -> list:
    box: list = []
    d.addBoth(box.append)
    return box


def test_the_port_opens_while_privileges_are_held_and_listening_says_so():
    endpoint = Endpoint()
    listener = Listener(endpoint, Factory(), "tcp:80")
    listener.privilegedStartService()  # as twistd does, before dropping --uid
    assert endpoint.calls == 1 and listener.port is not None
    listener.startService()
    assert endpoint.calls == 1  # not opened twice
    [port] = outcome(listener.listening())
    assert port is listener.port and port.listening
    listener.stopService()
    assert not port.listening and listener.port is None


def test_a_port_that_cannot_be_opened_is_said_once_and_told_to_who_waits():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        endpoint = Endpoint()
        endpoint.result = "wait"
        listener = Listener(endpoint, Factory(), "tcp:3003")
        listener.startService()
        waiting = outcome(listener.listening())
        endpoint.pending[0].errback(CannotListenError("", 3003, OSError("in use")))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [failure] = waiting
    assert failure.check(CannotListenError)
    assert outcome(listener.listening())[0].check(CannotListenError)
    assert len([e for e in events if e.get("endpoint") == "tcp:3003" and "log_failure" in e]) == 1
    listener.stopService()


def test_stopping_before_the_port_opens_cancels_the_opening_quietly():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        endpoint = Endpoint("wait")
        listener = Listener(endpoint, Factory(), "tcp:3003")
        listener.startService()
        waiting = outcome(listener.listening())
        listener.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert endpoint.pending[0].called and waiting and listener.port is None
    assert not [e for e in events if "log_failure" in e]


def test_a_listener_started_again_opens_again():
    endpoint = Endpoint()
    listener = Listener(endpoint, Factory())
    listener.startService()
    listener.stopService()
    listener.startService()
    assert endpoint.calls == 2 and listener.port is not None and listener.port.listening
    listener.stopService()


def test_running_starts_and_stops_its_component():
    calls: list = []
    service = Running("thing", lambda: calls.append("start"), lambda: calls.append("stop"))
    service.startService()
    service.stopService()
    assert calls == ["start", "stop"] and service.name == "thing"
