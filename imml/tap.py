"""
``twistd imml-balancer``: its options, and L{makeService}, which builds the
balancer (L{imml.wiring.build}) for twistd.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
from typing import Any, Callable, Optional

from attrs import evolve
from twisted.application import service
from twisted.python import usage

from . import __version__, version_line
from .agreement import INTERVAL, THRESHOLD, WAIT, parse_switch, parse_thresholds
from .backends import BackendListError, parse_backends, parse_dns_server
from .config import ConfigError, load_config
from .control import remember_command_line
from .discovery import METHODS, parse_methods
from .endpoints import FORMS, EndpointError, check
from .guard import TokenError, admin_hosts, read_token
from .host import BackendSettings
from .logs import FORMATS
from .strategies import UnknownStrategy, available, strategy_named
from .summary import report
from .tls import TLSError, TLSSettings, load_tls
from .values import COMMAND_LINE, DEFAULT, BadValue, Origin, choice, flag, number, reading, size

DEFAULT_STRATEGY = "shortest-delay"
#: The subcommand's name, as twistd knows it (twisted/plugins/imml_balancer.py).
TAPNAME = "imml-balancer"

#: The options that name somewhere to listen (L{imml.endpoints}).
_ENDPOINTS = ("listen", "admin")

#: What the configuration file's C{[balancer]} table cannot set, and
#: where it belongs instead.
_ELSEWHERE = {
    "backends": 'hosts go in [[hosts]] tables, one per host (address = "nas:3003"), which replace --backends',
    "demo": "stand-in hosts are for trying imml out: give --demo on the command line",
    "config": "it names this file: give --config on the command line",
    "check": "give --check on the command line",
}


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


def _number(name: str, default: Any, doc: str, **bounds: Any) -> list:
    """
    The row of a number option: greater than 0 unless C{bounds} say
    otherwise (L{number}).
    """
    return [name, None, default, doc, number(name, **bounds)]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A reverse proxy for Immich's machine-learning service: point Immich's "
        "ML URL at it, and it spreads the requests over its ML hosts (--backends "
        "or $IMML_BACKENDS, the --config file's [[hosts]], each address of a dns+ "
        "name, those --discover finds), checks their health, and retries failed "
        "requests on another host.  --check reads the options and the --config "
        "file, prints the settings in force, and exits."
    )
    optParameters = [
        ["listen", "l", "tcp:3003", f"Where to listen: {FORMS}."],
        [
            "backends",
            "b",
            None,
            "The ML hosts: host, host:port, [v6addr]:port, http://host:port or https://host:port, "
            "or dns+name[:port] for one host per address the name resolves to; "
            "comma separated, port 3003 when omitted (443 for https://). Default: $IMML_BACKENDS.",
        ],
        _number(
            "dns-interval",
            30.0,
            "Most seconds between two resolutions of a dns+ entry's name (sooner when its TTL says so).",
        ),
        [
            "dns-server",
            None,
            None,
            "The DNS server that resolves dns+ entries: ADDRESS[:PORT], port 53 when omitted. "
            "Default: /etc/hosts, then the servers of /etc/resolv.conf.",
            reading("dns-server", parse_dns_server),
        ],
        ["strategy", "s", DEFAULT_STRATEGY, "How to choose a host: a strategy name or the dotted path of a class."],
        _number("health-interval", 5.0, "Seconds between health checks (GET /ping) of a host that is up."),
        _number(
            "health-down-interval",
            2.0,
            "Seconds between health checks of a host that is down (never more than --health-interval).",
        ),
        _number(
            "health-fast-interval",
            1.0,
            "Seconds between health checks of a host that is down while requests wait for a host, "
            "or once it passed a check on its way back up (never more than the other two).",
        ),
        _number("health-timeout", 2.0, "Seconds a health check may take."),
        _number("rise", 2, "Passing checks in a row that bring a down host back up.", whole=True, least=1),
        _number("fall", 3, "Failing checks in a row that take a host down.", whole=True, least=1),
        _number("connect-timeout", 5.0, "Seconds to wait for a connection to a host."),
        _number(
            "response-timeout",
            300.0,
            "Seconds a host has to answer a request completely (a cold model load takes tens of seconds).",
        ),
        [
            "ca-file",
            None,
            None,
            "A PEM file of the CAs that https:// hosts' certificates are verified against "
            "(a host's own ca in --config wins). Default: the system's CAs.",
        ],
        ["max-body", None, "100M", "Largest request body accepted (e.g. 100M, 512k).", size("max-body")],
        _number("max-tries", 3, "Most hosts one request is sent to.", whole=True, least=1),
        _number(
            "queue-timeout",
            120.0,
            "Seconds a request may wait for a host with a free slot, or for a host to come up "
            "(keep it well under Immich's 300 s).",
        ),
        _number("max-queue", 1000, "Most requests that may wait at once.", whole=True, least=1),
        # The agreement check (imml.agreement; docs/agreement.md).
        [
            "agreement",
            None,
            "on",
            "Check that the ML hosts give the same embeddings for fixed inputs, and keep those that disagree "
            "out of the task: on or off.",
            reading("agreement", parse_switch),
        ],
        [
            "agreement-threshold",
            None,
            f"{THRESHOLD:g}",
            "The cosine similarity a host's vectors must reach: one number, or TASK=NUMBER pairs, comma "
            "separated (clip-visual, clip-textual, faces).",
            reading("agreement-threshold", parse_thresholds),
        ],
        _number("agreement-interval", INTERVAL, "Seconds between two agreement checks of a host that serves a task."),
        _number(
            "agreement-wait", WAIT, "Seconds the first request of a task waits for the hosts' first agreement check."
        ),
        [
            "config",
            "c",
            None,
            "A TOML file with per-host settings ([[hosts]]: address, name, slots, weight, tier, tasks, mac, "
            "ca, cert, key, headers, reference) "
            "and balancer options ([balancer]); its hosts replace --backends.",
        ],
        [
            "discover",
            None,
            (),
            f"Also use the ML hosts found on the network this way: {', '.join(METHODS)} "
            "(Bonjour: every imml-mac that advertises _immich-ml._tcp), or nothing.",
            reading("discover", parse_methods),
        ],
        ["wol-broadcast", None, "255.255.255.255", "Where Wake-on-LAN packets go: a broadcast address."],
        _number("wol-port", 9, "The UDP port of Wake-on-LAN packets.", whole=True, least=1, most=65535),
        _number("wol-interval", 30.0, "Least seconds between two wake-up packets to one host."),
        _number("demo", 0, "Start this many local stand-in ML hosts and balance over them.", whole=True, least=0),
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
        _number("drain-timeout", 30.0, "Seconds a stopping balancer waits for the requests it accepted."),
        [
            "log-format",
            None,
            "text",
            "How the log reads: text (a line for people) or json (one JSON object per line, for Loki or ELK).",
            choice("log-format", FORMATS),
        ],
    ]
    optFlags = [
        ["admin-actions", None, "Allow drain, enable and check from the admin page and API."],
        [
            "check",
            None,
            "Read the options, the --config file and the hosts, print the settings in force and exit "
            "(status 0), or print the first error (status 2); listen nowhere.",
        ],
    ]
    #: Options given once per value (an C{opt_} method each), and their defaults.
    repeated = {"admin-hosts": ()}
    #: While the command line is parsed, the options it sets.
    _command_line: Optional[set[str]] = None

    def __init__(self) -> None:
        super().__init__()
        self.update(self.repeated)
        self.defaults = dict(self)
        #: Where each option's value came from (L{Origin}); C{hosts} for
        #: the host list.
        self.origins: dict[str, Origin] = {}

    def __setitem__(self, name: str, value: Any) -> None:
        # The parser sets each option the command line gives (its
        # dispatchers, the opt_ methods): a value equal to the default is
        # given all the same, and wins over the file.
        if self._command_line is not None:
            self._command_line.add(name)
        super().__setitem__(name, value)

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        """
        Parse the command line.  Run by twistd (as its subcommand), a usage
        error is one line on stderr, first and alone, and exit status 2;
        otherwise it is raised (L{usage.UsageError}).
        """
        self._command_line = set()
        if self.parent is None:
            return super().parseOptions(options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write(f"{TAPNAME}: error: {e} (twistd {TAPNAME} --help lists the options)\n")
            raise SystemExit(2) from None

    def opt_admin_host(self, name: str) -> None:
        """Another name the admin listener answers to (repeatable). Default: $IMML_ADMIN_HOSTS."""
        self["admin-hosts"] = (*self["admin-hosts"], name)

    def _apply_file(self) -> None:
        """
        Read --config: its options apply where the command line did not
        give them; its hosts, with their settings, replace --backends.
        """
        try:
            config = load_config(self["config"], set(self.defaults) - set(_ELSEWHERE), _ELSEWHERE)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        for name, value in config.balancer.items():
            if name not in self["given"]:
                origin = Origin("file", config.where(name))
                self[name] = self._coerce(name, value, origin)
                self.origins[name] = origin
                self._valid(name)
        if config.hosts:
            self["hosts"] = [(h.address, h.settings) for h in config.hosts]
            self.origins["hosts"] = Origin("file", config.path)
        self["discover-exclude"] = config.exclude

    def _coerce(self, name: str, value: Any, origin: Origin) -> Any:
        """
        A value from C{origin}, as the command line's option C{name} would
        have it; one that cannot be is a usage error naming where it was
        set.
        """
        try:
            return self._read(name, value)
        except BadValue as e:
            raise usage.UsageError(f"{origin.subject(name)} {e.reason}") from None
        except (usage.UsageError, ValueError) as e:
            raise usage.UsageError(f"{origin.subject(name)}: {e}") from None

    def _read(self, name: str, value: Any) -> Any:
        if name == "discover" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)  # discover = ["mdns"]
        if name in self.repeated:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise usage.UsageError(f'{value!r} is not a list of names, e.g. ["nas.local"]')
            return admin_hosts(value)
        if any(row[0] == name for row in self.optFlags):
            return flag(name, value)
        [row] = [row for row in self.optParameters if row[0] == name]
        read: Optional[Callable[[str], Any]] = row[4] if len(row) > 4 else None
        return read(str(value)) if read is not None else str(value)

    def postOptions(self) -> None:
        given, self._command_line = self._command_line, None
        remember_command_line(self, given or ())
        self.origins = {name: COMMAND_LINE if name in self["given"] else DEFAULT for name in self.defaults}
        self["hosts"] = []
        self["discover-exclude"] = ()
        if self["config"]:
            self._apply_file()
        for row in self.optParameters:
            name = row[0]
            if len(row) > 4 and isinstance(self[name], str):  # a default as written, read as the others
                self[name] = self._coerce(name, self[name], self.origins[name])
        self._check_log_format()
        self._admin_guard()
        for name in (*_ENDPOINTS, "strategy"):
            self._valid(name)
        if not self["hosts"] and self["demo"]:
            self.origins["hosts"] = self.origins["demo"]
        elif not self["hosts"]:
            self._backends()
        self._tls()
        if "mdns" in self["discover"] and importlib.util.find_spec("zeroconf") is None:
            raise usage.UsageError(
                self.origins["discover"].tell("--discover mdns needs python-zeroconf: pip install 'imml[mdns]'")
            )
        if self["check"]:
            print(report(self, __version__))
            raise SystemExit(0)

    def _valid(self, name: str) -> None:
        """
        Refuse the value of option C{name} unless it can be used, naming
        where it was set: where to listen, and the strategy, whose checks
        need more than the value alone.
        """
        origin = self.origins[name]
        if name in _ENDPOINTS:
            try:
                _check_endpoint(name, self[name])
            except usage.UsageError as e:
                raise usage.UsageError(f"{origin.subject(name)} {e}") from None
        elif name == "strategy":
            try:
                strategy_named(self[name])
            except UnknownStrategy as e:
                raise usage.UsageError(origin.tell(str(e))) from None

    def _backends(self) -> None:
        """
        The hosts of C{--backends}, or else of C{$IMML_BACKENDS}.
        """
        text, origin = self["backends"], self.origins["backends"]
        if text is None:
            text = os.environ.get("IMML_BACKENDS", "")
            origin = Origin("environment", "$IMML_BACKENDS") if "IMML_BACKENDS" in os.environ else origin
        self.origins["hosts"] = origin
        if not text.replace(",", "").strip() and self["discover"]:
            return  # with --discover, every host may be found rather than listed
        if not text.replace(",", "").strip():
            raise usage.UsageError(
                origin.tell(
                    "no ML hosts: give --backends or IMML_BACKENDS (host[:port], comma separated), "
                    "[[hosts]] in a --config file, or --demo 3 to try imml with stand-in hosts"
                )
            )
        try:
            self["hosts"] = [(a, BackendSettings()) for a in parse_backends(text)]
        except BackendListError as e:
            raise usage.UsageError(origin.tell(str(e))) from None

    def _tls(self) -> None:
        """
        Give every C{https://} host its TLS settings: its own, trusting
        C{--ca-file}'s CAs (or the system's) unless it names a CA file.
        """
        default = TLSSettings()
        if self["ca-file"]:
            try:
                default = load_tls(self["ca-file"])
            except TLSError as e:
                raise usage.UsageError(self.origins["ca-file"].tell(f"--ca-file: {e}")) from None
        self["tls-default"] = default
        self["hosts"] = [
            (address, evolve(settings, tls=(settings.tls or TLSSettings()).with_ca(default)))
            if address.is_https
            else (address, settings)
            for address, settings in self["hosts"]
        ]

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
            self.origins["admin-hosts"] = Origin("environment", source)
        try:
            self["admin-hosts"] = admin_hosts(names)
        except ValueError as e:
            raise usage.UsageError(f"{source}: {e}") from None
        if self["admin-token"] is None and self["admin-token-file"] is not None:
            self.origins["admin-token"] = self.origins["admin-token-file"]
        elif self["admin-token"] is None:
            for variable in ("IMML_ADMIN_TOKEN", "IMML_ADMIN_TOKEN_FILE"):
                if variable in os.environ:
                    self.origins["admin-token"] = Origin("environment", f"${variable}")
                    break
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
    # What start-up made (modules, classes, the service tree) lives as long
    # as the process: once running, keep it out of the collector's way.  A
    # full collection walks every object tracked, and under load these
    # collections cost several per cent of the balancer's CPU.
    reactor.callWhenRunning(gc.freeze)
    return top
