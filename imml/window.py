"""
A recent window of what the hosts did: per host and task, the service times
of the answers of the last few minutes (for p50 and p95), and per host the
number of answers in each short interval (for a throughput chart, and the
fleet's rate of answers); plus the balancer's totals of requests answered, failed and cancelled since start.

L{RecentWindow} is an L{imml.interfaces.IReporter}: the forwarder tells it of
every attempt and request.  It reads time from an injected clock only, so it
tests with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Optional

from attrs import Factory, define, field
from zope.interface import implementer

from .interfaces import IReporter
from .records import ANSWERED, AttemptRecord, RequestRecord

#: The task label of a request that is not a /predict (C{GET /}, ...).
NO_TASK = "none"
#: Seconds over which the fleet's rate of answers is reckoned.
RATE_SPAN = 60.0


def task_label(task: Optional[str]) -> str:
    return task or NO_TASK


def percentile(values: list[float], fraction: float) -> Optional[float]:
    """
    The nearest-rank percentile of C{values} (C{fraction} 0.5 for the
    median), or None when there are none.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@implementer(IReporter)
@define(eq=False)
class RecentWindow:
    """
    @ivar span: seconds of history kept.
    @ivar bucket: width, in seconds, of one throughput interval.
    @ivar most: most latency samples kept per host and task, whatever
        C{span} says, to bound memory under heavy load.
    """

    clock: object
    span: float = 300.0
    bucket: float = 10.0
    most: int = 5000
    #: (host, task) -> deque of (time, seconds), oldest first.
    _samples: dict = field(factory=dict)
    #: host -> deque of [bucket number, answers], oldest first.
    _answers: dict = field(factory=dict)
    #: the balancer's requests since start, by outcome: answered, failed, cancelled.
    totals: Counter = field(factory=Counter)
    #: when old samples were last dropped: at most once a second while
    #: answers come in (the samples are bounded by C{most} meanwhile).
    _trimmed: float = float("-inf")
    #: when the window began.
    _began: float = field(default=Factory(lambda self: self.clock.seconds(), takes_self=True))

    # -- IReporter ----------------------------------------------------------

    def attempt_finished(self, record: AttemptRecord) -> None:
        if record.outcome != ANSWERED:
            return
        now = self.clock.seconds()
        key = (record.backend, task_label(record.task))
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self.most)
        samples.append((now, record.seconds))
        number = int(now // self.bucket)
        counts = self._answers.setdefault(record.backend, deque())
        if counts and counts[-1][0] == number:
            counts[-1][1] += 1
        else:
            counts.append([number, 1])
        if now - self._trimmed >= 1.0:
            self._trim(now)

    def request_finished(self, record: RequestRecord) -> None:
        if not isinstance(record.status, int):
            self.totals["cancelled"] += 1
        elif record.status >= 500:
            self.totals["failed"] += 1
        else:
            self.totals["answered"] += 1

    # -- reading ------------------------------------------------------------

    def _trim(self, now: float) -> None:
        self._trimmed = now
        oldest = now - self.span
        for key, samples in list(self._samples.items()):
            while samples and samples[0][0] < oldest:
                samples.popleft()
            if not samples:
                del self._samples[key]
        first = int(oldest // self.bucket)
        for host, counts in list(self._answers.items()):
            while counts and counts[0][0] < first:
                counts.popleft()
            if not counts:
                del self._answers[host]

    def latency(self, backend: str) -> dict:
        """
        C{{task: {"p50": s, "p95": s, "count": n}}} for C{backend}'s answers
        within the window.
        """
        self._trim(self.clock.seconds())
        result = {}
        for (host, task), samples in sorted(self._samples.items()):
            if host != backend:
                continue
            seconds = [s for _, s in samples]
            result[task] = {
                "p50": percentile(seconds, 0.50),
                "p95": percentile(seconds, 0.95),
                "count": len(seconds),
            }
        return result

    def throughput(self, backend: str) -> list[int]:
        """
        C{backend}'s answers in each C{bucket}-second interval of the
        window, oldest first; the last interval is the current one.
        """
        now = self.clock.seconds()
        self._trim(now)
        last = int(now // self.bucket)
        intervals = max(1, int(self.span // self.bucket))
        counts = dict((n, c) for n, c in self._answers.get(backend, ()))
        return [counts.get(n, 0) for n in range(last - intervals + 1, last + 1)]

    def rate(self, seconds: float = RATE_SPAN) -> float:
        """
        The answers of all hosts per second over about the last C{seconds}:
        the whole intervals that cover them, the current one included, or
        since the window began if that is later (and at least one interval,
        so that the first answers are no burst).
        """
        now = self.clock.seconds()
        self._trim(now)
        intervals = max(1, min(math.ceil(seconds / self.bucket), int(self.span // self.bucket)))
        first = int(now // self.bucket) - intervals + 1
        answers = sum(c for counts in self._answers.values() for n, c in counts if n >= first)
        return answers / max(now - max(first * self.bucket, self._began), self.bucket)
