"""
The contracts of imml's pluggable parts.

A strategy (L{IStrategy}) decides which ML host serves a request.  It is a
pure decision over the fleet's observed state: it sees each eligible host
through L{IBackendView} and the request through L{IRequestInfo}, does no I/O
and reads no clock.  The balancer feeds the views with what it observes
(requests in flight, health, service times) and asks the strategy again
whenever a slot frees up, so a strategy may also answer "wait".

To plug in a strategy of your own, either name its class by dotted path
(C{--strategy mypackage.module.MyStrategy}) or drop a Twisted plugin
providing L{IStrategyFactory} into a C{twisted/plugins/} directory on the
path and select it by its C{name}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from .records import AttemptRecord, RequestRecord


class IRequestInfo(Interface):
    """
    What the balancer knows about a request before choosing a host.
    """

    method = Attribute("The HTTP method, as bytes (b'POST').")
    path = Attribute("The request path without query, as bytes (b'/predict').")
    task = Attribute(
        "The ML task read from the request's C{entries} field: one of "
        "'clip-visual', 'clip-textual', 'faces', 'ocr', 'other' for an "
        "unrecognised /predict, or None for a request that is not a /predict."
    )
    interactive = Attribute(
        "True when a person waits for the answer (a CLIP text search); such requests go ahead of batch work."
    )
    ahead = Attribute(
        "How many requests wait in the balancer's queue ahead of this one; "
        "a strategy weighs a free slow host against waiting for a fast one "
        "with it.  A request with fewer ahead of it is expected to wait as "
        "readily: of several alike requests waiting (the same request, no "
        "host to avoid), when the strategy keeps the first and the last "
        "waiting, the balancer keeps those between waiting too, without "
        "asking about them, until it next binds a request or a host frees."
    )
    searching = Attribute(
        "True for batch work while people search (a search came in the last "
        "ten seconds): the balancer then paces batch work and keeps it from "
        "a host's room, and a strategy may keep batch work from filling "
        "hosts, so that searches find them less loaded."
    )


class IBackendView(Interface):
    """
    A strategy's read-only view of one ML host.
    """

    address = Attribute("The host's L{imml.backends.BackendAddress}.")
    index = Attribute("The host's position in the configured list, 0 first.")
    weight = Attribute("The configured relative share of work, a positive float (1.0 by default).")
    tier = Attribute("The configured priority tier, 0 first; lower tiers are preferred by failover.")
    in_flight = Attribute("How many requests this balancer has sent to the host and not yet seen answered.")
    limit = Attribute(
        "The most requests to keep in flight on the host now: its configured "
        "slots or a limit learned from its answers, lower while it starts up "
        "again after being down."
    )
    proven_limit = Attribute(
        "The part of C{limit} the host has been seen to take without queueing "
        "requests inside it: C{limit}, or one less while a learned limit is "
        "raised to probe for more.  A request that must not wait (a search) "
        "treats the host as full at C{in_flight >= proven_limit}, unless it "
        "weighs the wait: a search sees each host with a learned limit with "
        "room for one request past C{proven_limit} (C{limit} is then "
        "C{proven_limit + 1}), where it may run beside the others (a real "
        "host sharing its processor) or wait inside the host for a slot."
    )
    side_by_side = Attribute(
        "The most requests in flight at which the host was seen to run a "
        "request at once (it answered it before every request it joined): "
        "1 until seen.  A request sent with fewer in flight does not wait "
        "inside the host for a slot, whatever the proven limit."
    )
    search_surprise = Attribute(
        "One plus how much longer than expected the host's searches took "
        "lately (their unloaded time stretched by the requests on the host "
        "when sent), in their unloaded times: the worst of them, lowered by "
        "searches that take less and halved, beyond 1.0, every 30 s; 1.0 "
        "when they took what was expected.  On a host held to a CPU quota "
        "by periods a search beside its other work may wait for the next "
        "period, which neither its unloaded time nor its stretch shows."
    )
    error_rate = Attribute("A moving average of the host's failures: 0.0 none, 1.0 all.")
    throughput = Attribute(
        "A moving average of the answers per second the host gives while it "
        "is at its limit, whatever their task; None when nothing is known.  "
        "A request that must wait for k slots on it waits about k / throughput."
    )
    slot_time = Attribute(
        "A moving average of how long any request holds a slot on the host, "
        "whatever its task, in seconds; None when nothing is known.  A slot "
        "frees every slot_time / limit seconds on average."
    )

    def next_answer_in() -> float | None:
        """
        Seconds until the first request in flight on the host is expected
        to be answered (from how long each has been served and its task's
        recent service time; one waiting inside the host for a slot is not
        first), 0 when one is overdue; None when none is in flight or
        nothing is known.  The first slot to free up frees then.
        """

    def stretch(in_flight: int) -> float:
        """
        How many times longer a request takes with C{in_flight} requests on
        the host (itself included) than alone, from the host's measured
        throughput at each level: 1.0 on a host whose requests do not slow
        each other (free slots), more on a real host whose requests share
        its processor; 1.0 when nothing is known.
        """

    def has_free_slot() -> bool:
        """
        Whether the host may take one more request now (C{in_flight < limit}).
        """

    def service_time(task) -> float | None:
        """
        A recent moving average of the host's service time, in seconds, for
        requests of C{task}; None when nothing is known yet.
        """


class IStrategy(Interface):
    """
    Chooses the host for a request.
    """

    name = Attribute("The name the strategy is selected by, e.g. 'round-robin'.")

    def choose(request: IRequestInfo, candidates: Sequence[IBackendView]) -> IBackendView | None:
        """
        Choose a host for C{request}.

        @param request: an L{IRequestInfo}.
        @param candidates: a non-empty sequence of L{IBackendView}, in
            configured order: the hosts that are up, not draining, serve the
            request's task and (when any such host remains) have not already
            failed this request.  Some may have no free slot.
        @return: one of C{candidates} whose C{has_free_slot()} is true, or
            None to leave the request waiting until the fleet changes (a
            slot frees up, a host comes back).
        """


class IStrategyFactory(Interface):
    """
    A Twisted plugin that makes a strategy, for selection by name.
    """

    name = Attribute("The name to select the strategy by.")
    description = Attribute("One line for --help.")

    def __call__() -> IStrategy:
        """
        Make a fresh strategy.
        """


class IReporter(Interface):
    """
    Told of every attempt and request, for metrics and the status page.  Its
    methods are called on the reactor thread on every request: they must be
    quick and must not raise.
    """

    def attempt_finished(record: AttemptRecord) -> None:
        """
        An L{imml.records.AttemptRecord}: one try on one host is over.
        """

    def request_finished(record: RequestRecord) -> None:
        """
        An L{imml.records.RequestRecord}: a client request is answered.
        """
