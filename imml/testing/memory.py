"""
An in-memory HTTP client over several fake hosts, routed by address.

L{MemoryAgent} is an L{IAgent}, like treq's C{RequestTraversalAgent}, but in
front of a whole fleet: each L{imml.testing.FakeMLHost} is added at a
C{host:port} address and each request goes, over its own in-memory
connection, to the host its URI names.  Nothing touches a socket or the
global reactor, so a balancer's forwarding, retries and health checks test
under a L{twisted.internet.task.Clock}:

    clock = Clock()
    agent = MemoryAgent()
    agent.add("10.0.0.1:3003", FakeMLHost(clock, name="nas", service_time=0.2))
    d = agent.request(b"GET", b"http://10.0.0.1:3003/ping")
    clock.advance(0.2)
    agent.flush()

What crosses the wire does so as over TCP: a real L{twisted.web.client.Agent}
speaks HTTP/1.1 to the host's own L{imml.testing.fakesite.FakeMLSite}, one
connection per request.  An address with no host refuses the connection; an
L{unreachable <MemoryAgent.unreachable>} one (a sleeping Mac) leaves it
connecting until the request is cancelled; a host that aborts a connection
(modes C{reset}, C{die-mid-answer}) is seen as a reset by the client, and a
client that cancels a request is seen by the host as gone.

As with C{StubTreq}, data moves when a request is made and when L{flush
<MemoryAgent.flush>} is called: call it after C{clock.advance}.  The body
producer must produce without the global reactor (treq's default for
C{data=bytes} needs it: give C{HTTPClient} a C{data_to_body_producer}).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator

from attrs import define, field, frozen
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.client import URI, Agent
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from imml.backends import BackendAddress, parse_backend

from .fakehost import FakeMLHost
from .fakesite import FakeMLSite

__all__ = ["MemoryAgent"]


def _address(value: str | BackendAddress) -> BackendAddress:
    return value if isinstance(value, BackendAddress) else parse_backend(value)


def _uri_address(uri: URI) -> BackendAddress:
    """The address a URI names, normalized as L{parse_backend} does."""
    host = uri.host.decode("ascii")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return parse_backend(f"[{host}]:{uri.port}" if ":" in host else f"{host}:{uri.port}")


def _socket_address(address: BackendAddress) -> IAddress:
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return HostnameAddress(address.host.encode("idna"), address.port)
    if ip.version == 6:
        return IPv6Address("TCP", address.host, address.port)
    return IPv4Address("TCP", address.host, address.port)


class _Transport(iosim.FakeTransport):  # type: ignore[misc]
    """
    One end of an in-memory connection.  Aborting it (as a host does in
    modes C{reset} and C{die-mid-answer}, or a client cancelling) reports a
    reset to the other end and an abort to this one, as TCP does; data
    already written still arrives first.
    """

    peer: _Transport | None = None

    def abortConnection(self) -> None:
        if not self.disconnecting:
            self.disconnectReason = ConnectionAborted()
            if self.peer is not None and not self.peer.disconnecting:
                self.peer.disconnectReason = ConnectionLost("Connection reset by peer")
        super().abortConnection()


@frozen(eq=False)
class _Link:
    """An open in-memory connection to the host at C{address}."""

    address: BackendAddress
    pump: iosim.IOPump

    @property
    def closed(self) -> bool:
        return bool(self.pump.clientIO.disconnected and self.pump.serverIO.disconnected)


@frozen(eq=False)
class _Attempt:
    """A connection attempt waiting for an unreachable address."""

    deferred: Deferred[IProtocol]
    factory: IProtocolFactory


@implementer(IStreamClientEndpoint)
@frozen
class _Endpoint:
    agent: MemoryAgent
    address: BackendAddress

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self.agent._connect(self.address, protocolFactory)


@implementer(IAgentEndpointFactory)
@frozen
class _Endpoints:
    agent: MemoryAgent

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"http":
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r} (Immich ML speaks plain HTTP)")
        return _Endpoint(self.agent, _uri_address(uri))


@implementer(IAgent)
@define(eq=False)
class MemoryAgent:
    """
    An L{IAgent} over fake hosts in memory, routed by the URI's C{host:port}.

    Addresses are given as C{"host:port"}, C{"[v6]:port"} (port 3003 when
    left out) or as L{BackendAddress}; a URI without a port names port 80.
    """

    _sites: dict[BackendAddress, FakeMLSite] = field(init=False, factory=dict)
    _unreachable: set[BackendAddress] = field(init=False, factory=set)
    _waiting: dict[BackendAddress, list[_Attempt]] = field(init=False, factory=dict)
    _links: list[_Link] = field(init=False, factory=list)
    _fresh: list[_Link] = field(init=False, factory=list)
    _ports: Iterator[int] = field(init=False, factory=lambda: itertools.count(49152))
    _agent: Agent = field(init=False)

    @_agent.default
    def _make_agent(self) -> Agent:
        return Agent.usingEndpointFactory(MemoryReactorClock(), _Endpoints(self))

    def add(self, address: str | BackendAddress, host: FakeMLHost) -> None:
        """
        Serve C{host} at C{address}.

        @raise ValueError: If a host is already served there.
        """
        where = _address(address)
        if where in self._sites:
            raise ValueError(f"{where} already has a host: remove it first")
        self._sites[where] = FakeMLSite(host)

    def remove(self, address: str | BackendAddress) -> None:
        """
        Stop serving the host at C{address}: new connections to it are
        refused.  Connections already open stay open (C{host.stop()} aborts
        them).

        @raise KeyError: If no host is served there.
        """
        del self._sites[_address(address)]

    def unreachable(self, address: str | BackendAddress) -> None:
        """
        Make C{address} unreachable, like a machine asleep: new connections
        to it stay connecting until cancelled (then fail with
        L{ConnectingCancelledError}), and nothing moves on the open ones.
        """
        self._unreachable.add(_address(address))

    def reachable(self, address: str | BackendAddress) -> None:
        """
        Undo L{unreachable}: connections still connecting to C{address} are
        made (or refused, if no host is served there) and their requests
        sent; the open ones move again at the next L{flush}.
        """
        where = _address(address)
        self._unreachable.discard(where)
        for attempt in self._waiting.pop(where, []):
            try:
                protocol = self._open(where, attempt.factory)
            except ConnectionRefusedError:
                attempt.deferred.errback()
            else:
                attempt.deferred.callback(protocol)
        self._pump_fresh()

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """
        Send a request to the host its URI names (L{IAgent.request}).  The
        request reaches the host at once; a host that answers at once has
        answered when this returns.
        """
        d = self._agent.request(method, uri, headers, bodyProducer)
        self._pump_fresh()
        return d

    def flush(self) -> None:
        """
        Move all pending data on every open connection, both ways, until
        nothing moves (connections to unreachable addresses excepted).
        """
        for _ in range(1000):
            moved = False
            links, self._links = self._links, []
            for link in links:
                if link.address not in self._unreachable and link.pump.flush():
                    moved = True
                if not link.closed:
                    self._links.append(link)
            if not moved:
                return
        raise RuntimeError("data still moving after 1000 rounds")

    # ---- connections ---------------------------------------------------------

    def _connect(self, address: BackendAddress, factory: IProtocolFactory) -> Deferred[IProtocol]:
        if address in self._unreachable:
            attempt = _Attempt(Deferred(lambda d: self._give_up(address, attempt)), factory)
            self._waiting.setdefault(address, []).append(attempt)
            return attempt.deferred
        try:
            return succeed(self._open(address, factory))
        except ConnectionRefusedError:
            return fail()

    def _give_up(self, address: BackendAddress, attempt: _Attempt) -> None:
        waiting = self._waiting.get(address, [])
        if attempt in waiting:
            waiting.remove(attempt)
        attempt.deferred.errback(ConnectingCancelledError(_socket_address(address)))

    def _open(self, address: BackendAddress, factory: IProtocolFactory) -> IProtocol:
        """Connect C{factory}'s protocol to the host at C{address}."""
        site = self._sites.get(address)
        if site is None:
            raise ConnectionRefusedError(string=f"no fake host at {address}")
        server_address = _socket_address(address)
        if isinstance(server_address, IPv6Address):
            client_address: IAddress = IPv6Address("TCP", "::1", next(self._ports))
        else:
            client_address = IPv4Address("TCP", "127.0.0.1", next(self._ports))
        server = site.buildProtocol(client_address)
        client = factory.buildProtocol(server_address)
        server_io = _Transport(server, isServer=True, hostAddress=server_address, peerAddress=client_address)
        client_io = _Transport(client, isServer=False, hostAddress=client_address, peerAddress=server_address)
        server_io.peer, client_io.peer = client_io, server_io
        link = _Link(address, iosim.connect(server, server_io, client, client_io, greet=False))
        self._links.append(link)
        self._fresh.append(link)
        return client

    def _pump_fresh(self) -> None:
        """Send what was written on the connections just made."""
        fresh, self._fresh = self._fresh, []
        for link in fresh:
            if link.address not in self._unreachable:
                link.pump.flush()
