"""
The minimal proxy (bench/minimal_proxy.py) with a bare server side: a
plain Twisted Protocol that reads HTTP/1.1 requests itself in place of
twisted.web's Site, Request and Resource; the client to the hosts is kept
(Agent and a persistent HTTPConnectionPool), or with --lean-client the lean
client of bench/lean_client.py: the floor of a proxy written on Protocols.

    python bench/lean_server_proxy.py PORT 127.0.0.1:P1,127.0.0.1:P2 [--lean-client]

The server keeps connections alive (HTTP/1.1, or HTTP/1.0 with
Connection: keep-alive), reads bodies of a Content-Length up to MAX_BODY,
answers one request at a time in order (pipelined requests wait, their
connection paused while they fill more than MAX_WAITING bytes), and refuses
what it does not read with one answer and the connection closed: a head
over MAX_HEAD (431), a chunked or otherwise coded body (501), a body over
MAX_BODY (413), a request it cannot parse (400), another HTTP version (505).
A host that cannot be reached or answers wrongly gives 502.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Callable, Optional

from lean_client import LeanClient, parse_headers
from minimal_proxy import SKIP, Body, make_agent
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import readBody
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.http_headers import Headers

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
MAX_WAITING = 1024 * 1024

#: What a forwarder fires with: the code, the Content-Type (or None) and the body.
Reply = tuple[int, Optional[bytes], bytes]
#: method, target, headers (without hop-by-hop ones), body (None: no body) -> Deferred[Reply]
Forward = Callable[[bytes, bytes, list, Optional[bytes]], Deferred]


class BadRequest(Exception):
    """
    A request the server refuses: its status and the connection is closed.
    """

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


def parse_request_head(head: bytes) -> tuple[bytes, bytes, bool, list, int]:
    """
    The method, target, whether the connection stays open after the
    answer, the headers to forward and the body's length of a request's
    head (without its closing empty line).
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, "bad request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(505, "versions 1.1 and 1.0 only")
    keep = version == b"HTTP/1.1"
    lengths = set()
    forwarded = []
    for name, value in parse_headers(lines[1:], lambda why: BadRequest(400, why)):
        key = name.lower()
        if key == b"content-length":
            lengths.add(value)
        elif key == b"transfer-encoding":
            raise BadRequest(501, "coded bodies are not read")
        elif key == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            keep = b"close" not in tokens and (keep or b"keep-alive" in tokens)
        elif key not in SKIP:
            forwarded.append((name, value))
    length = 0
    if lengths:
        value = lengths.pop()
        if lengths or not value.isdigit():
            raise BadRequest(400, "bad or conflicting Content-Length")
        length = int(value)
        if length > MAX_BODY:
            raise BadRequest(413, f"body over {MAX_BODY} bytes")
    return method, target, keep, forwarded, length


class LeanServer(Protocol):
    """
    One client's connection: its requests read, forwarded and answered one
    at a time.
    """

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.buffer = b""
        self.head: Optional[tuple] = None
        self.busy: Optional[Deferred] = None
        self.paused = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.busy is None:
            self._next()
        elif len(self.buffer) > MAX_WAITING and not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def _next(self) -> None:
        """Start on the next whole request in the buffer, if there is one."""
        buffer = self.buffer
        if self.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._refuse(431, b"request head too large")
                return
            try:
                self.head = parse_request_head(buffer[:end])
            except BadRequest as e:
                self._refuse(e.code, str(e).encode())
                return
            buffer = self.buffer = buffer[end + 4 :]
        method, target, keep, headers, length = self.head
        if len(buffer) < length:
            return
        body = buffer[:length] if length or method == b"POST" else None
        self.buffer, self.head = buffer[length:], None
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
        self.busy = d = self.forward(method, target, headers, body)
        d.addCallbacks(self._answer, self._failed, callbackArgs=(keep,), errbackArgs=(keep,))

    def _answer(self, reply: Reply, keep: bool) -> None:
        code, content_type, body = reply
        self.busy = None
        lines = [
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Length: %d\r\n"
            % (code, RESPONSES.get(code, b"Unknown"), _date(), len(body))
        ]
        if content_type:
            lines.append(b"Content-Type: " + content_type + b"\r\n")
        if not keep:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        lines.append(body)
        self.transport.write(b"".join(lines))
        if not keep:
            self.transport.loseConnection()
        elif self.buffer:
            self._next()

    def _failed(self, failure: Failure, keep: bool) -> None:
        if self.busy is not None:  # not cancelled: the connection is still there
            self._answer((502, b"text/plain", b"the host did not answer\n"), keep)

    def _refuse(self, code: int, why: bytes) -> None:
        self.buffer = b""
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s\n"
            % (code, RESPONSES.get(code, b"Unknown"), len(why) + 1, why)
        )
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        busy, self.busy = self.busy, None
        if busy is not None:
            busy.cancel()


_dated = [0, b""]


def _date() -> bytes:
    """The Date header's value, made once a second."""
    now = int(time.time())
    if _dated[0] != now:
        _dated[:] = [now, datetimeToString(now)]
    return _dated[1]


def agent_forward(agent, backends) -> Forward:
    """Forward with twisted.web's Agent to the hosts in turn, reading answers whole."""
    turn = itertools.cycle(backends)

    def forward(method, target, headers, body):
        outgoing = Headers()
        for name, value in headers:
            outgoing.addRawHeader(name, value)
        d = agent.request(method, b"http://" + next(turn) + target, outgoing, None if body is None else Body(body))
        return d.addCallback(
            lambda r: readBody(r).addCallback(
                lambda data: (r.code, (r.headers.getRawHeaders(b"content-type") or [None])[0], data)
            )
        )

    return forward


def lean_forward(client: LeanClient, backends) -> Forward:
    """Forward with the lean client to the hosts in turn."""
    turn = itertools.cycle(backends)

    def forward(method, target, headers, body):
        d = client.request(method, next(turn), target, headers, body)
        return d.addCallback(lambda a: (a.code, a.header(b"content-type"), a.body))

    return forward


def main(port, backends, *flags):
    hosts = [b.encode() for b in backends.split(",")]
    forward = (
        lean_forward(LeanClient(reactor), hosts) if "--lean-client" in flags else agent_forward(make_agent(), hosts)
    )
    reactor.listenTCP(int(port), Factory.forProtocol(lambda: LeanServer(forward)), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
