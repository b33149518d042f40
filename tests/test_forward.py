"""
The forwarder's judgement of attempts, with a task.Clock and an agent that
never touches the network.
"""

from twisted.internet import error as ierror
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.web.test.requesthelper import DummyRequest

from imml.backends import BackendAddress
from imml.classify import RequestInfo
from imml.dispatch import Dispatcher
from imml.fleet import Fleet
from imml.forward import Forwarder
from imml.strategies import RoundRobin

SEARCH = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)


class StuckAgent:
    """
    An agent whose requests never get further than C{stage}; cancelling
    one fails it as Twisted does at that stage.
    """

    def __init__(self, error):
        self.error = error
        self.sent = []

    def request(self, method, uri, headers=None, producer=None):
        d = Deferred(lambda d: d.errback(self.error))
        self.sent.append(uri)
        return d


def forwarder(agent):
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("127.0.0.1", 3003), BackendAddress("127.0.0.1", 3004)], clock)
    for b in fleet.backends:
        fleet.check_passed(b)
        fleet.check_passed(b)
    return fleet, Forwarder(fleet, Dispatcher(fleet, RoundRobin(), clock), agent, clock)


def post():
    request = DummyRequest([b"predict"])
    request.method = b"POST"
    request.uri = b"/predict"
    return request


def test_a_client_going_away_while_a_host_is_being_connected_to_is_not_held_against_the_host():
    for error in [
        ierror.ConnectingCancelledError(None),  # connecting
        ierror.DNSLookupError("Couldn't find the hostname"),  # resolving its name
    ]:
        agent = StuckAgent(error)
        fleet, fwd = forwarder(agent)
        done = fwd.forward(post(), SEARCH, b"a body")
        assert len(agent.sent) == 1
        done.cancel()  # the client went away
        assert all(b.up for b in fleet.backends), error
        assert all(b.in_flight == 0 for b in fleet.backends)
        assert all(not b.stats.errors for b in fleet.backends)
        assert len(agent.sent) == 1  # and nothing was sent elsewhere


class Attempts:
    """A reporter that keeps the attempt records."""

    def __init__(self):
        self.records = []

    def attempt_finished(self, record):
        self.records.append(record)

    def request_finished(self, record):
        pass


def test_a_host_that_does_not_answer_in_time_is_left_for_another():
    """
    An attempt still unanswered at the response timeout is given up (it
    times out, the host is marked down) and the request goes to another
    host; once nothing is in flight, no timer is left behind.
    """
    from imml.forward import WATCH_EVERY, ProxySettings

    agent = StuckAgent(CancelledError())
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress("127.0.0.1", 3003), BackendAddress("127.0.0.1", 3004)], clock)
    for b in fleet.backends:
        fleet.check_passed(b)
        fleet.check_passed(b)
    attempts = Attempts()
    fwd = Forwarder(fleet, Dispatcher(fleet, RoundRobin(), clock), agent, clock,
                    ProxySettings(response_timeout=2.0), reporters=[attempts])
    done = fwd.forward(post(), SEARCH, b"a body")
    clock.advance(1.9)
    assert len(agent.sent) == 1 and not attempts.records
    clock.advance(0.1 + WATCH_EVERY)
    assert [r.error for r in attempts.records] == ["timed out"]
    assert not fleet.backends[0].up and fleet.backends[0].in_flight == 0
    assert agent.sent == [b"http://127.0.0.1:3003/predict", b"http://127.0.0.1:3004/predict"]
    done.cancel()
    clock.advance(WATCH_EVERY)
    assert clock.getDelayedCalls() == []


def test_an_attempt_far_slower_than_its_host_is_hedged_on_another():
    """
    A search still unanswered after eight times its host's recent service
    time (and at least a second) is sent to another host too; the first
    attempt keeps running.
    """
    from imml.forward import HEDGE_MIN, WATCH_EVERY

    agent = StuckAgent(CancelledError())
    fleet, fwd = forwarder(agent)
    clock = fwd.clock
    first = fleet.backends[0]
    fleet.started(first)
    fleet.finished(first, "clip-textual", 0.05, None, 1)  # a search takes it 50 ms
    done = fwd.forward(post(), SEARCH, b"a body")
    clock.advance(HEDGE_MIN - WATCH_EVERY / 2)
    assert len(agent.sent) == 1
    clock.advance(WATCH_EVERY)
    assert agent.sent == [b"http://127.0.0.1:3003/predict", b"http://127.0.0.1:3004/predict"]
    assert first.in_flight == 1 and first.up
    clock.advance(5)
    assert len(agent.sent) == 2  # hedged once
    done.cancel()
    assert all(b.in_flight == 0 for b in fleet.backends)


def test_each_request_is_one_info_event_of_the_forwarders_logger():
    """
    The event a request makes is what C{Logger.info} would make: observers
    filtering by level or namespace, and twistd's formatting, treat it as
    any other.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        Logger,
        formatEvent,
    )

    from imml.records import RequestRecord

    events, quiet = [], []
    fleet, fwd = forwarder(StuckAgent(CancelledError()))
    fwd.log = Logger(namespace="imml.forward", observer=events.append)
    record = RequestRecord("POST", "/predict", "clip-textual", 200, "127.0.0.1:3003", ("127.0.0.1:3003",), 0.0123)
    fwd.report_request(record)
    [event] = events
    assert event["log_level"] is LogLevel.info and event["log_namespace"] == "imml.forward"
    assert event["log_logger"] is fwd.log and isinstance(event["log_time"], float)
    assert formatEvent(event) == "POST /predict (clip-textual) -> 200 via 127.0.0.1:3003 in 0.012 s, 1 tries"
    assert (event["status"], event["tries"], event["imml_event"]) == (200, 1, "request")
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    fwd.log = Logger(namespace="imml.forward", observer=FilteringLogObserver(quiet.append, [predicate]))
    fwd.report_request(record)
    assert quiet == []
