"""
The balancer's HTTP face: the site, channel and request classes that receive
Immich's requests (bodies kept by L{imml.body}, refused at once when over
the limit), the resource that answers the balancer's own C{/ping}, refuses
what it must, classifies the rest and hands it to the
L{imml.forward.Forwarder}, and the writing of answers back to the client.

Every request is reported once, from the moment its headers have arrived:
by its job when it was forwarded (L{imml.job}), else by the site
(L{BalancerSite.report}): refused, answered here, or its client gone
before it was whole.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource

from .body import BodyStore, RequestBody, SpoolError
from .chunked import DeclaredChunks
from .classify import classify
from .records import RequestRecord
from .upstream import Answer

#: Seconds a refused client's connection stays open after the answer, what it
#: still sends read and dropped, so that a client busy uploading reads the
#: answer instead of a reset (nginx's lingering close); then it is cut.
LINGER = 5.0

#: Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ]
)
#: Request headers the proxy sets itself.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
#: Response headers the proxy sets itself.
_NOT_RETURNED = HOP_BY_HOP | {b"content-length", b"date", b"server"}


@lru_cache(maxsize=1)
def _date(second: int) -> bytes:
    """
    The C{Date} of the answers given in C{second}: made once a second, not
    for each answer.
    """
    return datetimeToString(second)


def json_error(request: server.Request, code: int, detail: str) -> bytes:
    """
    Set C{request} up for an error answer of the balancer's own, and return
    its body: C{{"detail": ...}} like Immich ML's own errors.
    """
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"detail": detail}).encode("utf-8")


def _answer_here(request: BalancerRequest, code: int, detail: str) -> bytes:
    # An error of the balancer's own, its detail kept for the request log.
    request.reason = detail
    return json_error(request, code, detail)


def too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


class BalancerChannel(HTTPChannel):
    """
    An HTTP connection from a client that can refuse the request being
    received at once, before its body (L{refuse}), and follows the sizes a
    chunked body declares (L{follow_chunks}).

    @ivar refused: the request being received was refused; whatever the
        client still sends is dropped.
    @ivar request_line: the request line of the request being received,
        until its headers are whole (L{BalancerRequest.gotLength}).
    @ivar closing: the balancer closed the connection (twisted.web does, on
        a malformed request or an idle timeout).
    """

    refused = False
    closing = False
    request_line: Optional[bytes] = None
    _chunks: Optional[DeclaredChunks] = None
    _chunk_limit = 0
    _over_limit: Optional[Callable[[], None]] = None
    _linger: Optional[IDelayedCall] = None
    _host: Optional[IAddress] = None

    def follow_chunks(self, limit: int, over: Callable[[], None]) -> None:
        """
        The body coming is chunked: call C{over} as soon as its chunks
        declare more than C{limit} bytes in all.
        """
        self._chunks = DeclaredChunks()
        self._chunk_limit = limit
        self._over_limit = over

    def lineReceived(self, line: bytes) -> None:
        # The request line, kept for the request log: twisted.web gives a
        # request its method and path only once its body has arrived, and a
        # request refused or cut before then is logged too.
        if self.request_line is None and line:
            self.request_line = line
        super().lineReceived(line)

    def loseConnection(self) -> None:
        self.closing = True
        super().loseConnection()

    def getHost(self) -> IAddress:
        # twisted.web asks every request for the connection's own address,
        # and a TCP transport asks the kernel each time (getsockname).
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        # An answer's head in one piece: twisted.web writes it as a sequence
        # of four pieces a header, each checked on its own by the transport.
        lines = [b"%s %s %s\r\n" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        chunks = self._chunks
        if chunks is not None:
            declared = chunks.feed(data)
            if chunks.done:
                self._chunks = None
            if declared > self._chunk_limit:
                self._chunks = None
                self._over_limit()
                return
        super().rawDataReceived(data)

    def refuse(self, code: int, detail: str) -> int:
        """
        Answer the request being received with an error of the balancer's
        own (C{{"detail": ...}}), now, and close the connection: its sending
        side at once, the whole of it once the client closes its own or
        L{LINGER} seconds later.

        @return: the bytes of the answer's body.
        """
        if self.refused:
            return 0
        self.refused = True
        self._chunks = None
        body = json.dumps({"detail": detail}).encode("utf-8")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (code, RESPONSES.get(code, b"Error"), len(body), body)
        )
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
        else:
            half_close()
            self._linger = self.callLater(LINGER, self.transport.abortConnection)
        return len(body)

    def connectionLost(self, reason: Failure) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)


class BalancerRequest(server.Request):
    """
    A request whose body is kept by the site's L{BodyStore} (in memory, or
    in a temporary file), up to the site's limit, and never parsed as a
    form: the balancer forwards it byte for byte.  A body declared over the
    limit is refused at once.  It writes the answers of the balancer
    (L{reply_error}) and of its hosts (L{start_answer}, L{end_answer}).

    Its C{content} is the L{RequestBody}; twisted.web closes it when the
    request ends, whichever way (answered, or the client went away).

    @ivar gone: the client's connection was lost.
    @ivar refused: the request was refused while its body arrived, and
        answered then.
    @ivar received: when its headers had all arrived (the site's clock), or
        None before.
    @ivar forwarded: handed to the forwarder, whose job reports it; else
        the site reports it.
    @ivar reason: why the balancer answered it itself, for the request log.
    """

    # An answer carries the host's content type, or none: never one of ours.
    defaultContentType = None
    gone = False
    refused = False
    forwarded = False
    received: Optional[float] = None
    reason: Optional[str] = None
    content: Optional[RequestBody]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Never parse a body as a form (Twisted would, with the email
        # package, on every multipart /predict).
        super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

    def gotLength(self, length: Optional[int]) -> None:
        channel = self.channel
        site = channel.site
        self.received = site.reactor.seconds()
        line, channel.request_line = channel.request_line, None
        if line is not None:
            # twisted.web sets the same once the body has arrived.
            parts = line.split(b" ")
            if len(parts) == 3:
                self.method, self.uri = parts[0], parts[1]
        limit = site.max_body
        if length is not None and length > limit:
            # No "100 Continue" for a body that is refused.
            self.requestHeaders.removeHeader(b"expect")
            self.refuse(413, too_large(limit))
            return
        self.content = site.bodies.new(length)
        if length is None:
            channel.follow_chunks(limit, lambda: self.refuse(413, too_large(limit)))

    def write(self, data: bytes) -> None:
        if not self.startedWriting and not self.gone and self.channel.site.stopping:
            # A stopping balancer answers what it accepted, and tells each
            # client to take its next request elsewhere: its connection
            # closes after this answer.
            self.setHeader(b"connection", b"close")
            self.channel.persistent = False
        super().write(data)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            self.content.write(data)
        except SpoolError as e:
            self.refuse(503, f"the balancer could not keep the request body: {e}")

    def process(self) -> None:
        # A request refused while its body arrived was answered then: what
        # of its body still arrived in the same read is not served.
        if self.refused:
            return
        # twisted.web's, less the walk down a tree of resources: the site's
        # one resource answers every path.
        self.site = site = self.channel.site
        self.setHeader(b"server", server.version)
        self.setHeader(b"date", _date(int(time.time())))
        if self.path == b"*":
            self._handleStar()  # OPTIONS *: the server's own answer
            return
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def refuse(self, code: int, detail: str) -> None:
        """
        Refuse the request while its body arrives: answer now, drop the
        body, close the connection (L{BalancerChannel.refuse}).
        """
        if self.refused:
            return
        self.refused = True
        if self.content is not None:
            self.content.close()
        channel = self.channel
        sent = channel.refuse(code, detail)
        channel.site.report_own(self, code, detail, sent)

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        channel = self.channel
        if channel is not None and not (self.forwarded or self.refused or self.finished or self.received is None):
            if channel.closing:
                channel.site.report_own(self, 400, "the request was malformed or too slow; the connection was closed")
            else:
                channel.site.report_own(self, 499, "the client went away before its request was whole")
        super().connectionLost(reason)

    @property
    def peer(self) -> Optional[str]:
        """
        The client's address (an IP address), or None when it has none.
        """
        return getattr(self.getClientAddress(), "host", None)

    @property
    def open(self) -> bool:
        """
        Whether an answer can still be written.
        """
        return not (self.finished or self.gone)

    def upstream_headers(self) -> Headers:
        """
        The headers to send a host: the client's, less the hop-by-hop ones
        (and those C{Connection} names), plus C{X-Forwarded-For}.
        """
        headers = Headers()
        given = self.requestHeaders
        connection = given.getRawHeaders(b"connection", [])
        named = {t.strip().lower() for v in connection for t in v.split(b",")}
        for name, values in given.getAllRawHeaders():
            lower = name.lower()
            if lower in _NOT_FORWARDED or lower in named:
                continue
            headers.setRawHeaders(name, values)
        peer = self.peer
        if peer:
            prior = given.getRawHeaders(b"x-forwarded-for")
            value = peer.encode("ascii")
            if prior:
                value = b", ".join(prior) + b", " + value
            headers.setRawHeaders(b"x-forwarded-for", [value])
        return headers

    def reply_error(self, code: int, detail: str) -> None:
        """
        Answer with an error of the balancer's own, if an answer can still
        be written.
        """
        if self.open:
            self.write(json_error(self, code, detail))
            self.finish()

    def start_answer(self, answer: Answer, via: bytes) -> None:
        """
        Write a host's status line and headers, naming it (C{via}) in
        C{X-Imml-Backend}.  The length is the host's when the answer
        streams, else what was held.
        """
        self.setResponseCode(answer.code, answer.phrase)
        headers = self.responseHeaders
        for name, values in answer.headers.getAllRawHeaders():
            if name.lower() not in _NOT_RETURNED:
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"x-imml-backend", [via])
        length = answer.length if answer.committed else answer.size
        if length is not UNKNOWN_LENGTH:
            self.setHeader(b"content-length", b"%d" % length)

    def end_answer(self, answer: Answer, via: bytes) -> None:
        """
        Give the client C{answer}: all of it when it was held, the end of it
        when it was streaming.
        """
        if not self.open:
            return
        if not answer.committed:
            self.start_answer(answer, via)
            chunks = answer.chunks
            if chunks:
                self.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        self.finish()

    def cut(self) -> None:
        """
        Cut the client's connection: an answer that failed after part of it
        was written must be seen as incomplete, never as whole.
        """
        if self.channel is not None:
            self.channel.transport.abortConnection()


class BalancerSite(server.Site):
    """
    The balancer's listener: requests of up to C{max_body} bytes, their
    bodies kept by C{bodies}, each rendered by its one resource, whatever
    its path.

    @ivar report: told of each request the site answers itself (refused,
        C{/ping}) or whose client went away before it was whole; a
        forwarded request is reported by its job.
    """

    requestFactory = BalancerRequest
    protocol = BalancerChannel

    def __init__(
        self,
        resource: Resource,
        max_body: int,
        bodies: Optional[BodyStore] = None,
        report: Callable[[RequestRecord], None] = lambda record: None,
        **kw: Any,
    ) -> None:
        super().__init__(resource, **kw)
        self.max_body = max_body
        self.bodies = bodies if bodies is not None else BodyStore()
        self.report = report

    @property
    def stopping(self) -> bool:
        """
        Whether the balancer is stopping (its resource says so).
        """
        return bool(getattr(self.resource, "stopping", False))

    def set_max_body(self, max_body: int) -> None:
        self.max_body = max_body

    def log(self, request: BalancerRequest) -> None:
        # twisted.web calls this as a request finishes.  A forwarded
        # request is reported by its job; one answered here, now.
        if not request.forwarded:
            self.report_own(request, request.code, request.reason)

    def report_own(
        self, request: BalancerRequest, status: int, reason: Optional[str], sent: Optional[int] = None
    ) -> None:
        """
        Report C{request}, which the site answered itself with C{status}
        (or which ended without an answer), for C{reason}; C{sent} bytes of
        body written past twisted.web (else what it counted).
        """
        received = request.received
        content = request.content
        method, uri = request.method, request.uri
        self.report(
            RequestRecord(
                # twisted.web's placeholders (str) before the request line is known
                method.decode("ascii", "replace") if method.__class__ is bytes else "-",
                uri.split(b"?", 1)[0].decode("ascii", "replace") if uri.__class__ is bytes else "-",
                None,
                status,
                None,
                (),
                self.reactor.seconds() - received if received is not None else 0.0,
                0.0,
                reason,
                request.peer,
                content.length if content is not None else 0,
                request.sentLength if sent is None else sent,
            )
        )


class BalancerResource(Resource):
    """
    The balancer's HTTP face: its own C{/ping}, and everything else
    forwarded.
    """

    isLeaf = True

    def __init__(self, fleet: Any, forwarder: Any) -> None:
        super().__init__()
        self.fleet = fleet
        self.forwarder = forwarder
        self.stopping = False
        #: The requests being answered, each with the forwarder's Deferred.
        self._answering: dict[BalancerRequest, Deferred[None]] = {}

    @property
    def active(self) -> int:
        """
        Requests accepted and not yet answered (for the graceful stop).
        """
        return len(self._answering)

    def stop_accepting(self) -> None:
        """
        The balancer is stopping: C{/ping} says so from now on, so Immich
        moves on.
        """
        self.stopping = True

    def _over(self, _: object, request: BalancerRequest) -> None:
        self._answering.pop(request, None)

    def stop_now(self, detail: str) -> None:
        """
        The balancer stops at once: every request being answered gets a
        503 saying C{detail}, or is cut if its answer has begun, and the
        forwarder cancels what it had under way.
        """
        for request, answering in list(self._answering.items()):
            if request.startedWriting:
                request.cut()
            else:
                request.reply_error(503, detail)
            answering.cancel()

    def render(self, request: BalancerRequest) -> Any:
        if not request.uri.startswith(b"/") or request.method == b"CONNECT":
            return _answer_here(request, 400, "imml is a reverse proxy for Immich ML hosts, not a forward proxy")
        path = request.uri.split(b"?", 1)[0]
        if path == b"/ping" and request.method in (b"GET", b"HEAD"):
            if self.stopping:
                return _answer_here(request, 503, "the balancer is stopping")
            if self.fleet.any_up:
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"pong"
            return _answer_here(request, 503, "no ML host is up")
        body = request.content
        content_type = request.requestHeaders.getRawHeaders(b"content-type", [None])[0]
        with body.view() as data:
            info = classify(request.method, path, content_type, data)
        request.forwarded = True
        d: Deferred[None] = self.forwarder.forward(request, info, body)
        self._answering[request] = d
        d.addBoth(self._over, request)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET
