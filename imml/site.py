"""
The balancer's HTTP face: the site and request classes that receive
Immich's requests, the resource that answers the balancer's own C{/ping},
refuses what it must, classifies the rest and hands it to the
L{imml.forward.Forwarder}, and the writing of answers back to the client.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource

from .classify import classify
from .upstream import Answer

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


def json_error(request: server.Request, code: int, detail: str) -> bytes:
    """
    Set C{request} up for an error answer of the balancer's own, and return
    its body: C{{"detail": ...}} like Immich ML's own errors.
    """
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"detail": detail}).encode("utf-8")


class BalancerRequest(server.Request):
    """
    A request whose body is held in memory, up to the site's limit, and
    never parsed as a form: the balancer forwards it byte for byte.  It
    writes the answers of the balancer (L{reply_error}) and of its hosts
    (L{start_answer}, L{end_answer}).

    @ivar gone: the client's connection was lost.
    """

    # An answer carries the host's content type, or none: never one of ours.
    defaultContentType = None
    too_large = False
    gone = False
    _received = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Never parse a body as a form (Twisted would, with the email
        # package, on every multipart /predict).
        super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.channel.site.max_body:
            self.too_large = True
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
            self.content = BytesIO()
            return
        self.content.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        super().connectionLost(reason)

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
        peer = getattr(self.getClientAddress(), "host", None)
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
    requestFactory = BalancerRequest

    def __init__(self, resource: Resource, max_body: int, **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.max_body = max_body

    def set_max_body(self, max_body: int) -> None:
        self.max_body = max_body

    def log(self, request: server.Request) -> None:
        # One structured event per request is logged by the request log.
        pass


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
            return json_error(request, 400, "imml is a reverse proxy for Immich ML hosts, not a forward proxy")
        path = request.uri.split(b"?", 1)[0]
        if path == b"/ping" and request.method in (b"GET", b"HEAD"):
            if self.stopping:
                return json_error(request, 503, "the balancer is stopping")
            if self.fleet.any_up:
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"pong"
            return json_error(request, 503, "no ML host is up")
        if request.too_large:
            request.setHeader(b"connection", b"close")
            limit = request.channel.site.max_body
            return json_error(request, 413, f"request body is larger than the limit of {limit} bytes")
        body = request.content.getvalue()
        content_type = request.requestHeaders.getRawHeaders(b"content-type", [None])[0]
        info = classify(request.method, path, content_type, body)
        d: Deferred[None] = self.forwarder.forward(request, info, body)
        self._answering[request] = d
        d.addBoth(self._over, request)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET
