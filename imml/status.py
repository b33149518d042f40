"""
The facts the status page, C{/api/status} and C{/metrics} show: each host's
state, load, counters and recent latencies, and the balancer's own.

A host's state is the first of L{STATES} whose test holds, so a new state is
one line there.  The JSON document is described in C{docs/admin.md}.
"""

from __future__ import annotations

from typing import Callable, Optional

from attrs import define, field

from . import __version__
from .health import DOWN, UNKNOWN
from .host import MODEL_TTL, Backend
from .window import RATE_SPAN, RecentWindow

#: A host's state: the first whose test holds, and when the host entered
#: it (the later of the events that may have begun it).
STATES: tuple[tuple[str, Callable[[Backend], bool], Callable[[Backend], float]], ...] = (
    ("draining", lambda b: b.draining, lambda b: b.drain_changed),
    ("waking", lambda b: b.waking, lambda b: b.woken),
    ("down", lambda b: b.health.state == DOWN, lambda b: max(b.health.since, b.drain_changed)),
    ("unknown", lambda b: b.health.state == UNKNOWN, lambda b: max(b.health.since, b.drain_changed)),
    ("cold", lambda b: b.cold, lambda b: max(b.health.since, b.drain_changed, _idle_since(b))),
    ("up", lambda b: True, lambda b: max(b.health.since, b.drain_changed, b.stats.warmed)),
)
STATE_NAMES = tuple(name for name, _, _ in STATES)

#: Share of --max-queue waiting past which the queue is nearly full.
QUEUE_ALERT = 0.8


def _idle_since(backend: Backend) -> float:
    """
    When C{backend} went cold by answering nothing for L{MODEL_TTL} seconds.
    """
    last = backend.stats.last_sample
    return float("-inf") if last is None else last + MODEL_TTL


def host_state(backend: Backend) -> str:
    return next(name for name, test, _ in STATES if test(backend))


def state_and_since(backend: Backend) -> tuple[str, float]:
    """
    C{backend}'s state and when it entered it.
    """
    return next((name, since(backend)) for name, test, since in STATES if test(backend))


def learning(backend: Backend) -> Optional[dict]:
    """
    What C{backend}'s learned limit has found, or None for a host with
    configured slots: the work it did per second at each level measured
    (in seconds of answers given alone), the lowest level seen to buy
    nothing (tried again now and then), and the most requests it was seen
    to run at once.
    """
    limiter = backend.limiter
    if limiter.slots is not None:
        return None
    return {
        "work_per_second": {str(level): round(rate, 3) for level, rate in limiter.measured().items()},
        "ceiling": limiter.ceiling,
        "ran_at_once": limiter.side_by_side,
    }


@define(eq=False)
class Status:
    """
    Reads the running balancer's state into plain data.

    @ivar stopping: tells whether the balancer is stopping (draining).
    @ivar actions: whether the admin actions (drain, enable, check) are on.
    """

    fleet: object
    dispatcher: object
    window: RecentWindow
    clock: object
    started: float = 0.0
    actions: bool = False
    stopping: Callable[[], bool] = lambda: False
    config: Optional[str] = None
    version: str = __version__
    extra: dict = field(factory=dict)
    #: The agreement check (L{imml.agreement.Agreement}), or None.
    agreement: object = None

    def set_actions(self, on: bool) -> None:
        """
        Turn the admin actions on or off.
        """
        self.actions = on

    def find(self, address: str) -> Optional[Backend]:
        """
        The host whose address reads C{address} (C{host:port}), or None.
        """
        for backend in self.fleet.backends:
            if str(backend.address) == address:
                return backend
        return None

    def host(self, backend: Backend) -> dict:
        health, settings, address = backend.health, backend.settings, str(backend.address)
        state, since = state_and_since(backend)
        return {
            "address": address,
            "name": settings.name,
            "state": state,
            "state_since": since,
            "health": health.state,
            "since": health.since,
            "last_check": health.last_check,
            "last_result": health.last_result,
            "draining": backend.draining,
            "leaving": backend.leaving,
            "in_flight": backend.in_flight,
            "slots": backend.limit,
            "slots_configured": settings.slots,
            "learning": learning(backend),
            "search_surprise": round(backend.search_surprise, 3),
            "weight": settings.weight,
            "tier": settings.tier,
            "tasks": sorted(settings.tasks) if settings.tasks is not None else None,
            "tls": settings.tls.describe() if settings.tls is not None else None,
            "headers": settings.header_names,
            "reference": settings.reference,
            "agreement": self.agreement.views(backend) if self.agreement is not None else [],
            "served": backend.stats.served,
            "errors": dict(sorted(backend.stats.errors.items())),
            "latency": self.window.latency(address),
            "throughput": self.window.throughput(address),
        }

    def alerts(self) -> list[dict]:
        """
        What needs an operator now: no host can take requests, the queue is
        nearly full, or hosts give answers that disagree.
        """
        alerts = []
        dispatcher, backends = self.dispatcher, self.fleet.backends
        if not self.fleet.any_up:
            then = f"requests wait up to {dispatcher.queue_timeout:g} s for one, then get 503"
            if not backends:
                text = f"no ML host is configured: {then}"
            elif any(b.health.up for b in backends):
                text = f"every ML host that is up is draining: {then}"
            else:
                text = f"no ML host is up: {then}"
            alerts.append({"kind": "no-host-up", "text": text})
        depth, most = dispatcher.queue_depth, dispatcher.max_queue
        if depth > QUEUE_ALERT * most:
            if depth >= most:
                text = f"the queue is full: {depth} of {most} requests wait (--max-queue); more get 503 at once"
            else:
                text = (
                    f"the queue is nearly full: {depth} of {most} requests wait (--max-queue); "
                    "once it is full, more get 503 at once"
                )
            alerts.append({"kind": "queue-nearly-full", "text": text})
        if self.agreement is not None:
            alerts += [{"kind": "hosts-disagree", "text": text} for text in self.agreement.conflicts()]
        return alerts

    def snapshot(self) -> dict:
        now = self.clock.seconds()
        totals = self.window.totals
        dispatcher = self.dispatcher
        return {
            "balancer": {
                "version": self.version,
                "strategy": dispatcher.strategy.name,
                "started": self.started,
                "uptime": now - self.started,
                "now": now,
                "queue_depth": dispatcher.queue_depth,
                "queue_oldest_wait": dispatcher.oldest_wait(),
                "max_queue": dispatcher.max_queue,
                "rate": self.window.rate(RATE_SPAN),
                "rate_span": RATE_SPAN,
                "answered": totals["answered"],
                "failed": totals["failed"],
                "cancelled": totals["cancelled"],
                "stopping": bool(self.stopping()),
                "actions": self.actions,
                "config": self.config,
                "window": {"span": self.window.span, "bucket": self.window.bucket},
                "states": list(STATE_NAMES),
                "alerts": self.alerts(),
                **self.extra,
            },
            "hosts": [self.host(b) for b in list(self.fleet.backends)],
        }
