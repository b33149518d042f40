"""
Reloading the host list and settings, over loopback, under load: on
SIGHUP, on a change of the --config file, and refusing a bad file.
"""

import os
import signal

import pytest
from steering import events, host, status
from support import bounded, rig, sleep, until
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults

from imml.control import Reloader
from imml.testing import start_fake_hosts


def hosts(n, **kw):
    return [dict(name=f"h{i}", **kw) for i in range(n)]


def write(path, text):
    # As an editor saves: a new file renamed over the old one.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def config_of(*addresses, **balancer):
    lines = ["[balancer]"] + [f"{k.replace('_', '-')} = {v!r}".replace("'", '"') for k, v in balancer.items()]
    for address in addresses:
        lines += ["[[hosts]]", f'address = "{address}"']
    return "\n".join(lines) + "\n"


class Load:
    """
    Clients sending /predict one after another until stopped.
    """

    def __init__(self, r, clients=3):
        self.r, self.codes, self.running = r, [], True
        self.done = gatherResults([ensureDeferred(self._client()) for _ in range(clients)])

    async def _client(self):
        while self.running:
            response = await self.r.predict()
            await response.content()
            self.codes.append(response.code)

    async def stop(self):
        self.running = False
        await self.done
        return self.codes


@pytest.mark.parametrize("strategy", ["round-robin", None])
@bounded(30)
async def test_reload_adds_removes_and_keeps_hosts_under_load_losing_nothing(tmp_path, strategy):
    """
    With round-robin, the new host's share shows at once.  With the default
    (the file names no strategy), the kept host, as fast and never slowed
    down by load (these fake hosts have no contention), may take every
    request: there, that the removed host leaves and nothing is lost is
    what is checked.
    """
    spare = await start_fake_hosts(reactor, [dict(name="h2", service_time=0.01)])
    path = str(tmp_path / "imml.toml")
    try:
        async with await _rig_with_config(path) as r:
            h0, h1, h2 = r.hosts[0].address, r.hosts[1].address, spare[0].address
            kept = r.fleet.backends[1]
            load = Load(r)
            await until(lambda: r.hosts[0].served >= 5 and r.hosts[1].served >= 5)
            served_before = kept.stats.served
            write(path, config_of(h1, h2, **({"strategy": strategy} if strategy else {})))
            assert r.balancer.reloader.reload("test") is True
            assert r.balancer.dispatcher.strategy.name == (strategy or "shortest-delay")
            if strategy == "round-robin":
                await until(lambda: spare[0].served >= 5)
            await until(lambda: h0 not in [str(b.address) for b in r.fleet.backends])
            await until(lambda: kept.stats.served >= served_before + 20)
            codes = await load.stop()
            assert codes and set(codes) == {200}, codes
            assert sum(h.served for h in r.hosts) + spare[0].served == len(codes)
            # h1 is the same host, its statistics kept and counting on.
            assert r.fleet.backends[0] is kept and kept.stats.served > served_before
            assert [str(b.address) for b in r.fleet.backends] == [h1, h2]
            [event] = events(r, "reload")
            assert (event["joined"], event["left"], event["kept"]) == ([h2], [h0], [h1])
            assert [e["backend"] for e in events(r, "leave")] == [h0]
            doc = await status(r)
            assert [h["address"] for h in doc["hosts"]] == [h1, h2]
            assert host(doc, h1)["served"] == kept.stats.served
    finally:
        for h in spare:
            await h.stop()


async def _rig_with_config(path, *args):
    """
    A balancer over h0 and h1 (fake hosts), listed in the config file at
    C{path}; the fake hosts are started first so the file can name them.
    """
    from imml.testing import start_fake_hosts as start

    started = await start(reactor, hosts(2, service_time=0.01))
    write(path, config_of(*(h.address for h in started), strategy="round-robin"))
    r = await rig([], "--config", path, *args)
    r.hosts = started
    return r


@bounded(20)
async def test_a_bad_config_is_rejected_and_the_old_one_stays(tmp_path):
    path = str(tmp_path / "imml.toml")
    async with await _rig_with_config(path) as r:
        before = list(r.fleet.backends)
        write(path, config_of(r.hosts[0].address) + '[[hosts]]\naddress = "nas"\nslots = 0\n')
        assert r.balancer.reloader.reload("test") is False
        [event] = events(r, "reload-rejected")
        assert "line 6" in event["reason"] and "slots" in event["reason"]
        assert r.fleet.backends == before
        write(path, '[balancer]\nstrategy = "no-such-strategy"\n')
        assert r.balancer.reloader.reload("test") is False
        assert r.balancer.dispatcher.strategy.name == "round-robin"
        response = await r.predict()
        assert response.code == 200
        await response.content()
        assert events(r, "reload") == []


@bounded(20)
async def test_a_changed_file_is_reloaded_by_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(Reloader, "interval", 0.05)
    path = str(tmp_path / "imml.toml")
    async with await _rig_with_config(path, "--max-queue", "5") as r:
        h0, h1 = (h.address for h in r.hosts)
        write(path, config_of(h1, h0, queue_timeout=7, max_tries=2, max_queue=50))
        await until(lambda: events(r, "reload"))
        [event] = events(r, "reload")
        assert event["trigger"] == "file changed"
        assert event["changed"] == ["max-tries", "queue-timeout", "strategy"]  # strategy: back to its default
        assert r.balancer.dispatcher.max_queue == 5  # the command line wins over the file
        assert [str(b.address) for b in r.fleet.backends] == [h1, h0]
        assert r.balancer.dispatcher.queue_timeout == 7.0
        assert r.balancer.forwarder.settings.max_tries == 2
        # The same content again is no change; a broken file is refused once.
        write(path, config_of(h1, h0, queue_timeout=7, max_tries=2, max_queue=50))
        write(path, "[[hosts]\n")
        await until(lambda: events(r, "reload-rejected"))
        await sleep(0.3)  # several more looks at the unchanged, broken file
        assert len(events(r, "reload")) == 1 and len(events(r, "reload-rejected")) == 1


@bounded(20)
async def test_sighup_reloads(tmp_path, monkeypatch):
    from imml.control import Reloader

    monkeypatch.setattr(Reloader, "interval", 3600.0)  # only SIGHUP may notice the change
    path = str(tmp_path / "imml.toml")
    async with await _rig_with_config(path) as r:
        h0, h1 = (h.address for h in r.hosts)
        write(path, config_of(h0, strategy="failover"))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: events(r, "reload"))
        [event] = events(r, "reload")
        assert event["trigger"] == "SIGHUP" and event["left"] == [h1]
        assert r.balancer.dispatcher.strategy.name == "failover"
        assert (await status(r))["balancer"]["strategy"] == "failover"


@bounded(20)
async def test_without_a_config_file_a_reload_keeps_the_hosts():
    async with await rig(hosts(2)) as r:
        before = list(r.fleet.backends)
        assert r.balancer.reloader.reload("SIGHUP") is True
        assert r.fleet.backends == before
        [event] = events(r, "reload")
        assert event["joined"] == [] and event["left"] == []


def test_reloading_the_health_intervals_leaves_the_wake_on_lan_timer_alone(tmp_path, monkeypatch):
    """
    New health intervals retime the health checks, and only them: the
    Wake-on-LAN timer keeps C{wol-interval}.
    """
    from twisted.internet.testing import MemoryReactorClock

    from imml.classify import RequestInfo
    from imml.dispatch import Dispatcher
    from imml.tap import Options
    from imml.wiring import build

    packets = []

    class Reactor(MemoryReactorClock):
        def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
            class Port:
                def write(self, data, address):
                    packets.append(clock.seconds())

                def stopListening(self):
                    pass

            return Port()

    clock = Reactor()
    looked = []  # each time the Wake-on-LAN timer looks at the waiting requests
    waiting = Dispatcher.waiting
    monkeypatch.setattr(Dispatcher, "waiting", lambda self: looked.append(clock.seconds()) or waiting(self))
    path = tmp_path / "imml.toml"
    host = '[[hosts]]\naddress = "192.0.2.7"\nmac = "aa:bb:cc:dd:ee:01"\n'
    path.write_text("[balancer]\nhealth-interval = 5\n\n" + host)
    options = Options()
    options.parseOptions(["--config", str(path), "--admin", "none", "--listen", "tcp:0", "--wol-interval", "30"])
    balancer = build(options, clock, signals=False)
    balancer.service.startService()
    try:
        balancer.dispatcher.acquire(RequestInfo(b"POST", b"/predict", "clip-visual"))  # waits for the host
        clock.pump([1] * 10)
        intervals = "health-interval = 1\nhealth-down-interval = 1\nhealth-fast-interval = 0.5\n"
        path.write_text("[balancer]\n" + intervals + "\n" + host)
        assert balancer.reloader.reload("test") is True
        checks = len(clock.tcpClients)
        clock.pump([1] * 50)
        checker = balancer.checker
        assert (checker.interval, checker.down_interval, checker.fast_interval) == (1, 1, 0.5)
        assert len(clock.tcpClients) - checks >= 15  # checked every second or two (a check times out in 2 s)
        assert looked == [0, 30, 60]
        assert packets == [0, 30, 60]
    finally:
        balancer.service.stopService()
