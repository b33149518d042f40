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
    One client request, over: answered, refused, or its client gone.

    @ivar method: the request's method.
    @ivar path: the request's path, without its query.
    @ivar status: the status the client got, or C{"cancelled"} when the
        client went away first.
    @ivar backend: the host whose answer the client got, or None.
    @ivar tried: every host tried, in order.
    @ivar duration: seconds from receiving the request to its end.
    @ivar waited: seconds spent waiting in the balancer's queue.
    @ivar reason: why the balancer answered itself (a refusal, a 503), why
        the request ended without an answer (the client went away), or
        why a host's answer broke off; None for a host's whole answer.
    @ivar client: the client's address, or None when it has none (a UNIX
        socket).
    @ivar bytes_in: bytes of the request's body received.
    @ivar bytes_out: bytes of the answer's body sent.
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
    client: Optional[str] = None
    bytes_in: int = 0
    bytes_out: int = 0
