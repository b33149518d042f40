"""
The service tree's building blocks: the listener that says when it listens,
or why it cannot, and moves; the tree that exits when a port cannot open.
"""

from __future__ import annotations

import errno
import os

import pytest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, globalLogPublisher

from imml.services import CannotListen, CannotStart, Listener, ListensOrExits, Running


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


def in_use() -> CannotListenError:
    return CannotListenError("127.0.0.1", 3003, OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)))


def test_a_port_that_cannot_be_opened_is_told_to_who_waits_in_one_line():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        endpoint = Endpoint()
        endpoint.result = "wait"
        listener = Listener(endpoint, Factory(), "tcp:3003")
        listener.startService()
        waiting = outcome(listener.listening())
        endpoint.pending[0].errback(in_use())
    finally:
        globalLogPublisher.removeObserver(events.append)
    [failure] = waiting
    assert failure.check(CannotListen)
    assert str(failure.value) == "cannot listen on tcp:3003: address already in use"
    assert outcome(listener.listening())[0].value is failure.value
    assert events == []  # whoever started it says it (ListensOrExits, the reload)
    listener.stopService()


def test_a_port_that_failed_to_open_while_privileged_is_not_opened_again_at_start():
    endpoint = Endpoint(in_use())
    listener = Listener(endpoint, Factory(), "tcp:3003")
    listener.privilegedStartService()
    listener.startService()
    assert endpoint.calls == 1 and listener.failure is not None
    listener.stopService()
    listener.startService()  # a new start tries again
    assert endpoint.calls == 2
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


def test_a_listener_moves_to_a_new_endpoint_once_its_port_is_open():
    old, new = Endpoint(), Endpoint()
    listener = Listener(old, Factory(), "tcp:3003")
    listener.startService()
    first = listener.port
    [result] = outcome(listener.move(new, "tcp:3004"))
    assert result is None and new.calls == 1
    assert listener.port is not first and listener.port.listening and not first.listening
    assert (listener.endpoint, listener.description) == (new, "tcp:3004")
    listener.stopService()


def test_a_listener_that_cannot_move_keeps_its_port_and_says_why():
    listener = Listener(Endpoint(), Factory(), "tcp:3003")
    listener.startService()
    port = listener.port
    [failure] = outcome(listener.move(Endpoint(in_use()), "tcp:3004"))
    assert str(failure.value) == "cannot listen on tcp:3004: address already in use"
    assert listener.port is port and port.listening and listener.description == "tcp:3003"
    listener.stopService()


def test_a_listener_not_running_takes_the_new_endpoint_for_its_next_start():
    new = Endpoint()
    listener = Listener(Endpoint(), Factory(), "tcp:3003")
    assert outcome(listener.move(new, "tcp:3004")) == [None] and new.calls == 0
    listener.startService()
    assert new.calls == 1 and listener.port is not None
    listener.stopService()


class Tree(ListensOrExits, MultiService):
    def __init__(self, *listeners: Listener) -> None:
        super().__init__()
        self.reactor = self
        self.stopped = 0
        self.ends: list[int] = []
        self.exit_when_done = self.ends.append
        for listener in listeners:
            listener.setServiceParent(self)

    def stop(self) -> None:
        self.stopped += 1


def named(name: str, endpoint: Endpoint, description: str) -> Listener:
    listener = Listener(endpoint, Factory(), description)
    listener.setName(name)
    return listener


def test_a_tree_whose_listener_cannot_listen_exits_with_one_line_and_closes_the_others():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    admin = named("admin", Endpoint(), "tcp:8080")
    tree = Tree(named("listen", Endpoint(in_use()), "0.0.0.0:3003"), admin)
    try:
        with pytest.raises(SystemExit) as exiting:
            tree.privilegedStartService()  # as twistd does, before its reactor runs
    finally:
        globalLogPublisher.removeObserver(events.append)
    error = exiting.value
    # An Exception too: twistd removes its PID file and tells a daemon's parent.
    assert error.code == 1 and isinstance(error, (CannotStart, Exception))
    assert str(error) == "cannot listen on 0.0.0.0:3003 (--listen): address already in use"
    [event] = [e for e in events if e.get("imml_event") == "cannot-listen"]
    assert event["log_level"] == LogLevel.critical and event["line"] == str(error)
    assert admin.port is None  # the admin port that did open is closed again
    assert tree.stopped == 0 and tree.ends == []


def test_ports_that_fail_to_open_after_the_start_stop_the_reactor_once_and_end_with_status_1():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    endpoint, admin = Endpoint("wait"), Endpoint("wait")
    tree = Tree(named("listen", endpoint, "tcp:3003"), named("admin", admin, "tcp:8080"))
    try:
        tree.privilegedStartService()
        tree.startService()
        assert tree.stopped == 0
        endpoint.pending[0].errback(in_use())
        admin.pending[0].errback(in_use())
    finally:
        globalLogPublisher.removeObserver(events.append)
    # each says so; the reactor is stopped once (a second stop would fail)
    assert tree.stopped == 1 and tree.ends == [1]
    lines = [e["line"] for e in events if e.get("imml_event") == "cannot-listen"]
    assert lines == [
        "cannot listen on tcp:3003 (--listen): address already in use",
        "cannot listen on tcp:8080 (--admin): address already in use",
    ]
    tree.stopService()


def test_running_starts_and_stops_its_component():
    calls: list = []
    service = Running("thing", lambda: calls.append("start"), lambda: calls.append("stop"))
    service.startService()
    service.stopService()
    assert calls == ["start", "stop"] and service.name == "thing"
