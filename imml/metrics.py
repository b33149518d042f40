"""
Prometheus metrics, with the maintained C{prometheus_client} library, in a
registry of the balancer's own (never the process-wide default, so several
balancers, or tests, in one process do not collide).

L{Metrics} is an L{imml.interfaces.IReporter}: it counts attempts and
requests as they finish, in plain numbers (this runs for every request;
C{prometheus_client}'s own counters take a lock and validate on each
update), and turns them into metric families when Prometheus scrapes.  What
is a level rather than a count (requests in flight, health state, queue
depth) is read from the fleet at scrape time by L{FleetCollector}.
C{/metrics} on the admin listener is L{MetricsPage} (made by L{resource}):
it renders on the reactor thread, so a scrape reads the fleet and the
counts between two of the reactor's events, never while they change.
"""

from __future__ import annotations

import gzip
from bisect import bisect_left
from typing import Iterator, Optional

from attrs import define, field
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.utils import floatToGoString
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from . import __version__
from .interfaces import IReporter
from .records import RETRIED, AttemptRecord, RequestRecord
from .status import STATE_NAMES, host_state
from .window import task_label

#: Service times of Immich ML run from a few ms (a CLIP text query) to a
#: minute (a cold model load); the buckets cover that range.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _status_label(status: Optional[int]) -> str:
    return str(status) if status is not None else "none"


@define(eq=False)
class _Counts:
    """
    One counter family: a count per label values.
    """

    name: str
    documentation: str
    labels: tuple
    values: dict = field(factory=dict)

    def add(self, key: tuple) -> None:
        values = self.values
        values[key] = values.get(key, 0) + 1

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family


@define(eq=False)
class _Histograms:
    """
    One histogram family: per label values, the count of observations in
    each bucket (not cumulative; the last is above every bound), and their
    sum.
    """

    name: str
    documentation: str
    labels: tuple
    bounds: tuple = LATENCY_BUCKETS
    values: dict = field(factory=dict)

    def observe(self, key: tuple, value: float) -> None:
        counts = self.values.get(key)
        if counts is None:
            counts = self.values[key] = [0] * (len(self.bounds) + 1) + [0.0]
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        names = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for key, counts in self.values.items():
            buckets, total = [], 0
            for name, count in zip(names, counts):
                total += count
                buckets.append((name, total))
            family.add_metric(key, buckets, counts[-1])
        return family


@implementer(IReporter)
@define(eq=False, slots=False)
class Metrics:
    """
    The balancer's metrics.  C{registry} holds them; serve it with
    L{resource}.
    """

    fleet: object
    dispatcher: object
    clock: object
    registry: CollectorRegistry = field(factory=CollectorRegistry)
    #: The agreement check (L{imml.agreement.Agreement}), or None.
    agreement: object = None

    def __attrs_post_init__(self) -> None:
        self.backend_requests = _Counts(
            "imml_backend_requests",
            "Attempts sent to an ML host, by host, task and the host's HTTP status "
            "(status 'none' when the host gave none: see imml_backend_errors_total).",
            ("backend", "task", "status"),
        )
        self.backend_errors = _Counts(
            "imml_backend_errors",
            "Attempts on an ML host that failed, by kind ('connection refused', 'timed out', 'status 503', ...).",
            ("backend", "kind"),
        )
        self.backend_retries = _Counts(
            "imml_backend_retries",
            "Attempts on an ML host that failed and whose request was sent on to another host.",
            ("backend",),
        )
        self.backend_hedges = _Counts(
            "imml_backend_hedges",
            "Attempts on an ML host whose request was sent to another host too while they ran "
            "(the host went down with it, or was far slower than usual); counted when they end.",
            ("backend",),
        )
        self.backend_latency = _Histograms(
            "imml_backend_request_duration_seconds",
            "Seconds from sending a request to an ML host to the end of its answer, answered attempts only.",
            ("backend", "task"),
        )
        self.requests = _Counts(
            "imml_requests",
            "Client requests finished, by the status the client got ('cancelled' when it went away) and task.",
            ("status", "task"),
        )
        self.request_latency = _Histograms(
            "imml_request_duration_seconds",
            "Seconds from receiving a client request to answering it, waiting and retries included.",
            ("task",),
        )
        self.queue_wait = _Histograms(
            "imml_queue_wait_seconds",
            "Seconds a client request waited in the balancer's queue for a host (0 when it did not wait).",
            ("task",),
        )
        self.registry.register(self)
        self.registry.register(FleetCollector(self.fleet, self.dispatcher, self.clock.seconds()))
        if self.agreement is not None:
            self.registry.register(AgreementCollector(self.fleet, self.agreement))

    # -- IReporter ----------------------------------------------------------

    def attempt_finished(self, record: AttemptRecord) -> None:
        task = task_label(record.task)
        backend = record.backend
        self.backend_requests.add((backend, task, _status_label(record.status)))
        if record.error is not None:
            self.backend_errors.add((backend, record.error))
        elif record.status is not None:
            self.backend_latency.observe((backend, task), record.seconds)
        if record.outcome == RETRIED:
            self.backend_retries.add((backend,))
        if record.hedged:
            self.backend_hedges.add((backend,))

    def request_finished(self, record: RequestRecord) -> None:
        task = task_label(record.task)
        self.requests.add((_status_label(record.status), task))
        self.request_latency.observe((task,), record.duration)
        self.queue_wait.observe((task,), record.waited)

    # -- a collector of the registry ----------------------------------------

    def describe(self) -> list[Metric]:
        # The families, so that a scrape may name them (name[]).
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        for counts in (
            self.backend_requests,
            self.backend_errors,
            self.backend_retries,
            self.backend_hedges,
            self.requests,
        ):
            yield counts.family()
        for histograms in (self.backend_latency, self.request_latency, self.queue_wait):
            yield histograms.family()


@define(eq=False)
class FleetCollector:
    """
    Levels read from the fleet when Prometheus scrapes (on the reactor
    thread, as everything that reads the fleet).
    """

    fleet: object
    dispatcher: object
    started: float

    def describe(self) -> list[Metric]:
        # The families, so that a scrape may name them (name[]).
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("imml_backend_in_flight", "Requests in flight on an ML host.", labels=["backend"])
        slots = GaugeMetricFamily(
            "imml_backend_slots",
            "Most requests kept in flight on an ML host (hosts with a limit only).",
            labels=["backend"],
        )
        work = GaugeMetricFamily(
            "imml_backend_work_per_second",
            "Work an ML host did per second with this many requests in flight, in seconds of its answers "
            "given alone (hosts with a learned limit only).",
            labels=["backend", "in_flight"],
        )
        at_once = GaugeMetricFamily(
            "imml_backend_ran_at_once",
            "Most requests an ML host was seen to run side by side (hosts with a learned limit only): "
            "past that many, a request waits inside it.",
            labels=["backend"],
        )
        surprise = GaugeMetricFamily(
            "imml_backend_search_surprise",
            "One plus how much longer than expected an ML host's searches lately took at worst, in their times alone.",
            labels=["backend"],
        )
        up = GaugeMetricFamily("imml_backend_up", "1 while an ML host passes its health checks.", labels=["backend"])
        state = GaugeMetricFamily(
            "imml_backend_state",
            f"1 for an ML host's state ({', '.join(STATE_NAMES)}), 0 for the others.",
            labels=["backend", "state"],
        )
        for backend in self.fleet.backends:
            name = str(backend.address)
            in_flight.add_metric([name], backend.in_flight)
            if backend.limit is not None:
                slots.add_metric([name], backend.limit)
            limiter = backend.limiter
            if limiter.slots is None:
                at_once.add_metric([name], limiter.side_by_side)
            for level, rate in limiter.measured().items():  # (none with slots)
                work.add_metric([name, str(level)], rate)
            surprise.add_metric([name], backend.search_surprise)
            up.add_metric([name], 1 if backend.health.up else 0)
            current = host_state(backend)
            for s in STATE_NAMES:
                state.add_metric([name, s], 1 if s == current else 0)
        yield from (in_flight, slots, work, at_once, surprise, up, state)
        dispatcher = self.dispatcher
        yield GaugeMetricFamily(
            "imml_queue_depth", "Requests waiting in the balancer for a host.", value=dispatcher.queue_depth
        )
        yield GaugeMetricFamily(
            "imml_queue_max", "Most requests that may wait in the balancer (--max-queue).", value=dispatcher.max_queue
        )
        yield GaugeMetricFamily(
            "imml_queue_oldest_wait_seconds",
            "Seconds the request waiting longest in the balancer has waited so far (0 when none waits).",
            value=dispatcher.oldest_wait() or 0.0,
        )
        yield GaugeMetricFamily(
            "imml_start_time_seconds", "When the balancer started, in seconds since the epoch.", value=self.started
        )
        info = InfoMetricFamily("imml_build", "The balancer's version and strategy.")
        info.add_metric([], {"version": __version__, "strategy": self.dispatcher.strategy.name})
        yield info


#: A host's verdicts on a model (L{imml.agreement.Verdict}).
VERDICTS = ("pending", "agrees", "disagrees", "failed")


@define(eq=False)
class AgreementCollector:
    """
    The agreement check, read when Prometheus scrapes: each host's verdict
    and similarity per task and model, and the canaries sent.
    """

    fleet: object
    agreement: object

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        labels = ["backend", "task", "model"]
        verdict = GaugeMetricFamily(
            "imml_backend_agreement",
            f"1 for an ML host's verdict on a task's model ({', '.join(VERDICTS)}), 0 for the others: "
            "whether its answers to the agreement check agree with the other hosts'.",
            labels=[*labels, "verdict"],
        )
        similarity = GaugeMetricFamily(
            "imml_backend_agreement_similarity",
            "The cosine similarity of an ML host's answers to the agreement check with those of the host "
            "it was compared with (1: the same).",
            labels=labels,
        )
        for backend in self.fleet.backends:
            name = str(backend.address)
            for view in self.agreement.views(backend):
                key = [name, view["task"], view["model"]]
                for v in VERDICTS:
                    verdict.add_metric([*key, v], 1 if v == view["verdict"] else 0)
                if view["similarity"] is not None:
                    similarity.add_metric(key, view["similarity"])
        sent = CounterMetricFamily(
            "imml_agreement_canaries",
            "Requests of the agreement check (canaries) sent to an ML host, by task.",
            labels=["backend", "task"],
        )
        for (backend, task), count in sorted(self.agreement.sent.items()):
            sent.add_metric([backend, task], count)
        yield from (verdict, similarity, sent)


class MetricsPage(Resource):
    """
    C{/metrics}: the samples of C{registry}, rendered synchronously on the
    reactor thread (C{prometheus_client}'s own Twisted resource collects in
    a thread pool, while the reactor changes what it reads), in the format
    the scraper accepts.  GET and HEAD; any other method is answered 405.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            # Answered here: Twisted's own answer to a method it does not
            # know (PUT, ...) is 501.
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"/metrics takes GET or HEAD\n"
        return super().render(request)

    def render_GET(self, request: IRequest) -> bytes:
        # As prometheus_client's own exposition does: the format the scraper
        # accepts (OpenMetrics or text), gzipped if it accepts that, and
        # only the families named in name[] when it names any.
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else None)
        registry = self.registry
        names = request.args.get(b"name[]")
        if names:
            registry = registry.restricted_registry([n.decode("utf-8", "replace") for n in names])
        body = encoder(registry)
        encoding = request.getHeader(b"accept-encoding")
        if encoding and gzip_accepted(encoding.decode("latin-1")):
            body = gzip.compress(body)
            request.setHeader(b"content-encoding", b"gzip")
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    def render_HEAD(self, request: IRequest) -> bytes:
        # The headers GET would send, the length included, and no body.
        request.setHeader(b"content-length", b"%d" % len(self.render_GET(request)))
        return b""


def resource(registry: CollectorRegistry) -> MetricsPage:
    """
    The C{/metrics} resource for C{registry}.
    """
    return MetricsPage(registry)
