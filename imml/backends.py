"""
Backend addresses: parsing the ``IMML_BACKENDS`` list.

An entry is ``host``, ``host:port``, ``[v6addr]``, ``[v6addr]:port``,
``http://host[:port]`` or ``https://host[:port]``; the port is 3003 when
omitted (443 for ``https://``, a host behind a TLS proxy).  Entries are separated
by commas, blanks are ignored.  Names are not resolved here: they are resolved
each time a connection is made, so ``.local`` names and DNS changes just work
(a plain entry is one host, whatever its name resolves to).

An entry written ``dns+NAME[:PORT]`` is a L{DnsName}: a pool of one host per
address the name resolves to (L{imml.dnspool}).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Union

from attrs import frozen

DEFAULT_PORT = 3003
#: The port of an C{https://} entry that names none.
HTTPS_PORT = 443

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


class BackendListError(ValueError):
    """
    A backend list, or one of its entries, cannot be used.  The message names
    the entry and says what is wrong with it.
    """


@frozen
class BackendAddress:
    """
    Where one Immich ML host listens.

    @ivar host: a name, an IPv4 address or an IPv6 address (without brackets).
    @ivar port: the TCP port.
    @ivar scheme: C{"http"}, or C{"https"} for a host reached over TLS
        (then it reads C{https://host:port}).
    """

    host: str
    port: int = DEFAULT_PORT
    scheme: str = "http"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def is_https(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:
        where = f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"
        return "https://" + where if self.scheme == "https" else where

    def url(self, path: bytes = b"/") -> bytes:
        """
        The absolute URL of C{path} on this host, as bytes for
        L{twisted.web.client.Agent}.
        """
        if self.scheme == "https":
            return str(self).encode("ascii") + path
        return b"http://" + str(self).encode("ascii") + path


@frozen
class DnsName:
    """
    A DNS pool (an entry written C{dns+NAME[:PORT]}): one host on C{port}
    for each address C{name} resolves to.
    """

    name: str
    port: int = DEFAULT_PORT
    #: The hosts of a DNS pool speak plain HTTP.
    is_https = False

    def __str__(self) -> str:
        return f"dns+{self.name}:{self.port}"


#: What one entry of a backend list is: a host, or a DNS pool of hosts.
Entry = Union[BackendAddress, DnsName]

#: How a DNS pool's entry begins.
DNS_PREFIX = "dns+"


def _port(text: str, entry: str) -> int:
    if not text.isdigit():
        raise BackendListError(f"backend {entry!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise BackendListError(f"backend {entry!r}: port {port} is not between 1 and 65535")
    return port


def parse_entry(entry: str) -> Entry:
    """
    Parse one entry of a backend list: a host, or a DNS pool (C{dns+NAME}).

    @raise BackendListError: naming C{entry} when it cannot be parsed.
    """
    text = entry.strip()
    if not text.lower().startswith(DNS_PREFIX):
        return _parse(text, entry)
    rest = text[len(DNS_PREFIX) :]
    if not rest:
        raise BackendListError(f"backend {entry!r}: dns+ needs a name, e.g. dns+immich-ml:3003")
    address = _parse(rest, entry)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        return DnsName(address.host, address.port)
    raise BackendListError(f"backend {entry!r}: dns+ takes a name to resolve, not an address")


def parse_backend(entry: str) -> BackendAddress:
    """
    Parse one entry of a backend list that names one host.

    @raise BackendListError: naming C{entry} when it cannot be parsed.
    """
    return _parse(entry.strip(), entry)


def _parse(text: str, original: str) -> BackendAddress:
    if not text:
        raise BackendListError("empty backend entry")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower() if sep else "http"
    if sep:
        if scheme not in ("http", "https"):
            raise BackendListError(f"backend {original!r}: only http:// and https:// are supported")
        text = rest.rstrip("/")
        if "/" in text:
            raise BackendListError(f"backend {original!r}: a backend is a host and port, not a path")
    port = HTTPS_PORT if scheme == "https" else DEFAULT_PORT
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise BackendListError(f"backend {original!r}: '[' without a closing ']'")
        host, tail = text[1:close], text[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise BackendListError(f"backend {original!r}: unexpected {tail!r} after ']'")
            port = _port(tail[1:], original)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BackendListError(f"backend {original!r}: {host!r} is not an IPv6 address") from None
        return BackendAddress(host, port, scheme)
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise BackendListError(
                f"backend {original!r}: write an IPv6 address with a port as [address]:port"
            ) from None
        return BackendAddress(text, port, scheme)
    host, sep, port_text = text.partition(":")
    if sep:
        port = _port(port_text, original)
    if not _HOSTNAME.match(host):
        raise BackendListError(f"backend {original!r}: {host!r} is not a host name or address")
    return BackendAddress(host.lower(), port, scheme)


def parse_backends(text: str) -> list[Entry]:
    """
    Parse a comma-separated backend list such as the ``IMML_BACKENDS``
    variable.  Blank entries are ignored.

    @raise BackendListError: when an entry cannot be parsed, when an entry is
        listed twice, or when the list names no backend at all.
    """
    addresses: list[Entry] = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        address = parse_entry(entry)
        if address in addresses:
            raise BackendListError(f"backend {entry.strip()!r} is listed twice (as {address})")
        addresses.append(address)
    if not addresses:
        raise BackendListError(
            "no backends: set IMML_BACKENDS or --backends to a comma-separated list of "
            "host[:port], https://host[:port] or dns+name[:port] entries"
        )
    return addresses


@frozen
class DnsServer:
    """
    The DNS server that resolves the DNS pools' names (C{--dns-server}).
    """

    address: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


def parse_dns_server(text: str) -> DnsServer:
    """
    A DNS server's address and port from C{ADDRESS[:PORT]} (C{[v6]:PORT}
    for IPv6), port 53 when omitted.

    @raise BackendListError: saying what is wrong.
    """
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, _, tail = host[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise BackendListError(f"{text!r} is not ADDRESS[:PORT]")
            port = tail[1:]
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BackendListError(f"{text!r}: a DNS server is an IP address, with a port if not 53") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BackendListError(f"{text!r}: port {port!r} is not between 1 and 65535")
    return DnsServer(host, int(port))
