"""
The forwarder's judgement of attempts, with a task.Clock and an agent that
never touches the network.
"""

from twisted.internet import error as ierror
from twisted.internet import task
from twisted.internet.defer import Deferred
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
