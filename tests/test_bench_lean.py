"""
The lean HTTP client and server of bench/ (lean_client.py,
lean_server_proxy.py), whose instruction counts say what Twisted's Agent
and twisted.web cost a proxy: they must speak HTTP/1.1 correctly for the
counts to mean anything.  Over loopback sockets, and byte by byte through
a StringTransport where the answer's splitting matters.
"""

import sys
from contextlib import asynccontextmanager

import pytest
from support import ROOT, Recorder, bounded, hear_out
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

sys.path.insert(0, str(ROOT / "bench"))

from lean_client import AnswerCut, BadAnswer, HostConnection, LeanClient  # noqa: E402
from lean_server_proxy import LeanServer  # noqa: E402


class Canned(Protocol):
    """A host that answers each request on its connection with the next canned bytes."""

    def __init__(self, answers):
        self.answers, self.buffer = list(answers), b""

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            length = [int(v.split(b":")[1]) for v in head.split(b"\r\n") if v.lower().startswith(b"content-length:")]
            self.buffer = self.buffer[length[0] if length else 0 :]
            answer = self.answers.pop(0) if self.answers else None
            if answer is None:
                self.transport.abortConnection()
                return
            self.transport.write(answer)
            if answer.endswith(b"CLOSE"):
                self.transport.loseConnection()


async def listening(factory):
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, b"127.0.0.1:%d" % port.getHost().port


@asynccontextmanager
async def hosted(factory, pool):
    """A host listening on loopback, its address; stopped, and C{pool}'s idle connections closed, after."""
    port, host = await listening(factory)
    try:
        yield host
    finally:
        await port.stopListening()
        for idle in pool._idle.values():
            for connection in idle:
                connection.transport.loseConnection()


def canned_host(*per_connection):
    """A listening host whose n-th connection answers with per_connection[n]."""
    connections = iter(per_connection)
    return Factory.forProtocol(lambda: Canned(next(connections)))


@bounded(10)
async def test_a_request_arrives_whole_and_its_connection_is_reused():
    recorder, client = Recorder(), LeanClient(reactor)
    async with hosted(Site(recorder), client) as host:
        first = await client.request(b"POST", host, b"/predict?x=1", [(b"X-Task", b"clip")], b"a body")
        second = await client.request(b"POST", host, b"/predict", [], b"")
    assert (first.code, first.body, first.header(b"content-type")) == (200, b'{"clip":[0.5]}', b"application/json")
    assert second.code == 200
    (m1, uri1, host1, len1, task1, body1, port1), (m2, _, host2, len2, task2, body2, port2) = [
        tuple(seen.values()) for seen in recorder.seen
    ]
    assert (m1, uri1, host1, len1, task1, body1) == (b"POST", b"/predict?x=1", host, b"6", b"clip", b"a body")
    assert (m2, host2, len2, task2, body2) == (b"POST", host, b"0", None, b"")
    assert port1 == port2  # one connection for both


def sent():
    """
    A host connection over a StringTransport that has sent a GET: the
    connection, and lists of the answers and failures its request gets.
    """
    connection = HostConnection(LeanClient(reactor), b"h:1")
    connection.makeConnection(StringTransport())
    got, failed = [], []
    connection.send(b"GET", b"GET / HTTP/1.1\r\n\r\n", Deferred().addCallbacks(got.append, failed.append))
    return connection, got, failed


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n",
    ],
    ids=["length", "interim", "chunked"],
)
def test_an_answer_is_read_however_it_is_split(answer):
    for piece in (1, 3, len(answer)):
        connection, got, _ = sent()
        for i in range(0, len(answer), piece):
            connection.dataReceived(answer[i : i + piece])
        assert [(a.code, a.body) for a in got] == [(200, b"hello world")], piece
        assert connection.transport.connected  # kept for the next request


def test_an_answer_to_the_end_of_the_connection_is_read_when_it_closes():
    connection, got, _ = sent()
    connection.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
    connection.dataReceived(b"world")
    assert got == []
    connection.connectionLost()
    assert [(a.code, a.header(b"content-type"), a.body) for a in got] == [(200, b"text/plain", b"hello world")]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n folded\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef",
    ],
    ids=["code", "protocol", "two-lengths", "folded", "chunk-size", "extra-bytes"],
)
def test_a_bad_answer_fails_its_request_and_closes_the_connection(answer):
    connection, _, failed = sent()
    connection.dataReceived(answer)
    assert [f.type for f in failed] == [BadAnswer]
    assert connection.transport.disconnecting


def test_an_answer_cut_short_fails_its_request():
    connection, _, failed = sent()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    connection.connectionLost()
    assert [f.type for f in failed] == [AnswerCut]


def test_a_header_that_would_split_the_request_is_refused():
    with pytest.raises(ValueError):
        LeanClient(reactor).request(b"GET", b"h:1", b"/", [(b"X-A", b"1\r\nX-B: 2")])


@bounded(10)
async def test_a_request_the_host_drops_on_a_reused_connection_is_sent_again():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # The first connection answers once, then drops the next request unanswered.
    client = LeanClient(reactor)
    async with hosted(canned_host([ok], [ok]), client) as host:
        first = await client.request(b"POST", host, b"/predict", [], b"1")
        second = await client.request(b"POST", host, b"/predict", [], b"2")
    assert (first.body, second.body) == (b"ok", b"ok")


@bounded(10)
async def test_a_cancelled_request_closes_its_connection():
    arrived, closed = Deferred(), Deferred()

    class Silent(Protocol):
        def dataReceived(self, data):
            if not arrived.called:
                arrived.callback(data)

        def connectionLost(self, reason):
            closed.callback(None)

    port, host = await listening(Factory.forProtocol(Silent))
    client = LeanClient(reactor)
    try:
        d = client.request(b"GET", host, b"/", [])
        assert (await arrived).startswith(b"GET / HTTP/1.1\r\n")
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        await closed
    finally:
        await port.stopListening()


@bounded(10)
async def test_a_connection_refused_fails_the_request():
    port, host = await listening(Factory.forProtocol(Protocol))
    await port.stopListening()
    with pytest.raises(Exception) as caught:
        await LeanClient(reactor).request(b"GET", host, b"/", [])
    assert "refused" in str(caught.value).lower()


def served(forward=None):
    """The lean server on a loopback port, forwarding what it reads to C{forward}."""
    seen = []

    def record(method, target, headers, body):
        seen.append((method, target, headers, body))
        return succeed((200, b"application/json", b'{"n":%d}' % len(seen)))

    factory = Factory.forProtocol(lambda: LeanServer(forward or record))
    return reactor.listenTCP(0, factory, interface="127.0.0.1"), seen


@bounded(10)
async def test_the_lean_server_answers_pipelined_requests_in_order_and_closes_when_asked():
    port, seen = served()
    try:
        said = await hear_out(
            port.getHost().port,
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-Task: clip\r\n\r\nabc"
            b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    finally:
        await port.stopListening()
    assert seen == [(b"POST", b"/predict", [(b"X-Task", b"clip")], b"abc"), (b"GET", b"/ping", [], None)]
    first, second = said.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK\r\n") and first.endswith(b'\r\n\r\n{"n":1}')
    assert second.startswith(b"200 OK\r\n") and b"Connection: close\r\n" in second and second.endswith(b'{"n":2}')


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"POST /predict HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n", b"413"),
        (b"POST /predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"501"),
        (b"POST /predict HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (b"GET /\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\n\r\n", b"505"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000, b"431"),
    ],
    ids=["too-large", "chunked", "two-lengths", "request-line", "version", "head-too-large"],
)
@bounded(10)
async def test_the_lean_server_refuses_what_it_cannot_read_with_one_answer(request_bytes, status):
    port, seen = served()
    try:
        said = await hear_out(port.getHost().port, request_bytes)
    finally:
        await port.stopListening()
    assert seen == []
    assert said.count(b"HTTP/1.1 ") == 1 and said.startswith(b"HTTP/1.1 " + status + b" ")


@bounded(10)
async def test_the_lean_server_answers_502_when_the_host_fails():
    port, _ = served(lambda *request: Deferred.fromCoroutine(_fail()))
    try:
        said = await hear_out(port.getHost().port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    finally:
        await port.stopListening()
    assert said.startswith(b"HTTP/1.1 502 ")


async def _fail():
    raise ConnectionError("host down")
