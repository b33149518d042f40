"""
Two balancer replicas in front of the same ML hosts, as Kubernetes runs
them (docs/kubernetes.md): both serve and neither starves; when one stops
(SIGTERM), every request it accepted is answered, the clients it still
talks to are told to go elsewhere, and the other replica goes on serving.
"""

from __future__ import annotations

import json
import re

from support import bounded, codes_of, connect_raw, free_port, sleep, spawn_twistd, until
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.web.client import Agent, HTTPConnectionPool

from imml.testing import ENTRIES, predict_body, start_fake_hosts


def post(client: HTTPClient, port: int):
    ctype, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8 a picture")
    return client.post(f"http://127.0.0.1:{port}/predict", data=body, headers={"content-type": ctype})


class Front:
    """
    What Kubernetes puts in front of the replicas: a Service that spreads
    new requests over the replicas that are ready, in turn.  A connection
    refused reached no replica: the request goes to another, and the
    refusing replica leaves the rotation, as its endpoint would.
    """

    def __init__(self, ports: list[int], client: HTTPClient) -> None:
        self.ready, self.client = list(ports), client
        self.turn = 0
        self.answers: list[tuple[int, int, str]] = []
        self.failures: list[str] = []
        self.running = True

    def answered_by(self, port: int) -> list[tuple[int, int, str]]:
        return [a for a in self.answers if a[0] == port]

    async def one(self) -> None:
        while self.ready:
            port = self.ready[self.turn % len(self.ready)]
            self.turn += 1
            try:
                response = await post(self.client, port)
            except ConnectionRefusedError:
                if port in self.ready:
                    self.ready.remove(port)
                continue
            except Exception as e:
                self.failures.append(f"{port}: {e!r}")
                return
            await response.content()
            [backend] = response.headers.getRawHeaders("x-imml-backend", ["-"])
            self.answers.append((port, response.code, backend))
            return

    async def worker(self) -> None:
        while self.running:
            await self.one()


async def busy(client: HTTPClient, admin: int) -> int:
    """
    Requests a replica is answering, from its admin API (as a probe would
    ask it: by address).
    """
    response = await client.get(f"http://127.0.0.1:{admin}/api/status")
    document = json.loads(await response.content())
    return document["balancer"]["queue_depth"] + sum(h["in_flight"] for h in document["hosts"])


@bounded(150)
async def test_two_replicas_serve_the_same_hosts_and_one_stops_losing_nothing():
    hosts = await start_fake_hosts(reactor, [dict(name=f"h{i}", slots=4, service_time=0.05) for i in range(2)])
    backends = ",".join(h.address for h in hosts)
    ports, admins = [free_port(), free_port()], [free_port(), free_port()]
    replicas = [
        spawn_twistd(
            *"-n --pidfile= imml-balancer --health-interval 0.2 --drain-timeout 120".split(),
            *["--listen", f"tcp:{port}:interface=127.0.0.1", "--admin", f"tcp:{admin}:interface=127.0.0.1"],
            *["--backends", backends],
        )
        for port, admin in zip(ports, admins)
    ]
    (first, first_process), (second, second_process) = replicas
    pool = HTTPConnectionPool(reactor)
    client = HTTPClient(Agent(reactor, pool=pool))
    front = Front(ports, client)
    workers = []
    try:
        for child, _ in replicas:
            for host in hosts:
                await child.said(f"ML host {host.address} is up", 20)
        workers = [ensureDeferred(front.worker()) for _ in range(4)]
        # Both serve, neither starves, and each spreads its requests over both hosts.
        await until(lambda: all(len(front.answered_by(p)) >= 10 for p in ports), 60)
        for port in ports:
            assert {backend for _, _, backend in front.answered_by(port)} == {h.address for h in hosts}
        # A connection to the first replica that a client keeps open.
        kept = await connect_raw(ports[0])

        # The first replica's endpoint is removed (readiness, preStop), then it
        # gets SIGTERM with requests under way.
        front.ready.remove(ports[0])
        for host in hosts:
            host.service_time = 1.0  # long enough to be under way when the signal comes
        while await busy(client, admins[0]):  # what the front sent it before is answered
            await sleep(0.05)
        burst = [post(client, ports[0]) for _ in range(4)]
        while await busy(client, admins[0]) < 4:
            await sleep(0.05)
        before = len(front.answered_by(ports[1]))
        first_process.signalProcess("TERM")
        await first.said("stopping: no new connections")
        [accepted] = re.findall(r"waiting up to \S+ s for (\d+) requests", first.output)
        assert int(accepted) == 4
        # A client still on a kept-alive connection is answered, and told to
        # take its next request elsewhere.
        ctype, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8 a picture")
        kept.transport.write(
            b"POST /predict HTTP/1.1\r\nhost: balancer\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (ctype, len(body), body)
        )
        said = await kept.closed
        assert said.startswith(b"HTTP/1.1 200 ") and b"\r\nconnection: close\r\n" in said.lower()
        assert await codes_of(burst) == [200] * 4
        await first.ended  # (twistd ends as by the signal it handled: status 143, or 0)
        assert "every request answered" in first.output and "Server Shut Down." in first.output
        assert "Traceback" not in first.output
        # The other replica goes on serving.
        for host in hosts:
            host.service_time = 0.05
        await until(lambda: len(front.answered_by(ports[1])) >= before + 10, 60)
    finally:
        front.running = False
        await gatherResults(workers)
        for child, process in replicas:
            if not child.ended.called:
                process.signalProcess("TERM")
                await child.ended
        await pool.closeCachedConnections()
        for host in hosts:
            await host.stop()
    assert front.failures == []
    assert {code for _, code, _ in front.answers} == {200}
    assert "Traceback" not in second.output
