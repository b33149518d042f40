"""
An attempt: one try of a client request on one host, its state, and the
rules that judge its outcome.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional

from attrs import define
from twisted.internet.defer import Deferred

from .classify import RequestInfo
from .fleet import Backend, Load
from .upstream import Answer


class AttemptState(Enum):
    RUNNING = "running"
    #: Running, and sent to another host too (its host went down, or it is
    #: far slower than usual).
    HEDGED = "hedged"
    #: The balancer gave up on it: another attempt answered, or the client
    #: went away.  However it then fails is no fault of the host's.
    CANCELLED = "cancelled"
    #: No complete answer within the response timeout: cancelled for that.
    TIMED_OUT = "timed out"
    OVER = "over"


_LIVE = (AttemptState.RUNNING, AttemptState.HEDGED)


@define(eq=False)
class Attempt:
    """
    One try of a job on one host.
    """

    #: The L{imml.job.Job} it is a try of.
    job: Any
    load: Load
    deferred: Optional[Deferred[Answer]] = None
    state: AttemptState = AttemptState.RUNNING
    #: It was hedged (L{hedge}), whatever its state now.
    hedged: bool = False

    @property
    def backend(self) -> Backend:
        return self.load.backend

    @property
    def sent(self) -> float:
        return self.load.sent

    def hedge(self) -> bool:
        """
        Mark the attempt as sent elsewhere too; whether it could be.
        """
        if self.state is not AttemptState.RUNNING:
            return False
        self.state = AttemptState.HEDGED
        self.hedged = True
        return True

    def over(self) -> AttemptState:
        """
        The attempt has its outcome; the state it had until then.
        """
        state, self.state = self.state, AttemptState.OVER
        return state

    def cancel(self, state: AttemptState = AttemptState.CANCELLED) -> None:
        """
        Give up on the attempt (C{TIMED_OUT}: for the response timeout).
        """
        if self.state in _LIVE:
            self.state = state
            self.deferred.cancel()


class NoAnswerInTime(Exception):
    """
    A host did not answer completely within the response timeout.
    """


def retry_status(info: RequestInfo, answer: Answer, had_500: bool) -> bool:
    """
    Whether another host should be asked instead: the host is failing (502,
    503, 504), or it answered 500 and no host has yet (a 500 is often about
    the request, so it is retried only once).
    """
    if not info.retryable or answer.committed:
        return False
    return answer.code in (502, 503, 504) or (answer.code == 500 and not had_500)
