"""
How many requests to keep in flight on one host.

A host's limit is its configured C{slots}, or, when none are configured, a
limit learned from how its service time grows with load, as adaptive
concurrency limiters do (TCP Vegas, Netflix's concurrency-limits): while a
host is at its limit and answers no slower than its unloaded baseline, the
limit grows by one per limit's worth of such answers; an answer much slower
than the baseline (requests queueing inside the host) shrinks it by one.

A host that comes back up starts slow: its limit is capped at one request and
the cap grows by one with each answer, until the full limit is reached.
"""

from __future__ import annotations

from typing import Optional

from attrs import define, field

#: An answer slower than this many times the baseline shows queueing.
QUEUEING = 1.5
#: ... plus this many seconds, so that tiny service times are not noise.
QUEUEING_SLACK = 0.005
#: An answer slower than this many times the baseline is an outlier (a model
#: loading): it tells nothing about concurrency.
OUTLIER = 10.0
#: How fast a baseline drifts up towards slower answers (new normal).
BASELINE_DRIFT = 0.02
#: The most a learned limit grows to.
MAX_LEARNED = 64


@define
class Limit:
    """
    @ivar slots: configured slots, or None to learn the limit.
    @ivar learned: the learned limit (used when C{slots} is None).
    @ivar ramp: the slow-start cap, or None when not starting.
    """

    slots: Optional[int] = None
    learned: int = 1
    ramp: Optional[int] = None
    _baseline: dict = field(factory=dict)
    _good: int = 0

    @property
    def value(self) -> int:
        full = self.slots if self.slots is not None else self.learned
        if self.ramp is not None:
            return min(full, self.ramp)
        return full

    def restart(self) -> None:
        """
        The host came back up: start slow.
        """
        self.ramp = 1
        self._good = 0

    def answered(self, task: Optional[str], seconds: float, in_flight: int) -> None:
        """
        A request of C{task} was answered in C{seconds}; C{in_flight} requests
        were on the host when it was sent (itself included).
        """
        key = task or "other"
        baseline = self._baseline.get(key)
        if baseline is None or seconds < baseline:
            self._baseline[key] = baseline = seconds
        elif seconds < baseline * OUTLIER:
            self._baseline[key] = baseline + BASELINE_DRIFT * (seconds - baseline)
        if self.ramp is not None:
            self.ramp += 1
            full = self.slots if self.slots is not None else self.learned
            if self.ramp >= full:
                self.ramp = None
        if self.slots is not None:
            return
        if seconds >= baseline * OUTLIER:
            return
        if seconds > baseline * QUEUEING + QUEUEING_SLACK:
            self._good = 0
            if self.learned > 1 and in_flight > 1:
                self.learned -= 1
            return
        if in_flight >= self.learned:
            self._good += 1
            if self._good >= self.learned and self.learned < MAX_LEARNED:
                self.learned += 1
                self._good = 0

    def failed(self) -> None:
        """
        A request failed on the host: be careful for a while.
        """
        self._good = 0
