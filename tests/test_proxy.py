"""
The balancer over real loopback sockets, in front of fake Immich ML hosts.
"""

import json
from collections import Counter

import treq
import treq.client
from support import bounded, rig, sleep, until
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent
from zope.interface import implementer

from imml.testing import ENTRIES, predict_body


def served_by(rig_, response):
    return response.headers.getRawHeaders(b"x-fake-host")[0].decode()


def hosts(n, **kw):
    return [dict(name=f"h{i}", **kw) for i in range(n)]


@bounded(20)
async def test_round_robin_takes_hosts_in_turn():
    async with await rig(hosts(3), "--strategy", "round-robin") as r:
        seen = []
        for _ in range(9):
            response = await r.predict()
            assert response.code == 200
            assert json.loads(await response.content())["clip"].startswith("[")
            seen.append(served_by(r, response))
        assert Counter(seen) == {"h0": 3, "h1": 3, "h2": 3}
        assert seen[:3] in (["h0", "h1", "h2"],)


@bounded(20)
async def test_failover_sends_everything_to_the_first_host():
    async with await rig(hosts(3), "--strategy", "failover") as r:
        seen = [served_by(r, await r.predict()) for _ in range(6)]
        assert seen == ["h0"] * 6


@bounded(20)
async def test_least_connections_spreads_concurrent_requests():
    async with await rig(hosts(3, service_time=0.3), "--strategy", "least-connections") as r:
        responses = await gatherResults([r.predict() for _ in range(3)])
        assert Counter(served_by(r, x) for x in responses) == {"h0": 1, "h1": 1, "h2": 1}


@bounded(20)
async def test_configured_slots_are_filled_and_never_exceeded(tmp_path):
    async with await rig(hosts(2, service_time=0.2), wait_up=False) as placeholder:
        config = tmp_path / "imml.toml"
        config.write_text(
            "[balancer]\nstrategy = 'least-connections'\n"
            + "".join(f"[[hosts]]\naddress = '{h.address}'\nslots = {n}\n" for h, n in zip(placeholder.hosts, [3, 1]))
        )
        async with await rig(hosts(2, service_time=0.2), "--config", str(config)) as r:
            # the configured hosts are the placeholder's: r's own hosts are not listed
            assert [str(b) for b in r.fleet.backends] == [h.address for h in placeholder.hosts]
            responses = await gatherResults([r.predict() for _ in range(8)])
            assert all(x.code == 200 for x in responses)
            assert [h.max_in_flight for h in placeholder.hosts] == [3, 1]
            assert [h.served for h in placeholder.hosts] in ([6, 2], [5, 3])


@bounded(30)
async def test_a_host_killed_mid_run_costs_no_client_visible_error():
    async with await rig(hosts(3, service_time=0.02), "--strategy", "round-robin") as r:
        codes = []

        async def client():
            for _ in range(20):
                response = await r.predict()
                await response.content()
                codes.append(response.code)

        clients = gatherResults([ensureDeferred(client()) for _ in range(4)])
        await until(lambda: len(codes) >= 15)
        await r.hosts[1].stop()  # connections in flight are aborted
        await clients
        assert codes == [200] * 80
        assert not r.fleet.backends[1].up
        # a host may have answered a request whose answer the stop cut off:
        # that one was answered again by another host
        assert sum(h.served for h in r.hosts) >= 80


@bounded(20)
async def test_a_retried_post_arrives_byte_identical():
    picture = bytes(range(256)) * 4000  # 1 MB of every byte value, CRLFs included
    async with await rig(hosts(2), "--strategy", "failover") as r:
        r.hosts[0].mode = "error503"
        response = await r.predict(image=picture)
        assert response.code == 200
        assert served_by(r, response) == "h1"
        _, body = predict_body(ENTRIES["clip-visual"], image=picture)
        [first], [second] = r.hosts[0].received, r.hosts[1].received
        assert first.sha256 == second.sha256
        assert first.length == second.length
        [event] = r.request_events()
        assert event["tries"] == 2 and event["status"] == 200


@bounded(20)
async def test_4xx_pass_through_untouched_and_do_not_mark_the_host_down():
    async with await rig(hosts(2), "--strategy", "failover") as r:
        ctype, body = predict_body("{not json", image=b"x")
        response = await r.client.post(r.url + "/predict", data=body, headers={"content-type": ctype})
        assert response.code == 422
        assert "detail" in json.loads(await response.content())
        ctype, body = predict_body(ENTRIES["clip-visual"])
        response = await r.client.post(r.url + "/predict", data=body, headers={"content-type": ctype})
        assert response.code == 400
        assert [len(h.received) for h in r.hosts] == [2, 0]
        assert all(b.up for b in r.fleet.backends)


@bounded(20)
async def test_other_paths_are_forwarded():
    async with await rig(hosts(1)) as r:
        response = await r.client.get(r.url + "/")
        assert response.code == 200
        assert json.loads(await response.content()) == {"message": "Immich ML"}
        response = await r.client.get(r.url + "/nothing-here")
        assert response.code == 404


@bounded(20)
async def test_hop_by_hop_headers_are_dropped_and_x_forwarded_for_added():
    async with await rig(hosts(1)) as r:
        ctype, body = predict_body(ENTRIES["clip-visual"], image=b"x")
        response = await r.client.post(
            r.url + "/predict",
            data=body,
            headers={
                "content-type": ctype,
                "connection": "keep-alive, x-secret",
                "x-secret": "for this hop only",
                "keep-alive": "timeout=5",
                "x-immich": "kept",
                "x-forwarded-for": "10.1.2.3",
            },
        )
        assert response.code == 200
        headers = r.hosts[0].received[0].headers
        assert "x-secret" not in headers and "keep-alive" not in headers
        assert headers["x-immich"] == ["kept"]
        assert headers["x-forwarded-for"] == ["10.1.2.3, 127.0.0.1"]
        assert response.headers.getRawHeaders(b"x-imml-backend") == [r.hosts[0].address.encode()]
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]


@bounded(20)
async def test_ping_answers_pong_only_while_a_host_is_up():
    async with await rig(hosts(2), "--fall", "1") as r:
        response = await r.client.get(r.url + "/ping")
        assert response.code == 200 and await response.content() == b"pong"
        assert sum(h.pings for h in r.hosts) >= 2  # the hosts were checked, /ping was not forwarded
        r.hosts[0].mode = "ping-fail"
        await until(lambda: not r.fleet.backends[0].up)
        response = await r.client.get(r.url + "/ping")
        assert response.code == 200
        r.hosts[1].mode = "ping-fail"
        await until(lambda: not r.fleet.any_up)
        response = await r.client.get(r.url + "/ping")
        assert response.code == 503
        assert "no ML host is up" in json.loads(await response.content())["detail"]


@bounded(20)
async def test_no_host_up_gives_503_with_a_reason_and_nothing_is_lost():
    async with await rig(hosts(1), "--queue-timeout", "0.5", "--fall", "1") as r:
        r.hosts[0].mode = "ping-fail"
        await until(lambda: not r.fleet.any_up)
        response = await r.predict()
        assert response.code == 503
        assert json.loads(await response.content())["detail"] == "no ML host came up within 0.5 s"
        assert r.hosts[0].received == []


@bounded(20)
async def test_a_request_waits_for_a_host_to_come_back():
    async with await rig(hosts(1), "--queue-timeout", "10", "--fall", "1", "--rise", "1") as r:
        r.hosts[0].mode = "ping-fail"
        await until(lambda: not r.fleet.any_up)
        pending = r.predict()
        await sleep(0.5)
        assert r.hosts[0].received == []
        r.hosts[0].mode = "ok"
        response = await pending
        assert response.code == 200


@bounded(20)
async def test_an_oversized_body_gets_413_and_no_host_is_contacted():
    async with await rig(hosts(1), "--max-body", "64k") as r:
        response = await r.predict(image=b"x" * 70_000)
        assert response.code == 413
        assert "65536" in json.loads(await response.content())["detail"]
        response = await r.predict(image=b"x" * 60_000)
        assert response.code == 200
        assert len(r.hosts[0].received) == 1


@bounded(20)
async def test_a_pooled_connection_closed_by_the_host_is_retried_not_failed():
    # The host closes idle connections after 0.05 s, well inside the pool's
    # own idle timeout, so the second request is sent on a dead connection.
    async with await rig(hosts(1, keepalive_timeout=0.05), "--health-interval", "60") as r:
        for _ in range(3):
            response = await r.predict()
            assert response.code == 200
            await sleep(0.2)
        assert r.fleet.backends[0].up
        assert [e["tries"] for e in r.request_events()] == [1, 1, 1]


@bounded(20)
async def test_forward_proxy_requests_are_refused():
    async with await rig(hosts(1)) as r:
        port = int(r.url.rsplit(":", 1)[1])
        answer = await raw_request(port, b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400")
        answer = await raw_request(port, b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400")
        assert r.hosts[0].received == []
        assert [(e["client"], e["method"], e["path"], e["status"], e["host"]) for e in r.request_events()] == [
            ("127.0.0.1", "GET", "http://example.org/", 400, None),
            ("127.0.0.1", "CONNECT", "example.org:443", 400, None),
        ]


@bounded(20)
async def test_one_log_event_per_request():
    async with await rig(hosts(2), "--strategy", "failover") as r:
        r.hosts[0].mode = "error503"
        await r.predict(task="clip-textual")
        await r.client.get(r.url + "/")
        events = r.request_events()
        assert len(events) == 2
        first, second = events
        assert (first["task"], first["status"], first["tries"]) == ("clip-textual", 200, 2)
        assert (first["client"], first["method"], first["path"]) == ("127.0.0.1", "POST", "/predict")
        assert first["host"] == r.hosts[1].address
        assert first["tried"] == [r.hosts[0].address, r.hosts[1].address]
        assert first["duration_s"] >= 0 and first["bytes_in"] > 0 and first["bytes_out"] > 0
        assert (second["method"], second["path"], second["task"], second["status"]) == ("GET", "/", None, 200)
        text = formatEvent(first)
        assert text.startswith("127.0.0.1 POST /predict clip-textual 200 in ") and " 2 tries " in text


class _Raw(Protocol):
    def __init__(self, request):
        self.request, self.data = request, b""

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.data += data
        if b"\r\n\r\n" in self.data:
            self.transport.loseConnection()


async def raw_request(port: int, data: bytes) -> bytes:
    from twisted.internet.defer import Deferred

    protocol = _Raw(data)
    done = Deferred()
    protocol.connectionLost = lambda reason: done.callback(None)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    await done
    return protocol.data


@bounded(30)
async def test_a_host_failing_one_task_stops_getting_that_task_only():
    async with await rig(hosts(2), "--strategy", "failover") as r:
        r.hosts[0].failing_tasks = {"ocr"}
        for _ in range(5):
            response = await r.predict(task="ocr")
            assert response.code == 200 and served_by(r, response) == "h1"
        ocr_on_h0 = [x for x in r.hosts[0].received if x.task == "ocr"]
        assert len(ocr_on_h0) == 3  # then it was left out
        response = await r.predict(task="clip-visual")
        assert served_by(r, response) == "h0"
        assert r.fleet.backends[0].up
        [blocked] = [e for e in r.events if e.get("imml_event") == "task-blocked"]
        assert (blocked["backend"], blocked["task"]) == (r.hosts[0].address, "ocr")


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name):
        self.name = name

    def cancel(self):
        pass


@implementer(IHostnameResolver)
class _FailingResolver:
    """A name resolver that never resolves anything (getaddrinfo failing)."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        receiver.resolutionBegan(_Resolution(hostName))
        receiver.resolutionComplete()


@bounded(20)
async def test_hosts_given_by_address_need_no_name_resolution():
    async with await rig(hosts(2), "--strategy", "round-robin") as r:
        from imml.upstream import make_agent, make_pool

        client = treq.client.HTTPClient(make_agent(reactor, 5, make_pool(reactor, persistent=False)))
        old = reactor.installNameResolver(_FailingResolver())
        try:
            ctype, body = predict_body(ENTRIES["clip-textual"], text="a cat")
            for _ in range(4):
                response = await client.post(r.url + "/predict", data=body, headers={"content-type": ctype})
                assert response.code == 200, await response.content()
            assert all(b.up for b in r.fleet.backends)
        finally:
            reactor.installNameResolver(old)
