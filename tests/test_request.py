"""
The balancer's request class: bodies are kept byte for byte, never parsed.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from imml.site import BalancerSite
from imml.testing import ENTRIES, predict_body


class Seen(Resource):
    isLeaf = True

    def render(self, request):
        self.args = dict(request.args)
        self.body = request.content.getvalue()
        self.too_large = request.too_large
        return b""


def receive(body: bytes, content_type: bytes, limit: int = 10_000, length=True):
    """
    Feed a POST over an in-memory connection to a site with a body limit,
    in pieces; what the resource saw.
    """
    seen = Seen()
    channel = BalancerSite(seen, limit).buildProtocol(None)
    channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.50", 40000)))
    head = [b"POST /predict HTTP/1.1", b"Host: balancer", b"Content-Type: " + content_type]
    if length:
        head.append(b"Content-Length: %d" % len(body))
        data = body
    else:
        head.append(b"Transfer-Encoding: chunked")
        data = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i : i + 1000] for i in range(0, len(body), 1000)))
        data += b"0\r\n\r\n"
    raw = b"\r\n".join(head) + b"\r\n\r\n" + data
    for i in range(0, len(raw), 1000):
        channel.dataReceived(raw[i : i + 1000])
    return seen


def test_a_multipart_body_is_not_parsed_as_a_form():
    ctype, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8" + bytes(range(256)) * 8)
    seen = receive(body, ctype)
    assert seen.args == {}
    assert seen.body == body and not seen.too_large


def test_a_body_over_the_limit_is_dropped_whether_its_length_is_declared_or_not():
    ctype, body = predict_body(ENTRIES["clip-visual"], image=b"x" * 20_000)
    for declared in (True, False):
        seen = receive(body, ctype, limit=10_000, length=declared)
        assert seen.too_large and seen.body == b""
