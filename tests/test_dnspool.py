"""
DNS pools (C{dns+NAME}): one host per address the name resolves to, found
again as the name's records change; hosts kept while DNS fails.  With a
fake resolver and a clock, then with a real DNS server on loopback.
"""

from __future__ import annotations

import pytest
from support import bounded, rig, until
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase

from imml.backends import (
    BackendAddress,
    BackendListError,
    DnsName,
    DnsServer,
    parse_backends,
    parse_dns_server,
    parse_entry,
)
from imml.config import parse_config
from imml.dnspool import MIN_INTERVAL, RETRY, DnsPool, system_resolver
from imml.fleet import Fleet
from imml.host import BackendSettings
from imml.sources import HostSources
from imml.testing import start_fake_hosts


class Zone(ResolverBase):
    """
    The records of a few names, changed by the test: a resolver for the
    pools, and the authority of a test DNS server.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list[tuple[str, int]]] = {}
        self.failure: Exception | None = None
        self.asked: list[tuple[str, int]] = []

    def _answer(self, name, kind: int, record: type):
        name = name.decode("ascii") if isinstance(name, bytes) else name  # (as a server asks)
        self.asked.append((name, kind))
        if self.failure is not None:
            return fail(self.failure)
        if name not in self.records:
            return fail(error.DomainError(name))
        answers = [
            dns.RRHeader(name, kind, ttl=ttl, payload=record(address, ttl))
            for address, ttl in self.records[name]
            if (":" in address) == (kind == dns.AAAA)
        ]
        return succeed((answers, [], []))

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, dns.A, dns.Record_A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, dns.AAAA, dns.Record_AAAA)


def pool_of(zone, clock, settings=None, interval=30.0, name="ml.test", port=3003):
    fleet = Fleet.from_addresses([], clock)
    pool = DnsPool(DnsName(name, port), settings or BackendSettings(), fleet, zone, clock, interval)
    return fleet, pool


def addresses(fleet) -> list[str]:
    return [str(b.address) for b in fleet.backends if not b.leaving]


def watch(events: list):
    globalLogPublisher.addObserver(events.append)
    return lambda: globalLogPublisher.removeObserver(events.append)


def of(events, name):
    return [e for e in events if e.get("imml_event") == name]


def test_dns_entries_parse_and_a_plain_entry_stays_one_host():
    assert parse_backends("dns+immich-ml,dns+ML.example.com:3010, nas.local") == [
        DnsName("immich-ml", 3003),
        DnsName("ml.example.com", 3010),
        BackendAddress("nas.local", 3003),
    ]
    assert str(parse_entry("DNS+ml")) == "dns+ml:3003"
    for bad, says in [
        ("dns+", "needs a name"),
        ("dns+10.0.0.1", "not an address"),
        ("dns+[::1]:3003", "not an address"),
        ("dns+ml:http", "not a number"),
    ]:
        with pytest.raises(BackendListError, match=says) as raised:
            parse_entry(bad)
        assert repr(bad) in str(raised.value)
    with pytest.raises(BackendListError, match="listed twice"):
        parse_backends("dns+ml,dns+ml:3003")
    assert parse_dns_server("127.0.0.1:5353") == DnsServer("127.0.0.1", 5353)
    assert parse_dns_server("[::1]") == DnsServer("::1", 53) and str(DnsServer("::1", 53)) == "[::1]:53"
    with pytest.raises(BackendListError, match="IP address"):
        parse_dns_server("dns.example")


def test_each_address_joins_as_a_host_with_the_entrys_settings_and_slow_start():
    clock, zone = Clock(), Zone()
    zone.records["ml.test"] = [("10.0.0.2", 30), ("10.0.0.1", 30)]
    fleet, pool = pool_of(zone, clock, BackendSettings(slots=4, tier=1))
    events: list = []
    unwatch = watch(events)
    try:
        pool.start()
    finally:
        unwatch()
    assert addresses(fleet) == ["10.0.0.1:3003", "10.0.0.2:3003"]
    for backend in fleet.backends:
        assert (backend.settings.slots, backend.settings.tier, backend.settings.name) == (4, 1, "ml.test")
        assert backend.limit == 1  # slow start: one request, then one more per answer
    assert fleet.backends[0].label == "ml.test (10.0.0.1:3003)"
    assert [e["label"] for e in of(events, "join")] == ["ml.test (10.0.0.1:3003)", "ml.test (10.0.0.2:3003)"]
    [resolved] = of(events, "dns-resolved")
    assert resolved["addresses"] == ["10.0.0.1", "10.0.0.2"]
    # a known host keeps its state when the name is resolved again
    first = fleet.backends[0]
    fleet.check_passed(first)
    zone.records["ml.test"].append(("10.0.0.3", 30))
    clock.advance(30)
    assert addresses(fleet) == ["10.0.0.1:3003", "10.0.0.2:3003", "10.0.0.3:3003"]
    assert fleet.backends[0] is first and first.up
    pool.stop()
    assert clock.getDelayedCalls() == []


def test_an_address_that_disappears_drains_and_leaves_after_its_last_request():
    clock, zone = Clock(), Zone()
    zone.records["ml.test"] = [("10.0.0.1", 30), ("10.0.0.2", 30)]
    fleet, pool = pool_of(zone, clock)
    pool.start()
    gone = fleet.backends[1]
    fleet.check_passed(gone)
    load = fleet.start(gone, "clip-visual")
    zone.records["ml.test"] = [("10.0.0.1", 30)]
    clock.advance(30)
    assert addresses(fleet) == ["10.0.0.1:3003"]
    assert gone in fleet.backends and gone.draining and not gone.usable_for("clip-visual")
    fleet.finish(load, 0.1)
    assert gone not in fleet.backends
    # the name has no address any more: every host leaves
    del zone.records["ml.test"]
    clock.advance(30)
    assert fleet.backends == []
    pool.stop()


def test_hosts_stay_while_dns_fails_and_the_name_is_asked_again_soon():
    clock, zone = Clock(), Zone()
    zone.records["ml.test"] = [("10.0.0.1", 30), ("10.0.0.2", 30)]
    fleet, pool = pool_of(zone, clock)
    pool.start()
    known = list(fleet.backends)
    events: list = []
    unwatch = watch(events)
    try:
        zone.failure = error.DNSServerError("SERVFAIL")
        for _ in range(3):
            clock.advance(30)
            assert fleet.backends == known and not any(b.draining for b in known)
        [failed] = of(events, "dns-failed")  # logged once, not at every try
        assert failed["addresses"] == ["10.0.0.1", "10.0.0.2"]
        asked = len(zone.asked)
        clock.advance(RETRY)  # asked again soon, not after a whole interval
        assert len(zone.asked) == asked + 1
        zone.failure = None
        zone.records["ml.test"] = [("10.0.0.2", 30)]
        clock.advance(RETRY)
        assert len(of(events, "dns-recovered")) == 1
        assert addresses(fleet) == ["10.0.0.2:3003"]
    finally:
        unwatch()
        pool.stop()


@pytest.mark.parametrize("ttl, seconds", [(5, 5.0), (3600, 30.0), (0, MIN_INTERVAL)])
def test_the_name_is_asked_again_when_its_ttl_runs_out_or_at_the_interval(ttl, seconds):
    clock, zone = Clock(), Zone()
    zone.records["ml.test"] = [("10.0.0.1", 600), ("10.0.0.2", ttl)]
    fleet, pool = pool_of(zone, clock, interval=30.0)
    pool.start()
    assert len(zone.asked) == 1
    clock.advance(seconds - 0.01)
    assert len(zone.asked) == 1
    clock.advance(0.01)
    assert len(zone.asked) == 2
    pool.set_interval(2.0)  # a reload shortens the interval: it applies from now
    if ttl > 2:
        clock.advance(2.0)
        assert len(zone.asked) == 3
    pool.stop()


def test_a_name_with_only_ipv6_addresses_gives_ipv6_hosts():
    clock, zone = Clock(), Zone()
    zone.records["ml.test"] = [("fd00::2", 30), ("fd00::1", 30)]
    fleet, pool = pool_of(zone, clock, port=3010)
    pool.start()
    assert addresses(fleet) == ["[fd00::1]:3010", "[fd00::2]:3010"]
    # with IPv4 addresses too, a dual-stack machine is one host, not two
    zone.records["ml.test"].append(("10.0.0.1", 30))
    clock.advance(30)
    assert addresses(fleet) == ["10.0.0.1:3010"]
    pool.stop()


def test_the_configuration_keeps_a_pool_per_dns_entry_and_drops_one_removed():
    clock, zone = Clock(), Zone()
    zone.records["ml.test"] = [("10.0.0.1", 30), ("10.0.0.2", 30)]
    config = parse_config(
        '[[hosts]]\naddress = "nas:3003"\n\n[[hosts]]\naddress = "dns+ml.test"\nname = "gpu pool"\nslots = 2\n'
    )
    entries = [(h.address, h.settings) for h in config.hosts]
    fleet = Fleet.from_addresses([], clock)
    sources = HostSources(fleet, clock, 30.0, lambda reactor: zone)
    sources.set(entries)
    sources.startService()
    try:
        assert addresses(fleet) == ["nas:3003", "10.0.0.1:3003", "10.0.0.2:3003"]
        assert [b.label for b in fleet.backends[1:]] == ["gpu pool (10.0.0.1:3003)", "gpu pool (10.0.0.2:3003)"]
        assert {b.limiter.slots for b in fleet.backends[1:]} == {2}
        # a reload changes the pool's settings: its hosts take them
        sources.set([entries[0], (entries[1][0], BackendSettings(slots=3))])
        assert {b.limiter.slots for b in fleet.backends[1:]} == {3}
        assert fleet.backends[1].settings.name == "ml.test"
        # a reload removes the pool: its hosts drain and leave, the name is asked no more
        sources.set(entries[:1])
        assert addresses(fleet) == ["nas:3003"]
        asked = len(zone.asked)
        clock.advance(120)
        assert len(zone.asked) == asked
    finally:
        sources.stopService()
    assert clock.getDelayedCalls() == []


def test_the_fleet_keeps_the_order_of_the_entries_whenever_a_pool_resolves():
    # --backends dns+primary.test,backup: failover sends everything to the
    # first host, the pool's, although the plain host was known first.
    clock, zone = Clock(), Zone()
    zone.records["primary.test"] = [("10.0.0.1", 30)]
    pool, backup = DnsName("primary.test", 3003), BackendAddress("backup", 3003)
    fleet = Fleet.from_addresses([backup], clock)  # as the balancer is built
    sources = HostSources(fleet, clock, 30.0, lambda reactor: zone)
    sources.set([(pool, BackendSettings()), (backup, BackendSettings())])
    sources.startService()
    try:
        assert addresses(fleet) == ["10.0.0.1:3003", "backup:3003"]
        assert [b.index for b in fleet.backends] == [0, 1]
        # a reload that puts the plain host first
        sources.set([(backup, BackendSettings()), (pool, BackendSettings())])
        assert addresses(fleet) == ["backup:3003", "10.0.0.1:3003"]
    finally:
        sources.stopService()


def test_nothing_of_the_resolver_stays_on_the_clock_once_the_pools_stop(tmp_path):
    # The machine's resolver reads resolv.conf again every minute, for as
    # long as it lives: it lives while the balancer runs.
    (tmp_path / "hosts").write_text("10.0.0.7 ml.test\n")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    clock = Clock()
    fleet = Fleet.from_addresses([], clock)
    made = []

    def resolver(reactor):
        made.append(system_resolver(reactor, None, str(tmp_path / "hosts").encode(), str(tmp_path / "resolv.conf")))
        return made[-1]

    sources = HostSources(fleet, clock, 30.0, resolver)
    sources.set([(DnsName("ml.test", 3003), BackendSettings())])
    assert made == []  # not before it starts
    sources.startService()
    assert addresses(fleet) == ["10.0.0.7:3003"] and len(made) == 1
    sources.stopService()
    assert clock.getDelayedCalls() == []
    sources.startService()  # started again, with a resolver of its own
    assert len(made) == 2
    sources.stopService()
    assert clock.getDelayedCalls() == []


class Silent(DatagramProtocol):
    """A DNS server that never answers."""

    def __init__(self) -> None:
        self.questions: list[bytes] = []

    def datagramReceived(self, data: bytes, address) -> None:
        self.questions.append(data)


def names_calls(before) -> list:
    """The calls pending on the reactor, not in C{before}, of imml or its resolver."""
    return [
        call
        for call in reactor.getDelayedCalls()
        if call not in before and call.active() and call.func.__module__.startswith(("imml", "twisted.names"))
    ]


@bounded(30)
async def test_stopping_cancels_the_question_under_way_and_its_timeouts():
    silent = Silent()
    port = reactor.listenUDP(0, silent, interface="127.0.0.1")
    before, readers = set(reactor.getDelayedCalls()), set(reactor.getReaders())
    fleet = Fleet.from_addresses([], reactor)
    sources = HostSources(
        fleet, reactor, 30.0, lambda r: system_resolver(r, DnsServer("127.0.0.1", port.getHost().port))
    )
    sources.set([(DnsName("ml.test", 3003), BackendSettings())])
    events: list = []
    unwatch = watch(events)
    try:
        sources.startService()
        await until(lambda: silent.questions)
        assert names_calls(before) != []  # the question's timeout
        sources.stopService()
        # The question is over: no timeout pending, its socket closed, and
        # nothing said of it.
        assert names_calls(before) == []
        assert [r for r in reactor.getReaders() if r not in readers] == []
        assert of(events, "dns-failed") == []
    finally:
        unwatch()
        if sources.running:
            sources.stopService()
        await port.stopListening()


async def dns_server(zone: Zone):
    """
    A DNS server for C{zone} on 127.0.0.1 (UDP), and its port.
    """
    factory = server.DNSServerFactory(authorities=[zone])
    return reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")


@bounded(30)
async def test_hosts_join_and_leave_as_a_real_dns_server_changes_its_records():
    zone = Zone()
    zone.records["ml.test"] = [("10.0.0.1", 300)]
    port = await dns_server(zone)
    try:
        resolver = system_resolver(reactor, DnsServer("127.0.0.1", port.getHost().port))
        fleet, pool = pool_of(resolver, reactor)
        pool.start()
        await until(lambda: addresses(fleet) == ["10.0.0.1:3003"])
        zone.records["ml.test"] = [("10.0.0.1", 300), ("10.0.0.2", 300)]
        await pool.resolve()
        assert addresses(fleet) == ["10.0.0.1:3003", "10.0.0.2:3003"]
        zone.records["ml.test"] = [("10.0.0.2", 300)]
        await pool.resolve()
        assert addresses(fleet) == ["10.0.0.2:3003"]
        zone.failure = RuntimeError("the zone is broken")  # the server answers SERVFAIL
        await pool.resolve()
        assert addresses(fleet) == ["10.0.0.2:3003"]
        assert ("ml.test", dns.A) in zone.asked
        pool.stop()
    finally:
        await port.stopListening()


@bounded(30)
async def test_a_balancer_answers_through_a_dns_pool():
    """
    C{--backends dns+NAME:PORT --dns-server ...}: the name resolves to the
    fake host's address, and requests reach it.
    """
    zone = Zone()
    zone.records["ml.test"] = [("127.0.0.1", 300)]
    dns_port = await dns_server(zone)
    [host] = await start_fake_hosts(reactor, [{"name": "a"}])
    try:
        host_port = host.address.rpartition(":")[2]
        async with await rig(
            [],
            "--backends",
            f"dns+ml.test:{host_port}",
            "--dns-server",
            f"127.0.0.1:{dns_port.getHost().port}",
            wait_up=False,
        ) as r:
            await until(lambda: [b.up for b in r.fleet.backends] == [True])
            response = await r.predict()
            assert response.code == 200
            await response.content()
            assert response.headers.getRawHeaders(b"x-imml-backend") == [host.address.encode()]
            assert r.fleet.backends[0].label == f"ml.test ({host.address})"
    finally:
        await host.stop()
        await dns_port.stopListening()
