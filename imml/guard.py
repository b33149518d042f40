"""
Who may use the admin listener: L{AdminGuard} decides, for each request,
from its C{Host} header and the credentials it carries; L{read_token} finds
the token the operator set.  The web side (the answers: 421, 401, the
sign-in) is L{imml.admin.AdminSite}'s.

- C{Host} must be an address (any: an address is never a rebound name) or
  one of the listener's own
  names: C{localhost}, this machine's host name, or a name the operator
  gives (C{--admin-host}).  A page whose name an attacker pointed at this
  machine's address (DNS rebinding) sends its own name, and is refused.
  A port does not matter.
  A request without C{Host} (HTTP/1.0) passes: every browser sends one.
- Once a token is set, every request must carry it: C{Authorization:
  Bearer <token>}, or the cookie the status page's sign-in sets, which holds
  a digest of the token (L{AdminGuard.cookie}), never the token itself.
  Both are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from typing import Iterable, Mapping, Optional

from attrs import define, field

#: The name of the cookie the status page's sign-in sets.
COOKIE = b"imml-admin"

#: The most bytes a token file may hold.
MAX_TOKEN_FILE = 4096

_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_PORT = re.compile(r"^\d{0,5}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")


class TokenError(ValueError):
    """
    The admin token cannot be used; the message names where it came from,
    never the token.
    """


def _address(text: str) -> Optional[str]:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def host_of(value: str) -> Optional[str]:
    """
    The host a C{Host} header (or an C{--admin-host} entry) names, without
    its port, in one spelling: an address as L{ipaddress} writes it, or a
    name in lower case without a final dot; None when it is neither.

    >>> host_of("[::1]:8080"), host_of("NAS.local.:8080")
    ('::1', 'nas.local')
    """
    text = value.strip().lower()
    if text.startswith("["):
        inner, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and _PORT.match(port[1:]))):
            return None
        return _address(inner)
    if text.count(":") > 1:  # an IPv6 address without brackets
        return _address(text)
    text, _, port = text.partition(":")
    if not _PORT.match(port):
        return None
    address = _address(text)
    if address is not None:
        return address
    name = text[:-1] if text.endswith(".") else text
    return name if _NAME.match(name) else None


def own_names(hostname: str) -> frozenset[str]:
    """
    The names a machine called C{hostname} answers to: C{localhost}, its
    host name, the host name's first label, and that label in C{.local}
    (its mDNS name).
    """
    names = {"localhost"}
    full = host_of(hostname)
    if full is not None and _address(full) is None:
        short = full.split(".")[0]
        names |= {full, short, short + ".local"}
    return frozenset(names)


@define(eq=False)
class AdminGuard:
    """
    Decides who may use the admin listener.

    @ivar own: this machine's names (L{own_names}).
    @ivar extra: the names and addresses the operator allowed besides, as
        L{host_of} spells them.
    @ivar token: the token every request must carry, or None for none.
    """

    own: frozenset[str]
    extra: frozenset[str] = field(default=frozenset(), converter=frozenset)
    token: Optional[str] = field(default=None, repr=False)

    def set_hosts(self, names: Iterable[str]) -> None:
        """
        Allow C{names} (as L{host_of} spells them) besides this machine's own.
        """
        self.extra = frozenset(names)

    def set_token(self, token: Optional[str]) -> None:
        """
        Require C{token} from now on (None: require none).  A cookie set
        for another token no longer counts.
        """
        self.token = token

    def host_allowed(self, values: Optional[list[bytes]]) -> bool:
        """
        Whether a request whose C{Host} headers are C{values} (None when it
        has none) names this listener.
        """
        if not values:
            return True
        if len(values) != 1:
            return False
        try:
            host = host_of(values[0].decode("ascii"))
        except UnicodeDecodeError:
            return False
        if host is None:
            return False
        # An address is never a rebound name: a page of another site can
        # reach this listener by a name of its own only.
        return host in self.own or host in self.extra or _address(host) is not None

    def cookie(self) -> bytes:
        """
        The value of the sign-in cookie for the token in force: a digest of
        the token, so that the token itself is never sent back.
        """
        assert self.token is not None
        return hmac.new(self.token.encode("ascii"), b"imml admin page", hashlib.sha256).hexdigest().encode("ascii")

    def right_token(self, given: bytes) -> bool:
        """
        Whether C{given} is the token (compared in constant time).
        """
        return self.token is not None and hmac.compare_digest(given, self.token.encode("ascii"))

    def authorized(self, authorization: Iterable[bytes], cookie: Optional[bytes]) -> bool:
        """
        Whether a request with these C{Authorization} headers and this
        sign-in cookie may be answered: always when no token is set, else
        when one of them carries the token.
        """
        if self.token is None:
            return True
        for value in authorization:
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and self.right_token(credentials.strip()):
                return True
        return cookie is not None and hmac.compare_digest(cookie, self.cookie())


def admin_hosts(entries: Iterable[str]) -> tuple[str, ...]:
    """
    The names and addresses in C{entries} (each may list several, comma
    separated), as L{host_of} spells them.

    @raise ValueError: naming an entry that is neither a name nor an address.
    """
    hosts = []
    for entry in entries:
        for part in entry.split(","):
            if not part.strip():
                continue
            host = host_of(part)
            if host is None:
                raise ValueError(
                    f"{part.strip()!r} is not a host name or address (examples: nas.local, 192.168.0.10, [fd00::5])"
                )
            hosts.append(host)
    return tuple(dict.fromkeys(hosts))


def _read_token_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_FILE + 1)
    except OSError as e:
        raise TokenError(f"{path}: cannot read the admin token: {e.strerror}") from None
    if len(data) > MAX_TOKEN_FILE:
        raise TokenError(f"{path}: too long for an admin token (over {MAX_TOKEN_FILE} bytes)")
    try:
        return data.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise TokenError(f"{path}: the admin token must be ASCII text") from None


def read_token(value: Optional[str], path: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """
    The admin token, from the first source given: C{value}
    (C{--admin-token}), the file at C{path} (C{--admin-token-file}),
    C{$IMML_ADMIN_TOKEN}, the file C{$IMML_ADMIN_TOKEN_FILE} names; None when
    none is.  A file's trailing newline is not part of the token.

    @raise TokenError: when the token cannot be used (empty, unreadable,
        spaces, or given two ways at one level).
    """
    if value is not None and path is not None:
        raise TokenError("give the admin token one way: --admin-token or --admin-token-file, not both")
    source = "--admin-token"
    if value is None and path is None:
        value, path = environ.get("IMML_ADMIN_TOKEN"), environ.get("IMML_ADMIN_TOKEN_FILE")
        if value is not None and path is not None:
            raise TokenError("set IMML_ADMIN_TOKEN or IMML_ADMIN_TOKEN_FILE, not both")
        source = "$IMML_ADMIN_TOKEN"
    if path is not None:
        value, source = _read_token_file(path), path
    if value is None:
        return None
    if not value:
        raise TokenError(f"{source}: the admin token is empty")
    if not _TOKEN.match(value):
        raise TokenError(f"{source}: the admin token may hold only printable ASCII characters, without spaces")
    return value
