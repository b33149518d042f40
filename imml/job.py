"""
A job: one client request, sent to one host after another until one answers
it.

A L{Job} asks the dispatcher for a host, sends the request there (an
L{Attempt}, one exchange of L{imml.upstream}) and judges the outcome:

- an answer the client should have (2xx, 4xx, a 5xx after retries) is
  delivered, and every other attempt of the job is cancelled;
- a connection failure, reset or timeout marks the host down and the job
  asks for another host; so does a 502/503/504, or a first 500;
- when the host of a running attempt goes down (its health checks fail: it
  stalled, or fell asleep), or the attempt takes far longer than its host's
  usual, the job starts another attempt elsewhere while the first one keeps
  running (it is I{hedged}): the first answer wins.

A job's life is one explicit state (L{JobState}): it is C{TRYING} (attempts
under way, or a host being sought) until a host's answer starts reaching the
client (C{STREAMING}, no more tries) or the job is C{DONE}: answered, or the
client went away.  Every job ends in exactly one answer to the client, or
none when the client went away first.
"""

from __future__ import annotations

from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any, Optional, Protocol

from attrs import define, field
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .attempt import Attempt, AttemptState, NoAnswerInTime, retry_status
from .body import RequestBody
from .classify import RequestInfo
from .dispatch import Dispatcher, NoBackendAvailable
from .fleet import Backend, Fleet, Load
from .health import describe_failure
from .records import ANSWERED, CANCELLED, FAILED, RETRIED, RequestRecord
from .upstream import Answer, Committed, Discard, Sink, Upstream, with_extra

if TYPE_CHECKING:
    from .site import BalancerRequest


class Runner(Protocol):
    """
    What a job runs on (the L{imml.forward.Forwarder}).
    """

    settings: Any  # max_tries, response_timeout
    clock: Any
    dispatcher: Dispatcher
    upstream: Upstream
    fleet: Fleet
    log: Logger

    def watch(self, attempt: Attempt) -> None:
        """Hold C{attempt} to the response timeout; hedge it when overdue."""

    def over(
        self,
        attempt: Attempt,
        seconds: float,
        status: Optional[int] = None,
        error: Optional[str] = None,
        service_time: Optional[float] = None,
        *,
        outcome: str,
    ) -> None:
        """C{attempt} is over (see L{imml.forward.Forwarder.over})."""

    def report(self, record: RequestRecord) -> None:
        """A client request is over."""


#: However many connections are refused, a request is sent at most this many
#: times max-tries.
MAX_ATTEMPTS = 4


class JobState(Enum):
    #: Looking for an answer: attempts under way, or a host being sought.
    TRYING = "trying"
    #: A host's answer is being streamed to the client: no more tries.
    STREAMING = "streaming"
    #: Answered, or the client went away.
    DONE = "done"


#: The moves a job may make, and the only ones (L{Job._enter}).
_MOVES = {
    JobState.TRYING: frozenset({JobState.STREAMING, JobState.DONE}),
    JobState.STREAMING: frozenset({JobState.DONE}),
    JobState.DONE: frozenset(),
}


@define(eq=False)
class Job:
    """
    One client request, until it is answered.

    @ivar tried: every host the request was sent to, in order.
    @ivar reasons: why each failed try failed, for the client's 503.
    @ivar failed_on: hosts that answered with a failing status.
    @ivar last: the last failing answer, given to the client if every try
        fails.
    """

    runner: Runner
    request: BalancerRequest
    info: RequestInfo
    #: The request body, read from its first byte by each try.
    body: RequestBody
    #: The headers sent to every host.
    headers: Headers
    started: float
    state: JobState = JobState.TRYING
    tried: list[Backend] = field(factory=list)
    reasons: list[str] = field(factory=list)
    failed_on: list[Backend] = field(factory=list)
    pending: set[Attempt] = field(factory=set)
    #: The dispatcher's Deferred while a host is sought.
    seeking: Optional[Deferred[Load]] = None
    last: Optional[tuple[Backend, Answer]] = None
    had_500: bool = False
    waited: float = 0.0
    #: Tries that count against max-tries (a refused connection does not).
    tries: int = 0
    #: Fires when the request has been answered; cancelling it (the client
    #: went away) cancels whatever is under way.
    done: Deferred[None] = field(init=False)

    @done.default
    def _done(self) -> Deferred[None]:
        return Deferred(lambda d: self.cancel())

    # -- finding hosts ------------------------------------------------------

    def next(self) -> None:
        """
        Send the request to one more host, if it may be.
        """
        if self.state is not JobState.TRYING or self.seeking is not None:
            return
        max_tries = self.runner.settings.max_tries
        # A try the host never saw (its connection was refused) is given
        # back: such a request waits for a host instead of failing.
        if self.tries >= max_tries or len(self.tried) >= MAX_ATTEMPTS * max_tries:
            if not self.pending:
                self.give_up()
            return
        d = self.runner.dispatcher.acquire(self.info, self.tried, self.started, owner=self)
        since = None
        if not d.called:
            self.seeking = d
            since = self.runner.clock.seconds()
        d.addCallbacks(self._acquired, self._no_host, callbackArgs=(since,), errbackArgs=(since,))
        d.addErrback(self.bug)

    def _waited(self, since: Optional[float]) -> None:
        self.seeking = None
        if since is not None:
            self.waited += self.runner.clock.seconds() - since

    def _acquired(self, load: Load, since: Optional[float]) -> None:
        self._waited(since)
        attempt = Attempt(self, load)
        self.tried.append(load.backend)
        self.tries += 1
        request, backend = self.request, load.backend
        headers = self.headers
        if backend.settings.headers:
            headers = with_extra(headers, backend.settings.headers)
        try:
            attempt.deferred = self.runner.upstream.exchange(
                request.method,
                backend.address.url(request.uri),
                headers,
                self.body,
                partial(self._commit, attempt),
                hold=self.info.retryable,
            )
        except Exception:
            # A fault of the balancer's own, not of the host: the request
            # leaves the host, and the caller's errback answers the client.
            attempt.over()
            self.runner.over(attempt, 0.0, outcome=FAILED)
            raise
        self.pending.add(attempt)
        self.runner.watch(attempt)
        attempt.deferred.addBoth(self._attempt_over, attempt).addErrback(self.bug)

    def _no_host(self, failure: Failure, since: Optional[float]) -> None:
        self._waited(since)
        if failure.check(CancelledError):
            return
        failure.trap(NoBackendAvailable)
        if self.pending:
            return  # a running attempt may still answer
        if self.last is not None:
            self.answer(*self.last)
            return
        detail = str(failure.value)
        if self.reasons:
            detail += "; tried " + "; ".join(self.reasons)
        self.answer_error(503, detail)

    def host_down(self, load: Load) -> None:
        """
        The host of one of this job's attempts went down with the request
        on it.
        """
        for attempt in list(self.pending):
            if attempt.load is load:
                self.hedge(attempt, "went down with it")

    def hedge(self, attempt: Attempt, why: str) -> None:
        """
        C{attempt}'s host went down with the request on it, or is far
        slower than usual with it: try another host now too, and take
        whichever answers first.
        """
        if self.state is not JobState.TRYING or not self.info.retryable or not attempt.hedge():
            return
        self.runner.log.info(
            "re-dispatching {method} {path} away from {backend}, which {why}",
            method=self.info.method.decode("ascii", "replace"),
            path=self.info.path.decode("ascii", "replace"),
            backend=attempt.backend.name,
            why=why,
            imml_event="redispatch",
        )
        self.next()

    # -- judging attempts ---------------------------------------------------

    def _attempt_over(self, result: Any, attempt: Attempt) -> None:
        state = attempt.over()
        self.pending.discard(attempt)
        backend = attempt.backend
        seconds = self.runner.clock.seconds() - attempt.sent
        if isinstance(result, Failure):
            # A cancelled attempt fails with whatever it was doing: waiting
            # for an answer (CancelledError), connecting
            # (ConnectingCancelledError), resolving the host's name
            # (DNSLookupError)...
            if state is AttemptState.CANCELLED or (
                result.check(CancelledError) and state is not AttemptState.TIMED_OUT
            ):
                self.runner.over(attempt, seconds, outcome=CANCELLED)
                return
            self._failed(result, attempt, state, seconds)
            return
        answer: Answer = result
        if self.state is JobState.TRYING and retry_status(self.info, answer, self.had_500):
            reason = f"status {answer.code}"
            self.runner.over(attempt, seconds, answer.code, reason, outcome=RETRIED)
            self.had_500 = self.had_500 or answer.code == 500
            self.last = (backend, answer)
            self.reasons.append(f"{backend}: {reason}")
            self.failed_on.append(backend)
            self.next()
            return
        ok = 200 <= answer.code < 300
        outcome = CANCELLED if self.state is JobState.DONE else ANSWERED
        self.runner.over(attempt, seconds, answer.code, service_time=seconds if ok else None, outcome=outcome)
        task = self.info.task
        if ok and task is not None:
            for failed in self.failed_on:
                if failed is not backend:
                    self.runner.fleet.task_failed(failed, task)
            self.runner.fleet.task_succeeded(backend, task)
        self.answer(backend, answer)

    def _failed(self, result: Failure, attempt: Attempt, state: AttemptState, seconds: float) -> None:
        backend = attempt.backend
        if state is AttemptState.TIMED_OUT:
            error: BaseException = NoAnswerInTime(self.runner.settings.response_timeout)
            reason = "timed out"
        else:
            error = result.value.error if result.check(Committed) else result.value
            reason = describe_failure(error)
        refused = isinstance(error, ierror.ConnectError)
        committed = result.check(Committed) is not None
        retry = not committed and (self.info.retryable or refused)
        if refused:
            self.tries -= 1
        self.runner.over(attempt, seconds, error=reason, outcome=RETRIED if retry else FAILED)
        self.runner.fleet.request_failed(backend, reason)
        self.reasons.append(f"{backend}: {reason}")
        if committed:
            # Part of the answer has reached the client: cut its connection,
            # so the answer is seen as incomplete, never as whole.
            self.finish(backend, self.request.code, f"the host's answer broke off: {reason}")
            self.request.cut()
        elif retry:
            self.next()
        elif not self.pending:
            self.give_up()

    def bug(self, failure: Failure) -> None:
        """
        A fault of the balancer's own: log it, and still answer.
        """
        self.runner.log.failure("request {uri!r} failed inside the balancer", failure, uri=self.request.uri)
        self.answer_error(500, "internal error in the balancer")

    # -- answering ----------------------------------------------------------

    def _commit(self, attempt: Attempt, answer: Answer) -> Sink:
        """
        C{attempt}'s answer is to stream to the client: past this point it
        is the client's, and no other try may follow.
        """
        if not self._enter(JobState.STREAMING):
            # Nobody waits for it any more (the client went away).
            attempt.cancel()
            return Discard()
        self._stop_others(keep=attempt)
        request = self.request
        request.start_answer(answer, attempt.backend.header)
        for chunk in answer.chunks:
            request.write(chunk)
        answer.chunks.clear()
        return request

    def _stop_others(self, keep: Optional[Attempt] = None) -> None:
        if self.seeking is not None:
            seeking, self.seeking = self.seeking, None
            seeking.cancel()
        for attempt in list(self.pending):
            if attempt is not keep:
                attempt.cancel()

    def answer(self, backend: Backend, answer: Answer) -> None:
        if self.state is JobState.DONE:
            return
        self.request.end_answer(answer, backend.header)
        self.finish(backend, answer.code)

    def answer_error(self, code: int, detail: str) -> None:
        if self.state is JobState.DONE:
            return
        self.request.reply_error(code, detail)
        self.finish(None, code, detail)

    def give_up(self) -> None:
        """
        Every try failed.  The last host's own answer, if it gave one; else
        503 naming what went wrong.
        """
        if self.last is not None:
            self.answer(*self.last)
        else:
            self.answer_error(503, f"no ML host answered after {len(self.tried)} tries: " + "; ".join(self.reasons))

    def _enter(self, new: JobState) -> bool:
        """
        Move to C{new}, if it may be from where the job stands: the one
        guard of its life.
        """
        if new not in _MOVES[self.state]:
            return False
        self.state = new
        return True

    def finish(self, backend: Optional[Backend], status: Any, reason: Optional[str] = None) -> None:
        if not self._enter(JobState.DONE):
            return
        self._stop_others()
        info = self.info
        clock = self.runner.clock
        request = self.request
        record = RequestRecord(
            info.method.decode("ascii", "replace"),
            info.path.decode("ascii", "replace"),
            info.task,
            status,
            backend.name if backend is not None else None,
            tuple(b.name for b in self.tried),
            clock.seconds() - self.started,
            self.waited,
            reason,
            request.peer,
            self.body.length,
            request.sentLength,
        )
        self.runner.report(record)
        self.done.callback(None)

    def cancel(self) -> None:
        """
        The client went away: cancel whatever is under way.
        """
        self.finish(None, "cancelled", "the client went away")


__all__ = ["Job", "JobState", "Runner"]
