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
from .host import Backend
from .window import RecentWindow

#: A host's state: the first whose test holds.
STATES: tuple[tuple[str, Callable[[object], bool]], ...] = (
    ("draining", lambda b: b.draining),
    ("waking", lambda b: b.waking),
    ("down", lambda b: b.health.state == DOWN),
    ("unknown", lambda b: b.health.state == UNKNOWN),
    ("cold", lambda b: b.cold),
    ("up", lambda b: True),
)
STATE_NAMES = tuple(name for name, _ in STATES)


def host_state(backend: Backend) -> str:
    return next(name for name, test in STATES if test(backend))


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
        return {
            "address": address,
            "state": host_state(backend),
            "health": health.state,
            "since": health.since,
            "last_check": health.last_check,
            "last_result": health.last_result,
            "draining": backend.draining,
            "leaving": backend.leaving,
            "in_flight": backend.in_flight,
            "slots": backend.limit,
            "slots_configured": settings.slots,
            "weight": settings.weight,
            "tier": settings.tier,
            "tasks": sorted(settings.tasks) if settings.tasks is not None else None,
            "served": backend.stats.served,
            "errors": dict(sorted(backend.stats.errors.items())),
            "latency": self.window.latency(address),
            "throughput": self.window.throughput(address),
        }

    def snapshot(self) -> dict:
        now = self.clock.seconds()
        totals = self.window.totals
        return {
            "balancer": {
                "version": self.version,
                "strategy": self.dispatcher.strategy.name,
                "started": self.started,
                "uptime": now - self.started,
                "now": now,
                "queue_depth": self.dispatcher.queue_depth,
                "answered": totals["answered"],
                "failed": totals["failed"],
                "cancelled": totals["cancelled"],
                "stopping": bool(self.stopping()),
                "actions": self.actions,
                "config": self.config,
                "window": {"span": self.window.span, "bucket": self.window.bucket},
                "states": list(STATE_NAMES),
                **self.extra,
            },
            "hosts": [self.host(b) for b in list(self.fleet.backends)],
        }
