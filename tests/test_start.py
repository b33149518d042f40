"""
Starting the balancer: where it listens, written as an nginx or HAProxy
user writes it or as a Twisted endpoint; a place it cannot listen is a
usage error naming the option and the forms, and a port it cannot open
ends twistd with one line and status 1, never a traceback.
"""

import os
import re
import socket
from typing import Optional

import pytest
import treq
from steering import events
from support import bounded, rig, spawn_twistd, twistd, until
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool

from imml import __version__
from imml.endpoints import FORMS, endpoint_string
from imml.tap import Options
from imml.testing import start_fake_hosts


@pytest.fixture
def held_port():
    """
    A loopback port another program listens on.
    """
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def start(*args: str, twistd_options: tuple = ("--pidfile=",), env: Optional[dict] = None):
    """
    C{twistd -n imml-balancer} with C{args}, run to its end.
    """
    return twistd("-n", *twistd_options, "imml-balancer", "--backends", "127.0.0.1:9", *args, env=env, timeout=60)


@pytest.mark.parametrize("option, other", [("--listen", "--admin"), ("--admin", "--listen")])
def test_a_port_in_use_ends_the_start_with_one_line_and_status_1(held_port, option, other):
    result = start(option, f"127.0.0.1:{held_port}", other, "tcp:0:interface=127.0.0.1")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    [line] = [line for line in output.splitlines() if "cannot listen" in line]
    assert f"127.0.0.1:{held_port} ({option}): address already in use" in line
    assert "Traceback" not in output
    # Nothing claims it runs.
    assert "listening on" not in output


#: An endpoint plugin whose port fails to open a moment after it is asked
#: for, once twistd's reactor runs (as one that opens asynchronously may).
LATE_ENDPOINT = """
import errno
import os

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class Late:
    def __init__(self, reactor):
        self.reactor = reactor

    def listen(self, factory):
        opening = Deferred()
        error = CannotListenError("", 0, OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)))
        self.reactor.callLater(0.2, opening.errback, error)
        return opening


@implementer(IPlugin, IStreamServerEndpointStringParser)
class Parser:
    prefix = "late"

    def parseStreamServer(self, reactor, *args, **kwargs):
        return Late(reactor)


parser = Parser()
"""


def test_a_port_that_fails_to_open_once_running_ends_twistd_with_one_line_and_status_1(tmp_path):
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "late_endpoint.py").write_text(LATE_ENDPOINT)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    result = start(
        "--listen",
        "late:here",
        twistd_options=(f"--pidfile={pidfile}", f"--logfile={logfile}"),
        env={"PYTHONPATH": path},
    )
    log = logfile.read_text()
    assert result.returncode == 1, log
    [line] = [line for line in log.splitlines() if "cannot listen" in line]
    assert line.endswith("cannot listen on late:here (--listen): address already in use; stopping")
    assert "Traceback" not in log + result.stdout + result.stderr
    # twistd did its part first: its PID file removed, its last line logged
    assert not pidfile.exists()
    assert log.splitlines()[-1].endswith("Server Shut Down.")


def test_a_bad_place_to_listen_ends_the_start_with_one_line_and_status_2():
    result = start("--admin", "0.0.0.0:notaport")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "imml-balancer: error: --admin '0.0.0.0:notaport': the port must be a number from 0 to 65535, "
        f"not 'notaport'; expected {FORMS} (twistd imml-balancer --help lists the options)\n"
    )


def options(*args: str) -> Options:
    parsed = Options()
    parsed.parseOptions([*args, "--backends", "nas"])
    return parsed


@pytest.mark.parametrize(
    "option, text, says",
    [
        ("--listen", "tcp:notaport", "the port must be a number from 0 to 65535, not 'notaport'"),
        ("--listen", "0.0.0.0:99999", "not '99999'"),
        ("--listen", "tcp:interface=127.0.0.1", "the port is missing"),
        ("--listen", "1.2.3:3003", "'1.2.3' is not an IPv4 address"),
        ("--listen", "[nas]:3003", "[nas] is not an IPv6 address in brackets"),
        ("--admin", "tcp:8080:foo=1", "unknown parameter 'foo'"),
        ("--admin", "nas:8080", "unknown endpoint type 'nas'"),
    ],
)
def test_a_bad_place_to_listen_is_a_usage_error_naming_the_option_and_the_forms(option, text, says):
    with pytest.raises(usage.UsageError) as error:
        options(option, text)
    message = str(error.value)
    assert message.startswith(f"{option} {text!r}: ")
    assert says in message and message.endswith(f"; expected {FORMS}")


@pytest.mark.parametrize(
    "text, twisted",
    [
        # A bare port is every IPv4 address, as nginx's "listen 8081".
        ("8081", "tcp:8081"),
        ("*:3003", "tcp:3003"),
        (":3003", "tcp:3003"),
        ("0.0.0.0:3003", "tcp:3003:interface=0.0.0.0"),
        ("127.0.0.1:8080", "tcp:8080:interface=127.0.0.1"),
        ("[::]:3003", r"tcp6:3003:interface=\:\:"),
        ("[::1]:8080", r"tcp6:8080:interface=\:\:1"),
        # Twisted's own strings, an IPv6 interface written plainly or escaped.
        ("tcp:3003", "tcp:3003"),
        ("tcp:80:interface=::", r"tcp:80:interface=\:\:"),
        (r"tcp:80:interface=\:\:", r"tcp:80:interface=\:\:"),
        ("tcp:80:interface=::1:backlog=5", r"tcp:80:interface=\:\:1:backlog=5"),
        ("tcp6:port=80:interface=fe80::1%eth0", r"tcp6:port=80:interface=fe80\:\:1%eth0"),
        ("unix:/run/imml.sock", "unix:/run/imml.sock"),
    ],
)
def test_places_to_listen_as_nginx_haproxy_and_twisted_users_write_them(text, twisted):
    assert endpoint_string(text) == twisted
    parsed = options("--listen", text, "--admin", text)
    assert (parsed["listen"], parsed["admin"]) == (text, text)


def test_the_config_file_says_where_to_listen_and_its_mistakes_name_the_file(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text('[balancer]\nlisten = "[::]:3003"\nadmin = 8081\n')
    parsed = options("--config", str(path))
    assert (parsed["listen"], parsed["admin"]) == ("[::]:3003", "8081")
    path.write_text('[balancer]\nlisten = "tcp:notaport"\n')
    with pytest.raises(usage.UsageError) as error:
        options("--config", str(path))
    assert str(error.value).startswith(f"{path}, line 2: listen 'tcp:notaport': the port must be")


@pytest.mark.parametrize("listen", ["tcp:0:interface=::1", "[::1]:0"])
@bounded(20)
async def test_an_ipv6_interface_written_plainly_is_listened_on(listen):
    async with await rig([dict(name="h0")], "--admin", "none", listen=listen) as r:
        assert r.url.startswith("http://[::1]:")
        # (treq cannot take an IPv6 address in a URL; Twisted's Agent can.)
        response = await Agent(reactor, pool=r.pool).request(b"GET", (r.url + "/ping").encode())
        assert response.code == 200 and await treq.content(response) == b"pong"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--rise", "0"], "--rise must be at least 1, not 0"),
        (["--max-tries", "three"], "--max-tries must be a whole number of at least 1, not 'three'"),
        (["--strategy", "fastest"], "unknown strategy 'fastest'; choose one of "),
        (["--no-such-option"], "option --no-such-option not recognized"),
        (["--config", "/nonexistent/imml.toml"], "/nonexistent/imml.toml: cannot read it: No such file or directory"),
    ],
)
def test_a_usage_error_is_one_line_first_with_a_hint_to_help_and_status_2(args, says):
    result = start(*args)
    assert (result.returncode, result.stdout) == (2, ""), result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"imml-balancer: error: {says}")
    assert line.endswith(" (twistd imml-balancer --help lists the options)")


def test_help_still_prints_every_option():
    result = twistd("imml-balancer", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: twistd [options] imml-balancer [options]")
    for row in Options.optParameters + Options.optFlags:
        assert f"--{row[0]}" in result.stdout


def host_named(name: str, address: str, **settings) -> str:
    lines = ["[[hosts]]", f'address = "{address}"', f'name = "{name}"' if name else ""]
    return "\n".join(lines + [f"{k} = {v}" for k, v in settings.items()]) + "\n"


@bounded(30)
async def test_the_start_line_says_what_runs_and_where_once_it_listens(tmp_path):
    [fake] = await start_fake_hosts(reactor, [dict(name="h0")])
    path = tmp_path / "imml.toml"
    path.write_text(host_named("nas", fake.address) + host_named("", "127.0.0.1:9"))
    child, process = spawn_twistd(
        *"-n --pidfile= imml-balancer --strategy round-robin --health-interval 0.2".split(),
        *["--listen", "tcp:0:interface=127.0.0.1", "--admin", "127.0.0.1:0", "--config", str(path)],
    )
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        await child.said("listening on")
        [line] = [line for line in child.output.splitlines() if "listening on" in line]
        said = re.search(
            r"\] imml (\S+) listening on 127\.0\.0\.1:(\d+), admin (http://127\.0\.0\.1:\d+/), "
            r"strategy round-robin, hosts: (.*), config (.*)$",
            line,
        )
        assert said is not None, line
        version, port, admin, hosts, config = said.groups()
        assert version == __version__ and port != "0"
        assert (hosts, config) == (f"nas ({fake.address}), 127.0.0.1:9", str(path))
        # The port and the admin URL it names are the ones it listens on.
        client = HTTPClient(Agent(reactor, pool=pool))
        await child.said(f"ML host nas ({fake.address}) is up")
        response = await client.get(f"http://127.0.0.1:{port}/ping")
        assert await response.text() == "pong"
        response = await client.get(admin + "api/status")
        assert (await response.json())["balancer"]["version"] == version
        process.signalProcess("TERM")
        await child.ended
    finally:
        await child.killed(process)
        await pool.closeCachedConnections()
        await fake.stop()


@bounded(20)
async def test_the_start_event_carries_each_fact(tmp_path):
    async with await rig([dict(name="h0")], "--strategy", "failover") as r:
        await until(lambda: events(r, "start"))
        [event] = events(r, "start")
        admin = r.balancer.admin.port.getHost()
        assert event["listen"] == r.url.removeprefix("http://")
        assert event["admin"] == f"http://127.0.0.1:{admin.port}/"
        assert event["strategy"] == "failover" and event["config"] == "none"
        assert event["hosts"] == [{"name": None, "address": r.hosts[0].address}]
        assert event["host_list"] == r.hosts[0].address
    async with await rig([dict(name="h0")], "--admin", "none", "--demo", "1") as r:
        await until(lambda: events(r, "start"))
        [event] = events(r, "start")
        assert event["admin"] == "none"
        # Its stand-in host (--demo replaces --backends), by its name.
        assert [h["name"] for h in event["hosts"]] == ["demo-1"]
