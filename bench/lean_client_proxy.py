"""
The minimal proxy (bench/minimal_proxy.py: twisted.web's Site and one
Resource) with the lean client of bench/lean_client.py to its hosts in
place of Agent and HTTPConnectionPool: what a leaner client to the hosts
would save.

    python bench/lean_client_proxy.py PORT 127.0.0.1:P1,127.0.0.1:P2
"""

import itertools
import sys

from lean_client import LeanClient
from minimal_proxy import SKIP, forwarding, reply, serve
from twisted.internet import reactor
from twisted.web.resource import Resource


class LeanForward(Resource):
    """
    Forwards every request to the hosts in turn, reads the whole answer and
    returns it: minimal_proxy's Forward, over the lean client.
    """

    isLeaf = True

    def __init__(self, client, backends):
        super().__init__()
        self.client, self.backends = client, itertools.cycle(backends)

    def render(self, request):
        headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            if name.lower() not in SKIP
            for value in values
        ]
        body = request.content.read()
        method = request.method
        d = self.client.request(
            method, next(self.backends), request.uri, headers, body if body or method == b"POST" else None
        )
        return forwarding(
            request, d, lambda answer: reply(request, answer.code, answer.header(b"content-type"), answer.body)
        )


def main(port, backends):
    serve(port, LeanForward(LeanClient(reactor), [b.encode() for b in backends.split(",")]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
