"""
``twistd imml-balancer``: its options, and L{makeService}, which builds the
balancer (L{imml.wiring.build}) for twistd.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.python import usage

from . import version_line
from .agreement import INTERVAL, THRESHOLD, WAIT, parse_switch, parse_thresholds
from .backends import BackendListError, parse_backends
from .config import ConfigError, load_config
from .control import remember_command_line
from .endpoints import FORMS, EndpointError, check
from .guard import TokenError, admin_hosts, read_token
from .host import BackendSettings
from .logs import FORMATS
from .strategies import UnknownStrategy, available, strategy_named

DEFAULT_STRATEGY = "shortest-delay"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """
    A size such as C{100M}, C{100MiB}, C{512k} or C{1048576}, in bytes
    (binary units).
    """
    m = _SIZE.match(text)
    if not m:
        raise usage.UsageError(f"{text!r} is not a size (examples: 100M, 512k, 1048576)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()])


#: The options that name somewhere to listen (L{imml.endpoints}).
_ENDPOINTS = ("listen", "admin")


def _check_endpoint(name: str, text: str) -> None:
    """
    Raise L{usage.UsageError} unless C{text} is somewhere option C{name}
    can listen (C{--admin} may also be C{none}).
    """
    if name == "admin" and text == "none":
        return
    try:
        check(text)
    except EndpointError as e:
        raise usage.UsageError(f"{text!r}: {e}") from None


def _positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"{text!r} is not a number") from None
        if value <= 0:
            raise usage.UsageError(f"{text!r} must be greater than zero")
        return value

    return convert


def _usage(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    C{parse}, its C{ValueError} a usage error.
    """

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    return convert


def _log_format(text: str) -> str:
    if text not in FORMATS:
        raise usage.UsageError(f"{text!r} is not a log format: {' or '.join(FORMATS)}")
    return text


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A reverse proxy for Immich's machine-learning service: point Immich's "
        "ML URL at it, and it spreads the requests over every ML host in "
        "--backends, checks their health, and retries failed requests on "
        "another host."
    )
    optParameters = [
        ["listen", "l", "tcp:3003", f"Where to listen: {FORMS}."],
        [
            "backends",
            "b",
            None,
            "The ML hosts: host, host:port, [v6addr]:port or http://host:port, "
            "comma separated, port 3003 when omitted. Default: $IMML_BACKENDS.",
        ],
        ["strategy", "s", DEFAULT_STRATEGY, "How to choose a host: a strategy name or the dotted path of a class."],
        [
            "health-interval",
            None,
            5.0,
            "Seconds between health checks (GET /ping) of a host that is up.",
            _positive(float),
        ],
        [
            "health-down-interval",
            None,
            2.0,
            "Seconds between health checks of a host that is down (never more than --health-interval).",
            _positive(float),
        ],
        [
            "health-fast-interval",
            None,
            1.0,
            "Seconds between health checks of a host that is down while requests wait for a host, "
            "or once it passed a check on its way back up (never more than the other two).",
            _positive(float),
        ],
        ["health-timeout", None, 2.0, "Seconds a health check may take.", _positive(float)],
        ["rise", None, 2, "Passing checks in a row that bring a down host back up.", _positive(int)],
        ["fall", None, 3, "Failing checks in a row that take a host down.", _positive(int)],
        ["connect-timeout", None, 5.0, "Seconds to wait for a connection to a host.", _positive(float)],
        [
            "response-timeout",
            None,
            300.0,
            "Seconds a host has to answer a request completely (a cold model load takes tens of seconds).",
            _positive(float),
        ],
        ["max-body", None, "100M", "Largest request body accepted (e.g. 100M, 512k)."],
        ["max-tries", None, 3, "Most hosts one request is sent to.", _positive(int)],
        [
            "queue-timeout",
            None,
            120.0,
            "Seconds a request may wait for a host with a free slot, or for a host to come up "
            "(keep it well under Immich's 300 s).",
            _positive(float),
        ],
        ["max-queue", None, 1000, "Most requests that may wait at once.", _positive(int)],
        # The agreement check (imml.agreement; docs/agreement.md).
        [
            "agreement",
            None,
            "on",
            "Check that the ML hosts give the same embeddings for fixed inputs, and keep those that disagree "
            "out of the task: on or off.",
            _usage(parse_switch),
        ],
        [
            "agreement-threshold",
            None,
            f"{THRESHOLD:g}",
            "The cosine similarity a host's vectors must reach: one number, or TASK=NUMBER pairs, comma "
            "separated (clip-visual, clip-textual, faces).",
            _usage(parse_thresholds),
        ],
        [
            "agreement-interval",
            None,
            INTERVAL,
            "Seconds between two agreement checks of a host that serves a task.",
            _positive(float),
        ],
        [
            "agreement-wait",
            None,
            WAIT,
            "Seconds the first request of a task waits for the hosts' first agreement check.",
            _positive(float),
        ],
        [
            "config",
            "c",
            None,
            "A TOML file with per-host settings ([[hosts]]: address, slots, weight, tier, tasks, mac, reference) "
            "and balancer options ([balancer]); its hosts replace --backends.",
        ],
        ["wol-broadcast", None, "255.255.255.255", "Where Wake-on-LAN packets go: a broadcast address."],
        ["wol-port", None, 9, "The UDP port of Wake-on-LAN packets.", _positive(int)],
        ["wol-interval", None, 30.0, "Least seconds between two wake-up packets to one host.", _positive(float)],
        ["demo", None, 0, "Start this many local stand-in ML hosts and balance over them.", int],
        # Seeing and steering the fleet (imml.control, imml.admin; docs/admin.md).
        [
            "admin",
            None,
            "tcp:8080:interface=127.0.0.1",
            "Where the status page, /api/status and /metrics listen, as --listen, or none.",
        ],
        [
            "admin-token",
            None,
            None,
            "A token every admin request must carry (Authorization: Bearer, or the status page's sign-in). "
            "Prefer --admin-token-file or $IMML_ADMIN_TOKEN: every user of the machine sees a command line. "
            "Default: $IMML_ADMIN_TOKEN, or the file $IMML_ADMIN_TOKEN_FILE names.",
        ],
        ["admin-token-file", None, None, "A file holding the admin token (its trailing newline is ignored)."],
        [
            "drain-timeout",
            None,
            30.0,
            "Seconds a stopping balancer waits for the requests it accepted.",
            _positive(float),
        ],
        [
            "log-format",
            None,
            "text",
            "How the log reads: text (a line for people) or json (one JSON object per line, for Loki or ELK).",
            _log_format,
        ],
    ]
    optFlags = [["admin-actions", None, "Allow drain, enable and check from the admin page and API."]]
    #: Options given once per value (an C{opt_} method each), and their defaults.
    repeated = {"admin-hosts": ()}

    def __init__(self) -> None:
        super().__init__()
        self.update(self.repeated)
        self.defaults = dict(self)

    def opt_admin_host(self, name: str) -> None:
        """Another name the admin listener answers to (repeatable). Default: $IMML_ADMIN_HOSTS."""
        self["admin-hosts"] = (*self["admin-hosts"], name)

    def _apply_file(self) -> None:
        """
        Read --config: its options apply where the command line left the
        default; its hosts, with their settings, replace --backends.
        """
        known = set(self.defaults) - {"config", "demo", "backends"}
        try:
            config = load_config(self["config"], known)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        for name, value in config.balancer.items():
            if self[name] == self.defaults[name]:
                try:
                    self[name] = self._coerce(name, value)
                except (usage.UsageError, ValueError) as e:
                    raise usage.UsageError(f"{self['config']}: [balancer] {name}: {e}") from None
        self["hosts"] = [(h.address, h.settings) for h in config.hosts]

    def _coerce(self, name: str, value: Any) -> Any:
        """
        A value from the file, as the command line's option C{name} would
        have it.
        """
        if name in self.repeated:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise usage.UsageError(f'{value!r} is not a list of names, e.g. ["nas.local"]')
            return admin_hosts(value)
        for flag in self.optFlags:
            if flag[0] == name:
                if not isinstance(value, bool):
                    raise usage.UsageError(f"{value!r} is not true or false")
                return 1 if value else 0
        for parameter in self.optParameters:
            if parameter[0] == name:
                coerce: Optional[Callable[[str], Any]] = parameter[4] if len(parameter) > 4 else None
                if name in _ENDPOINTS:
                    _check_endpoint(name, str(value))
                return coerce(str(value)) if coerce is not None else str(value)
        raise usage.UsageError("no such option")

    def postOptions(self) -> None:
        remember_command_line(self)
        if self["demo"] < 0:
            raise usage.UsageError("--demo takes a number of stand-in hosts, 0 or more")
        self["hosts"] = []
        if self["config"]:
            self._apply_file()
        self["max-body"] = parse_size(str(self["max-body"]))
        for name, parse in (("agreement", parse_switch), ("agreement-threshold", parse_thresholds)):
            if isinstance(self[name], str):  # the default, as written
                self[name] = parse(self[name])
        self._check_log_format()
        self._admin_guard()
        for name in _ENDPOINTS:
            try:
                _check_endpoint(name, self[name])
            except usage.UsageError as e:
                raise usage.UsageError(f"--{name} {e}") from None
        if not self["demo"] and not self["hosts"]:
            text = self["backends"]
            if text is None:
                text = os.environ.get("IMML_BACKENDS", "")
            try:
                self["hosts"] = [(a, BackendSettings()) for a in parse_backends(text)]
            except BackendListError as e:
                raise usage.UsageError(str(e)) from None
        try:
            strategy_named(self["strategy"])
        except UnknownStrategy as e:
            raise usage.UsageError(str(e)) from None

    def _check_log_format(self) -> None:
        """
        A JSON log is written by the balancer's own observer: twistd's
        C{--syslog} and C{--logger} would make it theirs.
        """
        twistd = getattr(self, "parent", None)
        if self["log-format"] != "text" and twistd is not None:
            for name in ("syslog", "logger"):
                if twistd.get(name):
                    raise usage.UsageError(
                        f"--log-format {self['log-format']} writes to standard output (-n) or --logfile, "
                        f"not with twistd's --{name}"
                    )

    def _admin_guard(self) -> None:
        """
        Check the admin listener's names, and replace C{admin-token} by the
        token in force from whichever source gives it (L{read_token}).
        """
        names, source = self["admin-hosts"], "--admin-host"
        if not names and os.environ.get("IMML_ADMIN_HOSTS"):
            names, source = (os.environ["IMML_ADMIN_HOSTS"],), "$IMML_ADMIN_HOSTS"
        try:
            self["admin-hosts"] = admin_hosts(names)
        except ValueError as e:
            raise usage.UsageError(f"{source}: {e}") from None
        try:
            self["admin-token"] = read_token(self["admin-token"], self["admin-token-file"], os.environ)
        except TokenError as e:
            raise usage.UsageError(str(e)) from None

    def opt_version(self) -> None:
        """Display imml's version (and Twisted's and Python's), then exit."""
        print(version_line())
        raise SystemExit(0)

    def opt_strategies(self) -> None:
        """List the strategies that --strategy accepts, then exit."""
        for name, factory in sorted(available().items()):
            print(f"{name:20} {getattr(factory, 'description', '')}")
        raise SystemExit(0)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from .logs import observer_for
    from .wiring import build

    top = build(options, reactor).service
    top.log_observer = observer_for(getattr(options, "parent", None), options["log-format"])
    return top
