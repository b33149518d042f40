"""
The balancer's configuration file (``--config PATH``, TOML).

``IMML_BACKENDS`` and ``--backends`` name hosts and nothing more; the file
adds per-host settings and the balancer's own.  Example::

    [balancer]              # any long command-line option, without the dashes
    strategy = "least-connections"
    queue-timeout = 90

    [[hosts]]
    address = "mac.local:3003"      # as in IMML_BACKENDS
    name = "mac"                    # what the status page calls it
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

A file that cannot be used raises L{ConfigError} naming the line and the
reason; a running balancer keeps its old configuration then.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any, Optional

from attrs import frozen

from .backends import BackendAddress, BackendListError, parse_backend
from .classify import TASKS
from .host import BackendSettings

_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$", re.I)
_HOST_KEYS = {"address", "name", "slots", "weight", "tier", "tasks", "mac", "reference"}


class ConfigError(ValueError):
    """
    The configuration file cannot be used; the message names the file, the
    line and the reason.
    """


@frozen
class HostConfig:
    address: BackendAddress
    settings: BackendSettings


@frozen
class Config:
    """
    @ivar hosts: the hosts in the file, in order (maybe none).
    @ivar balancer: the C{[balancer]} table: option name to value.
    """

    hosts: tuple[HostConfig, ...] = ()
    balancer: dict = {}


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


def _host(raw: dict, index: int, text: str, path: str) -> HostConfig:
    start = _line_of(text, "[[hosts]]", index)

    def fail(key: Optional[str], reason: str) -> ConfigError:
        line = start
        if key is not None and start is not None:
            lines = text.splitlines()
            for number in range(start, len(lines)):
                stripped = lines[number].strip()
                if stripped.startswith("["):
                    break
                if re.match(rf"{re.escape(key)}\s*=", stripped):
                    line = number + 1
                    break
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
        address = parse_backend(raw["address"])
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
    mac = raw.get("mac")
    if mac is not None and (not isinstance(mac, str) or not _MAC.match(mac)):
        raise fail("mac", f'mac must be a MAC address such as "aa:bb:cc:dd:ee:ff", not {mac!r}')
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip() or not name.isprintable()):
        raise fail("name", f'name must be a non-empty line of text such as "nas", not {name!r}')
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
            reference,
        ),
    )


def parse_config(text: str, path: str = "<config>", known_options: Optional[set] = None) -> Config:
    """
    Parse a configuration file's text.

    @param known_options: the option names the C{[balancer]} table may set.
    @raise ConfigError: naming the line and the reason.
    """
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e).replace("(at end of document)", f"(at the end of the file, line {len(text.splitlines())})")
        raise ConfigError(f"{path}: {message}") from None
    unknown = set(data) - {"hosts", "balancer"}
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"{_where(path, _line_of(text, name))}: unknown section {name!r}; use [balancer] and [[hosts]]"
        )
    raw_hosts = data.get("hosts", [])
    if not isinstance(raw_hosts, list):
        raise ConfigError(f"{_where(path, _line_of(text, 'hosts'))}: hosts must be written as [[hosts]] tables")
    hosts = tuple(_host(raw, i, text, path) for i, raw in enumerate(raw_hosts))
    seen: set = set()
    for i, host in enumerate(hosts):
        if host.address in seen:
            raise ConfigError(f"{_where(path, _line_of(text, '[[hosts]]', i))}: host {host.address} is listed twice")
        seen.add(host.address)
    balancer = data.get("balancer", {})
    if not isinstance(balancer, dict):
        raise ConfigError(f"{path}: balancer must be a table, [balancer]")
    balancer = {k.replace("_", "-"): v for k, v in balancer.items()}
    if known_options is not None:
        for key in balancer:
            if key not in known_options:
                raise ConfigError(
                    f"{_where(path, _line_of(text, key) or _line_of(text, key.replace('-', '_')))}: "
                    f"unknown balancer setting {key!r}"
                )
    return Config(hosts, balancer)


def load_config(path: str, known_options: Optional[set] = None) -> Config:
    """
    Read and parse the configuration file at C{path}.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, path, known_options)
