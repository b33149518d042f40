"""
The facts of the status page and /api/status, read from a fleet on a
task.Clock: how long each host has been in its state, the queue, the
fleet's rate and the alerts.
"""

import pytest
from steering import answered_one_at_a_time
from twisted.internet.task import Clock

from imml.backends import parse_backends
from imml.classify import RequestInfo
from imml.dispatch import Dispatcher
from imml.fleet import BackendSettings, Fleet
from imml.host import MODEL_TTL
from imml.records import ANSWERED, AttemptRecord
from imml.status import Status
from imml.strategies import strategy_named
from imml.window import RecentWindow

BATCH = RequestInfo(b"POST", b"/predict", "clip-visual")


def make(backends="a,b", max_queue=10, **settings):
    clock = Clock()
    clock.advance(1000)
    fleet = Fleet.from_addresses(parse_backends(backends), clock, settings=lambda a: BackendSettings(**settings))
    dispatcher = Dispatcher(fleet, strategy_named("round-robin"), clock, queue_timeout=60, max_queue=max_queue)
    return clock, fleet, dispatcher, Status(fleet, dispatcher, RecentWindow(clock), clock, started=1000.0)


def shown(status, address="a:3003"):
    """
    The state the page shows for the host, and for how long it has been in it.
    """
    doc = status.snapshot()
    [host] = [h for h in doc["hosts"] if h["address"] == address]
    return host["state"], doc["balancer"]["now"] - host["state_since"]


def answer(fleet, backend, seconds=0.2):
    fleet.finish(fleet.start(backend, "clip-visual"), seconds)


def test_in_this_state_counts_from_when_the_host_entered_the_state_shown():
    clock, fleet, dispatcher, status = make("a")
    [a] = fleet.backends
    assert shown(status) == ("unknown", 0)
    clock.advance(10)
    fleet.check_passed(a)  # 1010: up, but it answered nothing yet
    clock.advance(5)
    assert shown(status) == ("cold", 5)
    answer(fleet, a)  # 1015: its models are loaded
    clock.advance(20)
    assert shown(status) == ("up", 20)
    fleet.drain(a)  # 1035: the health did not change, the state did
    clock.advance(7)
    assert shown(status) == ("draining", 7)
    fleet.enable(a)  # 1042
    clock.advance(3)
    assert shown(status) == ("up", 3)
    clock.advance(MODEL_TTL)  # 1345: no answer since 1015: cold since 1315, its models unloaded
    assert shown(status) == ("cold", 30)
    fleet.request_failed(a, "connection refused")
    clock.advance(2)
    assert shown(status) == ("down", 2)
    fleet.woken(a)
    clock.advance(1)
    assert shown(status) == ("waking", 1)


def test_a_host_named_in_the_configuration_shows_its_name():
    _, _, _, status = make("a", name="studio Mac")
    [host] = status.snapshot()["hosts"]
    assert (host["name"], host["address"]) == ("studio Mac", "a:3003")
    _, _, _, status = make("a")
    assert status.snapshot()["hosts"][0]["name"] is None


def test_the_queue_and_the_fleets_rate():
    clock, fleet, dispatcher, status = make("a", max_queue=5)
    [a] = fleet.backends
    balancer = status.snapshot()["balancer"]
    assert (balancer["queue_depth"], balancer["queue_oldest_wait"], balancer["max_queue"]) == (0, None, 5)
    fleet.check_passed(a)
    for _ in range(30):
        status.window.attempt_finished(AttemptRecord("a:3003", "clip-visual", 200, None, 0.1, ANSWERED))
    clock.advance(50)
    balancer = status.snapshot()["balancer"]
    assert balancer["rate"] == 30 / 50 and balancer["rate_span"] == 60
    fleet.drain(a)
    dispatcher.acquire(BATCH)
    clock.advance(4)
    dispatcher.acquire(BATCH)
    clock.advance(1.5)
    balancer = status.snapshot()["balancer"]
    assert (balancer["queue_depth"], balancer["queue_oldest_wait"]) == (2, 5.5)


def alerts(status):
    return {alert["kind"]: alert["text"] for alert in status.snapshot()["balancer"]["alerts"]}


def test_an_alert_while_no_host_is_up():
    _, fleet, dispatcher, status = make("a,b")
    a, b = fleet.backends
    assert alerts(status) == {"no-host-up": "no ML host is up: requests wait up to 60 s for one, then get 503"}
    fleet.check_passed(a)
    assert alerts(status) == {}
    fleet.drain(a)
    assert "every ML host that is up is draining" in alerts(status)["no-host-up"]
    fleet.check_passed(b)
    assert alerts(status) == {}
    fleet.reconfigure([])
    assert "no ML host is configured" in alerts(status)["no-host-up"]


def test_an_alert_when_the_queue_is_nearly_full():
    _, fleet, dispatcher, status = make("a", max_queue=10)
    fleet.drain(fleet.backends[0])
    for _ in range(8):  # 80 %: not yet
        dispatcher.acquire(BATCH)
    assert set(alerts(status)) == {"no-host-up"}
    dispatcher.acquire(BATCH)
    assert alerts(status)["queue-nearly-full"].startswith("the queue is nearly full: 9 of 10 requests wait")
    dispatcher.acquire(BATCH)
    assert alerts(status)["queue-nearly-full"].startswith("the queue is full: 10 of 10 requests wait")


def test_a_learned_limit_shows_what_it_found_and_searches_their_surprise():
    clock, fleet, dispatcher, status = make("a")
    [a] = fleet.backends
    fleet.check_passed(a)
    answered_one_at_a_time(clock, fleet, a)
    [host] = status.snapshot()["hosts"]
    learned = host["learning"]
    # kept busy at one request in flight: one second of work a second
    assert learned["work_per_second"]["1"] == pytest.approx(1.0, abs=0.02)
    assert learned["ran_at_once"] == 1
    assert host["search_surprise"] == 1.0  # no search took longer than expected
    _, _, _, status = make("a", slots=2)
    assert status.snapshot()["hosts"][0]["learning"] is None  # configured slots: nothing to learn
