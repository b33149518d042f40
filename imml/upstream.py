"""
Upstream: the balancer's HTTP client to its ML hosts.

One L{Upstream} sends one request to one host and fires with its
L{Answer} (L{Upstream.exchange}); it knows nothing of jobs, retries or
clients.  An answer is held back whole until complete, so that a host dying
mid-answer can still be retried elsewhere, unless it grows past a limit or
the caller asks for it at once: then it is I{committed} to a sink (the
client) and the rest streams through.  L{make_pinger} is the health check's
exchange: C{GET /ping} on a new connection.

Requests go through one L{imml.hostclient.HostAgent}, which keeps a few
persistent connections per host (L{make_host_agent}); a request sent again
on a new connection, and the health check, go through Twisted's L{Agent}
without persistent connections (L{make_agent}).  Both reach each host
through one endpoint (L{_Endpoints}); an C{https://} host's connections are
wrapped in TLS with the connection creator its settings give
(L{imml.tls.HostsPolicy}).
"""

from __future__ import annotations

from typing import Any, Callable, Optional
from typing import Protocol as TypingProtocol

from attrs import define, field
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from .health import BadAnswer
from .hostclient import HostAgent
from .tls import HostsPolicy

#: Methods whose requests carry no body unless the client sent one.
_BODILESS = (b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE")


class Outgoing(TypingProtocol):
    """
    A request's body as L{Upstream.exchange} sends it: a client's
    (L{imml.body.RequestBody}) or a canary's; its length, and a producer
    per try that reads it from its first byte.
    """

    @property
    def length(self) -> int: ...

    def producer(self) -> IBodyProducer: ...


class Sink(TypingProtocol):
    """
    Where a committed answer's body goes: the client's request.
    """

    def write(self, data: bytes) -> None: ...


@define(eq=False)
class Answer:
    """
    A host's answer: held back whole, or (once C{committed}) being
    streamed to a sink.
    """

    code: int
    phrase: bytes
    headers: Headers
    #: The length the host announced, or C{UNKNOWN_LENGTH}.
    length: object
    chunks: list[bytes] = field(factory=list)
    #: Bytes received so far.
    size: int = 0
    committed: bool = False


class Discard:
    """
    A sink for an answer nobody waits for any more.
    """

    def write(self, data: bytes) -> None:
        pass


class Committed(Exception):
    """
    A host failed after part of its answer went to the sink.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Collector(Protocol):
    """
    Receives an answer's body: holds it until it is complete or grows past
    C{limit}, then calls C{commit} and writes the rest to the sink that
    returns.
    """

    def __init__(self, answer: Answer, limit: int, commit: Callable[[Answer], Sink]) -> None:
        self.answer = answer
        self.limit = limit
        self.commit = commit
        self.sink: Optional[Sink] = None
        self.done: Deferred[Answer] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[Answer]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        answer = self.answer
        if answer.committed:
            self.sink.write(data)
            return
        answer.chunks.append(data)
        answer.size += len(data)
        if answer.size > self.limit:
            answer.committed = True
            self.sink = self.commit(answer)

    def connectionLost(self, reason: Failure) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.answer)
        else:
            self.done.errback(reason)


def _mid_answer(failure: Failure, answer: Answer) -> Failure:
    if answer.committed:
        raise Committed(failure.value)
    return failure


def _gave_up(error: BaseException) -> bool:
    """
    Whether the balancer cancelled the exchange itself (its timeout, or the
    client went away), as Twisted reports it from inside a request.
    """
    return any(f.check(CancelledError) for f in getattr(error, "reasons", ()))


@define(eq=False)
class Upstream:
    """
    Sends requests to ML hosts.

    @ivar agent: the client, with a pool of persistent connections.
    @ivar fresh_agent: a client that makes a new connection per request:
        a request that failed on a pooled connection before any answer
        (the host may have closed it just then) is sent once more on it.
    @ivar hold_limit: an answer is held back until complete unless it grows
        past this many bytes.
    """

    agent: IAgent
    fresh_agent: Optional[IAgent] = None
    hold_limit: int = 8 * 1024 * 1024

    def exchange(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: Outgoing,
        commit: Callable[[Answer], Sink],
        hold: bool = True,
    ) -> Deferred[Answer]:
        """
        Send one request; fire with the host's complete L{Answer}.

        @param commit: called when the answer is to stream rather than be
            held: it returns where the body goes from then on.
        @param hold: whether to hold the answer back (a request that may be
            sent elsewhere if this host fails); if not, the answer is
            committed as soon as its headers arrive.
        @return: fails with L{Committed} when the host fails after part of
            the answer was committed, with C{CancelledError} when cancelled.
        (Plain callbacks, not a coroutine: this runs for every request.)
        """
        d = self._send(self.agent, method, url, headers, body)
        d.addCallbacks(
            self._receive,
            self._resend,
            callbackArgs=(commit, hold),
            errbackArgs=(method, url, headers, body, commit, hold),
        )
        return d

    @staticmethod
    def _send(agent: IAgent, method: bytes, url: bytes, headers: Headers, body: Outgoing) -> Deferred[IResponse]:
        # Each try reads the body from its first byte, through a producer
        # of its own.
        producer = body.producer() if body.length or method not in _BODILESS else None
        return agent.request(method, url, headers, producer)

    def _resend(
        self,
        failure: Failure,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: Outgoing,
        commit: Callable[[Answer], Sink],
        hold: bool,
    ) -> Any:
        error = failure.value
        if not isinstance(error, (ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent)):
            return failure
        if _gave_up(error):
            raise CancelledError()
        # Perhaps a pooled connection the host had just closed: once more on
        # a new connection before holding it against the host.  A request
        # that may not be repeated only if it was never sent.
        if self.fresh_agent is None or not (hold or isinstance(error, RequestNotSent)):
            return failure
        d = self._send(self.fresh_agent, method, url, headers, body)
        d.addCallback(self._receive, commit, hold)
        return d

    def _receive(self, response: IResponse, commit: Callable[[Answer], Sink], hold: bool) -> Deferred[Answer]:
        answer = Answer(response.code, response.phrase, response.headers, response.length)
        collector = _Collector(answer, self.hold_limit, commit)
        if not hold:
            answer.committed = True
            collector.sink = commit(answer)
        response.deliverBody(collector)
        return collector.done.addErrback(_mid_answer, answer)


def with_extra(headers: Headers, extra: tuple[tuple[bytes, bytes], ...]) -> Headers:
    """
    A copy of C{headers} with a host's extra headers (its settings'
    C{headers}), which replace any of the same name the client sent.
    """
    headers = headers.copy()
    for name, value in extra:
        headers.setRawHeaders(name, [value])
    return headers


class _Drain(Protocol):
    def __init__(self, done: Deferred[None]) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(None)


def make_pinger(agent: IAgent, clock: Any, timeout: float) -> Callable[[Any], Deferred[None]]:
    """
    A health check over C{agent} (best one that makes a new connection per
    request): C{GET /ping}, answered completely within C{timeout} seconds;
    any 2xx is healthy, as for Immich's own availability check.  It carries
    the host's extra headers, as its requests do.  The check fails with
    C{TimeoutError}, a connection error (a TLS one: the host's certificate
    did not verify) or L{BadAnswer}.
    """

    async def ping(backend: Any) -> None:
        extra = backend.settings.headers
        headers = with_extra(Headers(), extra) if extra else None
        d = agent.request(b"GET", backend.address.url(b"/ping"), headers)
        d.addTimeout(timeout, clock)
        try:
            response = await d
        except ResponseNeverReceived as e:
            if _gave_up(e):
                raise ierror.TimeoutError() from None  # our timeout, not the host's doing
            raise
        body: Deferred[None] = Deferred()
        response.deliverBody(_Drain(body))
        body.addTimeout(timeout, clock)
        await body
        if not 200 <= response.code < 300:
            raise BadAnswer(f"status {response.code}")

    return lambda backend: ensureDeferred(ping(backend))


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """
    An endpoint whose connections' factories log nothing of their own: one
    line per connection would drown the one line per request.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Deferred:
        factory.noisy = False
        return self._endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    One endpoint per ML host, made once: Twisted's default makes one per
    request.  A host named by its IP address is connected to directly; a
    name goes through a L{HostnameEndpoint}, which resolves it each time it
    connects, so DNS and C{.local} changes are followed.  (Resolving an
    address would only cost a thread hop per connection, and under load
    C{getaddrinfo} can fail even for C{127.0.0.1}, which would mark a
    healthy host down.)  An C{https://} host's endpoint is wrapped in TLS
    as C{tls} says for that host, at each connection: its settings may
    change on a reload.
    """

    def __init__(self, reactor: Any, connect_timeout: float, tls: IPolicyForHTTPS) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls
        self._endpoints: dict[tuple[bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        key = (uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._tcp(uri)
        if uri.scheme == b"https":
            return _QuietEndpoint(wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint))
        return endpoint

    def _tcp(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        return _QuietEndpoint(endpoint)


def make_pool(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """
    A connection pool to the ML hosts.  Idle connections are dropped after
    1 s, before Immich ML's own 2 s keep-alive timeout closes them under us.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = 16
    pool.cachedConnectionTimeout = 1.0
    pool.retryAutomatically = False
    return pool


def make_host_agent(reactor: Any, connect_timeout: float, tls: Optional[IPolicyForHTTPS] = None) -> HostAgent:
    """
    The balancer's client to the ML hosts, with persistent connections
    (L{imml.hostclient.HostAgent}: at most 16 idle ones per host, closed
    after 1 s, before Immich ML's own 2 s keep-alive timeout closes them
    under us).

    @param tls: the TLS settings of C{https://} hosts (default: the
        system's CAs, no client certificate).
    """
    if tls is None:
        tls = HostsPolicy(lambda host, port: None)
    return HostAgent(reactor, _Endpoints(reactor, connect_timeout, tls))


def make_agent(
    reactor: Any, connect_timeout: float, pool: HTTPConnectionPool, tls: Optional[IPolicyForHTTPS] = None
) -> Agent:
    """
    An HTTP client for the ML hosts, with its own connection pool (see
    L{make_pool}).

    @param tls: the TLS settings of C{https://} hosts (default: the
        system's CAs, no client certificate).
    """
    if tls is None:
        tls = HostsPolicy(lambda host, port: None)
    return Agent.usingEndpointFactory(reactor, _Endpoints(reactor, connect_timeout, tls), pool)


__all__ = [
    "Answer",
    "Committed",
    "Discard",
    "Outgoing",
    "Sink",
    "Upstream",
    "make_agent",
    "make_host_agent",
    "make_pinger",
    "make_pool",
    "with_extra",
]
