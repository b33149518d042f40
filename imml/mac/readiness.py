"""
Is the child answering?  ``GET /ping`` must answer 200 ``pong``.

The probe owns its HTTP client: a treq ``HTTPClient`` over an ``Agent``
with its own non-persistent ``HTTPConnectionPool`` (never treq's global
pool).  A new connection per check costs nothing at one check every few
seconds and never meets a keep-alive connection that Immich (2 s keep-alive)
closed in the meantime.
"""

import attr
import treq
from treq.client import HTTPClient
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

log = Logger()


class _QuietFactory(_HTTP11ClientFactory):
    # One check every few seconds would otherwise log two lines each.
    noisy = False


def ping_url(host, port):
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


@attr.s(eq=False)
class PingProbe:
    """
    A callable returning a Deferred that fires C{True} when C{url} answers
    200 with body C{pong} within C{timeout} seconds, C{False} otherwise.
    """

    reactor = attr.ib()
    url: str = attr.ib()
    timeout: float = attr.ib(default=5.0)
    client = attr.ib(default=None)

    def __attrs_post_init__(self):
        if self.client is None:
            self.pool = HTTPConnectionPool(self.reactor, persistent=False)
            self.pool._factory = _QuietFactory
            self.client = HTTPClient(Agent(self.reactor, pool=self.pool))
        else:
            self.pool = None

    def __call__(self):
        d = self.client.get(self.url, timeout=self.timeout)

        def answered(response):
            if response.code != 200:
                return treq.content(response).addCallback(lambda body: False)
            return treq.content(response).addCallback(lambda body: body.strip() == b"pong")

        def failed(failure):
            log.debug(
                "ping {url} failed: {error}",
                kind="ping-error",
                url=self.url,
                error=failure.getErrorMessage(),
            )
            return False

        d.addCallbacks(answered, failed)
        d.addErrback(failed)
        return d

    def close(self):
        """
        Drop any connection the pool holds.
        """
        if self.pool is not None:
            return self.pool.closeCachedConnections()
