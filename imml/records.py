"""
What the balancer reports of each request, for logs, metrics and the status
page: one L{AttemptRecord} per host a request was sent to, one
L{RequestRecord} per client request.  Reporters provide
L{imml.interfaces.IReporter}.
"""

from __future__ import annotations

from typing import Optional, Union

from attrs import frozen

#: Outcomes of an attempt.
ANSWERED = "answered"  # the host's answer went to the client
RETRIED = "retried"  # the host failed; the request went on to another host
FAILED = "failed"  # the host failed and no other try followed
CANCELLED = "cancelled"  # the balancer gave up on it (client gone, another host answered first)


@frozen
class AttemptRecord:
    """
    One try of a request on one host.

    @ivar backend: the host's address, as C{host:port}.
    @ivar status: the host's HTTP status, or None when it gave none.
    @ivar error: why the try failed (C{"connection refused"}, C{"timed out"},
        C{"status 503"}, ...), or None.
    @ivar seconds: from sending the request to the end of the answer.
    @ivar hedged: while it ran, the request was sent to another host too
        (its host went down with it, or it was far slower than usual).
    """

    backend: str
    task: Optional[str]
    status: Optional[int]
    error: Optional[str]
    seconds: float
    outcome: str
    hedged: bool = False


@frozen
class RequestRecord:
    """
    One client request, answered.

    @ivar status: the status the client got, or C{"cancelled"} when the
        client went away first.
    @ivar backend: the host whose answer the client got, or None.
    @ivar tried: every host tried, in order.
    @ivar waited: seconds spent waiting in the balancer's queue.
    @ivar reason: why the balancer answered itself (503), or None.
    """

    method: str
    path: str
    task: Optional[str]
    status: Union[int, str]
    backend: Optional[str]
    tried: tuple
    duration: float
    waited: float = 0.0
    reason: Optional[str] = None
