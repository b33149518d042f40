"""
Hosts found on the network rather than written down (C{--discover}).

A browser (L{imml.mdns}) tells L{Discovered} what it sees, on the reactor
thread: a service appeared (L{Found}: its name, where it listens, its
other names and what it says of itself) or is gone (its name).
L{Discovered} keeps that list, and each change offers the fleet the hosts
found as a host source of their own (L{DISCOVERED}, through
L{imml.fleet.Fleet.offer}, as the configuration and DNS pools are): a host
that appears joins (unknown until checked, then with slow start), one that
goes drains and leaves once its last request is answered.

The configuration decides what of it is used (L{Discovered.hosts}):

- a host the configuration lists (C{[[hosts]]}, C{--backends}) by one of
  the found host's addresses or its host name, and the same port, is
  I{pinned}: it stays a configured host, with its settings, whether it is
  advertised or not; discovering it adds nothing;
- a host whose service name, host name or address is in C{[discover]
  exclude} is not used.

Events: C{discovered}, C{discovery-gone}.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from attrs import define, field, frozen
from twisted.logger import Logger

from .backends import BackendAddress
from .host import BackendSettings

log = Logger()

#: The ways hosts can be discovered (C{--discover}).
METHODS = ("mdns",)


def parse_methods(text: str) -> tuple[str, ...]:
    """
    The methods of C{--discover}: names separated by commas (or none).

    @raise ValueError: naming an unknown method.
    """
    methods = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"{method!r} is not a discovery method: {', '.join(METHODS)}")
    return methods


@frozen
class Found:
    """
    One ML host a browser found.

    @ivar name: the name it advertises itself under (unique among those
        found: the browser's key).
    @ivar address: where it is reached.
    @ivar aliases: its other names: its host name (C{studio.local}) and
        every address it advertised, lower case.
    @ivar txt: what it says of itself (C{version}, C{providers}).
    """

    name: str
    address: BackendAddress
    aliases: frozenset[str] = frozenset()
    txt: Mapping[str, str] = field(factory=dict)

    def called(self, names: Iterable[str]) -> bool:
        """
        Whether any of C{names} names this host: its service name (any
        case), its host name or one of its addresses, or its address with
        its port.
        """
        own = {self.name.lower(), str(self.address).lower(), self.address.host.lower()} | self.aliases
        return any(n.lower() in own for n in names)

    def listed_as(self, address: BackendAddress) -> bool:
        """
        Whether a configured host at C{address} is this one.
        """
        return address.port == self.address.port and (
            address.host == self.address.host or address.host.lower() in self.aliases
        )


#: The host source of the hosts found on the network (L{imml.fleet.Fleet.offer}).
DISCOVERED = "discovered"


@define(eq=False)
class Discovered:
    """
    The hosts the browsers see now.

    @ivar refresh: offers the fleet the hosts found (L{hosts}) again, as
        the host source L{DISCOVERED}; called with why hosts may leave.
    """

    refresh: Callable[[str], None]
    _found: dict[str, Found] = field(factory=dict)

    def appeared(self, found: Found) -> None:
        """
        C{found} is advertised (it is new, or moved).
        """
        before = self._found.get(found.name)
        if before == found:
            return
        self._found[found.name] = found
        log.info(
            "found ML host {name} at {address} (imml {version}, providers {providers})",
            name=found.name,
            address=str(found.address),
            version=found.txt.get("version", "?"),
            providers=found.txt.get("providers", "?"),
            imml_event="discovered",
        )
        self.refresh(f"{found.name} moved to {found.address}" if before is not None else "no longer advertised")

    def gone(self, name: str) -> None:
        """
        The host advertised as C{name} no longer is.
        """
        found = self._found.pop(name, None)
        if found is None:
            return
        log.info(
            "ML host {name} at {address} is no longer advertised",
            name=name,
            address=str(found.address),
            imml_event="discovery-gone",
        )
        self.refresh("no longer advertised")

    def hosts(
        self, configured: Iterable[tuple[BackendAddress, BackendSettings]], exclude: Iterable[str] = ()
    ) -> list[tuple[BackendAddress, BackendSettings]]:
        """
        The found hosts the fleet takes besides C{configured}: not pinned
        (listed there), not excluded, in the order of their names, named
        on the status page as they advertise themselves.
        """
        # (a DNS pool, C{dns+NAME}, pins nothing: it finds its own hosts)
        listed = [address for address, _ in configured if isinstance(address, BackendAddress)]
        exclude = list(exclude)
        taken: list[tuple[BackendAddress, BackendSettings]] = []
        for name in sorted(self._found):
            found = self._found[name]
            if found.called(exclude) or any(found.listed_as(a) for a in listed):
                continue
            if any(address == found.address for address, _ in taken):
                continue
            taken.append((found.address, BackendSettings(name=found.name)))
        return taken

    @property
    def found(self) -> list[Found]:
        return [self._found[name] for name in sorted(self._found)]


__all__ = ["DISCOVERED", "METHODS", "Discovered", "Found", "parse_methods"]
