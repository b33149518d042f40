"""
The web face of a L{imml.testing.FakeMLHost}: what it says over HTTP.

L{FakeMLResource} answers C{/}, C{/ping} and C{/predict} like Immich's ML
service (C{docs/immich-ml.md}): it reads and checks each C{/predict} (with
L{imml.testing.multipart} and L{imml.testing.answers}), reports it to the
host as a L{Received}, applies the host's failure mode, and hands valid
requests to the host, which owns the slots, the timing and every counter.  L{FakeMLSite} serves it, on a real port
(L{FakeMLHost.listen}) or over in-memory connections
(L{imml.testing.MemoryAgent}), and tells the host of each connection.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .answers import BadRequest, answer_for, read_entries
from .multipart import MultipartError, parse_predict

if TYPE_CHECKING:
    from .fakehost import FakeMLHost

__all__ = ["FakeMLResource", "FakeMLSite", "Received"]

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"

_NOT_FOUND = b'{"detail":"Not Found"}'
_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_ROOT = b'{"message":"Immich ML"}'
_READS = (b"GET", b"HEAD")
_NO_FIELDS: dict[str, Any] = {"entries": None, "image": None, "text": None}


@frozen
class Received:
    """
    One C{POST /predict} a L{FakeMLHost} received.

    @ivar task: The task key (see L{imml.testing.TASKS}; several joined by
        C{+}), or L{None} when C{entries} was missing or unreadable.
    @ivar entries: The C{entries} field as sent, or L{None}.
    @ivar sha256: Hex SHA-256 of the raw body.
    @ivar length: Length of the raw body in bytes.
    @ivar headers: Request headers, lowercase name to list of values.
    @ivar time: C{reactor.seconds()} when the request arrived.
    """

    task: str | None
    entries: str | None
    sha256: str
    length: int
    headers: dict[str, list[str]]
    time: float


def plain(request: Request, status: int, body: bytes) -> bytes:
    """Set C{request} up for a plain-text answer; return its body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", TEXT)
    return body


def _json(request: Request, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return json.dumps(value, separators=(",", ":")).encode()


def abort(request: Request) -> None:
    """Drop the request's connection without a word (TCP RST when possible)."""
    transport = request.channel.transport
    abort = getattr(transport, "abortConnection", None) or transport.loseConnection
    abort()


def hang_up(request: Request) -> None:
    """
    Close the request's connection once what was written is sent, as the
    system does for a process that dies (an abort would drop it unsent).
    """
    request.channel.transport.loseConnection()


class FakeMLResource(Resource):
    """The web face of a L{FakeMLHost}: one leaf answering every path."""

    isLeaf = True

    def __init__(self, host: FakeMLHost) -> None:
        super().__init__()
        self.host = host

    def render(self, request: Request) -> object:  # type: ignore[override]
        host = self.host
        if getattr(request, "dropped", False):
            return NOT_DONE_YET  # the connection is gone
        request.setHeader(b"x-fake-host", host.name.encode("utf-8"))
        for name, value in host.required_headers.items():
            if request.getHeader(name) != value:
                return plain(request, 401, b"Unauthorized")
        path, method = request.path, request.method
        if path == b"/predict":
            if method == b"POST":
                return self._predict(request)
            allowed = b"POST"
        elif host.mode == "hang":
            if path == b"/ping":
                host._pinged()
            return host._park(request)
        elif path == b"/ping" and method in _READS:
            host._pinged()
            if host.mode == "ping-fail":
                return plain(request, 503, b"Service Unavailable")
            return plain(request, 200, b"pong")
        elif path == b"/" and method in _READS:
            request.setHeader(b"content-type", JSON)
            return _ROOT
        elif path in (b"/", b"/ping"):
            allowed = b"GET"
        else:
            request.setResponseCode(404)
            request.setHeader(b"content-type", JSON)
            return _NOT_FOUND
        request.setResponseCode(405)
        request.setHeader(b"allow", allowed)
        request.setHeader(b"content-type", JSON)
        return _NOT_ALLOWED

    def _predict(self, request: Request) -> object:
        host = self.host
        content = request.content
        content.seek(0)
        body = content.read()
        content_type = request.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
        entries = task = models = failure = None
        fields: dict[str, Any] | None = None
        try:
            fields = parse_predict(content_type, body)
        except MultipartError:
            if content_type.lower().startswith(b"multipart/"):
                failure = BadRequest(400, "There was an error parsing the body")
            else:
                # Starlette reads no form fields from another type of body.
                fields = _NO_FIELDS
        if fields is not None:
            entries = fields["entries"]
            try:
                task, models = read_entries(entries)
            except BadRequest as e:
                failure = e
        host._arrived(
            Received(
                task=task,
                entries=entries,
                sha256=hashlib.sha256(body).hexdigest(),
                length=len(body),
                headers={
                    name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
                time=host.reactor.seconds(),
            )
        )

        mode = host.mode
        if mode == "hang":
            return host._park(request)
        if mode == "reset":
            abort(request)
            return NOT_DONE_YET
        if mode == "error500":
            return plain(request, 500, b"Internal Server Error")
        if mode == "error503":
            return plain(request, 503, b"Service Unavailable")
        try:
            if failure is not None:
                raise failure
            assert fields is not None and task is not None and models is not None
            answer = answer_for(
                task, models, fields["image"], fields["text"], host.models, host.failing_tasks, host.vectors
            )
        except BadRequest as e:
            if e.plain:
                return plain(request, e.status, e.detail.encode())
            return _json(request, e.status, {"detail": e.detail})
        host._submit(request, task, models, answer, die=mode == "die-mid-answer")
        return NOT_DONE_YET


class _Request(Request):
    """
    A request that a host in mode C{drop-upload} drops halfway through its
    body.
    """

    dropped = False
    _cut_at: int | None = None
    _arrived = 0

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        if length and self.channel.site.host.mode == "drop-upload":
            self._cut_at = max(1, length // 2)

    def handleContentChunk(self, data: bytes) -> None:
        if self.dropped:
            return
        super().handleContentChunk(data)
        if self._cut_at is None:
            return
        self._arrived += len(data)
        if self._arrived >= self._cut_at:
            self.dropped = True
            self.channel.site.host._dropped()
            abort(self)


class _Channel(HTTPChannel):
    """An HTTP channel its L{FakeMLHost} can find and abort."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.host._connected(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.factory.host._disconnected(self)


class FakeMLSite(Site):
    """
    A quiet L{Site} for one L{FakeMLHost}: no access log, no form parsing,
    idle connections closed after the host's C{keepalive_timeout} (on the
    host's reactor), each connection reported to the host.
    """

    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _Request
    noisy = False
    displayTracebacks = False

    def __init__(self, host: FakeMLHost) -> None:
        kwargs: dict[str, Any] = {"reactor": host.reactor, "timeout": host.keepalive_timeout}
        try:
            super().__init__(host.resource(), parsePOSTFormSubmission=False, **kwargs)
        except TypeError:  # Twisted without that option
            super().__init__(host.resource(), **kwargs)
        self.host = host

    def log(self, request: Request) -> None:
        """No access log: the hot path stays lean."""

    def startFactory(self) -> None:
        """Nothing to start: no access log, so no log-date timer."""

    def stopFactory(self) -> None:
        """Nothing to stop."""
