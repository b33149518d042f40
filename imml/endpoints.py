"""
Where the balancer listens (C{--listen}, C{--admin}): the forms an nginx or
HAProxy user writes, and Twisted's server endpoint strings.

    3003                       every IPv4 address, port 3003 (tcp:3003)
    0.0.0.0:3003, *:3003, :3003
    127.0.0.1:8080             one address (tcp:8080:interface=127.0.0.1)
    [::]:3003, [::1]:8080      IPv6 (tcp6:3003:interface=\\:\\:)
    tcp:3003:interface=::      a Twisted endpoint string; an IPv6 interface
                               may be written plainly, its colons unescaped
    unix:/run/imml.sock, ssl:443:privateKey=..., systemd:domain=INET:index=0

L{endpoint_string} turns any of them into Twisted's form, or raises
L{EndpointError} saying what is wrong and which forms are expected.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

#: The forms, for messages.
FORMS = "PORT, ADDRESS:PORT, [IPv6]:PORT or a Twisted endpoint such as tcp:3003:interface=0.0.0.0"

_PORT = re.compile(r"^\d+$")
#: ADDRESS:PORT, the address maybe empty, C{*}, dotted or in brackets.
_ADDRESS_PORT = re.compile(r"^(?P<host>|\*|[0-9.]+|\[[^\]]*\]):(?P<port>[^:]*)$")
#: The endpoint types whose first field is a port.
_PORTED = {"tcp", "tcp6", "ssl"}
_UNESCAPED_COLON = re.compile(r"(?<!\\):")
#: Where a Twisted endpoint's next C{name=value} field begins.
_NEXT_FIELD = re.compile(r":(?=[A-Za-z_]\w*=)")


class EndpointError(ValueError):
    """
    Not a place to listen; the message says why and which forms are
    expected.
    """


def _port(text: str) -> int:
    if not text:
        raise EndpointError("the port is missing")
    if not _PORT.match(text) or int(text) > 65535:
        raise EndpointError(f"the port must be a number from 0 to 65535, not {text!r}")
    return int(text)


def _port_field(fields: str) -> str:
    """
    The port of a C{tcp}, C{tcp6} or C{ssl} endpoint's fields: the first
    one, or the one named C{port=}.
    """
    split = _UNESCAPED_COLON.split(fields)
    for field in split:
        if field.startswith("port="):
            return field[len("port=") :]
    return split[0] if "=" not in split[0] else ""


def _ipv6(text: str) -> str:
    """
    C{text} as an IPv6 address (brackets and a zone allowed), or ''.
    """
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return bare if isinstance(ipaddress.ip_address(bare), ipaddress.IPv6Address) else ""
    except ValueError:
        return ""


def _from_address(host: str, port: str) -> str:
    number = _port(port)
    if host in ("", "*"):
        return f"tcp:{number}"
    if host.startswith("["):
        address = _ipv6(host)
        if not address:
            raise EndpointError(f"{host} is not an IPv6 address in brackets")
        return f"tcp6:{number}:interface={quoteStringArgument(address)}"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise EndpointError(f"{host!r} is not an IPv4 address") from None
    return f"tcp:{number}:interface={host}"


def _escape_interface(text: str) -> str:
    """
    C{text} with a plainly written IPv6 C{interface=} value escaped, as
    Twisted's parser needs it (C{interface=::} becomes C{interface=\\:\\:}).
    """
    key = ":interface="
    start = text.find(key)
    if start < 0 or "\\" in text:
        return text
    start += len(key)
    rest = text[start:]
    ends = [m.start() for m in _NEXT_FIELD.finditer(rest)] + [len(rest)]
    for end in ends:
        address = _ipv6(rest[:end])
        if address:
            return text[:start] + quoteStringArgument(address) + rest[end:]
    return text


def endpoint_string(text: str) -> str:
    """
    The Twisted server endpoint string for C{text}, written in any of the
    forms of this module's docstring.

    @raise EndpointError: when C{text} is none of them.
    """
    text = text.strip()
    try:
        if _PORT.match(text):
            return f"tcp:{_port(text)}"
        m = _ADDRESS_PORT.match(text)
        if m:
            return _from_address(m["host"], m["port"])
        twisted = _escape_interface(text)
        kind, _, rest = twisted.partition(":")
        if kind in _PORTED:
            _port(_port_field(rest))
        return twisted
    except EndpointError as e:
        raise EndpointError(f"{e}; expected {FORMS}") from None


def server_endpoint(reactor: Any, text: str) -> IStreamServerEndpoint:
    """
    The endpoint to listen on for C{text} (see L{endpoint_string}).

    @raise EndpointError: when C{text} is not one, naming why (an unknown
        endpoint type or parameter, a missing certificate file...).
    """
    twisted = endpoint_string(text)
    try:
        return serverFromString(reactor, twisted)
    except Exception as e:
        raise EndpointError(f"{_reason(e)}; expected {FORMS}") from None


def _reason(error: Exception) -> str:
    text = str(error)
    unknown = re.search(r"unexpected keyword argument '(\w+)'", text)
    if unknown:
        return f"unknown parameter {unknown.group(1)!r}"
    if text.startswith("Unknown endpoint type"):
        return "unknown endpoint type " + text.partition(": ")[2]
    return text


def check(text: str) -> None:
    """
    Raise L{EndpointError} unless C{text} is somewhere to listen.  Only
    parses: nothing is opened, and the endpoint made to check it is given
    no reactor.
    """
    server_endpoint(None, text)
