"""
The proxy: receives Immich's requests, has the dispatcher bind each to a host,
forwards it, and retries it elsewhere when the host fails.

Flow of one request: L{BalancerRequest} buffers the body (refusing one over
the limit without contacting any host); L{BalancerResource} answers the
balancer's own C{/ping}, refuses forward-proxy requests, classifies the rest
(L{imml.classify}) and hands them to L{Forwarder}.  The forwarder loops:
acquire a host from the L{imml.dispatch.Dispatcher} (which may wait), send
the request with one shared L{Agent}, and judge the outcome.  A connection
failure marks the host down and tries another host; a 502/503/504 (or a first
500) tries another host; anything else is the answer.  Answers to retryable
requests are held until complete (up to a limit), so a host that dies
mid-answer is retried too; other answers stream through.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Optional

from attrs import define, field, frozen
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import server
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from .classify import RequestInfo, classify
from .dispatch import Dispatcher, NoBackendAvailable
from .fleet import Backend, Fleet
from .health import describe_failure
from .records import ANSWERED, CANCELLED, FAILED, RETRIED, AttemptRecord, RequestRecord

log = Logger()

MiB = 1024 * 1024

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


@frozen
class ProxySettings:
    """
    @ivar max_tries: most hosts one request is sent to.
    @ivar response_timeout: seconds a host has to answer a request
        completely (a cold model load takes tens of seconds).
    @ivar max_body: largest request body accepted, in bytes.
    @ivar hold_limit: an answer to a retryable request is held back until
        complete, so that a host dying mid-answer can be retried, unless it
        grows past this many bytes.
    """

    max_tries: int = 3
    response_timeout: float = 300.0
    connect_timeout: float = 5.0
    max_body: int = 100 * MiB
    hold_limit: int = 8 * MiB


class _QuietClientFactory(_HTTP11ClientFactory):
    # One log line per connection would drown the one line per request.
    noisy = False


def make_pool(reactor, persistent: bool = True) -> HTTPConnectionPool:
    """
    A connection pool to the ML hosts.  Idle connections are dropped after
    1 s, before Immich ML's own 2 s keep-alive timeout closes them under us.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = 16
    pool.cachedConnectionTimeout = 1.0
    pool.retryAutomatically = False
    return pool


class BalancerRequest(server.Request):
    """
    A request whose body is held in memory, up to the site's limit, and
    never parsed as a form: the balancer forwards it byte for byte.
    """

    _parsePOSTFormSubmission = False
    # An answer carries the host's content type, or none: never one of ours.
    defaultContentType = None
    too_large = False
    _received = 0

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


class BalancerSite(server.Site):
    requestFactory = BalancerRequest

    def __init__(self, resource, max_body: int, **kw) -> None:
        super().__init__(resource, **kw)
        self.max_body = max_body

    def log(self, request) -> None:
        # One structured event per request is logged by the forwarder.
        pass


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def json_error(request, code: int, detail: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"detail": detail}).encode("utf-8")


@define(eq=False)
class _Answer:
    """
    A host's answer: held back whole, or (once L{committed}) being streamed
    to the client.
    """

    code: int
    phrase: bytes
    headers: Headers
    length: object
    chunks: list = field(factory=list)
    size: int = 0
    committed: bool = False


class _Collector(Protocol):
    """
    Receives an answer's body: holds it until it is complete or grows past
    C{limit}, then calls C{commit} and streams the rest to C{sink}.
    """

    def __init__(self, answer: _Answer, limit: int, commit) -> None:
        self.answer = answer
        self.limit = limit
        self.commit = commit
        self.sink = None
        self.done = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        answer = self.answer
        if answer.committed:
            self.sink.write(data)
            return
        answer.chunks.append(data)
        answer.size += len(data)
        if answer.size > self.limit:
            self.sink = self.commit(answer)

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.answer)
        else:
            self.done.errback(reason)


@define(eq=False)
class Forwarder:
    """
    Sends requests to hosts chosen by the dispatcher, with retries.
    """

    fleet: Fleet
    dispatcher: Dispatcher
    agent: Agent
    clock: object
    settings: ProxySettings = field(factory=ProxySettings)
    fresh_agent: Optional[Agent] = None
    log: Logger = field(factory=Logger)
    #: L{imml.interfaces.IReporter}s told of every attempt and request.
    reporters: list = field(factory=list)

    def forward(self, request: server.Request, info: RequestInfo, body: bytes) -> Deferred:
        """
        Answer C{request} from a host.  The returned Deferred fires when the
        request has been answered; cancelling it (the client went away)
        cancels the upstream request.
        """
        return ensureDeferred(self._serve(request, info, body))

    def _headers(self, request: server.Request) -> Headers:
        headers = Headers()
        connection = request.requestHeaders.getRawHeaders(b"connection", [])
        named = {t.strip().lower() for v in connection for t in v.split(b",")}
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower in _NOT_FORWARDED or lower in named:
                continue
            headers.setRawHeaders(name, values)
        client = request.getClientAddress()
        peer = getattr(client, "host", None)
        if peer:
            prior = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
            value = peer.encode("ascii")
            if prior:
                value = b", ".join(prior) + b", " + value
            headers.setRawHeaders(b"x-forwarded-for", [value])
        return headers

    async def _serve(self, request: server.Request, info: RequestInfo, body: bytes) -> None:
        started = self.clock.seconds()
        headers = self._headers(request)
        tried: list[Backend] = []
        reasons: list[str] = []
        last: Optional[tuple[Backend, _Answer]] = None
        had_500 = False
        status = None
        via = None
        try:
            while len(tried) < self.settings.max_tries:
                try:
                    backend = await self.dispatcher.acquire(info, tried)
                except NoBackendAvailable as e:
                    if last is not None:
                        break
                    detail = str(e)
                    if reasons:
                        detail += "; tried " + "; ".join(reasons)
                    status = 503
                    self._finish(request, 503, detail=detail)
                    return
                tried.append(backend)
                sent = self.clock.seconds()
                try:
                    answer = await self._attempt(request, info, backend, headers, body)
                except (CancelledError, ierror.TimeoutError) as e:
                    if isinstance(e, CancelledError):
                        self.dispatcher.release(backend, info.task, None, None)
                        self._attempt_over(backend, info, sent, None, "cancelled", CANCELLED)
                        raise
                    reason = "timed out"
                    reasons.append(f"{backend}: {reason}")
                    self.fleet.request_failed(backend, f"request {reason}")
                    self.dispatcher.release(backend, info.task, None, reason)
                    self._attempt_over(backend, info, sent, None, reason, self._then(info, tried))
                    if not info.retryable:
                        break
                    continue
                except _Committed as e:
                    # Part of the answer has reached the client: it cannot
                    # be retried.  Cut the client's connection so the
                    # answer is seen as incomplete, never as whole.
                    reason = describe_failure(e.error)
                    self.fleet.request_failed(backend, reason)
                    self.dispatcher.release(backend, info.task, None, reason)
                    self._attempt_over(backend, info, sent, e.code, reason, FAILED)
                    status, via = e.code, backend
                    request.channel.transport.abortConnection()
                    return
                except Exception as e:
                    reason = describe_failure(e)
                    reasons.append(f"{backend}: {reason}")
                    self.fleet.request_failed(backend, reason)
                    self.dispatcher.release(backend, info.task, None, reason)
                    retry = info.retryable or isinstance(e, ierror.ConnectError)
                    self._attempt_over(backend, info, sent, None, reason, self._then(info, tried) if retry else FAILED)
                    if not (info.retryable or isinstance(e, ierror.ConnectError)):
                        break
                    continue
                if self._retry_status(info, answer, had_500):
                    last = (backend, answer)
                    had_500 = had_500 or answer.code == 500
                    reasons.append(f"{backend}: status {answer.code}")
                    self.dispatcher.release(backend, info.task, None, f"status {answer.code}")
                    self._attempt_over(backend, info, sent, answer.code, f"status {answer.code}", self._then(info, tried))
                    continue
                else:
                    self.dispatcher.release(backend, info.task, self.clock.seconds() - sent)
                    self._attempt_over(backend, info, sent, answer.code, None, ANSWERED)
                    status, via = answer.code, backend
                    self._deliver(request, backend, answer)
                    return
            if last is not None:
                # Every try failed with a status: the last host's own answer.
                status, via = last[1].code, last[0]
                self._deliver(request, *last)
            else:
                status = 503
                self._finish(
                    request,
                    503,
                    detail=f"no ML host answered after {len(tried)} tries: " + "; ".join(reasons),
                )
        except CancelledError:
            status = "cancelled"
            raise
        finally:
            self.log.info(
                "{method} {path} -> {status} via {backend} in {duration:.3f} s, {tries} tries",
                method=info.method.decode("ascii", "replace"),
                path=info.path.decode("ascii", "replace"),
                task=info.task,
                status=status,
                backend=str(tried[-1]) if tried else None,
                tried=[str(b) for b in tried],
                tries=len(tried),
                duration=self.clock.seconds() - started,
                imml_event="request",
            )
            self._report(
                "request_finished",
                RequestRecord(
                    info.method.decode("ascii", "replace"), info.path.decode("ascii", "replace"), info.task,
                    status if status is not None else "cancelled", str(via) if via else None,
                    tuple(str(b) for b in tried), self.clock.seconds() - started,
                ),
            )

    def _then(self, info: RequestInfo, tried: list) -> str:
        return RETRIED if info.retryable and len(tried) < self.settings.max_tries else FAILED

    def _attempt_over(self, backend, info, sent, status, error, outcome) -> None:
        self._report(
            "attempt_finished",
            AttemptRecord(str(backend), info.task, status, error, self.clock.seconds() - sent, outcome),
        )

    def _report(self, method: str, record) -> None:
        for reporter in self.reporters:
            try:
                getattr(reporter, method)(record)
            except Exception:
                self.log.failure("reporter {reporter} failed", reporter=repr(reporter))

    @staticmethod
    def _retry_status(info: RequestInfo, answer: _Answer, had_500: bool) -> bool:
        """
        Whether another host should be asked instead: the host is failing
        (502, 503, 504), or it answered 500 and no host has yet (a 500 is
        often about the request, so it is retried only once).
        """
        if not info.retryable or answer.committed:
            return False
        return answer.code in (502, 503, 504) or (answer.code == 500 and not had_500)

    async def _attempt(self, request, info: RequestInfo, backend: Backend, headers: Headers, body: bytes) -> _Answer:
        d = ensureDeferred(self._exchange(request, info, backend, headers, body))
        d.addTimeout(self.settings.response_timeout, self.clock)
        return await d

    async def _send(self, agent: Agent, request, backend: Backend, headers: Headers, body: bytes):
        producer = None
        if body or request.method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"):
            producer = _BytesProducer(body)
        return await agent.request(request.method, backend.address.url(request.uri), headers.copy(), producer)

    async def _exchange(self, request, info: RequestInfo, backend: Backend, headers: Headers, body: bytes) -> _Answer:
        try:
            response = await self._send(self.agent, request, backend, headers, body)
        except (ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent) as e:
            if any(f.check(CancelledError) for f in getattr(e, "reasons", ())):
                # We gave up on it (timeout, or the client went away).
                raise CancelledError() from None
            # Perhaps a pooled connection the host had closed: once more on
            # a new connection before holding it against the host.
            if self.fresh_agent is None or not (info.retryable or isinstance(e, RequestNotSent)):
                raise
            response = await self._send(self.fresh_agent, request, backend, headers, body)
        answer = _Answer(response.code, response.phrase, response.headers, response.length)

        def commit(answer: _Answer):
            answer.committed = True
            self._start(request, backend, answer)
            for chunk in answer.chunks:
                request.write(chunk)
            answer.chunks.clear()
            return request

        collector = _Collector(answer, self.settings.hold_limit, commit)
        if not info.retryable:
            collector.sink = commit(answer)
        response.deliverBody(collector)
        try:
            await collector.done
        except Exception as e:
            if answer.committed:
                raise _Committed(e, answer.code)
            raise
        return answer

    def _start(self, request: server.Request, backend: Backend, answer: _Answer) -> None:
        request.setResponseCode(answer.code, answer.phrase)
        for name, values in answer.headers.getAllRawHeaders():
            if name.lower() not in _NOT_RETURNED:
                request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.setRawHeaders(b"x-imml-backend", [str(backend).encode("ascii")])
        if not answer.committed or answer.length is not UNKNOWN_LENGTH:
            length = answer.size if not answer.committed else answer.length
            if isinstance(length, int):
                request.setHeader(b"content-length", b"%d" % length)

    def _deliver(self, request: server.Request, backend: Backend, answer: _Answer) -> None:
        if request.finished or request._disconnected:
            return
        if not answer.committed:
            self._start(request, backend, answer)
            if answer.chunks:
                request.write(b"".join(answer.chunks) if len(answer.chunks) > 1 else answer.chunks[0])
        request.finish()

    def _finish(self, request: server.Request, code: int, detail: str) -> None:
        if request.finished or request._disconnected:
            return
        request.write(json_error(request, code, detail))
        request.finish()


class _Committed(Exception):
    def __init__(self, error: BaseException, code: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.code = code


class BalancerResource(Resource):
    """
    The balancer's HTTP face: its own C{/ping}, and everything else
    forwarded.
    """

    isLeaf = True

    def __init__(self, fleet: Fleet, forwarder: Forwarder) -> None:
        super().__init__()
        self.fleet = fleet
        self.forwarder = forwarder

    def render(self, request: BalancerRequest):
        if not request.uri.startswith(b"/") or request.method == b"CONNECT":
            return json_error(request, 400, "imml is a reverse proxy for Immich ML hosts, not a forward proxy")
        path = request.uri.split(b"?", 1)[0]
        if path == b"/ping" and request.method in (b"GET", b"HEAD"):
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
        d = self.forwarder.forward(request, info, body)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _failed(self, failure, request) -> None:
        if failure.check(CancelledError):
            return None
        log.failure("request {uri} failed inside the balancer", failure, uri=request.uri)
        if not request.finished and not request._disconnected:
            request.write(json_error(request, 500, "internal error in the balancer"))
            request.finish()
