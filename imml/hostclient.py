"""
The HTTP/1.1 client to the ML hosts: an C{IAgent} that keeps a few
persistent connections to each host and does no more than the balancer
needs of it.

Twisted's C{Agent} and C{HTTPConnectionPool} cost about a third of the
balancer's processor per request (bench/README.md, "What a leaner HTTP
client or server would save"), and on a NAS the ML host beside the
balancer shares that processor.  L{HostAgent} writes a request's head in
one piece (with the body, when it is in memory), reads the answer's status
line and headers in one step, and streams its body to the protocol given
to C{IResponse.deliverBody}.

What it sends: the request line; C{Host}, unless the caller's headers have
one; C{Content-Length} when there is a body (its producer must know its
length), or 0 for a C{POST} or C{PUT} without one; the caller's headers;
the body, as its producer writes it (a streaming producer of the
connection, paused while the host does not read).  What it reads,
strictly: a status line of HTTP/1.1 or 1.0, header lines without folding,
a body delimited by C{Content-Length}, by chunked coding or by the end of
the connection; interim (1xx) answers are skipped.  An answer complete
before the request's body is all written stops the body and closes the
connection.

Its failures are C{Agent}'s, so that callers read them alike:

- the connection cannot be made: the endpoint's error;
- the connection is lost (or the body's producer fails) while the body is
  written: C{RequestTransmissionFailed};
- the connection is lost before the answer's head: C{ResponseNeverReceived}
  (on a reused connection the host may have closed it just then: the
  caller may send the request again on a new one);
- the answer's head is not HTTP/1.1 as read here: C{ResponseFailed} of an
  L{UnreadableAnswer};
- the body is cut short or unreadable: C{ResponseFailed} to the body's
  protocol; a body that ends with the connection ends with
  C{PotentialDataLoss}, a whole one with C{ResponseDone};
- cancelled before the answer's head: C{CancelledError}; a body being
  delivered stops when the body protocol's transport is told to
  C{stopProducing}.

Idle connections: at most L{MAX_IDLE} per host, the newest reused first,
closed after L{IDLE_SECONDS} (below Immich ML's 2 s keep-alive) by one
timer for them all.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from .body import BytesProducer

#: The most an answer's status line and headers may take, in bytes.
MAX_HEAD = 64 * 1024
#: Idle connections kept per host.
MAX_IDLE = 16
#: Seconds an idle connection is kept: below Immich ML's 2 s keep-alive.
IDLE_SECONDS = 1.0

_DEFAULT_PORT = {b"http": b"80", b"https": b"443"}
#: Methods whose requests say C{Content-Length: 0} when they carry no body.
_LENGTH_ZERO = (b"POST", b"PUT")
#: The most URLs' hosts kept (a DNS pool's hosts may change for ever).
_MAX_HOSTS = 1024

# What the parser of a connection expects next.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(7)


class UnreadableAnswer(Exception):
    """
    A host's answer is not HTTP/1.1 as this client reads it.
    """


@implementer(IResponse)
class _Response:
    """
    An answer whose head is read; its body goes to the protocol given to
    L{deliverBody}, kept until then.
    """

    request = None
    previousResponse = None

    def __init__(self, version: tuple, code: int, phrase: bytes, headers: Headers, length: Any) -> None:
        self.version, self.code, self.phrase, self.headers, self.length = version, code, phrase, headers, length
        self._protocol: Any = None
        self._kept: list[bytes] = []
        self._end: Optional[Failure] = None
        self._transport: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        protocol.makeConnection(self._transport)
        kept, self._kept = self._kept, []
        for data in kept:
            protocol.dataReceived(data)
        if self._end is not None:
            self.ended(self._end)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def received(self, data: bytes) -> None:
        if self._protocol is None:
            self._kept.append(data)
        else:
            self._protocol.dataReceived(data)

    def ended(self, reason: Failure) -> None:
        """
        The body ended with C{reason}.  Its protocol and transport are let
        go once told: the transport holds the exchange, which holds this
        answer, and an answer that ends its part in that cycle is freed
        with its request, not by the cycle collector some time later.
        """
        protocol = self._protocol
        if protocol is None:
            self._end = reason
        else:
            self._protocol = self._transport = self._end = None
            protocol.connectionLost(reason)


class _BodyTransport:
    """
    What the body's protocol sees as its transport: stopping it drops the
    connection, while the answer is still its exchange's.
    """

    def __init__(self, connection: "_Connection", exchange: "_Exchange") -> None:
        self._connection, self._exchange = connection, exchange

    def _current(self) -> Any:
        connection = self._connection
        return connection.transport if connection.exchange is self._exchange and not self._exchange.stopped else None

    def pauseProducing(self) -> None:
        transport = self._current()
        if transport is not None:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport = self._current()
        if transport is not None:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        transport = self._current()
        if transport is not None:
            self._exchange.stopped = True
            transport.abortConnection()


class _Exchange:
    """
    One request and its answer.
    """

    __slots__ = (
        "head",
        "method",
        "producer",
        "waiting",
        "connecting",
        "connection",
        "response",
        "producing",
        "over",
        "stopped",
    )

    def __init__(self, method: bytes, head: bytes, producer: Optional[IBodyProducer]) -> None:
        self.method, self.head, self.producer = method, head, producer
        self.waiting: Deferred = Deferred(self._cancel)
        #: The connection being made for it, if any.
        self.connecting: Optional[Deferred] = None
        self.connection: Optional[_Connection] = None
        self.response: Optional[_Response] = None
        #: Its body's producer is still writing.
        self.producing = False
        #: Cancelled, failed or answered: nothing more is told of it.
        self.over = False
        #: Its body's reader stopped it: the rest is not read.
        self.stopped = False

    def _cancel(self, waiting: Deferred) -> None:
        self.over = True
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.connection is not None:
            self.connection.transport.abortConnection()

    def fail(self, failure: Failure) -> None:
        """
        The request failed before its answer's head.
        """
        if not self.over:
            self.over = True
            self.waiting.errback(failure)


class _Connection(Protocol):
    """
    One persistent connection to a host, one exchange at a time.
    """

    def __init__(self, agent: "HostAgent", key: bytes) -> None:
        self.agent, self.key = agent, key
        self.exchange: Optional[_Exchange] = None
        self.idle_since = 0.0
        self.closed: Optional[Deferred] = None
        self.state = _HEAD
        self.buffer = b""
        self.remaining = 0
        self.keep = False

    # -- sending ---------------------------------------------------------

    def start(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        exchange.connection = self
        self.state, self.buffer, self.remaining, self.keep = _HEAD, b"", 0, False
        producer = exchange.producer
        if producer is None:
            self.transport.write(exchange.head)
        elif type(producer) is BytesProducer:
            self.transport.write(exchange.head + producer.body)
        else:
            self.transport.write(exchange.head)
            exchange.producing = True
            consumer = _Counted(self.transport)
            self.transport.registerProducer(producer, True)
            try:
                d = producer.startProducing(consumer)
            except Exception:
                d = fail()
            d.addCallbacks(self._produced, self._not_produced, (exchange, consumer), None, (exchange,))

    def _produced(self, _: object, exchange: _Exchange, consumer: "_Counted") -> None:
        if not exchange.producing:
            return
        exchange.producing = False
        self.transport.unregisterProducer()
        if consumer.written != exchange.producer.length:
            self._not_produced(
                Failure(
                    ValueError(f"the body's producer wrote {consumer.written} bytes, not {exchange.producer.length}")
                ),
                exchange,
                unregistered=True,
            )

    def _not_produced(self, failure: Failure, exchange: _Exchange, unregistered: bool = False) -> None:
        if not (exchange.producing or unregistered):
            return  # stopped by us, or the connection is gone
        exchange.producing = False
        if not unregistered:
            self.transport.unregisterProducer()
        if exchange.response is None:
            exchange.fail(Failure(RequestTransmissionFailed([failure])))
        self.transport.abortConnection()

    def _stop_producing(self, exchange: _Exchange) -> None:
        if exchange.producing:
            exchange.producing = False
            self.keep = False
            self.transport.unregisterProducer()
            exchange.producer.stopProducing()

    # -- reading -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.transport.abortConnection()  # bytes nobody asked for
            return
        if exchange.stopped:
            return
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        try:
            self._parse(data, exchange)
        except UnreadableAnswer as e:
            self._unreadable(exchange, Failure(e))

    def _parse(self, data: bytes, exchange: _Exchange) -> None:
        while data:
            state = self.state
            if state == _LENGTH:
                rest = self._take(data, exchange)
                if rest is not None:
                    self._complete(exchange, rest)
                return
            if state == _HEAD:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise UnreadableAnswer(f"an answer's head over {MAX_HEAD} bytes")
                    self.buffer = data
                    return
                head, data = data[:end], data[end + 4 :]
                if not self._headed(exchange, head):
                    continue  # an interim answer: the real one follows
                if exchange.stopped:
                    return  # whoever had the answer stopped it
                if self.state == _LENGTH and not self.remaining:
                    self._complete(exchange, data)
                    return
            elif state == _UNTIL_CLOSE:
                exchange.response.received(data)
                return
            elif state == _CHUNK_DATA:
                rest = self._take(data, exchange)
                if rest is None:
                    return
                data, self.state = rest, _CHUNK_END
            elif state == _CHUNK_END:
                if len(data) < 2:
                    self.buffer = data
                    return
                if data[:2] != b"\r\n":
                    raise UnreadableAnswer("a chunk not followed by CRLF")
                data = data[2:]
                self.state = _CHUNK_SIZE
            else:  # _CHUNK_SIZE, _TRAILER
                end = data.find(b"\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise UnreadableAnswer("a chunk's size line too long")
                    self.buffer = data
                    return
                line, data = data[:end], data[end + 2 :]
                if state == _TRAILER:
                    if not line:
                        self._complete(exchange, data)
                        return
                    continue
                size = line.split(b";", 1)[0].strip()
                try:
                    self.remaining = int(size, 16)
                except ValueError:
                    raise UnreadableAnswer(f"a bad chunk size {size[:20]!r}") from None
                if self.remaining < 0:
                    raise UnreadableAnswer(f"a bad chunk size {size[:20]!r}")
                self.state = _CHUNK_DATA if self.remaining else _TRAILER
            if exchange.stopped:
                return  # the body's reader stopped it

    def _take(self, data: bytes, exchange: _Exchange) -> Optional[bytes]:
        """
        Pass on what C{data} holds of the C{remaining} bytes of the body (or
        of its chunk); what follows them, or None while more are to come.
        """
        remaining = self.remaining
        if len(data) < remaining:
            self.remaining = remaining - len(data)
            exchange.response.received(data)
            return None
        exchange.response.received(data[:remaining])
        return data[remaining:]

    def _headed(self, exchange: _Exchange, head: bytes) -> bool:
        """
        Read an answer's head: its status line and headers.  Whether it is
        the answer (not an interim one); if so the request's Deferred has
        fired with it.
        """
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise UnreadableAnswer(f"a bad status line {lines[0][:80]!r}")
        code = int(parts[1])
        if 100 <= code < 200:
            return False
        headers = Headers()
        length: Optional[bytes] = None
        chunked = encoded = False
        close = parts[0] == b"HTTP/1.0"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or b" " in name or b"\t" in name:
                raise UnreadableAnswer(f"a bad header line {line[:80]!r}")
            value = value.strip(b" \t")
            headers.addRawHeader(name, value)
            key = name.lower()
            if key == b"content-length":
                if length is not None and length != value or not value.isdigit():
                    raise UnreadableAnswer("a bad or conflicting Content-Length")
                length = value
            elif key == b"transfer-encoding":
                encoded = True
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            elif key == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                close = b"close" in tokens or (close and b"keep-alive" not in tokens)
        if exchange.method == b"HEAD" or code in (204, 304):
            self.state, self.remaining, size = _LENGTH, 0, 0
        elif chunked:
            self.state, size = _CHUNK_SIZE, UNKNOWN_LENGTH
        elif length is not None and not encoded:
            self.state, self.remaining = _LENGTH, int(length)
            size = self.remaining
        else:
            self.state, size, close = _UNTIL_CLOSE, UNKNOWN_LENGTH, True
        self.keep = not close
        version = (b"HTTP", 1, 0) if parts[0] == b"HTTP/1.0" else (b"HTTP", 1, 1)
        response = exchange.response = _Response(version, code, parts[2] if len(parts) == 3 else b"", headers, size)
        response._transport = _BodyTransport(self, exchange)
        exchange.over = True
        exchange.waiting.callback(response)
        return True

    def _complete(self, exchange: _Exchange, rest: bytes) -> None:
        """
        The answer is whole: the connection goes back to the idle ones (or
        is closed), then the body's protocol is told.
        """
        self._stop_producing(exchange)  # answered before its body was sent
        self.exchange = None
        if self.keep and not rest:
            self.state = _HEAD
            self.agent._rest(self)
        else:
            self.transport.loseConnection()
        exchange.response.ended(Failure(ResponseDone()))

    def _unreadable(self, exchange: _Exchange, failure: Failure) -> None:
        self._stop_producing(exchange)
        self.exchange = None
        self.transport.abortConnection()
        if exchange.response is None:
            exchange.fail(Failure(ResponseFailed([failure])))
        else:
            exchange.response.ended(Failure(ResponseFailed([failure])))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.agent._lost(self)
        if self.closed is not None:
            self.closed.callback(None)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        producing, exchange.producing = exchange.producing, False
        if exchange.response is not None:
            if self.state == _UNTIL_CLOSE:
                exchange.response.ended(Failure(PotentialDataLoss()))
            else:
                exchange.response.ended(Failure(ResponseFailed([reason])))
        elif producing:
            exchange.fail(Failure(RequestTransmissionFailed([reason])))
        else:
            exchange.fail(Failure(ResponseNeverReceived([reason])))


class _Counted:
    """
    A connection's transport as a body's producer writes to it: counting.
    """

    def __init__(self, transport: Any) -> None:
        self.transport, self.written = transport, 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.transport.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass  # the connection registered it

    def unregisterProducer(self) -> None:
        pass


@implementer(IAgent)
class HostAgent:
    """
    Requests to ML hosts over persistent connections.

    @param endpoints: the endpoint of each host (TLS for C{https://} ones),
        asked once per new connection.
    """

    def __init__(
        self,
        reactor: Any,
        endpoints: IAgentEndpointFactory,
        max_idle: int = MAX_IDLE,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._reactor = reactor
        self._endpoints = endpoints
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        #: Per host (C{b"scheme://netloc"}), its idle connections, oldest first.
        self._idle: dict[bytes, list[_Connection]] = {}
        #: Per URL's scheme and netloc: the host's key and C{Host} value.
        self._hosts: dict[bytes, tuple[bytes, bytes]] = {}
        self._sweeper: Any = None

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred[IResponse]:
        start = uri.find(b"/", uri.find(b"://") + 3)
        base, path = (uri, b"/") if start < 0 else (uri[:start], uri[start:])
        host = self._hosts.get(base)
        if host is None:
            if len(self._hosts) >= _MAX_HOSTS:
                self._hosts.clear()
            host = self._hosts[base] = _host_of(base)
        key, host_value = host
        lines = [method, b" ", path, b" HTTP/1.1\r\n"]
        if headers is None or not headers.hasHeader(b"host"):
            lines += [b"Host: ", host_value, b"\r\n"]
        if bodyProducer is not None:
            if bodyProducer.length is UNKNOWN_LENGTH:
                return fail(ValueError("a request body of unknown length"))
            lines += [b"Content-Length: %d\r\n" % bodyProducer.length]
        elif method in _LENGTH_ZERO:
            lines += [b"Content-Length: 0\r\n"]
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                for value in values:
                    lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        exchange = _Exchange(method, b"".join(lines), bodyProducer)
        connection = self._idle_connection(key)
        if connection is not None:
            connection.start(exchange)
        else:
            self._connect(key, uri, exchange)
        return exchange.waiting

    def _connect(self, key: bytes, uri: bytes, exchange: _Exchange) -> None:
        try:
            endpoint = self._endpoints.endpointForURI(URI.fromBytes(uri))
        except Exception:
            exchange.fail(Failure())
            return
        connecting = exchange.connecting = connectProtocol(endpoint, _Connection(self, key))

        def connected(connection: _Connection) -> None:
            exchange.connecting = None
            if exchange.over:
                connection.transport.loseConnection()
            else:
                connection.start(exchange)

        def failed(failure: Failure) -> None:
            exchange.connecting = None
            exchange.fail(failure)

        connecting.addCallbacks(connected, failed)

    def _idle_connection(self, key: bytes) -> Optional[_Connection]:
        idle = self._idle.get(key)
        if not idle:
            return None
        connection = idle.pop()
        if self._reactor.seconds() - connection.idle_since < self.idle_seconds:
            return connection
        # The newest is too old: so are the others.
        for old in (connection, *idle):
            old.transport.loseConnection()
        idle.clear()
        return None

    def _rest(self, connection: _Connection) -> None:
        """
        C{connection} is free for the next request to its host.
        """
        connection.idle_since = now = self._reactor.seconds()
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = []
        idle.append(connection)
        if len(idle) > self.max_idle:
            idle.pop(0).transport.loseConnection()
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.idle_seconds, self._sweep)
        elif self._sweeper.getTime() > now + self.idle_seconds:
            self._sweeper.reset(self.idle_seconds)  # the clock went back

    def _sweep(self) -> None:
        """
        Close the connections idle too long; come back for the next one.
        """
        self._sweeper = None
        now = self._reactor.seconds()
        first = None
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since >= self.idle_seconds:
                idle.pop(0).transport.loseConnection()
            if idle:
                first = idle[0].idle_since if first is None else min(first, idle[0].idle_since)
            else:
                del self._idle[key]
        if first is not None:
            self._sweeper = self._reactor.callLater(max(0.0, first + self.idle_seconds - now), self._sweep)

    def _lost(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close the idle connections (as C{HTTPConnectionPool} does); fires
        when they are closed.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        closing = []
        for idle in self._idle.values():
            for connection in idle:
                connection.closed = Deferred()
                closing.append(connection.closed)
                connection.transport.loseConnection()
        self._idle.clear()
        return gatherResults(closing).addCallback(lambda _: None)


def _host_of(base: bytes) -> tuple[bytes, bytes]:
    """
    A URL's C{scheme://netloc}: the key of its host's connections, and its
    C{Host} header (without the scheme's default port, as C{Agent} writes it).
    """
    scheme, _, netloc = base.partition(b"://")
    host, colon, port = netloc.rpartition(b":")
    if colon and b"]" not in port and _DEFAULT_PORT.get(scheme) == port:
        netloc = host
    return base, netloc


__all__ = ["HostAgent", "UnreadableAnswer", "IDLE_SECONDS", "MAX_HEAD", "MAX_IDLE"]
