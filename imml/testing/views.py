"""
A fake host view, for testing a strategy with plain lists and numbers.

A strategy (L{imml.interfaces.IStrategy}) sees each host through
L{imml.interfaces.IBackendView}.  L{FakeBackendView} provides that interface
with plain attributes a test sets as it likes:

    from imml.testing import FakeBackendView

    fast = FakeBackendView("10.0.0.1:3003", index=0, limit=2, in_flight=2,
                           service_times={"clip-visual": 0.04})
    slow = FakeBackendView("10.0.0.2:3003", index=1, limit=1,
                           service_times={"clip-visual": 0.6})
    chosen = MyStrategy().choose(request, [fast, slow])
    chosen.in_flight += 1
"""

from __future__ import annotations

from attrs import define, field
from zope.interface import implementer

from imml.backends import BackendAddress, parse_backend
from imml.interfaces import IBackendView

__all__ = ["FakeBackendView"]


def _address(value: str | BackendAddress) -> BackendAddress:
    """A L{BackendAddress} from C{host}, C{host:port} or C{[v6]:port}."""
    if isinstance(value, BackendAddress):
        return value
    return parse_backend(value)


@implementer(IBackendView)
@define(eq=False)
class FakeBackendView:
    """
    One host as a strategy sees it, every fact a settable attribute.

    @ivar address: The host's L{BackendAddress}; give it as C{"host:port"}
        (port 3003 when left out).  Strategies tell hosts apart by it.
    @ivar index: Position in the configured list, 0 first.
    @ivar weight: Relative share of work.
    @ivar tier: Priority tier, 0 first.
    @ivar in_flight: Requests sent to the host and not yet answered.
    @ivar limit: The most requests to keep in flight on it: 1 by default, as
        for a host the balancer knows nothing about yet.
    @ivar proven_limit: The part of C{limit} known to take no queueing; the
        same as C{limit} unless set.
    @ivar error_rate: Moving average of failures, 0.0 to 1.0.
    @ivar throughput: Answers per second at the limit, or L{None}.
    @ivar slot_time: Seconds a request holds a slot, or L{None}.
    @ivar service_times: Seconds per task key, what L{service_time} answers
        (a request with no task is looked up as C{"other"}, as the balancer
        does).
    @ivar answer_in: What L{next_answer_in} answers.
    @ivar stretches: What L{stretch} answers, by requests in flight (1.0
        for those not given).
    @ivar side_by_side: The most requests it was seen to run at once: 1
        unless set.
    @ivar search_surprise: One plus how much longer than expected its
        searches took, in their unloaded times: 1.0 unless set.
    """

    address: BackendAddress = field(converter=_address)
    index: int = 0
    weight: float = 1.0
    tier: int = 0
    in_flight: int = 0
    limit: int = 1
    _proven_limit: int | None = field(default=None, alias="proven_limit")
    error_rate: float = 0.0
    throughput: float | None = None
    slot_time: float | None = None
    service_times: dict[str, float] = field(factory=dict)
    answer_in: float | None = None
    stretches: dict[int, float] = field(factory=dict)
    side_by_side: int = 1
    search_surprise: float = 1.0

    @property
    def proven_limit(self) -> int:
        return self.limit if self._proven_limit is None else self._proven_limit

    @proven_limit.setter
    def proven_limit(self, value: int | None) -> None:
        self._proven_limit = value

    def has_free_slot(self) -> bool:
        """C{in_flight < limit}."""
        return self.in_flight < self.limit

    def service_time(self, task: str | None) -> float | None:
        """C{service_times[task]}, or L{None} when not set."""
        return self.service_times.get(task or "other")

    def next_answer_in(self) -> float | None:
        """C{answer_in}."""
        return self.answer_in

    def stretch(self, in_flight: int) -> float:
        """C{stretches[in_flight]}, or 1.0."""
        return self.stretches.get(in_flight, 1.0)

    def __str__(self) -> str:
        return str(self.address)
