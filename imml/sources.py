"""
Host sources: where the fleet's hosts come from.

A host source finds ML hosts and tells the fleet, the one writer of their
state, the whole list it finds now: C{fleet.offer(source, hosts)}, with
C{source} its name and C{hosts} its C{(BackendAddress, BackendSettings)}
pairs; C{fleet.withdraw(source)} when it is gone.  The fleet does the rest
for every source alike: new hosts join (slow start), known ones keep their
state, those no source offers any more drain and leave.

L{HostSources} is the configuration as a host source: on start and on each
reload it offers the plain entries of C{--backends}, C{IMML_BACKENDS} or the
file's C{[[hosts]]} as L{imml.fleet.CONFIG}, and keeps one
L{imml.dnspool.DnsPool} (a source of its own) per C{dns+} entry: started
when it appears, withdrawn when it goes, its settings changed in place.
The pools' resolver is made when the service starts and dropped when it
stops, with whatever it left pending on the reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from twisted.application import service

from .backends import BackendAddress, DnsName, Entry
from .dnspool import DnsPool, KeptCalls
from .fleet import CONFIG, Fleet
from .host import BackendSettings


class HostSources(service.Service):
    """
    The configuration's hosts, plain and DNS pools, as the fleet's sources.
    """

    def __init__(
        self,
        fleet: Fleet,
        clock: Any,
        dns_interval: float,
        resolver: Callable[[Any], Any],
        extra: Callable[[], list] = list,
    ) -> None:
        """
        @param resolver: makes the resolver of the DNS pools on the reactor
            it is given (L{imml.dnspool.system_resolver}): once running,
            when a pool first needs one; it is dropped, and whatever it left
            on the reactor cancelled, when the service stops.
        @param extra: hosts that are not in the configuration but stay (the
            stand-in hosts of C{--demo}).
        """
        self.fleet, self.clock, self.dns_interval = fleet, clock, dns_interval
        self._make_resolver = resolver
        self._resolver: Any = None
        self._calls: Optional[KeptCalls] = None
        self.extra = extra
        self.pools: dict[DnsName, DnsPool] = {}

    def set(self, entries: Iterable[tuple[Entry, BackendSettings]]) -> None:
        """
        Make the configuration's hosts those of C{entries}, in that order: a
        DNS pool's hosts in its entry's place (taken before its name
        resolves), the plain hosts together in the place of the first of
        them.
        """
        plain, pools, order = [], {}, []
        for entry, settings in entries:
            if isinstance(entry, DnsName):
                pools[entry] = settings
                order.append(str(entry))
            else:
                plain.append((entry, settings))
                if CONFIG not in order:
                    order.append(CONFIG)
        self.fleet.order(order)
        self.fleet.reconfigure(plain + list(self.extra()))
        for entry in [e for e in self.pools if e not in pools]:
            self.pools.pop(entry).stop()
            self.fleet.withdraw(str(entry))
        for entry, settings in pools.items():
            pool = self.pools.get(entry)
            if pool is not None:
                pool.set_settings(settings)
                continue
            pool = self.pools[entry] = DnsPool(entry, settings, self.fleet, None, self.clock, self.dns_interval)
            if self.running:
                pool.start(self._resolver_now())

    def _resolver_now(self) -> Any:
        if self._resolver is None:
            self._calls = KeptCalls(self.clock)
            self._resolver = self._make_resolver(self._calls)
        return self._resolver

    def set_dns_interval(self, seconds: float) -> None:
        """
        Ask every DNS pool's name again at least every C{seconds}.
        """
        self.dns_interval = seconds
        for pool in self.pools.values():
            pool.set_interval(seconds)

    def startService(self) -> None:
        super().startService()
        for pool in self.pools.values():
            pool.start(self._resolver_now())

    def stopService(self) -> None:
        """
        Stop every pool (the questions under way are cancelled) and drop the
        resolver: nothing of theirs stays on the reactor.
        """
        super().stopService()
        for pool in self.pools.values():
            pool.stop()
        calls, self._calls, self._resolver = self._calls, None, None
        if calls is not None:
            calls.cancel()


def plain_hosts(entries: Iterable[tuple[Entry, BackendSettings]]) -> list[tuple[BackendAddress, BackendSettings]]:
    """
    The entries that name one host each (not DNS pools).
    """
    return [(entry, settings) for entry, settings in entries if isinstance(entry, BackendAddress)]


__all__ = ["HostSources", "plain_hosts"]
