"""
A balancer in memory: its request path (site, forwarder, dispatcher, fleet)
over fake ML hosts reached through L{imml.testing.MemoryAgent}, with raw HTTP
fed to its site over an in-memory transport and time on a
L{twisted.internet.task.Clock}.  No socket is opened.
"""

from __future__ import annotations

from typing import Any, Optional

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from imml.agreement import Agreement
from imml.backends import parse_backend
from imml.dispatch import Dispatcher
from imml.fleet import BackendSettings, Fleet
from imml.forward import Forwarder, ForwardSettings
from imml.records import AttemptRecord, RequestRecord
from imml.requestlog import RequestLog
from imml.site import BalancerResource, BalancerSite
from imml.strategies import strategy_named
from imml.testing import ENTRIES, FakeMLHost, MemoryAgent, predict_body
from imml.upstream import Upstream


@define(eq=False)
class Records:
    """A reporter that keeps what it is told."""

    attempts: list[AttemptRecord] = field(factory=list)
    requests: list[RequestRecord] = field(factory=list)

    def attempt_finished(self, record: AttemptRecord) -> None:
        self.attempts.append(record)

    def request_finished(self, record: RequestRecord) -> None:
        self.requests.append(record)


@define(eq=False)
class Client:
    """One client connection with one request on it."""

    transport: StringTransport
    channel: Any
    #: The request's body, as sent.
    body: bytes

    def answer(self) -> Optional[tuple[int, dict[bytes, bytes], bytes]]:
        """
        The status, headers and body of the answer, once complete; None
        before.
        """
        raw = self.transport.value()
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            if len(body) < int(headers[b"content-length"]):
                return None
        elif headers.get(b"transfer-encoding") == b"chunked":
            if not body.endswith(b"0\r\n\r\n"):
                return None
            body = _unchunk(body)
        return status, headers, body

    @property
    def cut(self) -> bool:
        """Whether the balancer aborted the connection."""
        return self.transport.disconnecting

    def partial(self) -> bytes:
        """What arrived of the answer's body so far."""
        return self.transport.value().partition(b"\r\n\r\n")[2]

    def go_away(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        body = rest[n + 2 :]
    return out


@define(eq=False)
class MemoryBalancer:
    clock: Clock
    agent: MemoryAgent
    hosts: list[FakeMLHost]
    fleet: Fleet
    dispatcher: Dispatcher
    forwarder: Forwarder
    site: BalancerSite
    records: Records
    #: The forwarder's log events, and the request log's (and the agreement
    #: check's).
    events: list[dict[str, Any]]
    agreement: Optional[Agreement] = None

    def send(
        self, method: bytes, path: bytes, body: bytes = b"", headers: Optional[dict[bytes, bytes]] = None
    ) -> Client:
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: balancer"]
        lines += [name + b": " + value for name, value in (headers or {}).items()]
        lines.append(b"Content-Length: %d" % len(body))
        return self.send_raw(b"\r\n".join(lines) + b"\r\n\r\n" + body, body)

    def send_raw(self, data: bytes, body: bytes = b"") -> Client:
        """Open a client connection from 192.0.2.50 and send C{data} on it, as it is."""
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.50", 40000))
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(data)
        self.agent.flush()
        return Client(transport, channel, body)

    def request_events(self) -> list[dict[str, Any]]:
        """The request log's events: one per request."""
        return [e for e in self.events if e.get("imml_event") == "request"]

    def predict(self, task: str = "clip-visual", image: bytes = b"\xff\xd8 a small picture") -> Client:
        content_type, body = predict_body(
            ENTRIES[task],
            image=None if task == "clip-textual" else image,
            text="a cat" if task == "clip-textual" else None,
        )
        return self.send(b"POST", b"/predict", body, {b"Content-Type": content_type})

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let C{seconds} pass, moving the in-memory connections' bytes as it does."""
        steps = max(1, round(seconds / step))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            self.agent.flush()

    def host(self, name: str) -> FakeMLHost:
        return next(h for h in self.hosts if h.name == name)


def memory_balancer(
    *specs: dict[str, Any],
    strategy: str = "failover",
    response_timeout: float = 300.0,
    max_tries: int = 3,
    queue_timeout: float = 120.0,
    hold_limit: int = 8 * 1024 * 1024,
    max_body: int = 100 * 1024 * 1024,
    agreement: Optional[dict[str, Any]] = None,
    settings: Optional[dict[str, BackendSettings]] = None,
) -> MemoryBalancer:
    """
    A balancer over one fake host per spec (FakeMLHost's arguments; C{name}
    is required), at addresses 10.0.0.1:3003, 10.0.0.2:3003..., every host
    up.  A spec with C{"listening": False} has no host at its address (its
    connections are refused).

    The request path is all there but the agreement check, unless
    C{agreement} gives its arguments (C{{}}: its defaults): the tests of
    forwarding count what the hosts receive, and canaries would be among it.
    C{settings} gives hosts' settings by name.
    """
    clock = Clock()
    agent = MemoryAgent()
    hosts, addresses = [], []
    for number, spec in enumerate(specs, 1):
        spec = dict(spec)
        listening = spec.pop("listening", True)
        address = f"10.0.0.{number}:3003"
        host = FakeMLHost(clock, **spec)
        hosts.append(host)
        addresses.append(parse_backend(address))
        if listening:
            agent.add(address, host)
    names = {parse_backend(f"10.0.0.{n}:3003"): spec["name"] for n, spec in enumerate(specs, 1)}
    fleet = Fleet.from_addresses(addresses, clock, settings=lambda a: (settings or {}).get(names[a], BackendSettings()))
    for backend in fleet.backends:
        fleet.check_passed(backend)
    events: list[dict[str, Any]] = []
    upstream = Upstream(agent, fresh_agent=agent, hold_limit=hold_limit)
    check = None
    if agreement is not None:
        log = Logger(namespace="imml.agreement", observer=events.append)
        check = Agreement(fleet, upstream, clock, log=log, **agreement)
    dispatcher = Dispatcher(fleet, strategy_named(strategy), clock, queue_timeout=queue_timeout, gate=check)
    records = Records()
    log = Logger(namespace="imml.forward", observer=events.append)
    request_log = RequestLog(log)
    forwarder = Forwarder(
        fleet,
        dispatcher,
        upstream,
        clock,
        ForwardSettings(max_tries, response_timeout),
        reporters=[records, request_log],
        log=log,
    )
    site = BalancerSite(
        BalancerResource(fleet, forwarder), max_body, report=request_log.request_finished, reactor=clock
    )
    return MemoryBalancer(clock, agent, hosts, fleet, dispatcher, forwarder, site, records, events, check)
