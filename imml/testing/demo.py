"""
Several fake hosts in one process: the balancer's demo mode (C{twistd
imml-balancer --demo N}) and tests that need a small fleet on loopback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IReactorTime

from .fakehost import FakeMLHost

__all__ = ["demo_specs", "start_fake_hosts"]


async def start_fake_hosts(
    reactor: IReactorTime,
    specs: Iterable[Mapping[str, Any]],
    endpoint: str = "tcp:0:interface=127.0.0.1",
) -> list[FakeMLHost]:
    """
    Start one listening L{FakeMLHost} per spec.

    @param reactor: A real reactor.
    @param specs: Keyword arguments for L{FakeMLHost} (without C{reactor});
        a spec may hold C{"endpoint"} to override C{endpoint}.
    @param endpoint: Where each host listens (default: an ephemeral port on
        127.0.0.1).
    @return: The hosts, listening (see L{FakeMLHost.address}).  If one fails
        to start, those already started are stopped and the error raised.
    """
    hosts: list[FakeMLHost] = []
    try:
        for spec in specs:
            kwargs = dict(spec)
            where = kwargs.pop("endpoint", endpoint)
            host = FakeMLHost(reactor, **kwargs)
            await host.listen(where)
            hosts.append(host)
    except BaseException:
        await gatherResults([h.stop() for h in hosts], consumeErrors=True)
        raise
    return hosts


_DEMO_SECONDS: dict[str, float] = {"clip-visual": 0.05, "clip-textual": 0.01, "faces": 0.15, "ocr": 0.2}


def demo_specs(count: int) -> list[dict[str, Any]]:
    """
    Specs for L{start_fake_hosts}: C{count} hosts named C{demo-1}... with 2
    slots each, from fast to slow (host M{i} is M{1 + i/2} times slower
    than the first).
    """
    return [
        {
            "name": f"demo-{i + 1}",
            "slots": 2,
            "service_time": {k: v * (1 + i / 2) for k, v in _DEMO_SECONDS.items()},
        }
        for i in range(count)
    ]
