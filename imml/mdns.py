"""
Finding ML hosts by Bonjour (C{--discover mdns}): L{MdnsBrowser} browses
for C{_immich-ml._tcp} services with python-zeroconf and tells
L{imml.discovery.Discovered} what comes and goes.

zeroconf runs its own threads: its browser calls us on its thread, where
resolving a service (its address, port and TXT records) may block; what
was learned then goes to the reactor thread with C{callFromThread}.
Starting and closing zeroconf (which waits for its threads) run in the
reactor's thread pool, never on the reactor.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from . import MDNS_SERVICE
from .backends import BackendAddress
from .discovery import Discovered, Found

log = Logger()

#: Milliseconds a browser waits for a service's records.
RESOLVE_TIMEOUT = 3000


def instance_name(name: str, service_type: str = MDNS_SERVICE) -> str:
    """
    C{"Studio"} of C{"Studio._immich-ml._tcp.local."}.
    """
    suffix = "." + service_type
    return name[: -len(suffix)] if name.endswith(suffix) else name


def found_of(info: ServiceInfo, service_type: str = MDNS_SERVICE) -> Optional[Found]:
    """
    What a resolved service says: its name, the address to reach it at
    (its first IPv4 address, else its first IPv6 address that is not
    link-local), its other names, its TXT records.  None when it gave no
    usable address.
    """
    if info.port is None:
        return None
    usable = [
        a
        for a in info.parsed_addresses(IPVersion.V4Only) + info.parsed_addresses(IPVersion.V6Only)
        if not (ipaddress.ip_address(a).is_link_local and ":" in a) and not ipaddress.ip_address(a).is_unspecified
    ]
    if not usable:
        return None
    aliases = {a.lower() for a in info.parsed_addresses()}
    if info.server:
        aliases.add(info.server.rstrip(".").lower())
    txt = {}
    for key, value in info.properties.items():
        if isinstance(key, bytes) and isinstance(value, bytes):
            txt[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return Found(instance_name(info.name, service_type), BackendAddress(usable[0], info.port), frozenset(aliases), txt)


class MdnsBrowser(service.Service):
    """
    Browses for ML hosts while it runs, and tells C{discovered}.
    """

    def __init__(self, reactor: Any, discovered: Discovered, service_type: str = MDNS_SERVICE) -> None:
        self.reactor, self.discovered, self.service_type = reactor, discovered, service_type
        self._zeroconf: Optional[Zeroconf] = None
        self._browser: Optional[ServiceBrowser] = None
        self._started: Deferred = succeed(None)

    def _in_pool(self, f: Any, *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def startService(self) -> None:
        super().startService()
        self._started = self._in_pool(self._start)
        self._started.addCallbacks(
            lambda _: log.info("looking for ML hosts by mDNS ({type})", type=self.service_type, imml_event="browsing"),
            lambda f: log.failure("cannot look for ML hosts by mDNS", f, imml_event="browse-failed"),
        )

    def _start(self) -> None:
        # (In the pool.)
        self._zeroconf = Zeroconf()
        self._browser = ServiceBrowser(self._zeroconf, self.service_type, handlers=[self._changed])

    def stopService(self) -> Deferred:
        super().stopService()
        d = self._started.addErrback(lambda _: None)
        d.addCallback(lambda _: self._in_pool(self._close))
        d.addErrback(lambda f: log.failure("closing mDNS failed", f))
        return d

    def _close(self) -> None:
        # (In the pool.)
        browser, zeroconf, self._browser, self._zeroconf = self._browser, self._zeroconf, None, None
        if browser is not None:
            browser.cancel()
        if zeroconf is not None:
            zeroconf.close()

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        # (On zeroconf's browser thread: it may block, the reactor may not.)
        try:
            if state_change is ServiceStateChange.Removed:
                self.reactor.callFromThread(self._tell, "gone", instance_name(name, service_type))
                return
            info = zeroconf.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT)
            found = found_of(info, service_type) if info is not None else None
            if found is None:
                self.reactor.callFromThread(self._unusable, name)
            else:
                self.reactor.callFromThread(self._tell, "appeared", found)
        except Exception as e:  # zeroconf would only log it, on its thread
            self.reactor.callFromThread(self._unusable, name, repr(e))

    def _tell(self, what: str, argument: Any) -> None:
        if self.running:
            getattr(self.discovered, what)(argument)

    def _unusable(self, name: str, reason: str = "no address or port") -> None:
        log.warn(
            "ML host {name} is advertised but cannot be used: {reason}",
            name=name,
            reason=reason,
            imml_event="discovery-unusable",
        )


__all__ = ["MdnsBrowser", "found_of", "instance_name"]
