"""
Backend addresses: parsing the ``IMML_BACKENDS`` list.

An entry is ``host``, ``host:port``, ``[v6addr]``, ``[v6addr]:port``,
``http://host[:port]`` or ``https://host[:port]``; the port is 3003 when
omitted (443 for ``https://``, a host behind a TLS proxy).  Entries are separated
by commas, blanks are ignored.  Names are not resolved here: they are resolved
each time a connection is made, so ``.local`` names and DNS changes just work.
"""

from __future__ import annotations

import ipaddress
import re

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


def _port(text: str, entry: str) -> int:
    if not text.isdigit():
        raise BackendListError(f"backend {entry!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise BackendListError(f"backend {entry!r}: port {port} is not between 1 and 65535")
    return port


def parse_backend(entry: str) -> BackendAddress:
    """
    Parse one entry of a backend list.

    @raise BackendListError: naming C{entry} when it cannot be parsed.
    """
    original = entry
    text = entry.strip()
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


def parse_backends(text: str) -> list[BackendAddress]:
    """
    Parse a comma-separated backend list such as the ``IMML_BACKENDS``
    variable.  Blank entries are ignored.

    @raise BackendListError: when an entry cannot be parsed, when an entry is
        listed twice, or when the list names no backend at all.
    """
    addresses: list[BackendAddress] = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        address = parse_backend(entry)
        if address in addresses:
            raise BackendListError(f"backend {entry.strip()!r} is listed twice (as {address})")
        addresses.append(address)
    if not addresses:
        raise BackendListError(
            "no backends: set IMML_BACKENDS or --backends to a comma-separated list of host[:port] "
            "(or https://host[:port]) entries"
        )
    return addresses
