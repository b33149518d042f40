"""
The balancer's request class: bodies are kept byte for byte, never parsed.
"""

from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel

from imml.site import BalancerRequest, BalancerSite
from imml.testing import ENTRIES, predict_body


class Seen(Resource):
    isLeaf = True

    def render(self, request):
        self.args = dict(request.args)
        self.body = request.content.getvalue()
        self.too_large = request.too_large
        return b""


def receive(body: bytes, content_type: bytes, limit: int = 10_000, length=True):
    seen = Seen()
    channel = DummyChannel()
    channel.site = BalancerSite(seen, limit)
    request = BalancerRequest(channel)
    request.requestHeaders.setRawHeaders(b"content-type", [content_type])
    request.gotLength(len(body) if length else None)
    for i in range(0, len(body), 1000):
        request.handleContentChunk(body[i : i + 1000])
    request.requestReceived(b"POST", b"/predict", b"HTTP/1.1")
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
