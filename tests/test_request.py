"""
The balancer's request class: bodies are kept byte for byte, never parsed,
in memory or in a temporary file; a body over the limit is refused at once,
before it arrives.
"""

import json
import time
from email.utils import parsedate_to_datetime

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource

from imml.body import BodyStore
from imml.site import LINGER, BalancerSite, _date
from imml.testing import ENTRIES, predict_body


class Seen(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def render(self, request):
        self.calls += 1
        self.args = dict(request.args)
        self.spooled = request.content.spooled
        with request.content.view() as data:
            self.body = bytes(data)
        return b""


class HalfClosing(StringTransport):
    """A transport that can close its sending side alone, as TCP's can."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


def connect(limit=10_000, bodies=None, transport=None, clock=None):
    """A resource that notes what it saw, behind a site; a connection to it."""
    seen = Seen()
    site = BalancerSite(seen, limit, bodies=bodies, reactor=clock or Clock())
    channel = site.buildProtocol(None)
    transport = transport or StringTransport()
    transport.peerAddr = IPv4Address("TCP", "192.0.2.50", 40000)
    channel.makeConnection(transport)
    return seen, site, channel, transport


def head(content_type=b"application/octet-stream", length=None, extra=()):
    lines = [b"POST /predict HTTP/1.1", b"Host: balancer", b"Content-Type: " + content_type, *extra]
    lines.append(b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunked(body: bytes, size: int = 1000) -> bytes:
    data = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i : i + size] for i in range(0, len(body), size)))
    return data + b"0\r\n\r\n"


def feed(channel, raw: bytes, piece: int = 1000) -> None:
    for i in range(0, len(raw), piece):
        channel.dataReceived(raw[i : i + piece])


def receive(body: bytes, content_type: bytes, limit: int = 10_000, length=True, bodies=None):
    """
    Feed a POST over an in-memory connection to a site with a body limit,
    in pieces; what the resource saw, and the client's transport.
    """
    seen, site, channel, transport = connect(limit, bodies)
    raw = head(content_type, len(body)) + body if length else head(content_type) + chunked(body)
    feed(channel, raw)
    return seen, transport


def answer(transport) -> tuple[int, dict]:
    raw = transport.value()
    status = int(raw.split(b" ", 2)[1])
    return status, json.loads(raw.partition(b"\r\n\r\n")[2])


def test_a_multipart_body_is_not_parsed_as_a_form():
    ctype, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8" + bytes(range(256)) * 8)
    seen, _ = receive(body, ctype)
    assert seen.args == {}
    assert seen.body == body and not seen.spooled


def test_a_large_body_is_kept_in_a_file_byte_for_byte_whether_its_length_is_declared_or_not():
    ctype, body = predict_body(ENTRIES["clip-visual"], image=bytes(range(256)) * 40)
    for declared in (True, False):
        bodies = BodyStore(spool_over=4096)
        seen, _ = receive(body, ctype, limit=100_000, length=declared, bodies=bodies)
        assert seen.spooled and seen.body == body
        assert bodies.in_memory == 0
        # Answered: twisted.web closed the body, and with it its file.
        assert bodies.files == 0


def test_a_declared_length_over_the_limit_is_refused_before_the_body_and_the_connection_closed():
    seen, site, channel, transport = connect(limit=10_000)
    feed(channel, head(length=200 * 1024 * 1024, extra=[b"Expect: 100-continue"]))
    status, detail = answer(transport)
    assert status == 413 and "10000" in detail["detail"]
    assert b"100 Continue" not in transport.value()
    assert b"connection: close" in transport.value()
    assert transport.disconnecting
    # What the client sends anyway is dropped, and nothing reaches the resource.
    written = transport.value()
    channel.dataReceived(b"x" * 50_000)
    assert transport.value() == written and seen.calls == 0
    assert site.bodies.files == 0 and site.bodies.in_memory == 0


def test_a_chunk_declared_over_the_limit_is_refused_before_its_data():
    seen, site, channel, transport = connect(limit=10_000)
    feed(channel, head() + b"%x\r\n" % 2**80 + b"some of it")
    status, _ = answer(transport)
    assert status == 413 and transport.disconnecting and seen.calls == 0


def test_chunks_whose_sizes_add_up_over_the_limit_are_refused_at_the_chunk_that_crosses_it():
    seen, site, channel, transport = connect(limit=10_000)
    feed(channel, head() + b"1000\r\n" + b"a" * 4096 + b"\r\n")
    assert transport.value() == b""
    feed(channel, b"1000\r\n")  # 8192 declared: still within the limit
    assert transport.value() == b""
    feed(channel, b"a" * 4096 + b"\r\n" + b"800;ext=1\r\n")  # 10240
    status, _ = answer(transport)
    assert status == 413 and seen.calls == 0
    assert site.bodies.in_memory == 0


def test_a_chunked_body_at_the_limit_fed_one_byte_at_a_time_is_accepted_whole():
    body = bytes(range(256)) * 39 + b"0123"  # 10_000 bytes
    seen, site, channel, transport = connect(limit=10_000)
    feed(channel, head() + chunked(body, size=333).replace(b"\r\n", b";x=y\r\n", 1), piece=1)
    assert seen.calls == 1 and seen.body == body


def test_a_refused_client_still_sending_is_cut_after_the_linger():
    clock = Clock()
    seen, site, channel, transport = connect(limit=10_000, transport=HalfClosing(), clock=clock)
    feed(channel, head(length=50_000) + b"x" * 1000)
    assert answer(transport)[0] == 413
    # The answer is followed by the end of what the balancer sends; the
    # connection stays open a little while, reading and dropping.
    assert transport.write_closed and not transport.aborted
    clock.advance(LINGER - 0.1)
    channel.dataReceived(b"x" * 1000)
    assert not transport.aborted
    clock.advance(0.2)
    assert transport.aborted


def test_a_body_that_cannot_be_spooled_gets_503_at_once(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    seen, site, channel, transport = connect(limit=100_000, bodies=BodyStore(spool_over=1000))
    # The whole body in one read: the refusal comes in the middle of it.
    channel.dataReceived(head(length=5000) + b"x" * 5000)
    status, detail = answer(transport)
    assert status == 503 and "missing" in detail["detail"]
    assert transport.disconnecting
    assert transport.value().count(b"HTTP/1.1") == 1 and seen.calls == 0


class _Writes(StringTransport):
    """A transport that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq):
        self.writes.append(list(seq))
        super().writeSequence(seq)


def test_an_answer_head_goes_out_in_one_piece_with_the_server_and_date():
    seen, site, channel, transport = connect(transport=_Writes())
    feed(channel, head(length=0))
    assert seen.calls == 1
    first = transport.writes[0]
    assert isinstance(first, bytes) and first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\n")
    headers = dict(line.split(b": ", 1) for line in first.split(b"\r\n")[1:-2])
    assert {b"server", b"date", b"content-length"} <= {name.lower() for name in headers}
    dated = parsedate_to_datetime(headers[b"Date"].decode()).timestamp()
    assert abs(dated - time.time()) < 5


def test_an_answers_date_is_the_seconds_own():
    now = int(time.time())
    assert _date(now) == datetimeToString(now)
    assert _date(now + 1) == datetimeToString(now + 1) != _date(now)
    assert _date(now) == datetimeToString(now)


class _AddressCounting(StringTransport):
    """A transport that counts how often its own address is asked for."""

    asked = 0

    def getHost(self):
        self.asked += 1
        return super().getHost()


def test_a_connection_asks_for_its_own_address_once():
    seen, site, channel, transport = connect(transport=_AddressCounting())
    for _ in range(3):
        feed(channel, head(length=0))
    assert seen.calls == 3 and transport.value().count(b"HTTP/1.1 200 OK") == 3
    assert transport.asked == 1


def test_options_star_gets_the_servers_own_answer_not_the_resources():
    seen, site, channel, transport = connect()
    feed(channel, b"OPTIONS * HTTP/1.1\r\nHost: balancer\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n") and seen.calls == 0
