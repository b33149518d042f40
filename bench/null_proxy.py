"""
A proxy's server side alone: answers every request itself, with the answer
its first host gave once at start (GET /predict), read whole, so the
bytes a client gets are a proxy's.  With twisted.web (Site and Resource, as
bench/minimal_proxy.py) or, with --bare, with the bare Protocol server of
bench/lean_server_proxy.py.  What is left of a proxy's cost when its
client to the hosts is taken away.

    python bench/null_proxy.py PORT 127.0.0.1:P1[,...] [--bare]
"""

import sys
import urllib.request

from lean_server_proxy import LeanServer
from minimal_proxy import serve
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.web.resource import Resource


class Canned(Resource):
    """Reads each request's body and answers the same JSON."""

    isLeaf = True

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def render(self, request):
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(self.answer))
        return self.answer


def main(port, backends, *flags):
    with urllib.request.urlopen(f"http://{backends.split(',')[0]}/predict", timeout=10) as r:
        answer = r.read()
    if "--bare" not in flags:
        serve(port, Canned(answer))
        return
    reply = (200, b"application/json", answer)
    factory = Factory.forProtocol(lambda: LeanServer(lambda method, target, headers, body: defer.succeed(reply)))
    reactor.listenTCP(int(port), factory, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
