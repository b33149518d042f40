"""
Forwarding: one client request, sent to one host after another until one
answers it.

A L{_Job} is one client request.  It asks the dispatcher for a host, sends
the request there (an L{_Attempt}), and judges the outcome:

- an answer the client should have (2xx, 4xx, a 5xx after retries) is
  delivered, and every other attempt of the job is cancelled;
- a connection failure, reset or timeout marks the host down and the job
  asks for another host; so does a 502/503/504, or a first 500;
- when the host of a running attempt goes down (its health checks fail: it
  stalled, or fell asleep), the job starts another attempt elsewhere at once
  while the first one keeps running: the first answer wins.

Answers to retryable requests are held back until complete (up to a limit),
so a host that dies mid-answer is retried too; other answers stream through.
Every job ends in exactly one answer to the client, or none when the client
went away first.
"""

from __future__ import annotations

import json
from time import time
from typing import Optional

from attrs import define, field, frozen
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.client import Agent
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from .classify import RequestInfo
from .dispatch import Dispatcher, NoBackendAvailable
from .fleet import Backend, Fleet
from .health import describe_failure
from .records import ANSWERED, CANCELLED, FAILED, RETRIED, AttemptRecord, RequestRecord

MiB = 1024 * 1024

#: An attempt still unanswered after this many times its host's recent
#: service time for the task (and at least HEDGE_MIN seconds) is sent to
#: another host too: the host may have stalled before its health checks
#: can tell.  The first answer wins.
HEDGE_FACTOR = 8.0
HEDGE_MIN = 1.0
#: Seconds between two looks at the attempts in flight, for the response
#: timeout and the hedge above: one timer for all of them, rather than two
#: per request.
WATCH_EVERY = 0.1
#: However many connections are refused, a request is sent at most this many
#: times max-tries.
MAX_ATTEMPTS = 4

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


def json_error(request, code: int, detail: str) -> bytes:
    """
    Set C{request} up for an error answer of the balancer's own, and return
    its body: C{{"detail": ...}} like Immich ML's own errors.
    """
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"detail": detail}).encode("utf-8")


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
    C{limit}, then calls C{commit} and streams the rest to the client.
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


class _NoAnswerInTime(Exception):
    """
    A host did not answer completely within the response timeout.
    """


class _Committed(Exception):
    """
    A host failed after part of its answer reached the client.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _mid_answer(failure: Failure, answer: _Answer):
    if answer.committed:
        raise _Committed(failure.value)
    return failure


@define(eq=False)
class _Attempt:
    """
    One try of a job on one host.
    """

    job: "_Job"
    backend: Backend
    sent: float
    in_flight: int
    deferred: Optional[Deferred] = None
    #: When the host started serving it, or None while it waits inside the
    #: host for a slot (L{Backend.take}).
    starts: Optional[float] = None
    redispatched: bool = False
    #: No complete answer within the response timeout: cancelled for that.
    timed_out: bool = False
    #: The balancer gave up on it (another attempt answered, or the client
    #: went away): however it then fails, that is no fault of the host's.
    cancelled: bool = False

    @property
    def task(self) -> Optional[str]:
        return self.job.info.task

    def host_down(self) -> None:
        """
        The host went down while this attempt was on it.
        """
        self.job.redispatch(self)

    def time_out(self) -> None:
        """
        The host had the response timeout to answer, and did not.
        """
        if not self.timed_out:
            self.timed_out = True
            self.deferred.cancel()


@define(eq=False)
class _Job:
    """
    One client request, until it is answered.
    """

    forwarder: "Forwarder"
    request: server.Request
    info: RequestInfo
    body: bytes
    headers: Headers
    started: float
    tried: list = field(factory=list)
    reasons: list = field(factory=list)
    #: Hosts that answered this request with a failing status.
    failed_on: list = field(factory=list)
    pending: set = field(factory=set)
    acquiring: Optional[Deferred] = None
    last: Optional[tuple] = None
    had_500: bool = False
    finished: bool = False
    waited: float = 0.0
    tries: int = 0
    last_code: Optional[int] = None
    #: Fires when the request has been answered; cancelling it (the client
    #: went away) cancels whatever is under way.
    done: Deferred = field(init=False)

    @done.default
    def _done(self) -> Deferred:
        return Deferred(lambda d: self.cancel())

    # -- finding hosts ------------------------------------------------------

    def next(self) -> None:
        """
        Send the request to one more host, if it may be.
        """
        if self.finished or self.acquiring is not None:
            return
        max_tries = self.forwarder.settings.max_tries
        # A try the host never saw (its connection was refused) is given
        # back: such a request waits for a host instead of failing.
        if self.tries >= max_tries or len(self.tried) >= MAX_ATTEMPTS * max_tries:
            if not self.pending:
                self.give_up()
            return
        d = self.forwarder.dispatcher.acquire(self.info, self.tried, self.started)
        since = None
        if not d.called:
            self.acquiring = d
            since = self.forwarder.clock.seconds()
        d.addCallbacks(self._acquired, self._no_host, callbackArgs=(since,), errbackArgs=(since,))
        d.addErrback(self.bug)

    def _waited(self, since: Optional[float]) -> None:
        self.acquiring = None
        if since is not None:
            self.waited += self.forwarder.clock.seconds() - since

    def _acquired(self, backend: Backend, since: Optional[float]) -> None:
        self._waited(since)
        forwarder = self.forwarder
        self.tried.append(backend)
        self.tries += 1
        clock = forwarder.clock
        attempt = _Attempt(self, backend, clock.seconds(), backend.in_flight)
        backend.take(attempt)
        self.pending.add(attempt)
        forwarder.watch(attempt)
        attempt.deferred = forwarder.exchange(self, backend)
        attempt.deferred.addBoth(self._attempt_over, attempt).addErrback(self.bug)

    def _no_host(self, failure: Failure, since: Optional[float]) -> None:
        self._waited(since)
        if failure.check(CancelledError):
            return None
        failure.trap(NoBackendAvailable)
        if self.pending:
            return None  # a running attempt may still answer
        if self.last is not None:
            self.answer(*self.last)
            return None
        detail = str(failure.value)
        if self.reasons:
            detail += "; tried " + "; ".join(self.reasons)
        self.answer_error(503, detail)
        return None

    def overdue(self, attempt: _Attempt) -> None:
        """
        C{attempt} takes far longer than its host's recent service times (the
        host may have stalled, or fallen asleep, before its health checks
        tell): try another host too, and take whichever answers first.
        """
        self.redispatch(attempt, "is far slower than usual with it")

    def redispatch(self, attempt: _Attempt, why: str = "went down with it") -> None:
        """
        C{attempt}'s host went down with the request on it: try another host
        now, and take whichever answers first.
        """
        if self.finished or attempt.redispatched or not self.info.retryable:
            return
        attempt.redispatched = True
        self.forwarder.log.info(
            "re-dispatching {method} {path} away from {backend}, which {why}",
            method=self.info.method.decode("ascii", "replace"),
            path=self.info.path.decode("ascii", "replace"),
            backend=attempt.backend.name,
            why=why,
            imml_event="redispatch",
        )
        self.next()

    # -- judging attempts ---------------------------------------------------

    def _attempt_over(self, result, attempt: _Attempt) -> None:
        forwarder = self.forwarder
        backend = attempt.backend
        self.pending.discard(attempt)
        backend.release(attempt)
        forwarder.live.discard(attempt)
        seconds = forwarder.clock.seconds() - attempt.sent
        task = self.info.task
        if isinstance(result, Failure):
            # A cancelled attempt fails with whatever it was doing: waiting
            # for an answer (CancelledError), connecting
            # (ConnectingCancelledError), resolving the host's name
            # (DNSLookupError)...
            if attempt.cancelled or (result.check(CancelledError) and not attempt.timed_out):
                forwarder.release(backend, task, None, None, attempt, seconds, None, CANCELLED)
                return None
            if attempt.timed_out:
                error, reason = _NoAnswerInTime(forwarder.settings.response_timeout), "timed out"
            else:
                error = result.value.error if result.check(_Committed) else result.value
                reason = describe_failure(error)
            retry = not result.check(_Committed) and (
                self.info.retryable or isinstance(error, ierror.ConnectError)
            )
            if isinstance(error, ierror.ConnectError):
                self.tries -= 1
            forwarder.release(backend, task, None, reason, attempt, seconds, None, RETRIED if retry else FAILED)
            forwarder.fleet.request_failed(backend, reason)
            self.reasons.append(f"{backend}: {reason}")
            if result.check(_Committed):
                # Part of the answer has reached the client: cut its
                # connection, so the answer is seen as incomplete, never as
                # whole.
                self.finish(backend, self.last_code)
                self.request.channel.transport.abortConnection()
                return None
            if retry:
                self.next()
            elif not self.pending:
                self.give_up()
            return None
        answer: _Answer = result
        if forwarder.retry_status(self.info, answer, self.had_500) and not self.finished:
            reason = f"status {answer.code}"
            forwarder.release(backend, task, None, reason, attempt, seconds, answer.code, RETRIED)
            self.had_500 = self.had_500 or answer.code == 500
            self.last = (backend, answer)
            self.reasons.append(f"{backend}: {reason}")
            self.failed_on.append(backend)
            self.next()
            return None
        ok = 200 <= answer.code < 300
        outcome = ANSWERED if not self.finished else CANCELLED
        forwarder.release(backend, task, seconds if ok else None, None, attempt, seconds, answer.code, outcome)
        if ok and task is not None:
            for failed in self.failed_on:
                if failed is not backend:
                    forwarder.fleet.task_failed(failed, task)
            forwarder.fleet.task_succeeded(backend, task)
        self.answer(backend, answer)
        return None

    def bug(self, failure: Failure) -> None:
        """
        A fault of the balancer's own: log it, and still answer.
        """
        self.forwarder.log.failure("request {uri!r} failed inside the balancer", failure, uri=self.request.uri)
        self.answer_error(500, "internal error in the balancer")

    # -- answering ----------------------------------------------------------

    def _stop_others(self) -> None:
        if self.acquiring is not None:
            acquiring, self.acquiring = self.acquiring, None
            acquiring.cancel()
        for attempt in list(self.pending):
            attempt.cancelled = True
            attempt.deferred.cancel()

    def answer(self, backend: Backend, answer: _Answer) -> None:
        if self.finished:
            return
        self.forwarder.deliver(self.request, backend, answer)
        self.finish(backend, answer.code)

    def answer_error(self, code: int, detail: str) -> None:
        if self.finished:
            return
        request = self.request
        if not (request.finished or request._disconnected):
            request.write(json_error(request, code, detail))
            request.finish()
        self.finish(None, code, detail)

    def give_up(self) -> None:
        """
        Every try failed.  The last host's own answer, if it gave one; else
        503 naming what went wrong.
        """
        if self.last is not None:
            self.answer(*self.last)
        else:
            self.answer_error(
                503, f"no ML host answered after {len(self.tried)} tries: " + "; ".join(self.reasons)
            )

    def finish(self, backend: Optional[Backend], status, reason: Optional[str] = None) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop_others()
        forwarder = self.forwarder
        info = self.info
        record = RequestRecord(
            info.method.decode("ascii", "replace"),
            info.path.decode("ascii", "replace"),
            info.task,
            status,
            backend.name if backend is not None else None,
            tuple(b.name for b in self.tried),
            forwarder.clock.seconds() - self.started,
            self.waited,
            reason,
        )
        forwarder.report_request(record)
        self.done.callback(None)

    def cancel(self) -> None:
        """
        The client went away: cancel whatever is under way.
        """
        self.finish(None, "cancelled")


@define(eq=False)
class Forwarder:
    """
    Sends requests to hosts chosen by the dispatcher, with retries, and
    reports every attempt and request to its C{reporters}
    (L{imml.interfaces.IReporter}).
    """

    fleet: Fleet
    dispatcher: Dispatcher
    agent: Agent
    clock: object
    settings: ProxySettings = field(factory=ProxySettings)
    fresh_agent: Optional[Agent] = None
    reporters: list = field(factory=list)
    log: Logger = field(factory=Logger)
    #: The attempts in flight, looked at every L{WATCH_EVERY} seconds.
    live: set = field(factory=set)
    _watching: Optional[object] = None

    def forward(self, request: server.Request, info: RequestInfo, body: bytes) -> Deferred:
        """
        Answer C{request} from a host.  The returned Deferred fires when the
        request has been answered; cancelling it (the client went away)
        cancels whatever is under way.
        """
        job = _Job(self, request, info, body, self._headers(request), self.clock.seconds())
        job.next()
        return job.done

    def _headers(self, request: server.Request) -> Headers:
        headers = Headers()
        connection = request.requestHeaders.getRawHeaders(b"connection", [])
        named = {t.strip().lower() for v in connection for t in v.split(b",")}
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower in _NOT_FORWARDED or lower in named:
                continue
            headers.setRawHeaders(name, values)
        peer = getattr(request.getClientAddress(), "host", None)
        if peer:
            prior = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
            value = peer.encode("ascii")
            if prior:
                value = b", ".join(prior) + b", " + value
            headers.setRawHeaders(b"x-forwarded-for", [value])
        return headers

    # -- watching the attempts in flight ------------------------------------

    def watch(self, attempt: _Attempt) -> None:
        """
        Hold C{attempt} to the response timeout, and hedge it when it is far
        slower than its host's usual.
        """
        self.live.add(attempt)
        if self._watching is None:
            self._watching = self.clock.callLater(WATCH_EVERY, self._look)

    def _look(self) -> None:
        self._watching = None
        now = self.clock.seconds()
        timeout = self.settings.response_timeout
        for attempt in list(self.live):
            elapsed = now - attempt.sent
            if elapsed >= timeout:
                self.live.discard(attempt)
                attempt.time_out()
            elif elapsed >= HEDGE_MIN and not attempt.redispatched:
                job = attempt.job
                expected = attempt.backend.service_time(job.info.task) if job.info.retryable else None
                if expected is not None and elapsed >= HEDGE_FACTOR * expected:
                    job.overdue(attempt)
        if self.live:
            self._watching = self.clock.callLater(WATCH_EVERY, self._look)

    # -- reporting ----------------------------------------------------------

    def release(self, backend, task, service_time, error, attempt, seconds, status, outcome) -> None:
        self.fleet.finished(backend, task, service_time, error, attempt.in_flight)
        if self.reporters:
            record = AttemptRecord(backend.name, task, status, error, seconds, outcome)
            for reporter in self.reporters:
                reporter.attempt_finished(record)

    def report_request(self, record: RequestRecord) -> None:
        # The line is rendered here, once, with an f-string: Twisted's
        # template formatting costs several times more on this hot path.
        summary = (
            f"{record.method} {record.path} ({record.task}) -> {record.status} "
            f"via {record.backend} in {record.duration:.3f} s, {len(record.tried)} tries"
        )
        log = self.log
        # The event Logger.info would make, made here: Logger.emit first
        # checks the level against a freshly sorted list of every level,
        # which on this hot path costs as much as the rest of the event.
        log.observer(
            {
                "log_logger": log,
                "log_level": LogLevel.info,
                "log_namespace": log.namespace,
                "log_source": log.source,
                "log_format": summary.replace("{", "{{").replace("}", "}}"),
                "log_time": time(),
                "method": record.method,
                "path": record.path,
                "task": record.task,
                "status": record.status,
                "backend": record.backend,
                "tried": list(record.tried),
                "tries": len(record.tried),
                "duration": record.duration,
                "waited": record.waited,
                "reason": record.reason,
                "imml_event": "request",
            }
        )
        for reporter in self.reporters:
            reporter.request_finished(record)

    # -- one exchange with one host -----------------------------------------

    @staticmethod
    def retry_status(info: RequestInfo, answer: _Answer, had_500: bool) -> bool:
        """
        Whether another host should be asked instead: the host is failing
        (502, 503, 504), or it answered 500 and no host has yet (a 500 is
        often about the request, so it is retried only once).
        """
        if not info.retryable or answer.committed:
            return False
        return answer.code in (502, 503, 504) or (answer.code == 500 and not had_500)

    def exchange(self, job: _Job, backend: Backend) -> Deferred:
        """
        Send C{job}'s request to C{backend}; fire with its L{_Answer}, within
        the response timeout.  (Plain callbacks, not a coroutine: this runs
        for every request.)
        """
        d = self._send(self.agent, job, backend)
        d.addCallbacks(self._receive, self._resend, callbackArgs=(job, backend), errbackArgs=(job, backend))
        return d

    def _send(self, agent: Agent, job: _Job, backend: Backend) -> Deferred:
        request = job.request
        producer = None
        if job.body or request.method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"):
            producer = _BytesProducer(job.body)
        return agent.request(request.method, backend.address.url(request.uri), job.headers, producer)

    def _resend(self, failure: Failure, job: _Job, backend: Backend):
        error = failure.value
        if not isinstance(error, (ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent)):
            return failure
        if any(f.check(CancelledError) for f in getattr(error, "reasons", ())):
            # We gave up on it (timeout, or the client went away).
            raise CancelledError()
        # Perhaps a pooled connection the host had closed: once more on a new
        # connection before holding it against the host.
        if self.fresh_agent is None or not (job.info.retryable or isinstance(error, RequestNotSent)):
            return failure
        d = self._send(self.fresh_agent, job, backend)
        d.addCallback(self._receive, job, backend)
        return d

    def _receive(self, response, job: _Job, backend: Backend) -> Deferred:
        answer = _Answer(response.code, response.phrase, response.headers, response.length)
        request = job.request

        def commit(answer: _Answer):
            # Past this point the answer is the client's: the job is over.
            answer.committed = True
            job.last_code = answer.code
            job._stop_others()
            self._start(request, backend, answer)
            for chunk in answer.chunks:
                request.write(chunk)
            answer.chunks.clear()
            return request

        collector = _Collector(answer, self.settings.hold_limit, commit)
        if not job.info.retryable:
            collector.sink = commit(answer)
        response.deliverBody(collector)
        return collector.done.addErrback(_mid_answer, answer)

    def _start(self, request: server.Request, backend: Backend, answer: _Answer) -> None:
        request.setResponseCode(answer.code, answer.phrase)
        for name, values in answer.headers.getAllRawHeaders():
            if name.lower() not in _NOT_RETURNED:
                request.responseHeaders.setRawHeaders(name, values)
        request.responseHeaders.setRawHeaders(b"x-imml-backend", [backend.header])
        length = answer.length if answer.committed else answer.size
        if length is not UNKNOWN_LENGTH:
            request.setHeader(b"content-length", b"%d" % length)

    def deliver(self, request: server.Request, backend: Backend, answer: _Answer) -> None:
        """
        Give C{answer} to the client (the rest of it, if it was streaming).
        """
        if request.finished or request._disconnected:
            return
        if not answer.committed:
            self._start(request, backend, answer)
            if answer.chunks:
                request.write(b"".join(answer.chunks) if len(answer.chunks) > 1 else answer.chunks[0])
        request.finish()
