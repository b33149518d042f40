"""
What the balancer says of itself: the line it logs once it listens
(L{StartLine}, C{imml_event="start"}), and the settings in force that
C{--check} prints (L{report}).

Event: C{start}.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from . import __version__
from .endpoints import endpoint_string
from .services import Listener
from .values import size_text

log = Logger()

#: Options whose value is a secret: only whether one is set is shown.
SECRET = {"admin-token"}


def address_text(address: Any) -> str:
    """
    A listening port's address as nginx writes it: C{0.0.0.0:3003},
    C{[::]:3003}, C{unix:/run/imml.sock}.
    """
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name.decode() if isinstance(address.name, bytes) else address.name
        return f"unix:{name}"
    return str(address)


def url_of(place: str, address: Any) -> str:
    """
    The URL of a page served at C{address}, listened on as C{place} says
    (C{https} for a C{ssl:} endpoint); an address that is not TCP is given
    as it is.
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return address_text(address)
    scheme = "https" if endpoint_string(place).startswith("ssl:") else "http"
    return f"{scheme}://{address_text(address)}/"


def host_text(name: Optional[str], address: str) -> str:
    """
    A host as logs name it: C{nas (192.168.0.5:3003)}, or its address
    alone when the configuration gives it no name.
    """
    return f"{name} ({address})" if name else address


class StartLine(service.Service):
    """
    Logs one line once the balancer listens (C{imml_event="start"}): its
    version, where it listens (the port opened: useful with port 0), the
    admin URL or none, the strategy, every host with its name, and the
    configuration file or none.  A listener that cannot listen says so
    itself (L{imml.services.ListensOrExits}); then this says nothing.
    """

    def __init__(
        self,
        listener: Listener,
        admin: Optional[Listener],
        hosts: Callable[[], list[tuple[Optional[str], str]]],
        strategy: str,
        config: Optional[str],
        ready: Sequence[Callable[[], Deferred[Any]]] = (),
    ) -> None:
        """
        @param hosts: the hosts as they are then: name (or None) and
            address.
        @param ready: what else to wait for (the stand-in hosts of
            C{--demo}).
        """
        self.listener, self.admin, self.hosts = listener, admin, hosts
        self.strategy, self.config, self.ready = strategy, config, ready
        self._waiting: Optional[Deferred[Any]] = None

    def startService(self) -> None:
        super().startService()
        listeners = [self.listener.listening()]
        if self.admin is not None:
            listeners.append(self.admin.listening())
        self._waiting = gatherResults([*listeners, *(ready() for ready in self.ready)], consumeErrors=True)
        self._waiting.addCallbacks(self._say, lambda failure: None)

    def stopService(self) -> None:
        super().stopService()
        if self._waiting is not None:
            self._waiting.cancel()

    def _say(self, results: list) -> None:
        self._waiting = None
        ports = results[: 2 if self.admin is not None else 1]
        admin = "none"
        if self.admin is not None:
            admin = url_of(self.admin.description, ports[1].getHost())
        hosts = self.hosts()
        log.info(
            "imml {version} listening on {listen}, admin {admin}, strategy {strategy}, hosts: {host_list}, "
            "config {config}",
            version=__version__,
            listen=address_text(ports[0].getHost()),
            admin=admin,
            strategy=self.strategy,
            host_list=", ".join(host_text(name, address) for name, address in hosts) or "none",
            hosts=[{"name": name, "address": address} for name, address in hosts],
            config=self.config or "none",
            imml_event="start",
        )


def _value_text(options: Any, name: str, flags: set) -> str:
    value = options[name]
    if name in SECRET:
        return "set" if value is not None else "none"
    if name in flags:
        return "on" if value else "off"
    if value is None:
        return "none"
    if name == "max-body":
        return size_text(value)
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _settings_text(settings: Any) -> str:
    return "; ".join(
        [
            f"weight {settings.weight:g}",
            f"slots {settings.slots if settings.slots is not None else 'learned'}",
            f"tier {settings.tier}",
            f"tasks {', '.join(sorted(settings.tasks)) if settings.tasks is not None else 'all'}",
            *([f"mac {settings.mac}"] if settings.mac else []),
        ]
    )


def report(options: Any, version: str) -> str:
    """
    What C{--check} prints: every option (in the order of C{--help}), its
    value in force, and where that came from; then the hosts.  A secret's
    value is never shown.

    @param options: the parsed L{imml.tap.Options}, with their C{origins}.
    """
    flags = {row[0] for row in options.optFlags}
    names = [row[0] for row in options.optParameters] + [*options.repeated] + sorted(flags - {"check"})
    rows = [("option", "value", "from")]
    rows += [(name, _value_text(options, name, flags), str(options.origins[name])) for name in names]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"imml {version}: the configuration is valid; the settings in force:"]
    lines += [f"  {row[0]:{width[0]}}  {row[1]:{width[1]}}  {row[2]}".rstrip() for row in rows]
    hosts = options["hosts"]
    origin = options.origins.get("hosts", "")
    if not hosts and options["demo"]:
        lines.append(f"hosts: {options['demo']} stand-in hosts, started with the balancer (from {origin})")
        return "\n".join(lines)
    lines.append(f"hosts ({len(hosts)}, from {origin}):")
    named = [(host_text(settings.name, str(address)), settings) for address, settings in hosts]
    width_host = max(len(text) for text, _ in named)
    lines += [f"  {text:{width_host}}  {_settings_text(settings)}" for text, settings in named]
    if options["demo"]:
        lines.append(f"  and {options['demo']} stand-in hosts, started with the balancer (--demo)")
    return "\n".join(lines)
