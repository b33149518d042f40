"""
Prometheus metrics, with the maintained C{prometheus_client} library, in a
registry of the balancer's own (never the process-wide default, so several
balancers, or tests, in one process do not collide).

L{Metrics} is an L{imml.interfaces.IReporter}: counters and histograms are
updated as attempts and requests finish.  What is a level rather than a
count (requests in flight, health state, queue depth) is read from the fleet
at scrape time by L{FleetCollector}.  C{/metrics} on the admin listener is
C{prometheus_client}'s own Twisted resource (L{resource}).
"""

from __future__ import annotations

from attrs import define, field
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from zope.interface import implementer

from . import __version__
from .interfaces import IReporter
from .records import RETRIED, AttemptRecord, RequestRecord
from .status import STATE_NAMES, host_state
from .window import task_label

#: Service times of Immich ML run from a few ms (a CLIP text query) to a
#: minute (a cold model load); the buckets cover that range.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _status_label(status) -> str:
    return str(status) if status is not None else "none"


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
    _children: dict = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.backend_requests = Counter(
            "imml_backend_requests",
            "Attempts sent to an ML host, by host, task and the host's HTTP status "
            "(status 'none' when the host gave none: see imml_backend_errors_total).",
            ["backend", "task", "status"],
            registry=r,
        )
        self.backend_errors = Counter(
            "imml_backend_errors",
            "Attempts on an ML host that failed, by kind ('connection refused', 'timed out', 'status 503', ...).",
            ["backend", "kind"],
            registry=r,
        )
        self.backend_retries = Counter(
            "imml_backend_retries",
            "Attempts on an ML host that failed and whose request was sent on to another host.",
            ["backend"],
            registry=r,
        )
        self.backend_latency = Histogram(
            "imml_backend_request_duration_seconds",
            "Seconds from sending a request to an ML host to the end of its answer, answered attempts only.",
            ["backend", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "imml_requests",
            "Client requests finished, by the status the client got ('cancelled' when it went away) and task.",
            ["status", "task"],
            registry=r,
        )
        self.request_latency = Histogram(
            "imml_request_duration_seconds",
            "Seconds from receiving a client request to answering it, waiting and retries included.",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(FleetCollector(self.fleet, self.dispatcher, self.clock.seconds()))

    # -- IReporter ----------------------------------------------------------

    def _child(self, metric, *labels):
        # labels() validates and hashes on every call; a request path calls
        # it several times, with a few distinct label sets.
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def attempt_finished(self, record: AttemptRecord) -> None:
        task = task_label(record.task)
        self._child(self.backend_requests, record.backend, task, _status_label(record.status)).inc()
        if record.error is not None:
            self._child(self.backend_errors, record.backend, record.error).inc()
        if record.outcome == RETRIED:
            self._child(self.backend_retries, record.backend).inc()
        if record.status is not None and record.error is None:
            self._child(self.backend_latency, record.backend, task).observe(record.seconds)

    def request_finished(self, record: RequestRecord) -> None:
        task = task_label(record.task)
        self._child(self.requests, _status_label(record.status), task).inc()
        self._child(self.request_latency, task).observe(record.duration)


@define(eq=False)
class FleetCollector:
    """
    Levels read from the fleet when Prometheus scrapes.  It runs in the web
    server's thread pool: it only reads, from a copy of the host list.
    """

    fleet: object
    dispatcher: object
    started: float

    def describe(self):
        # Nothing to check at registration; collect() needs the live fleet.
        return []

    def collect(self):
        backends = list(self.fleet.backends)
        in_flight = GaugeMetricFamily("imml_backend_in_flight", "Requests in flight on an ML host.", labels=["backend"])
        slots = GaugeMetricFamily(
            "imml_backend_slots", "Most requests kept in flight on an ML host (hosts with a limit only).", labels=["backend"]
        )
        up = GaugeMetricFamily("imml_backend_up", "1 while an ML host passes its health checks.", labels=["backend"])
        state = GaugeMetricFamily(
            "imml_backend_state",
            f"1 for an ML host's state ({', '.join(STATE_NAMES)}), 0 for the others.",
            labels=["backend", "state"],
        )
        for backend in backends:
            name = str(backend.address)
            in_flight.add_metric([name], backend.in_flight)
            if backend.limit is not None:
                slots.add_metric([name], backend.limit)
            up.add_metric([name], 1 if backend.health.up else 0)
            current = host_state(backend)
            for s in STATE_NAMES:
                state.add_metric([name, s], 1 if s == current else 0)
        yield from (in_flight, slots, up, state)
        yield GaugeMetricFamily(
            "imml_queue_depth", "Requests waiting in the balancer for a host.", value=self.dispatcher.queue_depth
        )
        yield GaugeMetricFamily(
            "imml_start_time_seconds", "When the balancer started, in seconds since the epoch.", value=self.started
        )
        info = InfoMetricFamily("imml_build", "The balancer's version and strategy.")
        info.add_metric([], {"version": __version__, "strategy": self.dispatcher.strategy.name})
        yield info


def resource(registry: CollectorRegistry):
    """
    C{prometheus_client}'s Twisted resource for C{registry}.
    """
    from prometheus_client.twisted import MetricsResource

    return MetricsResource(registry=registry)
