"""
Wiring: the balancer's components, built once from its options into a
typed record (L{Balancer}) and a service tree.

Each component owns its state and its settings; a reload changes a setting
through the component that owns it (L{appliers}).  The tree's children stop
one after another, last started first: the graceful stop (the listener
closes, requests drain), the reloader, the start-up line, the admin
listener, the mDNS browser (C{--discover mdns}), the host sources (the DNS
pools), the health checker, the demo hosts, the waker, the agreement check
and the connection pool.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional

from attrs import frozen
from twisted.application import service
from twisted.internet.defer import Deferred, ensureDeferred, fail, gatherResults
from twisted.logger import Logger

from .admin import admin_site
from .agreement import Agreement
from .backends import parse_backend
from .control import GracefulStop, OrderedStop, Reloader
from .discovery import DISCOVERED, Discovered
from .dispatch import Dispatcher
from .dnspool import system_resolver
from .endpoints import server_endpoint
from .fleet import BackendSettings, Fleet
from .forward import Forwarder, ForwardSettings
from .guard import AdminGuard, own_names
from .health import HealthChecker
from .logs import OffersLogObserver
from .metrics import Metrics
from .metrics import resource as metrics_resource
from .requestlog import RequestLog
from .services import Listener, ListensOrExits, Running
from .site import BalancerResource, BalancerSite
from .sources import HostSources, plain_hosts
from .status import Status
from .strategies import strategy_named
from .summary import StartLine
from .tls import HostsPolicy, TLSSettings
from .trim import give_back_free_memory
from .upstream import Upstream, make_agent, make_host_agent, make_pinger, make_pool
from .wake import Waker
from .window import RecentWindow

log = Logger()


class BalancerService(OffersLogObserver, ListensOrExits, OrderedStop):
    """
    The balancer's service tree (see L{build}); under twistd it brings its
    own log observer (L{imml.logs}), exits when it cannot listen
    (L{ListensOrExits}), and stops at once on a second C{SIGINT} or
    C{SIGTERM} (C{hurry}, L{OrderedStop}).
    """

    def __init__(self, reactor: Any, hurry: Optional[Callable[[str], None]]) -> None:
        super().__init__(reactor, hurry)
        self.reactor = reactor


@frozen
class Balancer:
    """
    A balancer's components, as L{build} wired them.
    """

    fleet: Fleet
    dispatcher: Dispatcher
    forwarder: Forwarder
    agreement: Agreement
    checker: HealthChecker
    waker: Waker
    window: RecentWindow
    metrics: Metrics
    status: Status
    guard: AdminGuard
    front: BalancerResource
    site: BalancerSite
    listener: Listener
    admin: Optional[Listener]
    stopper: GracefulStop
    reloader: Reloader
    sources: HostSources
    demo: Optional[_DemoHosts]
    discovered: Discovered
    service: BalancerService


class _DemoHosts(service.Service):
    """
    Local stand-in ML hosts for --demo, started before the balancer's
    fleet is checked; once they listen they join the fleet (and, as any
    host that joins, are checked at once).
    """

    def __init__(self, reactor: Any, fleet: Fleet, count: int) -> None:
        self.reactor, self.fleet, self.count = reactor, fleet, count
        self.hosts: list = []
        self._started: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        from . import testing

        d = ensureDeferred(testing.start_fake_hosts(self.reactor, testing.demo_specs(self.count)))

        def started(hosts: list) -> None:
            self.hosts = hosts
            for host in hosts:
                log.info("demo ML host {name} listens on {address}", name=host.name, address=host.address)
            for address, settings in self.addresses():
                self.fleet.add(address, settings)

        d.addCallback(started).chainDeferred(self._started)

    def joined(self) -> Deferred[None]:
        """
        Fires once the hosts have joined the fleet (or could not start).
        """
        joined: Deferred[None] = Deferred()

        def pass_on(result: Any) -> Any:
            joined.callback(None)
            return result

        self._started.addBoth(pass_on)
        return joined

    def stopService(self) -> Deferred:
        super().stopService()
        return gatherResults([h.stop() for h in self.hosts])

    def addresses(self) -> list:
        return [(parse_backend(h.address), BackendSettings(name=h.name)) for h in self.hosts]


def _listener(reactor: Any, option: str, text: str, factory: Any) -> Listener:
    """
    The listener for option C{option} (its service name), at C{text}.
    """
    listener = Listener(server_endpoint(reactor, text), factory, text)
    listener.setName(option)
    return listener


def _mover(reactor: Any, listener: Optional[Listener]) -> Callable[[str], Deferred[None]]:
    """
    What moves C{listener} to a new place when a reload changes it; the
    admin listener is turned on or off only by a restart.
    """

    def move(text: str) -> Deferred[None]:
        if listener is None or text == "none":
            return fail(ValueError("turning the admin listener on or off needs a restart"))
        try:
            endpoint = server_endpoint(reactor, text)
        except ValueError as e:
            return fail(e)
        return listener.move(endpoint, text)

    return move


def _tls_of(fleet: Fleet) -> Callable[[str, int], Optional[TLSSettings]]:
    """
    The TLS settings of the C{https://} host at a name and port, as the
    fleet has them now (a reload may change them).
    """

    def settings_for(host: str, port: int) -> Optional[TLSSettings]:
        for backend in fleet.backends:
            address = backend.address
            if address.is_https and address.port == port and address.host == host:
                return backend.settings.tls
        return None

    return settings_for


def appliers(
    agreement: Agreement,
    dispatcher: Dispatcher,
    forwarder: Forwarder,
    site: BalancerSite,
    fleet: Fleet,
    checker: HealthChecker,
    stopper: GracefulStop,
    status: Status,
    guard: AdminGuard,
    sources: HostSources,
    listeners: dict[str, Callable[[str], Deferred[None]]],
) -> dict[str, Callable[[Any], Any]]:
    """
    The options a reload applies to a running balancer, each through the
    component that owns it.

    @param listeners: what moves each listener (by option) elsewhere.
    """
    return {
        **listeners,
        "strategy": lambda name: dispatcher.set_strategy(strategy_named(name)),
        "agreement": agreement.set_on,
        "agreement-threshold": agreement.set_thresholds,
        "agreement-interval": agreement.set_interval,
        "agreement-wait": agreement.set_wait,
        "queue-timeout": dispatcher.set_queue_timeout,
        "max-queue": dispatcher.set_max_queue,
        "max-tries": forwarder.set_max_tries,
        "response-timeout": forwarder.set_response_timeout,
        "max-body": site.set_max_body,
        "rise": lambda rise: fleet.set_thresholds(rise, fleet.fall),
        "fall": lambda fall: fleet.set_thresholds(fleet.rise, fall),
        "health-interval": checker.set_interval,
        "health-down-interval": checker.set_down_interval,
        "health-fast-interval": checker.set_fast_interval,
        "drain-timeout": stopper.set_timeout,
        "admin-actions": lambda on: status.set_actions(bool(on)),
        "admin-hosts": guard.set_hosts,
        # The token in force, from whichever source gives it (the options
        # resolve it); a new file path matters only through that token.
        "admin-token": guard.set_token,
        "admin-token-file": lambda path: None,
        # The CAs of https:// hosts go with each host's settings.
        "ca-file": lambda path: None,
        "dns-interval": sources.set_dns_interval,
    }


def build(options: Any, reactor: Any, signals: bool = True) -> Balancer:
    """
    The balancer for parsed C{options} (L{imml.tap.Options}): its components
    and their service tree, not yet started.
    """
    plain = plain_hosts(options["hosts"])
    fleet = Fleet.from_addresses(
        [address for address, _ in plain],
        reactor,
        rise=options["rise"],
        fall=options["fall"],
        settings=dict(plain).__getitem__,
    )
    connect_timeout = options["connect-timeout"]
    tls = HostsPolicy(_tls_of(fleet))
    hosts_agent = make_host_agent(reactor, connect_timeout, tls)
    upstream = Upstream(
        hosts_agent,
        fresh_agent=make_agent(reactor, connect_timeout, make_pool(reactor, persistent=False), tls),
    )
    # The agreement check: the dispatcher asks it which hosts may serve.
    agreement = Agreement(
        fleet,
        upstream,
        reactor,
        on=options["agreement"],
        thresholds=options["agreement-threshold"],
        interval=options["agreement-interval"],
        wait=options["agreement-wait"],
    )
    dispatcher = Dispatcher(
        fleet,
        strategy_named(options["strategy"]),
        reactor,
        queue_timeout=options["queue-timeout"],
        max_queue=options["max-queue"],
        gate=agreement,
    )
    window = RecentWindow(reactor)
    metrics = Metrics(fleet, dispatcher, reactor, agreement=agreement)
    request_log = RequestLog()
    forwarder = Forwarder(
        fleet,
        dispatcher,
        upstream,
        reactor,
        ForwardSettings(options["max-tries"], options["response-timeout"]),
        reporters=[request_log, window, metrics],
    )
    front = BalancerResource(fleet, forwarder)
    # What the site answers itself (refusals, /ping) goes to the request log
    # only: the metrics and the status page count forwarded requests.
    site = BalancerSite(front, options["max-body"], report=request_log.request_finished)
    listener = _listener(reactor, "listen", options["listen"], site)
    pinger_agent = make_agent(reactor, options["health-timeout"], make_pool(reactor, persistent=False), tls)
    checker = HealthChecker(
        fleet,
        make_pinger(pinger_agent, reactor, options["health-timeout"]),
        reactor,
        options["health-interval"],
        options["health-down-interval"],
        options["health-fast-interval"],
        waiting=lambda: dispatcher.queue_depth > 0,
    )
    dispatcher.when_waiting(checker.requests_wait)
    waker = Waker(fleet, reactor, options["wol-broadcast"], options["wol-port"], options["wol-interval"])
    dispatcher.when_waiting(waker.waiting)
    status = Status(
        fleet,
        dispatcher,
        window,
        reactor,
        started=reactor.seconds(),
        actions=bool(options["admin-actions"]),
        stopping=lambda: front.stopping,
        config=options["config"],
        agreement=agreement,
    )
    guard = AdminGuard(own_names(socket.gethostname()), options["admin-hosts"], options["admin-token"])
    stopper = GracefulStop(listener, front, fleet, dispatcher, reactor, options["drain-timeout"])
    demo = _DemoHosts(reactor, fleet, options["demo"]) if options["demo"] else None
    sources = HostSources(
        fleet,
        reactor,
        options["dns-interval"],
        lambda kept: system_resolver(kept, options["dns-server"]),
        extra=demo.addresses if demo is not None else list,
    )
    sources.set(options["hosts"])
    # Hosts that join (a DNS pool's, a reload's) are checked at once.
    fleet.when_hosts_change(checker.fleet_changed)
    admin = None
    if options["admin"] != "none":
        site_ = admin_site(status, checker, metrics_resource(metrics.registry), guard)
        admin = _listener(reactor, "admin", options["admin"], site_)
    movers = {"listen": _mover(reactor, listener), "admin": _mover(reactor, admin)}

    def offer_found(options: Any, why: Optional[str] = None) -> None:
        # The hosts found on the network, less those the configuration pins
        # or excludes, are a host source of their own.
        fleet.offer(DISCOVERED, discovered.hosts(options["hosts"], options["discover-exclude"]), why)

    discovered = Discovered(lambda why: offer_found(reloader.options, why))

    def set_hosts(options: Any) -> None:
        sources.set(options["hosts"])
        offer_found(options)

    reloader = Reloader(
        options,
        reactor,
        fleet,
        appliers(agreement, dispatcher, forwarder, site, fleet, checker, stopper, status, guard, sources, movers),
        set_hosts,
        signals,
    )

    top = BalancerService(reactor, stopper.hurry if signals else None)
    Running("pool", lambda: None, hosts_agent.closeCachedConnections).setServiceParent(top)
    Running("agreement", lambda: None, agreement.stop).setServiceParent(top)
    Running("waker", lambda: waker.start(dispatcher.waiting), waker.stop).setServiceParent(top)
    if demo is not None:
        demo.setServiceParent(top)
    Running("health", checker.start, checker.stop).setServiceParent(top)
    sources.setServiceParent(top)
    if "mdns" in options["discover"]:
        from .mdns import MdnsBrowser

        MdnsBrowser(reactor, discovered).setServiceParent(top)
    listener.setServiceParent(top)
    if admin is not None:
        admin.setServiceParent(top)
    StartLine(
        listener,
        admin,
        lambda: [(b.settings.name, str(b.address)) for b in fleet.backends],
        options["strategy"],
        options["config"],
        [demo.joined] if demo is not None else [],
    ).setServiceParent(top)
    reloader.setServiceParent(top)
    trimmer = give_back_free_memory(reactor)
    if trimmer is not None:
        trimmer.setServiceParent(top)
    # The graceful stop, last started, stops the listener first of all.
    stopper.setServiceParent(top)
    return Balancer(
        fleet=fleet,
        dispatcher=dispatcher,
        forwarder=forwarder,
        agreement=agreement,
        checker=checker,
        waker=waker,
        window=window,
        metrics=metrics,
        status=status,
        guard=guard,
        front=front,
        site=site,
        listener=listener,
        admin=admin,
        stopper=stopper,
        reloader=reloader,
        sources=sources,
        demo=demo,
        discovered=discovered,
        service=top,
    )


__all__ = ["Balancer", "BalancerService", "appliers", "build"]
