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
QUEUEING = 1.25
#: ... plus this many seconds, so that tiny service times are not noise.
QUEUEING_SLACK = 0.005
#: An answer slower than this many times the baseline is an outlier (a model
#: loading): it tells nothing about concurrency.
OUTLIER = 10.0
#: How fast a baseline follows slower answers given alone (a new normal).
BASELINE_DRIFT = 0.05
#: The most a learned limit grows to.
MAX_LEARNED = 64


#: Good answers at a limit before the limit is raised again to one that
#: showed queueing before; doubled each time the raise shows queueing again.
PROBE_AFTER = 50
MAX_PROBE_AFTER = 400
#: Answers in a row that show queueing before the limit comes down (once
#: the host has been seen queueing at all).
QUEUED_IN_A_ROW = 2


@define
class Limit:
    """
    @ivar slots: configured slots, or None to learn the limit.
    @ivar learned: the learned limit (used when C{slots} is None).
    @ivar ramp: the slow-start cap, or None when not starting.
    @ivar ceiling: the lowest limit at which the host was seen queueing, or
        None: raising the limit to it again is a probe, tried only after
        C{probe_after} good answers, since the probe's request pays for it
        (it waits inside the host for a whole service time).
    """

    slots: Optional[int] = None
    learned: int = 1
    ramp: Optional[int] = None
    ceiling: Optional[int] = None
    probe_after: int = PROBE_AFTER
    _baseline: dict = field(factory=dict)
    _good: int = 0
    _bad: int = 0

    @property
    def value(self) -> int:
        full = self.slots if self.slots is not None else self.learned
        if self.ramp is not None:
            return min(full, self.ramp)
        return full

    @property
    def proven(self) -> int:
        """
        The limit the host has been seen to take without queueing: L{value},
        less one while a learned limit is raised to the level where the host
        queued before (a probe: the request sent into that last slot may
        wait inside the host).
        """
        value = self.value
        if self.slots is None and self.ceiling is not None and self.learned >= self.ceiling and value > 1:
            return value - 1
        return value

    def restart(self) -> None:
        """
        The host came back up: start slow.
        """
        self.ramp = 1
        self._good = 0

    def answered(self, task: Optional[str], seconds: float, in_flight: int) -> bool:
        """
        A request of C{task} was answered in C{seconds}; C{in_flight} requests
        were on the host when it was sent (itself included).

        @return: whether the answer is a fair sample of the host's service
            time: not queued inside the host, not a model loading.
        """
        key = task or "other"
        baseline = self._baseline.get(key)
        if baseline is None or seconds < baseline:
            self._baseline[key] = baseline = seconds
        elif in_flight == 1 and seconds < baseline * OUTLIER:
            # Alone on the host, an answer cannot have queued behind ours:
            # it is the host's unloaded service time (which may change).
            self._baseline[key] = baseline + BASELINE_DRIFT * (seconds - baseline)
        if self.ramp is not None:
            self.ramp += 1
            full = self.slots if self.slots is not None else self.learned
            if self.ramp >= full:
                self.ramp = None
        outlier = seconds >= baseline * OUTLIER
        queued = not outlier and seconds > baseline * QUEUEING + QUEUEING_SLACK
        if self.slots is not None or outlier:
            return not (outlier or queued)
        if queued:
            self._good = 0
            # Only a request sent at the present limit (or below) says the
            # present limit queues; those sent before the last decrease
            # say nothing new.  One slow answer may be noise: two in a row
            # are not.
            if 1 < in_flight <= self.learned:
                self._bad += 1
            # The first time, one queued answer is enough: until then the
            # limit was a guess.
            if self._bad >= (1 if self.ceiling is None else QUEUED_IN_A_ROW):
                self._bad = 0
                if self.ceiling is not None and self.learned >= self.ceiling:
                    # the probe failed: wait longer before the next one
                    self.probe_after = min(self.probe_after * 2, MAX_PROBE_AFTER)
                elif self.ceiling is not None:
                    # Queueing below the old ceiling: a new one, whose
                    # probes start as often as the first ones did.  (Else
                    # a host that stalled once, with probes above its real
                    # limit grown rare, would stay below it for hundreds
                    # of answers.)
                    self.probe_after = PROBE_AFTER
                self.ceiling = self.learned if self.ceiling is None else min(self.ceiling, self.learned)
                self.learned -= 1
            return False
        self._bad = 0
        if in_flight >= self.learned:
            self._good += 1
            probing = self.ceiling is not None and self.learned + 1 >= self.ceiling
            needed = self.probe_after if probing else self.learned
            if self._good >= needed and self.learned < MAX_LEARNED:
                self.learned += 1
                self._good = 0
                if self.ceiling is not None and self.learned > self.ceiling:
                    self.ceiling = None  # the host took more than before
        return True

    def failed(self) -> None:
        """
        A request failed on the host: be careful for a while.
        """
        self._good = 0
