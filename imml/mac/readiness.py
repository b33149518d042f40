"""
Is the child answering?  ``GET /ping`` must answer 200 ``pong``.

The probe owns its HTTP client: a treq ``HTTPClient`` over an ``Agent``
with its own non-persistent ``HTTPConnectionPool`` (never treq's global
pool).  A new connection per check costs nothing at one check every few
seconds and never meets a keep-alive connection that Immich (2 s keep-alive)
closed in the meantime.  The pool (L{_QuietPool}) connects through
L{_QuietEndpoint}, which turns off the C{noisy} flag of each connection's
factory: otherwise every check would log Twisted's "Starting factory" and
"Stopping factory" lines.
"""

from __future__ import annotations

from typing import Any, Hashable, Optional

import treq
from attrs import define, field, frozen
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IResponse
from zope.interface import implementer

log = Logger()


@implementer(IStreamClientEndpoint)
@frozen
class _QuietEndpoint:
    """
    C{endpoint}, connecting factories that do not log when they start and
    stop (C{noisy} is a public attribute of every Twisted C{Factory}).
    """

    endpoint: IStreamClientEndpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        protocolFactory.noisy = False
        return self.endpoint.connect(protocolFactory)


class _QuietPool(HTTPConnectionPool):
    """
    A connection pool whose new connections go through L{_QuietEndpoint}.
    """

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred:
        return super().getConnection(key, _QuietEndpoint(endpoint))


def ping_url(host: str, port: int) -> str:
    """
    The URL to check a service that binds C{host}: a wildcard address is
    checked on the loopback of the same family.
    """
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/ping"


@define(eq=False)
class PingProbe:
    """
    A callable returning a Deferred that fires C{True} when C{url} answers
    200 with body C{pong} within C{timeout} seconds, C{False} otherwise.

    @ivar pool: the connection pool of the probe's own client; C{None} when
        a C{client} was given.
    """

    reactor: Any
    url: str
    timeout: float = 5.0
    client: Any = None
    pool: Optional[HTTPConnectionPool] = field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.client is None:
            self.pool = _QuietPool(self.reactor, persistent=False)
            self.client = HTTPClient(Agent(self.reactor, pool=self.pool))

    def __call__(self) -> Deferred:
        d = self.client.get(self.url, timeout=self.timeout)

        def answered(response: IResponse) -> Deferred:
            if response.code != 200:
                return treq.content(response).addCallback(lambda body: False)
            return treq.content(response).addCallback(lambda body: body.strip() == b"pong")

        def failed(failure: Failure) -> bool:
            log.debug(
                "ping {url} failed: {error}",
                imml_event="ping-error",
                url=self.url,
                error=failure.getErrorMessage(),
            )
            return False

        d.addCallbacks(answered, failed)
        d.addErrback(failed)
        return d

    def close(self) -> Optional[Deferred]:
        """
        Drop any connection the pool holds.
        """
        if self.pool is not None:
            return self.pool.closeCachedConnections()
        return None
