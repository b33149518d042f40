"""
The /ping probe, in memory (treq's StubTreq): only 200 ``pong`` counts.
"""

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from imml.mac.readiness import PingProbe, ping_url


class Ping(Resource):
    isLeaf = True

    def __init__(self, code, body):
        super().__init__()
        self.code, self.body = code, body

    def render_GET(self, request):
        request.setResponseCode(self.code)
        return self.body


@pytest.mark.parametrize(
    "code, body, healthy",
    [
        (200, b"pong", True),
        (200, b"pong\n", True),
        (200, b"starting", False),
        (503, b"pong", False),
    ],
)
def test_only_pong_is_healthy(code, body, healthy):
    probe = PingProbe(Clock(), "http://127.0.0.1:3003/ping", client=StubTreq(Ping(code, body)))
    assert probe().result is healthy


def test_a_refused_connection_is_unhealthy():
    class Refusing:
        def get(self, url, timeout):
            from twisted.internet import defer, error

            return defer.fail(error.ConnectionRefusedError())

    assert PingProbe(Clock(), "http://127.0.0.1:1/ping", client=Refusing())().result is False


@pytest.mark.parametrize(
    "host, url",
    [
        ("0.0.0.0", "http://127.0.0.1:3003/ping"),
        ("::", "http://[::1]:3003/ping"),
        ("[::]", "http://[::1]:3003/ping"),
        ("192.0.2.7", "http://192.0.2.7:3003/ping"),
        ("fe80::1", "http://[fe80::1]:3003/ping"),
    ],
)
def test_wildcards_are_checked_on_loopback(host, url):
    assert ping_url(host, 3003) == url


class Recording:
    """
    An endpoint that records the factories it is asked to connect.
    """

    def __init__(self):
        self.factories = []

    def connect(self, factory):
        self.factories.append(factory)
        return defer.Deferred()


def test_the_probes_connections_do_not_log_starting_and_stopping():
    probe = PingProbe(Clock(), "http://127.0.0.1:3003/ping")
    assert not probe.pool.persistent
    endpoint = Recording()
    probe.pool.getConnection(("http", b"127.0.0.1", 3003), endpoint)
    (factory,) = endpoint.factories
    assert isinstance(factory, Factory) and factory.noisy is False
    assert probe.close().called


def test_a_given_client_means_no_pool():
    probe = PingProbe(Clock(), "http://127.0.0.1:3003/ping", client=StubTreq(Ping(200, b"pong")))
    assert probe.pool is None and probe.close() is None
