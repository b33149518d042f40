"""
The balancer's HTTP face: the site and request classes that receive
Immich's requests, and the resource that answers the balancer's own C{/ping},
refuses what it must, classifies the rest and hands it to the
L{imml.forward.Forwarder}.
"""

from __future__ import annotations

from io import BytesIO
from typing import Optional

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web import server
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer
from twisted.web.resource import Resource

from .classify import classify
from .fleet import Fleet
from .forward import Forwarder, json_error

log = Logger()


class _QuietClientFactory(_HTTP11ClientFactory):
    # One log line per connection would drown the one line per request.
    noisy = False


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    One endpoint per ML host, made once: Twisted's default makes one per
    request.  A host named by its IP address is connected to directly; a
    name goes through a L{HostnameEndpoint}, which resolves it each time it
    connects, so DNS and C{.local} changes are followed.  (Resolving an
    address would only cost a thread hop per connection, and under load
    C{getaddrinfo} can fail even for C{127.0.0.1}, which would mark a
    healthy host down.)
    """

    def __init__(self, reactor, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._endpoints: dict = {}

    def endpointForURI(self, uri):
        key = (uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii")
            if isIPAddress(host):
                endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            elif isIPv6Address(host):
                endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            else:
                endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            self._endpoints[key] = endpoint
        return endpoint


def make_agent(reactor, connect_timeout: float, pool: HTTPConnectionPool) -> Agent:
    """
    An HTTP client for the ML hosts, with its own connection pool (see
    L{make_pool}).
    """
    return Agent.usingEndpointFactory(reactor, _Endpoints(reactor, connect_timeout), pool)


def make_pool(reactor, persistent: bool = True) -> HTTPConnectionPool:
    """
    A connection pool to the ML hosts.  Idle connections are dropped after
    1 s, before Immich ML's own 2 s keep-alive timeout closes them under us.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = 16
    pool.cachedConnectionTimeout = 1.0
    pool.retryAutomatically = False
    return pool


class BalancerRequest(server.Request):
    """
    A request whose body is held in memory, up to the site's limit, and
    never parsed as a form: the balancer forwards it byte for byte.
    """

    # An answer carries the host's content type, or none: never one of ours.
    defaultContentType = None
    too_large = False
    _received = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Never parse a body as a form (Twisted would, with the email
        # package, on every multipart /predict).
        self._parsePOSTFormSubmission = False

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.channel.site.max_body:
            self.too_large = True
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
            self.content = BytesIO()
            return
        self.content.write(data)


class BalancerSite(server.Site):
    requestFactory = BalancerRequest

    def __init__(self, resource, max_body: int, **kw) -> None:
        super().__init__(resource, **kw)
        self.max_body = max_body

    def log(self, request) -> None:
        # One structured event per request is logged by the forwarder.
        pass


class BalancerResource(Resource):
    """
    The balancer's HTTP face: its own C{/ping}, and everything else
    forwarded.
    """

    isLeaf = True

    def __init__(self, fleet: Fleet, forwarder: Forwarder) -> None:
        super().__init__()
        self.fleet = fleet
        self.forwarder = forwarder
        #: The balancer is stopping: /ping says so, so Immich moves on.
        self.stopping = False
        #: Requests accepted and not yet answered (for the graceful stop).
        self.active = 0

    def _over(self, _) -> None:
        self.active -= 1

    def render(self, request: BalancerRequest):
        if not request.uri.startswith(b"/") or request.method == b"CONNECT":
            return json_error(request, 400, "imml is a reverse proxy for Immich ML hosts, not a forward proxy")
        path = request.uri.split(b"?", 1)[0]
        if path == b"/ping" and request.method in (b"GET", b"HEAD"):
            if self.stopping:
                return json_error(request, 503, "the balancer is stopping")
            if self.fleet.any_up:
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"pong"
            return json_error(request, 503, "no ML host is up")
        if request.too_large:
            request.setHeader(b"connection", b"close")
            limit = request.channel.site.max_body
            return json_error(request, 413, f"request body is larger than the limit of {limit} bytes")
        body = request.content.getvalue()
        content_type = request.requestHeaders.getRawHeaders(b"content-type", [None])[0]
        info = classify(request.method, path, content_type, body)
        self.active += 1
        d = self.forwarder.forward(request, info, body)
        d.addBoth(self._over)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET
