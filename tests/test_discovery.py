"""
Discovered hosts in the balancer's fleet (C{--discover}), with a fake
browser telling what appears and goes, and time on a clock: a host that
appears joins and is checked, one that goes drains and leaves once its
requests are answered, a host the configuration lists is pinned, an
excluded one is never used, and a reload keeps what was found.
"""

import pytest
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from imml.backends import BackendAddress
from imml.discovery import Found
from imml.tap import Options
from imml.wiring import build

STUDIO = Found(
    "Studio",
    BackendAddress("192.168.1.20", 3003),
    frozenset({"studio.local", "192.168.1.20", "fe80::1"}),
    {"version": "0.1.0", "providers": "CoreML,CPU"},
)
LAPTOP = Found("Laptop", BackendAddress("192.168.1.30", 3003), frozenset({"laptop.local", "192.168.1.30"}))


def balancer(tmp_path, config=None, *args):
    argv = ["--discover", "mdns", "--admin", "none", *args]
    if config is not None:
        path = tmp_path / "imml.toml"
        path.write_text(config)
        argv += ["--config", str(path)]
    options = Options()
    options.parseOptions(argv)
    return build(options, MemoryReactorClock(), signals=False)


class FakeBrowser:
    """
    What a browser (L{imml.mdns.MdnsBrowser}) tells the balancer, on the
    reactor thread.
    """

    def __init__(self, b):
        self.discovered = b.discovered

    def appear(self, found):
        self.discovered.appeared(found)

    def go(self, name):
        self.discovered.gone(name)


def hosts(b):
    """
    The fleet as the status page lists it: address, name, draining.
    """
    return [(str(x.address), x.settings.name, x.draining) for x in b.fleet.backends]


def test_a_host_that_appears_joins_and_is_checked_at_once(tmp_path):
    b = balancer(tmp_path)
    checked = []
    b.checker.ping = lambda backend: succeed(checked.append(str(backend.address)))
    b.checker.start()
    assert hosts(b) == []
    FakeBrowser(b).appear(STUDIO)
    assert hosts(b) == [("192.168.1.20:3003", "Studio", False)]
    b.checker.clock.advance(0)  # the next turn of the reactor
    assert checked == ["192.168.1.20:3003"]
    assert b.fleet.backends[0].health.up


def test_a_host_that_goes_drains_and_leaves_once_its_requests_are_answered(tmp_path):
    b = balancer(tmp_path)
    browser = FakeBrowser(b)
    browser.appear(STUDIO)
    browser.appear(LAPTOP)
    studio = b.fleet.backends[[x.settings.name for x in b.fleet.backends].index("Studio")]
    load = b.fleet.start(studio, "clip-visual")
    browser.go("Studio")
    assert ("192.168.1.20:3003", "Studio", True) in hosts(b)
    b.fleet.finish(load, 0.2)
    assert hosts(b) == [("192.168.1.30:3003", "Laptop", False)]
    # Gone twice, or never seen: nothing more happens.
    browser.go("Studio")
    browser.go("Nobody")
    assert hosts(b) == [("192.168.1.30:3003", "Laptop", False)]


def test_a_host_that_moves_to_another_address_joins_there_and_drains_here(tmp_path):
    b = balancer(tmp_path)
    browser = FakeBrowser(b)
    browser.appear(STUDIO)
    moved = Found("Studio", BackendAddress("192.168.1.21", 3003), frozenset({"studio.local"}))
    browser.appear(moved)
    assert hosts(b) == [("192.168.1.21:3003", "Studio", False)]
    # The same advertisement again changes nothing.
    browser.appear(moved)
    assert hosts(b) == [("192.168.1.21:3003", "Studio", False)]


PINNED = """
[[hosts]]
address = "studio.local:3003"
name = "the studio"
slots = 2

[[hosts]]
address = "nas"
"""


def test_a_configured_host_is_pinned_it_keeps_its_settings_and_stays(tmp_path):
    b = balancer(tmp_path, PINNED)
    browser = FakeBrowser(b)
    before = hosts(b)
    assert before == [("studio.local:3003", "the studio", False), ("nas:3003", None, False)]
    browser.appear(STUDIO)
    assert hosts(b) == before
    assert b.fleet.backends[0].settings.slots == 2
    browser.go("Studio")
    assert hosts(b) == before
    # By address too, and only on the same port.
    b2 = balancer(tmp_path, '[[hosts]]\naddress = "192.168.1.20"\n')
    FakeBrowser(b2).appear(STUDIO)
    assert hosts(b2) == [("192.168.1.20:3003", None, False)]
    b3 = balancer(tmp_path, '[[hosts]]\naddress = "studio.local:3004"\n')
    FakeBrowser(b3).appear(STUDIO)
    assert hosts(b3) == [("studio.local:3004", None, False), ("192.168.1.20:3003", "Studio", False)]


@pytest.mark.parametrize("name", ["Studio", "studio", "studio.local", "192.168.1.20", "192.168.1.20:3003"])
def test_an_excluded_host_is_never_used(tmp_path, name):
    b = balancer(tmp_path, f'[discover]\nexclude = ["{name}"]\n')
    browser = FakeBrowser(b)
    browser.appear(STUDIO)
    browser.appear(LAPTOP)
    assert hosts(b) == [("192.168.1.30:3003", "Laptop", False)]


def test_a_reload_keeps_discovered_hosts_and_applies_a_new_exclude(tmp_path):
    b = balancer(tmp_path, '[[hosts]]\naddress = "nas"\n')
    browser = FakeBrowser(b)
    browser.appear(STUDIO)
    studio = b.fleet.backends[1]
    studio.stats.served = 7
    # A reload for another reason: the discovered host stays, as it was.
    (tmp_path / "imml.toml").write_text('[[hosts]]\naddress = "nas"\nslots = 3\n')
    assert b.reloader.reload("test")
    assert hosts(b) == [("nas:3003", None, False), ("192.168.1.20:3003", "Studio", False)]
    assert b.fleet.backends[1] is studio and studio.stats.served == 7
    # Excluded now: it drains and leaves.
    (tmp_path / "imml.toml").write_text('[[hosts]]\naddress = "nas"\n\n[discover]\nexclude = ["Studio"]\n')
    assert b.reloader.reload("test")
    assert hosts(b) == [("nas:3003", None, False)]
    # No longer excluded: back.
    (tmp_path / "imml.toml").write_text('[[hosts]]\naddress = "nas"\n')
    assert b.reloader.reload("test")
    assert hosts(b) == [("nas:3003", None, False), ("192.168.1.20:3003", "Studio", False)]


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_discover_needs_no_listed_host(monkeypatch):
    monkeypatch.delenv("IMML_BACKENDS", raising=False)
    options = parse("--discover", "mdns")
    assert options["discover"] == ("mdns",) and options["hosts"] == []
    with pytest.raises(usage.UsageError, match="no ML hosts"):
        parse()
    both = parse("--discover", "mdns", "--backends", "nas")
    assert [str(a) for a, _ in both["hosts"]] == ["nas:3003"]


def test_discover_in_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("IMML_BACKENDS", raising=False)
    path = tmp_path / "imml.toml"
    path.write_text('[balancer]\ndiscover = ["mdns"]\n\n[discover]\nexclude = ["Office iMac"]\n')
    options = parse("--config", str(path))
    assert options["discover"] == ("mdns",)
    assert options["discover-exclude"] == ("Office iMac",)


@pytest.mark.parametrize(
    "argv, config, words",
    [
        (["--discover", "dns-sd"], None, "'dns-sd' is not a discovery method: mdns"),
        ([], '[balancer]\ndiscover = ["carrier-pigeon"]\n', "'carrier-pigeon' is not a discovery method"),
        ([], '[balancer]\ndiscover = "mdns"\n[discover]\nexclude = "Studio"\n', "line 4: exclude must be a list"),
        ([], '[balancer]\ndiscover = "mdns"\n[discover]\nexclude = [""]\n', "exclude must be a list"),
        ([], '[balancer]\ndiscover = "mdns"\n[discover]\ninclude = ["a"]\n', "line 4: unknown discover setting"),
    ],
)
def test_bad_discovery_settings_say_what_is_wrong(tmp_path, argv, config, words):
    if config is not None:
        path = tmp_path / "imml.toml"
        path.write_text(config)
        argv = [*argv, "--config", str(path)]
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert words in str(e.value)
