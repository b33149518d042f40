"""
The ceiling of our stack: the least a twisted.web reverse proxy can do.

One Resource forwards every request with one Agent and a persistent
HTTPConnectionPool to the backends in turn (round-robin), reads the whole
answer and returns it.  No retries, no health checks, no logging, no form
parsing of request bodies (Site(parsePOSTFormSubmission=False)).

    python bench/minimal_proxy.py PORT 127.0.0.1:P1,127.0.0.1:P2 [--lean-agent]

With --lean-agent, the Agent is imml's own client to its hosts
(imml/hostclient.py's HostAgent), which grew out of the lean client of
bench/lean_client.py put behind the IAgent interface.
"""

import itertools
import sys
import warnings

from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

SKIP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"te", b"upgrade"}


@implementer(IBodyProducer)
class Body:
    def __init__(self, data):
        self.data, self.length = data, len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class Forward(Resource):
    isLeaf = True

    def __init__(self, agent, backends):
        super().__init__()
        self.agent, self.backends = agent, itertools.cycle(backends)

    def render(self, request):
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in SKIP:
                headers.setRawHeaders(name, values)
        body = request.content.read()
        url = b"http://" + next(self.backends) + request.uri
        d = self.agent.request(request.method, url, headers, Body(body) if body or request.method == b"POST" else None)
        d.addCallback(lambda r: readBody(r).addCallback(lambda data: (r, data)))

        def done(result):
            response, data = result
            content_type = response.headers.getRawHeaders(b"content-type")
            reply(request, response.code, content_type[0] if content_type else None, data)

        return forwarding(request, d, done)


def reply(request, code, content_type, data):
    """Answer C{request} with a host's answer, read whole."""
    request.setResponseCode(code)
    if content_type:
        request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(data))
    request.write(data)
    request.finish()


def forwarding(request, d, done):
    """
    C{request} waits on C{d}: C{done} answers it with C{d}'s result, 502 if
    C{d} fails; C{d} cancelled if the client goes away.
    """

    def failed(failure):
        if not request.finished and not request._disconnected:
            request.setResponseCode(502)
            request.finish()

    d.addCallbacks(done, failed)
    request.notifyFinish().addErrback(lambda _: d.cancel())
    return NOT_DONE_YET


class QuietSite(Site):
    def log(self, request):
        pass


def make_agent():
    """The Agent and its persistent pool, as a proxy to Immich ML would set them."""
    warnings.filterwarnings("ignore", "Using readBody with a transport", DeprecationWarning)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    pool.cachedConnectionTimeout = 1.0  # below Immich ML's 2 s keep-alive
    return Agent(reactor, pool=pool)


def serve(port, resource):
    """Serve C{resource} with twisted.web on 127.0.0.1:C{port} until stopped."""
    # A proxy forwards bodies byte for byte: no form parsing.
    site = QuietSite(resource, parsePOSTFormSubmission=False)
    site.noisy = False
    reactor.listenTCP(int(port), site, interface="127.0.0.1")
    reactor.run()


def main(port, backends, *flags):
    if "--lean-agent" in flags:
        from imml.upstream import make_host_agent  # imml's own IAgent

        agent = make_host_agent(reactor, 5.0)
    else:
        agent = make_agent()
    serve(port, Forward(agent, [b.encode() for b in backends.split(",")]))


if __name__ == "__main__":
    main(*sys.argv[1:])
