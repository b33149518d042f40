"""
The balancer's configuration file (``--config PATH``, TOML).

``IMML_BACKENDS`` and ``--backends`` name hosts and nothing more; the file
adds per-host settings and the balancer's own.  Example::

    [balancer]              # any long command-line option, without the dashes
    strategy = "least-connections"
    queue-timeout = 90

    [[hosts]]
    address = "mac.local:3003"      # as in IMML_BACKENDS (dns+NAME: a DNS pool)
    name = "mac"                    # what logs and pages call it
    slots = 4                       # most requests in flight on this host
    weight = 2.0                    # relative share of the work
    tier = 0                        # failover order: lower tiers first
    tasks = ["clip-visual", "clip-textual", "faces"]   # the tasks it serves
    mac = "aa:bb:cc:dd:ee:ff"       # Wake-on-LAN
    reference = true                # its answers are right: others must agree

    [[hosts]]
    address = "nas"
    slots = 1
    tasks = ["ocr"]

    [[hosts]]
    address = "https://gpu.example.net"   # TLS, port 443 unless given
    ca = "friend-ca.pem"            # trust this CA file (default: the system's)
    cert = "client.pem"             # a client certificate (PEM) ...
    key = "client.key"              # ... and its key, when not in cert
    headers = { X-Token = "..." }   # sent with every request; never shown

Relative paths are read from the file's own directory: those of the hosts
and those of C{[balancer]}'s C{ca-file} and C{admin-token-file}.

    [discover]              # hosts found by --discover (discover = ["mdns"])
    exclude = ["Office iMac", "laptop.local"]   # never use these

A discovered host that a C{[[hosts]]} entry names (by its address or host
name, and its port) is pinned: it keeps the entry's settings.

A file that cannot be used raises L{ConfigError} naming the line and the
reason; a running balancer keeps its old configuration then.  The options
read the values of C{[balancer]} themselves: L{Config.where} names the line
of each, for their messages.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any, Mapping, Optional

from attrs import frozen

from .backends import BackendListError, Entry, parse_entry
from .classify import TASKS
from .host import BackendSettings
from .tls import TLSError, load_tls

_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$", re.I)
_HOST_KEYS = {"address", "name", "slots", "weight", "tier", "tasks", "mac", "ca", "cert", "key", "headers", "reference"}
#: The longest host name.
_NAME_LENGTH = 64
_TLS_KEYS = ("ca", "cert", "key")
#: The C{[balancer]} settings that name files.
_PATH_SETTINGS = ("ca-file", "admin-token-file")
#: A header name: an HTTP token.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Headers that frame the request: the balancer's to set, not the file's.
_FRAMING = {"connection", "content-length", "expect", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}


class ConfigError(ValueError):
    """
    The configuration file cannot be used; the message names the file, the
    line and the reason.
    """


@frozen
class HostConfig:
    address: Entry
    settings: BackendSettings


@frozen
class Config:
    """
    @ivar hosts: the hosts in the file, in order (maybe none).
    @ivar balancer: the C{[balancer]} table: option name to value.
    @ivar exclude: the C{[discover]} table's C{exclude}: discovered hosts
        (by service name, host name or address) never used.
    """

    hosts: tuple[HostConfig, ...] = ()
    balancer: dict = {}
    #: The file's name, as given.
    path: str = "<config>"
    #: The line of each C{[balancer]} setting.
    lines: dict = {}
    exclude: tuple[str, ...] = ()

    def where(self, option: str) -> str:
        """
        Where C{[balancer]}'s C{option} is set: the file and the line.
        """
        return _where(self.path, self.lines.get(option))


def _line_of(text: str, needle: str, occurrence: int = 0) -> Optional[int]:
    count = 0
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            if count == occurrence:
                return number
            count += 1
    return None


def _where(path: str, line: Optional[int]) -> str:
    return f"{path}, line {line}" if line else path


def _key_line(text: str, start: int, key: str) -> Optional[int]:
    """
    The line that sets C{key} in the table whose header is line C{start},
    the key written bare or quoted, with dashes or underscores.
    """
    spellings = "|".join(re.escape(k) for k in {key, key.replace("-", "_")})
    setting = re.compile(rf"""^(["']?)({spellings})\1\s*=""")
    lines = text.splitlines()
    for number in range(start, len(lines)):
        stripped = lines[number].strip()
        if stripped.startswith("["):
            break
        if setting.match(stripped):
            return number + 1
    return None


def _host(raw: dict, index: int, text: str, path: str) -> HostConfig:
    start = _line_of(text, "[[hosts]]", index)

    def fail(key: Optional[str], reason: str) -> ConfigError:
        line = start
        if key is not None and start is not None:
            line = _key_line(text, start, key) or start
        return ConfigError(f"{_where(path, line)}: {reason}")

    if not isinstance(raw, dict):
        raise fail(None, "each [[hosts]] entry must be a table")
    unknown = set(raw) - _HOST_KEYS
    if unknown:
        raise fail(
            sorted(unknown)[0], f"unknown host setting {sorted(unknown)[0]!r}; known: {', '.join(sorted(_HOST_KEYS))}"
        )
    if "address" not in raw:
        raise fail(None, 'a host needs an address, e.g. address = "nas:3003"')
    if not isinstance(raw["address"], str):
        raise fail("address", 'address must be a string such as "nas:3003"')
    try:
        address = parse_entry(raw["address"])
    except BackendListError as e:
        raise fail("address", str(e)) from None
    slots = raw.get("slots")
    if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
        raise fail("slots", f"slots must be a whole number of at least 1, not {slots!r}")
    weight = raw.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise fail("weight", f"weight must be a number greater than 0, not {weight!r}")
    tier = raw.get("tier", 0)
    if not isinstance(tier, int) or isinstance(tier, bool) or tier < 0:
        raise fail("tier", f"tier must be a whole number, 0 or more, not {tier!r}")
    tasks = raw.get("tasks")
    if tasks is not None:
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise fail("tasks", "tasks must be a non-empty list of task names")
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise fail("tasks", f"unknown task {bad[0]!r}; tasks are {', '.join(TASKS)}")
        tasks = frozenset(tasks)
    name = raw.get("name")
    if name is not None and (
        not isinstance(name, str) or not name.strip() or len(name) > _NAME_LENGTH or not name.isprintable()
    ):
        raise fail("name", f'name must be a short text such as "nas" (at most {_NAME_LENGTH} characters), not {name!r}')
    mac = raw.get("mac")
    if mac is not None and (not isinstance(mac, str) or not _MAC.match(mac)):
        raise fail("mac", f'mac must be a MAC address such as "aa:bb:cc:dd:ee:ff", not {mac!r}')
    tls = None
    paths = {}
    for key in _TLS_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise fail(key, f'{key} must be the path of a PEM file, such as "{key}.pem"')
        if not address.is_https:
            raise fail(key, f"{key} is for https:// hosts; write the address as https://{address}")
        paths[key] = os.path.join(os.path.dirname(path), value) if path != "<config>" else value
    if address.is_https:
        try:
            tls = load_tls(**paths)
        except TLSError as e:
            raise fail(next((k for k, p in paths.items() if p in str(e)), None), str(e)) from None
    try:
        headers = _headers(raw.get("headers", {}))
    except ValueError as e:
        raise fail("headers", str(e)) from None
    reference = raw.get("reference", False)
    if not isinstance(reference, bool):
        raise fail("reference", f"reference must be true or false, not {reference!r}")
    return HostConfig(
        address,
        BackendSettings(
            float(weight),
            slots,
            tasks,
            tier,
            mac.lower() if mac else None,
            name.strip() if name else None,
            tls,
            headers,
            reference,
        ),
    )


def _headers(raw: object) -> tuple[tuple[bytes, bytes], ...]:
    """
    A host's C{headers} table as C{(name, value)} bytes.  An error names
    the header, never its value (a secret).
    """
    if not isinstance(raw, dict):
        raise ValueError('headers must be a table, such as headers = { X-Token = "..." }')
    headers = []
    for name, value in raw.items():
        if not _TOKEN.match(name):
            raise ValueError(f"headers: {name!r} is not a header name")
        if name.lower() in _FRAMING:
            raise ValueError(f"headers: {name} is set by the balancer itself")
        if not isinstance(value, str):
            raise ValueError(f"headers: the value of {name} must be a string")
        if not value.isascii() or not value.isprintable():
            raise ValueError(f"headers: the value of {name} must be printable ASCII on one line")
        headers.append((name.encode("ascii"), value.encode("ascii")))
    return tuple(headers)


def parse_config(
    text: str, path: str = "<config>", known_options: Optional[set] = None, elsewhere: Mapping[str, str] = {}
) -> Config:
    """
    Parse a configuration file's text.

    @param known_options: the option names the C{[balancer]} table may set.
    @param elsewhere: options it may not set, each with where it belongs.
    @raise ConfigError: naming the line and the reason.
    """
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e).replace("(at end of document)", f"(at the end of the file, line {len(text.splitlines())})")
        raise ConfigError(f"{path}: {message}") from None
    unknown = set(data) - {"hosts", "balancer", "discover"}
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"{_where(path, _line_of(text, name))}: unknown section {name!r}; use [balancer], [[hosts]] and [discover]"
        )
    raw_hosts = data.get("hosts", [])
    if not isinstance(raw_hosts, list):
        raise ConfigError(f"{_where(path, _line_of(text, 'hosts'))}: hosts must be written as [[hosts]] tables")
    hosts = tuple(_host(raw, i, text, path) for i, raw in enumerate(raw_hosts))
    addresses: set = set()
    names: set = set()
    for i, host in enumerate(hosts):
        where = _where(path, _line_of(text, "[[hosts]]", i))
        if host.address in addresses:
            raise ConfigError(f"{where}: host {host.address} is listed twice")
        if host.settings.name in names:
            raise ConfigError(f"{where}: the name {host.settings.name!r} is given to two hosts")
        addresses.add(host.address)
        if host.settings.name is not None:
            names.add(host.settings.name)
    balancer = data.get("balancer", {})
    if not isinstance(balancer, dict):
        raise ConfigError(f"{path}: balancer must be a table, [balancer]")
    balancer = {k.replace("_", "-"): v for k, v in balancer.items()}
    start = _line_of(text, "[balancer]")
    lines = {}
    for key in balancer:
        lines[key] = (_key_line(text, start, key) if start else None) or _line_of(text, key)
        if key in elsewhere:
            raise ConfigError(f"{_where(path, lines[key])}: {key} cannot be set in [balancer]: {elsewhere[key]}")
        if known_options is not None and key not in known_options:
            raise ConfigError(f"{_where(path, lines[key])}: unknown balancer setting {key!r}")
        value = balancer[key]
        if key in _PATH_SETTINGS and isinstance(value, str) and value and path != "<config>":
            balancer[key] = os.path.join(os.path.dirname(path), value)
    return Config(hosts, balancer, path, lines, _exclude(data.get("discover", {}), text, path))


def _exclude(discover: Any, text: str, path: str) -> tuple[str, ...]:
    """
    The C{[discover]} table's C{exclude} list.
    """
    if not isinstance(discover, dict):
        raise ConfigError(f"{_where(path, _line_of(text, 'discover'))}: discover must be a table, [discover]")
    unknown = set(discover) - {"exclude"}
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"{_where(path, _line_of(text, name))}: unknown discover setting {name!r}; known: exclude")
    exclude = discover.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(n, str) and n.strip() for n in exclude):
        raise ConfigError(
            f"{_where(path, _line_of(text, 'exclude'))}: exclude must be a list of host names, "
            f'e.g. exclude = ["Office iMac", "laptop.local"]'
        )
    return tuple(n.strip() for n in exclude)


def load_config(path: str, known_options: Optional[set] = None, elsewhere: Mapping[str, str] = {}) -> Config:
    """
    Read and parse the configuration file at C{path} (see L{parse_config}).
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, path, known_options, elsewhere)
