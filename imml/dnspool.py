"""
DNS pools: an entry written ``dns+NAME[:PORT]`` is one ML host per address
NAME resolves to, a host source of the fleet (L{imml.fleet.Fleet.offer}).

L{DnsPool} asks for NAME's IPv4 addresses (its IPv6 ones when it has none:
a dual-stack machine is one host, not two), offers one host per address,
and asks again when the shortest TTL of the answer runs out, or every
C{--dns-interval} seconds, whichever comes first (never more often than
once a second).  A new address joins with slow start, one that is gone
drains and leaves.  An answer that the name has no address (NXDOMAIN, or no
records) is believed: the pool is empty.  No answer (a timeout, a server
failure) changes nothing: the last good set of hosts stays, the failure is
logged once, and the name is asked again within L{RETRY} seconds.

Names are resolved with C{twisted.names}, not the system's C{getaddrinfo}:
it gives each record's TTL, it asks without tying up a thread, and a test
(or an operator) can point it at a DNS server of its own.  It reads the
name servers of C{/etc/resolv.conf} and the names of C{/etc/hosts}, but
not resolv.conf's C{search} list: write the name in full
(C{immich-ml.immich.svc.cluster.local}), except where the DNS server itself
answers short names (Docker's, for a Compose service).

Events: C{dns-resolved}, C{dns-failed}, C{dns-recovered}.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Callable, Optional

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.names import client, dns, error, hosts, resolve
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure

from .backends import BackendAddress, DnsName, DnsServer
from .fleet import Fleet
from .host import BackendSettings

#: The fewest seconds between two questions about one name, whatever the TTL.
MIN_INTERVAL = 1.0
#: The most seconds before a name that could not be resolved is asked again.
RETRY = 5.0
#: Seconds to wait for each try of a question (Twisted's resolver tries again
#: after each, with the next server).
TIMEOUTS = (1, 3, 5)

log = Logger()


@frozen
class Answer:
    """
    What a name resolves to now.

    @ivar addresses: its addresses, sorted.
    @ivar ttl: the shortest TTL of their records, in seconds, or None when
        the name has none.
    """

    addresses: tuple[str, ...]
    ttl: Optional[float]


def system_resolver(
    reactor: Any,
    server: Optional[DnsServer] = None,
    hosts_file: bytes = b"/etc/hosts",
    resolv_conf: str = "/etc/resolv.conf",
) -> ResolverBase:
    """
    The resolver of the DNS pools: the DNS server C{server} if given
    (C{--dns-server}); else the machine's, C{/etc/hosts} then the name
    servers of C{/etc/resolv.conf} (read again when it changes: a call
    delayed on C{reactor} every minute, for as long as the resolver lives;
    see L{KeptCalls}).
    """
    if server is not None:
        return client.Resolver(servers=[(server.address, server.port)], reactor=reactor)
    return resolve.ResolverChain([hosts.Resolver(hosts_file), client.Resolver(resolv=resolv_conf, reactor=reactor)])


class KeptCalls:
    """
    A reactor as a resolver is given it: the calls delayed through it (its
    reading of C{resolv.conf} again, its questions' timeouts) are kept, so
    that those still pending are cancelled (L{cancel}) when the resolver is
    dropped; everything else is the reactor's.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._calls: list[IDelayedCall] = []

    def callLater(self, seconds: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> IDelayedCall:
        call = self._reactor.callLater(seconds, f, *args, **kwargs)
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(call)
        return call

    def cancel(self) -> None:
        """
        Cancel every call delayed through it that is still pending.
        """
        calls, self._calls = self._calls, []
        for call in calls:
            if call.active():
                call.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _records(answers: list, kind: int) -> tuple[list[str], Optional[float]]:
    family = socket.AF_INET if kind == dns.A else socket.AF_INET6
    found, ttl = [], None
    for record in answers:
        if record.type == kind:
            found.append(socket.inet_ntop(family, record.payload.address))
            ttl = record.ttl if ttl is None else min(ttl, record.ttl)
    return found, ttl


def _no_such_name(e: Exception) -> bool:
    """
    Whether C{e} says the name does not exist (NXDOMAIN, or not in
    C{/etc/hosts}), rather than that no answer came (a server failure, a
    refusal).
    """
    return type(e) in (error.DomainError, error.DNSNameError, error.AuthoritativeDomainError)


async def lookup(resolver: Any, name: str) -> Answer:
    """
    The IPv4 addresses C{name} resolves to, or its IPv6 ones when it has
    none.

    @raise Exception: when there is no answer (not when the answer is that
        the name has no address).
    """
    for kind, ask in ((dns.A, resolver.lookupAddress), (dns.AAAA, resolver.lookupIPV6Address)):
        try:
            answers, _, _ = await ask(name, TIMEOUTS)
        except (error.DomainError, error.AuthoritativeDomainError) as e:
            if not _no_such_name(e):
                raise
            return Answer((), None)
        found, ttl = _records(answers, kind)
        if found:
            return Answer(tuple(sorted(set(found), key=ipaddress.ip_address)), ttl)
    return Answer((), None)


@define(eq=False)
class DnsPool:
    """
    One C{dns+NAME[:PORT]} entry: a host source that offers the fleet a
    host for each address NAME resolves to, each with the entry's settings
    and named NAME (or the entry's own C{name}).
    """

    entry: DnsName
    settings: BackendSettings
    fleet: Fleet
    resolver: Any
    clock: Any
    interval: float = 30.0
    _running: bool = False
    _timer: Any = None
    _asking: Optional[Deferred] = None
    _last: Optional[Answer] = None
    _failing: bool = False
    log: Logger = field(factory=lambda: log)

    @property
    def source(self) -> str:
        """
        Its name as a host source: C{dns+NAME:PORT}.
        """
        return str(self.entry)

    def start(self, resolver: Any = None) -> None:
        """
        Ask now, and from then on as the TTLs and the interval say; with
        C{resolver} if given (else the one it was made with).
        """
        if resolver is not None:
            self.resolver = resolver
        self._running = True
        self.resolve()

    def stop(self) -> None:
        """
        Ask no more, and cancel the question under way (the hosts found stay
        in the fleet).
        """
        self._running = False
        self._cancel_timer()
        asking, self._asking = self._asking, None
        if asking is not None:
            asking.cancel()

    def set_interval(self, seconds: float) -> None:
        """
        Ask at least every C{seconds} from now on.
        """
        self.interval = seconds
        if self._running and self._asking is None:
            self._schedule(self._next())

    def set_settings(self, settings: BackendSettings) -> None:
        """
        The entry's settings (a reload): if they changed, its hosts take
        them now.
        """
        if settings == self.settings:
            return
        self.settings = settings
        if self._last is not None:
            self._offer(self._last)

    def resolve(self) -> Deferred:
        """
        Ask for the name's addresses now (unless a question is under way),
        offer the fleet what the answer says, and set the time to ask again.
        """
        self._cancel_timer()
        if self._asking is None:
            self._asking = ensureDeferred(lookup(self.resolver, self.entry.name))
            self._asking.addCallbacks(self._answered, self._failed).addErrback(
                lambda f: self.log.failure("resolving {source} failed unexpectedly", f, source=self.source)
            )
        return self._asking

    def _answered(self, answer: Answer) -> None:
        self._asking = None
        if not self._running:
            return
        if self._failing:
            self._failing = False
            self.log.info("{source} resolves again", source=self.source, imml_event="dns-recovered")
        if answer.addresses != (self._last.addresses if self._last is not None else None):
            self.log.info(
                "{source} resolves to {addresses}",
                source=self.source,
                addresses=list(answer.addresses),
                ttl=answer.ttl,
                imml_event="dns-resolved",
            )
        self._last = answer
        self._offer(answer)
        self._schedule(self._next())

    def _failed(self, failure: Failure) -> None:
        self._asking = None
        if not self._running:
            return
        if not self._failing:
            self._failing = True
            kept = list(self._last.addresses) if self._last is not None else []
            self.log.warn(
                "{source} does not resolve ({reason}); keeping its {count} hosts {addresses}",
                source=self.source,
                reason=failure.getErrorMessage() or failure.type.__name__,
                count=len(kept),
                addresses=kept,
                imml_event="dns-failed",
            )
        self._schedule(min(self.interval, RETRY))

    def _next(self) -> float:
        ttl = self._last.ttl if self._last is not None else None
        seconds = self.interval if ttl is None else min(self.interval, ttl)
        return max(seconds, MIN_INTERVAL)

    def _offer(self, answer: Answer) -> None:
        settings = self.settings
        if settings.name is None:
            settings = evolve(settings, name=self.entry.name)
        port = self.entry.port
        self.fleet.offer(self.source, [(BackendAddress(a, port), settings) for a in answer.addresses])

    def _schedule(self, seconds: float) -> None:
        self._cancel_timer()
        if self._running:
            self._timer = self.clock.callLater(seconds, self.resolve)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


__all__ = ["Answer", "DnsPool", "KeptCalls", "lookup", "system_resolver"]
