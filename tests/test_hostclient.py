"""
The balancer's HTTP/1.1 client to its hosts (imml.hostclient.HostAgent):
what goes on the wire, answers however they are split and delimited,
persistent connections, and each failure as Twisted's Agent reports it.
Over loopback sockets where the wire matters, and byte by byte through a
StringTransport where the answer's splitting does.
"""

import gc
import weakref

import pytest
from support import Recorder, bounded
from twisted.internet import error, reactor, task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.client import (
    URI,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Site

from imml.body import BodyStore, BytesProducer, PacedProducer
from imml.hostclient import HostAgent, UnreadableAnswer
from imml.upstream import make_host_agent


class Body(Protocol):
    """Reads an answer's body: its bytes, and how it ended."""

    def __init__(self):
        self.data, self.ended = [], Deferred()

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.ended.callback((b"".join(self.data), reason))


async def whole(response):
    """The body of C{response} and the failure it ended with."""
    body = Body()
    response.deliverBody(body)
    return await body.ended


class Hosted:
    """A host listening on loopback; the agent's idle connections and the port closed by L{stop}."""

    def __init__(self, factory, agent=None):
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = b"127.0.0.1:%d" % self.port.getHost().port
        self.agent = agent if agent is not None else make_host_agent(reactor, 5.0)

    def url(self, path=b"/predict"):
        return b"http://" + self.address + path

    async def stop(self):
        await self.agent.closeCachedConnections()
        await self.port.stopListening()


class Scripted(Protocol):
    """A host that does what its test says: records what it got, answers with C{answer(self)}."""

    def __init__(self, log, answer):
        self.log, self.answer, self.got = log, answer, b""
        self.lost = Deferred()

    def connectionMade(self):
        self.log.append(self)

    def dataReceived(self, data):
        self.got += data
        self.answer(self)

    def connectionLost(self, reason):
        self.lost.callback(None)


def scripted(answer):
    """A factory of L{Scripted} hosts, and the list of their connections."""
    log = []
    return Factory.forProtocol(lambda: Scripted(log, answer)), log


@bounded(10)
async def test_a_request_arrives_whole_and_its_connection_is_reused():
    recorder = Recorder()
    host = Hosted(Site(recorder))
    try:
        headers = Headers({b"X-Task": [b"clip"]})
        first = await host.agent.request(b"POST", host.url(b"/predict?x=1"), headers, BytesProducer(b"a body"))
        body, reason = await whole(first)
        second = await host.agent.request(b"POST", host.url(), None, BytesProducer(b""))
        await whole(second)
    finally:
        await host.stop()
    assert (first.code, first.phrase, body, first.length) == (200, b"OK", b'{"clip":[0.5]}', 14)
    assert first.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert reason.check(ResponseDone)
    one, two = recorder.seen
    assert (one["method"], one["uri"], one["host"], one["length"], one["task"], one["body"]) == (
        b"POST",
        b"/predict?x=1",
        host.address,
        b"6",
        b"clip",
        b"a body",
    )
    assert (two["length"], two["task"], two["body"]) == (b"0", None, b"")
    assert one["port"] == two["port"]  # one connection for both


class Paced(PacedProducer):
    """A body written in blocks, paced by the connection."""

    def __init__(self, blocks):
        super().__init__(sum(len(b) for b in blocks))
        self.blocks = list(blocks)
        self.stopped = False

    def next_block(self):
        return self.blocks.pop(0) if self.blocks else b""

    def stopProducing(self):
        self.stopped = True
        super().stopProducing()


@bounded(20)
async def test_a_large_body_goes_out_paced_by_the_host():
    recorder = Recorder()
    host = Hosted(Site(recorder))
    blocks = [bytes([i]) * 65536 for i in range(128)]  # 8 MiB: more than the socket buffers hold
    try:
        response = await host.agent.request(b"POST", host.url(), None, Paced(blocks))
        await whole(response)
    finally:
        await host.stop()
    assert recorder.seen[0]["length"] == b"%d" % (128 * 65536)
    assert recorder.seen[0]["body"] == b"".join(blocks)


@bounded(10)
async def test_a_spooled_body_is_sent_from_its_file():
    recorder = Recorder()
    host = Hosted(Site(recorder))
    body = BodyStore(spool_over=1024).new(200_000)
    body.write(b"x" * 200_000)
    assert body.spooled
    try:
        response = await host.agent.request(b"POST", host.url(), None, body.producer())
        await whole(response)
    finally:
        body.close()
        await host.stop()
    assert recorder.seen[0]["body"] == b"x" * 200_000


def _split(data, cuts):
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(data[last:cut])
        last = cut
    return [piece for piece in pieces + [data[last:]] if piece]  # a transport gives no empty reads


class OnString:
    """Endpoints whose connections are StringTransports: the test plays the host."""

    def __init__(self):
        self.connections = []

    def endpointForURI(self, uri):
        return self

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.connections.append(protocol)
        return succeed(protocol)


def requested(url=b"http://h:1/", body=None):
    """
    A HostAgent over a StringTransport that has sent a GET to C{url}: the
    agent, its connection, and what the request fired with (a list);
    the answer's body goes to C{body}, if given, as soon as its head is read.
    """
    endpoints = OnString()
    agent = HostAgent(Clock(), endpoints)
    fired = []
    d = agent.request(b"GET", url)
    if body is not None:
        d.addCallback(lambda response: response.deliverBody(body) or response)
    d.addBoth(fired.append)
    (connection,) = endpoints.connections
    return agent, connection, fired


#: An answer; its code and body as read; whether its connection is kept.
ANSWERS = {
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", 200, b"hello", True),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n",
        200,
        b"hello",
        True,
    ),
    "interim first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\nno",
        503,
        b"no",
        True,
    ),
    "no content": (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
    "HTTP/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
    "close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
}


@pytest.mark.parametrize("name", sorted(ANSWERS))
@pytest.mark.parametrize("cuts", [(), (1,), (17, 18, 19, 40), "every byte"])
def test_an_answer_is_read_however_it_is_split(name, cuts):
    answer, code, body, reused = ANSWERS[name]
    reader = Body()
    agent, connection, fired = requested(b"http://h:1/x", reader)
    assert connection.transport.value() == b"GET /x HTTP/1.1\r\nHost: h:1\r\n\r\n"
    for piece in _split(answer, range(1, len(answer)) if cuts == "every byte" else cuts):
        connection.dataReceived(piece)
    got, reason = reader.ended.result
    assert (fired[0].code, got) == (code, body)
    assert reason.check(ResponseDone)
    assert (agent._idle.get(b"http://h:1") == [connection]) is reused
    assert connection.transport.disconnecting is not reused


def test_an_answer_to_the_end_of_the_connection_ends_with_it():
    agent, connection, fired = requested()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
    reader = Body()
    fired[0].deliverBody(reader)  # after the first bytes: they were kept
    connection.dataReceived(b" bytes")
    connection.connectionLost(error.ConnectionDone())
    got, reason = reader.ended.result
    assert (fired[0].length, got) == (UNKNOWN_LENGTH, b"some bytes")
    assert reason.check(PotentialDataLoss)


@pytest.mark.parametrize("how", ["read as it comes", "read once whole", "lost mid-answer"])
def test_an_answer_whose_body_ended_is_freed_with_its_reader(how):
    """
    The balancer's requests are freed as they end, not by the cycle
    collector now and then: between its runs, garbage from every request
    answered meanwhile would pile up (and leave the memory it took behind).
    """
    gc.disable()
    try:
        reader = Body()
        agent, connection, fired = requested(body=None if how == "read once whole" else reader)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
        if how == "lost mid-answer":
            connection.connectionLost(error.ConnectionLost())
        else:
            connection.dataReceived(b"lo")
        response = fired.pop()
        if how == "read once whole":
            response.deliverBody(reader)
        got, reason = reader.ended.result
        assert reason.check(ResponseFailed if how == "lost mid-answer" else ResponseDone)
        answer = weakref.ref(response)
        del response, reader
        assert answer() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    ],
)
def test_a_bad_head_fails_its_request_and_drops_the_connection(answer):
    agent, connection, fired = requested()
    connection.dataReceived(answer)
    (failure,) = fired
    assert failure.check(ResponseFailed)
    assert failure.value.reasons[0].check(UnreadableAnswer)
    assert connection.transport.disconnecting


def test_a_bad_chunk_fails_the_body_and_drops_the_connection():
    reader = Body()
    agent, connection, fired = requested(body=reader)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXY")
    got, reason = reader.ended.result
    assert got == b"ok"
    assert reason.check(ResponseFailed) and reason.value.reasons[0].check(UnreadableAnswer)
    assert connection.transport.disconnecting


@bounded(10)
async def test_a_connection_lost_before_the_answer_is_a_response_never_received():
    factory, log = scripted(lambda host: host.transport.loseConnection())
    host = Hosted(factory)
    try:
        with pytest.raises(ResponseNeverReceived):
            await host.agent.request(b"GET", host.url(b"/ping"))
    finally:
        await host.stop()


@bounded(10)
async def test_a_connection_lost_mid_answer_fails_the_body():
    def half(host):
        host.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        host.transport.loseConnection()

    factory, log = scripted(half)
    host = Hosted(factory)
    try:
        response = await host.agent.request(b"GET", host.url())
        got, reason = await whole(response)
    finally:
        await host.stop()
    assert got == b"half"
    assert reason.check(ResponseFailed)


@bounded(10)
async def test_a_connection_refused_fails_with_the_endpoints_error():
    host = Hosted(Site(Recorder()))
    url = host.url()
    await host.stop()
    with pytest.raises(error.ConnectionRefusedError):
        await host.agent.request(b"GET", url)


@bounded(10)
async def test_an_answer_before_the_body_is_sent_stops_it_and_drops_the_connection():
    def refuse(host):
        if b"\r\n\r\n" in host.got and not host.transport.disconnecting:
            host.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")

    factory, log = scripted(refuse)
    host = Hosted(factory)
    producer = Paced([b"x" * 65536] * 1024)  # 64 MiB: the host answers long before
    try:
        response = await host.agent.request(b"POST", host.url(), None, producer)
        await whole(response)
        await log[0].lost
    finally:
        await host.stop()
    assert response.code == 413
    assert producer.stopped
    assert host.agent._idle == {}


@bounded(10)
async def test_a_failing_body_fails_the_request_and_drops_the_connection():
    class Failing(Paced):
        def next_block(self):
            if not self.blocks:
                raise OSError("the spooled body is gone")
            return super().next_block()

    factory, log = scripted(lambda host: None)
    host = Hosted(factory)
    try:
        with pytest.raises(RequestTransmissionFailed) as raised:
            await host.agent.request(b"POST", host.url(), None, Failing([b"x" * 10]))
        await log[0].lost
    finally:
        await host.stop()
    assert raised.value.reasons[0].check(OSError)


@bounded(10)
async def test_a_body_shorter_than_its_length_fails_the_request():
    factory, log = scripted(lambda host: None)
    host = Hosted(factory)
    producer = Paced([b"12345"])
    producer.length = 10
    try:
        with pytest.raises(RequestTransmissionFailed) as raised:
            await host.agent.request(b"POST", host.url(), None, producer)
        await log[0].lost
    finally:
        await host.stop()
    assert "wrote 5 bytes, not 10" in str(raised.value.reasons[0].value)


@bounded(10)
async def test_a_cancelled_request_drops_its_connection():
    factory, log = scripted(lambda host: None)  # never answers
    host = Hosted(factory)
    try:
        d = host.agent.request(b"GET", host.url())
        while not log or not log[0].got:
            await task.deferLater(reactor, 0.01)
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        await log[0].lost
    finally:
        await host.stop()


def test_a_request_cancelled_while_connecting_fails_with_cancelled():
    class Hanging:
        def endpointForURI(self, uri):
            return self

        def connect(self, factory):
            return Deferred()

    d = HostAgent(Clock(), Hanging()).request(b"GET", b"http://h:1/")
    d.cancel()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(CancelledError)


@bounded(10)
async def test_a_stopped_body_drops_the_connection_and_ends():
    factory, log = scripted(lambda host: host.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"))
    host = Hosted(factory)
    try:
        response = await host.agent.request(b"GET", host.url())
        reader = Body()
        response.deliverBody(reader)
        reader.transport.stopProducing()
        got, reason = await reader.ended
        await log[0].lost
    finally:
        await host.stop()
    assert reason.check(ResponseFailed)


@bounded(10)
async def test_idle_connections_close_after_a_second_and_a_few_are_kept():
    clock = Clock()
    recorder = Recorder()
    factory = Site(recorder)
    host = Hosted(factory, HostAgent(clock, make_host_agent(reactor, 5.0)._endpoints, max_idle=2))
    try:
        # three at once: three connections, two kept once answered
        responses = [host.agent.request(b"GET", host.url()) for _ in range(3)]
        for d in responses:
            await whole(await d)
        assert len(host.agent._idle[b"http://" + host.address]) == 2
        clock.advance(0.5)
        await whole(await host.agent.request(b"GET", host.url()))
        assert len({seen["port"] for seen in recorder.seen}) == 3  # the fourth reused one
        clock.advance(1.0)  # idle for a second: closed
        assert host.agent._idle == {}
        await whole(await host.agent.request(b"GET", host.url()))
        assert len({seen["port"] for seen in recorder.seen}) == 4  # a new connection
    finally:
        await host.stop()


def test_the_host_header_is_the_urls_without_a_default_port_and_a_callers_wins():
    endpoints = OnString()
    agent = HostAgent(Clock(), endpoints)
    agent.request(b"GET", b"http://h:80")
    agent.request(b"GET", b"https://[::1]:443/p")
    agent.request(b"POST", b"http://h:3003/predict", Headers({b"Host": [b"other"]}))
    heads = [c.transport.value() for c in endpoints.connections]
    assert heads == [
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /p HTTP/1.1\r\nHost: [::1]\r\n\r\n",
        b"POST /predict HTTP/1.1\r\nContent-Length: 0\r\nHost: other\r\n\r\n",
    ]


def test_a_body_of_unknown_length_is_refused():
    producer = Paced([b"some"])
    producer.length = UNKNOWN_LENGTH
    failures = []
    HostAgent(Clock(), OnString()).request(b"POST", b"http://h:1/", None, producer).addErrback(failures.append)
    assert failures[0].check(ValueError)


def test_bytes_from_an_idle_connection_drop_it():
    agent, connection, fired = requested()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert agent._idle[b"http://h:1"] == [connection]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert connection.transport.disconnecting


def test_the_uri_of_a_new_connection_goes_to_the_endpoint_factory():
    class Seeing(OnString):
        def endpointForURI(self, uri):
            self.uri = uri
            return self

    endpoints = Seeing()
    HostAgent(Clock(), endpoints).request(b"GET", b"https://host.example:8443/ping")
    assert (endpoints.uri.scheme, endpoints.uri.host, endpoints.uri.port) == (b"https", b"host.example", 8443)
    assert isinstance(endpoints.uri, URI)
