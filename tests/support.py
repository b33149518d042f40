"""
Shared helpers for loopback tests: a balancer with fake ML hosts behind it,
a client with its own connection pool, bounded waits, and twistd run as a
child process.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import pytest_twisted
from attrs import define, field
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from imml.tap import Options
from imml.testing import ENTRIES, FakeMLHost, predict_body, start_fake_hosts
from imml.wiring import Balancer, build

ROOT = Path(__file__).resolve().parent.parent
#: The virtual environment's scripts: twistd, as users run it.
BIN = Path(sys.executable).parent


def twistd(*args: str, env: Optional[dict] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """
    Run C{twistd *args} to its end; its status and output.
    """
    return subprocess.run(
        [str(BIN / "twistd"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


class Child(ProcessProtocol):
    """
    A child process's output, as it comes, and its end.
    """

    def __init__(self) -> None:
        self.output = ""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)

    async def killed(self, process: Any) -> None:
        """
        Kill C{process}, this child, unless it has ended; wait for its end.
        """
        if not self.ended.called:
            process.signalProcess("KILL")
            await self.ended

    async def said(self, text: str, seconds: float = 10.0) -> None:
        """
        Wait until the child has written C{text}; fail after C{seconds}.
        """
        await until(lambda: text in self.output or self.ended.called, seconds)
        assert text in self.output, self.output


def spawn_twistd(*args: str) -> tuple[Child, Any]:
    """
    Start C{twistd *args} as a child process on the reactor: its output
    and its process (for C{signalProcess}).
    """
    child = Child()
    process = reactor.spawnProcess(child, str(BIN / "twistd"), ["twistd", *args], env=dict(os.environ), path=str(ROOT))
    return child, process


def bounded(seconds: float):
    """
    Run an async test under pytest-twisted, failing it after C{seconds}.
    """

    def decorate(test):
        @pytest_twisted.ensureDeferred
        @functools.wraps(test)
        async def run(*args, **kwargs):
            d = ensureDeferred(test(*args, **kwargs))
            d.addTimeout(seconds, reactor)
            return await d

        return run

    return decorate


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(predicate: Callable[[], bool], seconds: float = 5.0, step: float = 0.02) -> None:
    """
    Wait until C{predicate()} holds; fail after C{seconds}.
    """
    for _ in range(int(seconds / step) + 1):
        if predicate():
            return
        await sleep(step)
    raise AssertionError(f"condition not met within {seconds} s")


def url_of(port) -> str:
    """
    The URL of a listening port (an IPv6 address in brackets).
    """
    address = port.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"http://{host}:{address.port}"


@define(eq=False)
class Rig:
    """
    A running balancer with fake hosts behind it, and a client.
    """

    hosts: list[FakeMLHost]
    balancer: Balancer
    url: str
    client: HTTPClient
    pool: HTTPConnectionPool
    events: list = field(factory=list)

    @property
    def fleet(self):
        return self.balancer.fleet

    @property
    def service(self):
        return self.balancer.service

    def request_events(self) -> list[dict]:
        return [e for e in self.events if e.get("imml_event") == "request"]

    def predict(self, task: str = "clip-visual", image: bytes = b"\xff\xd8 a small picture", **kw) -> Deferred:
        """
        POST a /predict like Immich's server does.
        """
        ctype, body = predict_body(
            ENTRIES[task],
            image=None if task == "clip-textual" else image,
            text="a cat" if task == "clip-textual" else None,
        )
        return self.client.post(self.url + "/predict", data=body, headers={"content-type": ctype}, **kw)

    async def __aenter__(self) -> "Rig":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        globalLogPublisher.removeObserver(self.events.append)
        await self.service.stopService()
        await self.pool.closeCachedConnections()
        for host in self.hosts:
            await host.stop()


async def rig(
    specs: list[dict], *args: str, wait_up: bool = True, listen: Optional[str] = "tcp:0:interface=127.0.0.1"
) -> Rig:
    """
    Start fake hosts from C{specs}, and a balancer in front of them with
    C{args} on the command line, listening at C{listen} (none: as the
    options say).

    The agreement check is off unless C{args} turn it on: these tests count
    what the hosts receive, and canaries would be among it.
    """
    if "--agreement" not in args:
        args = ("--agreement", "off", *args)
    hosts = await start_fake_hosts(reactor, specs)
    options = Options()
    options.parseOptions(
        [
            *(["--listen", listen] if listen is not None else []),
            "--backends",
            ",".join(h.address for h in hosts),
            "--health-interval",
            "0.2",
            "--admin",
            "tcp:0:interface=127.0.0.1",
            *args,
        ]
    )
    balancer = build(options, reactor)
    r = Rig(hosts, balancer, "", None, HTTPConnectionPool(reactor))
    globalLogPublisher.addObserver(r.events.append)
    balancer.service.startService()
    try:
        port = await balancer.listener.listening()
    except BaseException:
        await r.stop()
        raise
    r.url = url_of(port)
    r.client = HTTPClient(Agent(reactor, pool=r.pool))
    if wait_up:
        try:
            await until(lambda: all(b.up for b in balancer.fleet.backends))
        except BaseException:
            await r.stop()
            raise
    return r


async def codes_of(pending: list[Deferred]) -> list[int]:
    """
    The status of each answer C{pending} fires with, its body read.
    """
    codes = []
    for d in pending:
        response = await d
        await response.content()
        codes.append(response.code)
    return codes


def open_files_in(directory) -> list[str]:
    """
    The files this process holds open in C{directory}, deleted ones
    included (Linux: read from /proc/self/fd).
    """
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


class _HearOut(Protocol):
    def __init__(self, data: bytes) -> None:
        self.request, self.data = data, b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.data)


async def hear_out(port: int, data: bytes) -> bytes:
    """
    Send C{data} to 127.0.0.1:C{port} and nothing more; everything the
    server says until it closes the connection.
    """
    protocol = await connect_raw(port, data)
    return await protocol.closed


async def connect_raw(port: int, data: bytes = b"") -> _HearOut:
    """
    A connection to 127.0.0.1:C{port} that sends C{data} (more through its
    C{transport}); its C{closed} fires with all the server said.
    """
    protocol = _HearOut(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return protocol


async def rig_with_config(
    path: str, specs: list[dict], text: Callable[[list[str]], str], *args: str, wait_up: bool = True
) -> Rig:
    """
    Start fake hosts from C{specs}, and a balancer in front of them that
    reads its C{--config} file at C{path}, written first as
    C{text(addresses)} (the hosts' addresses, once they listen).
    """
    hosts = await start_fake_hosts(reactor, specs)
    try:
        with open(path, "w") as f:
            f.write(text([h.address for h in hosts]))
        r = await rig([], "--config", path, *args, wait_up=wait_up)
    except BaseException:
        for host in hosts:
            await host.stop()
        raise
    r.hosts = hosts
    return r


def free_port() -> int:
    """
    A TCP port of 127.0.0.1 that was free a moment ago, for a child
    process to listen on.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port: int, path: str) -> Optional[bytes]:
    """
    The body of C{GET http://127.0.0.1:PORT/PATH} from a child process, or
    L{None} while nothing answers there.  Blocking: for tests that run no
    reactor.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.read()
    except OSError:
        return None


class Recorder(Resource):
    """A host that answers every request with what it received of it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render(self, request):
        self.seen.append(
            {
                "method": request.method,
                "uri": request.uri,
                "host": request.getHeader(b"host"),
                "length": request.getHeader(b"content-length"),
                "task": request.getHeader(b"x-task"),
                "body": request.content.read(),
                "port": request.getClientAddress().port,
            }
        )
        request.setHeader(b"content-type", b"application/json")
        return b'{"clip":[0.5]}'
