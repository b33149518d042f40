"""
``twistd imml-balancer``: options and the service tree (L{build}).
"""

from __future__ import annotations

import os
import re

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.error import TimeoutError
from twisted.web._newclient import ResponseNeverReceived
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from . import __version__
from .admin import admin_site
from .backends import BackendListError, parse_backend, parse_backends
from .config import ConfigError, load_config
from .control import GracefulStop, OrderedStop, Reloader, remember_command_line
from .dispatch import Dispatcher
from .fleet import BackendSettings, Fleet
from .forward import Forwarder, ProxySettings
from .health import BadAnswer, HealthChecker
from .logs import OffersLogObserver, observer_for
from .metrics import Metrics
from .metrics import resource as metrics_resource
from .proxy import BalancerResource, BalancerSite, make_agent, make_pool
from .status import Status
from .strategies import UnknownStrategy, available, strategy_named
from .wake import Waker
from .window import RecentWindow

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


def _positive(kind):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"{text!r} is not a number") from None
        if value <= 0:
            raise usage.UsageError(f"{text!r} must be greater than zero")
        return value

    return convert


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A reverse proxy for Immich's machine-learning service: point Immich's "
        "ML URL at it, and it spreads the requests over every ML host in "
        "--backends, checks their health, and retries failed requests on "
        "another host."
    )
    optParameters = [
        ["listen", "l", "tcp:3003", "Where to listen: a Twisted server endpoint string."],
        [
            "backends",
            "b",
            None,
            "The ML hosts: host, host:port, [v6addr]:port or http://host:port, "
            "comma separated, port 3003 when omitted. Default: $IMML_BACKENDS.",
        ],
        ["strategy", "s", DEFAULT_STRATEGY, "How to choose a host: a strategy name or the dotted path of a class."],
        ["health-interval", None, 5.0, "Seconds between health checks (GET /ping) of each host.", _positive(float)],
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
        [
            "config",
            "c",
            None,
            "A TOML file with per-host settings ([[hosts]]: address, slots, weight, tier, tasks, mac) "
            "and balancer options ([balancer]); its hosts replace --backends.",
        ],
        ["wol-broadcast", None, "255.255.255.255", "Where Wake-on-LAN packets go: a broadcast address."],
        ["wol-port", None, 9, "The UDP port of Wake-on-LAN packets.", _positive(int)],
        ["wol-interval", None, 30.0, "Least seconds between two wake-up packets to one host.", _positive(float)],
        ["demo", None, 0, "Start this many local stand-in ML hosts and balance over them.", int],
        # Seeing and steering the fleet (imml.control, imml.admin; docs/admin.md).
        ["admin", None, "tcp:8080:interface=127.0.0.1", "Where the status page, /api/status and /metrics listen: a Twisted server endpoint string, or none."],
        ["drain-timeout", None, 30.0, "Seconds a stopping balancer waits for the requests it accepted.", _positive(float)],
    ]
    optFlags = [["admin-actions", None, "Allow drain, enable and check from the admin page and API."]]

    def __init__(self) -> None:
        super().__init__()
        self.defaults = dict(self)

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
                    dispatch = self._dispatch[name]
                    if isinstance(dispatch, usage.CoerceParameter):
                        dispatch.dispatch(name, str(value))
                    else:
                        dispatch(name, str(value))
                except usage.UsageError as e:
                    raise usage.UsageError(f"{self['config']}: [balancer] {name}: {e}") from None
        self["hosts"] = [(h.address, h.settings) for h in config.hosts]

    def postOptions(self) -> None:
        remember_command_line(self)
        if self["demo"] < 0:
            raise usage.UsageError("--demo takes a number of stand-in hosts, 0 or more")
        self["hosts"] = []
        if self["config"]:
            self._apply_file()
        self["max-body"] = parse_size(str(self["max-body"]))
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

    def opt_version(self) -> None:
        print(f"imml {__version__}")
        raise SystemExit(0)

    def opt_strategies(self) -> None:
        """List the strategies that --strategy accepts, then exit."""
        for name, factory in sorted(available().items()):
            print(f"{name:20} {getattr(factory, 'description', '')}")
        raise SystemExit(0)


def _pinger(reactor, timeout: float):
    """
    A health check: GET /ping on a new connection; any 2xx is healthy, as
    for Immich's own availability check.
    """
    agent = make_agent(reactor, timeout, make_pool(reactor, persistent=False))

    async def ping(backend) -> None:
        d = agent.request(b"GET", backend.address.url(b"/ping"))
        d.addTimeout(timeout, reactor)
        try:
            response = await d
        except ResponseNeverReceived as e:
            if any(f.check(CancelledError) for f in e.reasons):
                raise TimeoutError() from None  # our timeout, not the host's doing
            raise
        body = Deferred()
        response.deliverBody(_Drain(body))
        body.addTimeout(timeout, reactor)
        await body
        if not 200 <= response.code < 300:
            raise BadAnswer(f"status {response.code}")

    return lambda backend: ensureDeferred(ping(backend))


class _Drain(Protocol):
    def __init__(self, done: Deferred) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.done.callback(None)


class _PoolCloser(service.Service):
    def __init__(self, pool: HTTPConnectionPool) -> None:
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


class _DemoHosts(service.Service):
    """
    Local stand-in ML hosts for --demo, started before the balancer's
    fleet is checked.
    """

    log = Logger()

    def __init__(self, reactor, fleet: Fleet, checker: HealthChecker, count: int) -> None:
        self.reactor, self.fleet, self.checker, self.count = reactor, fleet, checker, count
        self.hosts = []

    def startService(self) -> None:
        super().startService()
        from . import testing

        d = ensureDeferred(testing.start_fake_hosts(self.reactor, testing.demo_specs(self.count)))

        def started(hosts):
            self.hosts = hosts
            for host in hosts:
                self.log.info("demo ML host {name} listens on {address}", name=host.name, address=host.address)
            for host in hosts:
                self.fleet.add(parse_backend(host.address))
            self.checker.check_all()

        d.addCallback(started)

    def stopService(self):
        super().stopService()
        return gatherResults([h.stop() for h in self.hosts])


class BalancerService(OffersLogObserver, OrderedStop):
    """
    The balancer's service tree (see L{build}); under twistd it brings its
    own log observer (L{imml.logs}).
    """


def build(options, reactor, signals: bool = True) -> BalancerService:
    """
    The balancer's service tree for parsed C{options}.  Children stop one
    after another in reverse order: the graceful stop first (the listener
    closes, requests drain), then the reloader, the admin listener, the
    health checker, the demo hosts, the waker and the connection pool.
    """
    top = BalancerService()
    settings_of = dict(options["hosts"])
    fleet = Fleet.from_addresses(
        [address for address, _ in options["hosts"]],
        reactor,
        rise=options["rise"],
        fall=options["fall"],
        settings=settings_of.__getitem__,
    )
    settings = ProxySettings(
        max_tries=options["max-tries"],
        response_timeout=options["response-timeout"],
        connect_timeout=options["connect-timeout"],
        max_body=options["max-body"],
    )
    dispatcher = Dispatcher(
        fleet,
        strategy_named(options["strategy"]),
        reactor,
        queue_timeout=options["queue-timeout"],
        max_queue=options["max-queue"],
    )
    pool = make_pool(reactor)
    agent = make_agent(reactor, settings.connect_timeout, pool)
    fresh = make_agent(reactor, settings.connect_timeout, make_pool(reactor, persistent=False))
    window = RecentWindow(reactor)
    metrics = Metrics(fleet, dispatcher, reactor)
    forwarder = Forwarder(fleet, dispatcher, agent, reactor, settings, fresh_agent=fresh, reporters=[window, metrics])
    resource = BalancerResource(fleet, forwarder)
    site = BalancerSite(resource, settings.max_body)
    listener = StreamServerEndpointService(serverFromString(reactor, options["listen"]), site)
    checker = HealthChecker(fleet, _pinger(reactor, options["health-timeout"]), reactor, options["health-interval"])
    status = Status(
        fleet,
        dispatcher,
        window,
        reactor,
        started=reactor.seconds(),
        actions=bool(options["admin-actions"]),
        stopping=lambda: resource.stopping,
        config=options["config"],
    )

    _PoolCloser(pool).setServiceParent(top)
    Waker(
        fleet, reactor, options["wol-broadcast"], options["wol-port"], options["wol-interval"]
    ).service(dispatcher).setServiceParent(top)
    demo = None
    if options["demo"]:
        demo = _DemoHosts(reactor, fleet, checker, options["demo"])
        demo.setServiceParent(top)
    checker.service().setServiceParent(top)
    # The graceful stop, last started, stops the listener first of all.
    listener.setServiceParent(top)
    top.admin = None
    if options["admin"] != "none":
        admin = admin_site(status, checker, metrics_resource(metrics.registry))
        top.admin = StreamServerEndpointService(serverFromString(reactor, options["admin"]), admin)
        top.admin.setServiceParent(top)
    top.reloader = Reloader(
        top,
        options,
        reactor,
        signals,
        extra_hosts=lambda: [(parse_backend(h.address), BackendSettings()) for h in (demo.hosts if demo else [])],
    )
    top.reloader.setServiceParent(top)
    top.stopper = GracefulStop(listener, resource, fleet, dispatcher, reactor, options["drain-timeout"])
    top.stopper.setServiceParent(top)
    top.fleet, top.dispatcher, top.checker, top.site, top.listener = fleet, dispatcher, checker, site, listener
    top.forwarder, top.window, top.metrics, top.status, top.gate = forwarder, window, metrics, status, resource
    return top


def makeService(options) -> service.MultiService:
    from twisted.internet import reactor

    top = build(options, reactor)
    top.log_observer = observer_for(getattr(options, "parent", None))
    return top
