"""
The admin listener over loopback, in front of fake ML hosts: the status
document, the page, and the actions.
"""

import json
from typing import Any

from steering import act, admin_url, events, host, status
from support import bounded, rig, until
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.web.iweb import IResponse

from imml.backends import parse_backend


def hosts(n: int, **kw: Any) -> list[dict[str, Any]]:
    return [dict(name=f"h{i}", **kw) for i in range(n)]


def served_by(response: IResponse) -> bytes:
    return response.headers.getRawHeaders(b"x-fake-host")[0]


@bounded(20)
async def test_status_shows_each_host_and_the_balancer() -> None:
    async with await rig(hosts(2), "--strategy", "failover") as r:
        r.hosts[0].mode = "error503"
        for task in ("clip-visual", "ocr"):
            response = await r.predict(task=task)
            assert response.code == 200
            await response.content()
        doc = await status(r)
        balancer = doc["balancer"]
        assert balancer["strategy"] == "failover"
        assert balancer["version"] == __import__("imml").__version__
        assert (balancer["answered"], balancer["failed"], balancer["queue_depth"]) == (2, 0, 0)
        assert balancer["uptime"] >= 0 and balancer["stopping"] is False and balancer["actions"] is False
        first, second = (h.address for h in r.hosts)
        assert [h["address"] for h in doc["hosts"]] == [first, second]
        a, b = host(doc, first), host(doc, second)
        # a answered nothing yet: its models may not be loaded
        assert (a["state"], b["state"]) == ("cold", "up")
        assert a["errors"] == {"status 503": 2} and a["served"] == 0 and a["latency"] == {}
        assert b["served"] == 2 and b["errors"] == {}
        assert set(b["latency"]) == {"clip-visual", "ocr"}
        assert 0 < b["latency"]["ocr"]["p50"] <= b["latency"]["ocr"]["p95"]
        assert sum(b["throughput"]) == 2 and sum(a["throughput"]) == 0
        assert b["last_result"] == "pong" and b["last_check"] <= balancer["now"]
        assert b["since"] <= balancer["now"]
        assert b["in_flight"] == 0


@bounded(20)
async def test_a_down_host_shows_as_down_with_its_check_result() -> None:
    async with await rig(hosts(2), "--fall", "1") as r:
        r.hosts[1].mode = "ping-fail"
        await until(lambda: not r.fleet.backends[1].up)
        doc = await status(r)
        down = host(doc, r.hosts[1].address)
        assert down["state"] == "down" and down["last_result"] == "status 503"


@bounded(20)
async def test_the_page_is_one_self_contained_document() -> None:
    async with await rig(hosts(1)) as r:
        response = await r.client.get(admin_url(r) + "/")
        page = (await response.content()).decode()
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
        assert "api/status" in page
        for external in ("http://", "https://", "src=", "<link"):
            assert external not in page.replace("http://www.w3.org/2000/svg", "")


@bounded(20)
async def test_actions_are_off_by_default() -> None:
    async with await rig(hosts(1)) as r:
        code, body = await act(r, r.hosts[0].address, "drain")
        assert code == 403 and "--admin-actions" in body["detail"]
        assert not r.fleet.backends[0].draining


@bounded(30)
async def test_drain_lets_requests_in_flight_finish_and_sends_new_ones_elsewhere() -> None:
    async with await rig(hosts(2, service_time=0.3), "--admin-actions", "--strategy", "round-robin") as r:
        first = r.hosts[0].address
        for backend in r.fleet.backends:
            backend.limiter.slots = 2
        pending = [r.predict() for _ in range(4)]
        await until(lambda: r.hosts[0].in_flight == 2)
        code, body = await act(r, first, "drain")
        assert code == 200 and body["host"]["state"] == "draining" and body["host"]["in_flight"] == 2
        reached = len(r.hosts[0].received)
        responses = await gatherResults(pending)
        assert [x.code for x in responses] == [200] * 4
        # The two in flight on h0 finished there; nothing more was sent to it.
        assert r.hosts[0].served == reached and r.hosts[0].cancelled == 0
        later = [served_by(await r.predict()) for _ in range(4)]
        assert later == [b"h1"] * 4
        assert len(r.hosts[0].received) == reached
        doc = await status(r)
        assert host(doc, first)["state"] == "draining"
        [event] = events(r, "admin-action")
        assert (event["action"], event["backend"], event["peer"]) == ("drain", first, "127.0.0.1")
        assert [e["backend"] for e in events(r, "drain")] == [first]
        code, body = await act(r, first, "enable")
        assert code == 200 and body["host"]["state"] == "up"
        assert b"h0" in [served_by(await r.predict()) for _ in range(2)]
        assert [e["action"] for e in events(r, "admin-action")] == ["drain", "enable"]


@bounded(20)
async def test_check_runs_a_health_check_now() -> None:
    async with await rig(hosts(1), "--admin-actions", "--health-interval", "60", "--fall", "1") as r:
        pings = r.hosts[0].pings
        r.hosts[0].mode = "ping-fail"
        code, body = await act(r, r.hosts[0].address, "check")
        assert code == 200
        assert r.hosts[0].pings == pings + 1
        assert body["host"]["state"] == "down" and body["host"]["last_result"] == "status 503"
        [event] = events(r, "admin-action")
        assert event["action"] == "check" and event["result"] == "status 503"


class _Silent(Protocol):
    """
    Takes the connection and never answers.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)


@bounded(20)
async def test_a_check_whose_client_went_away_runs_to_its_end_unanswered() -> None:
    """
    The client that asked for a check goes away before the host answers:
    the check still takes effect and is logged, and nothing fails trying to
    answer it.
    """
    factory = Factory.forProtocol(_Silent)
    factory.connections = []
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    try:
        async with await rig(
            hosts(1), "--admin-actions", "--health-interval", "60", "--health-timeout", "0.3", "--fall", "1"
        ) as r:
            address = f"127.0.0.1:{port.getHost().port}"
            added = r.fleet.add(parse_backend(address))
            await until(lambda: added.health.state == "down")  # checked once it joined
            checked = added.health.last_check
            answered, failed = [], []
            asked = r.client.post(f"{admin_url(r)}/api/hosts/{address}/check")
            asked.addCallbacks(answered.append, failed.append)
            await until(lambda: len(factory.connections) == 2)  # the check is under way
            assert not answered and not failed
            asked.cancel()  # the client goes away
            assert failed and not answered
            await until(lambda: events(r, "admin-action"))
            [event] = events(r, "admin-action")
            assert (event["action"], event["backend"], event["result"]) == ("check", address, "timed out")
            assert added.health.state == "down" and added.health.last_check > checked
            await until(lambda: not factory.connections[1].transport.connected)
            assert [e for e in r.events if "log_failure" in e] == []
    finally:
        await port.stopListening()


@bounded(20)
async def test_actions_refuse_what_they_cannot_do() -> None:
    async with await rig(hosts(1), "--admin-actions") as r:
        address = r.hosts[0].address
        assert (await act(r, "nas:3003", "drain"))[0] == 404
        assert (await act(r, address, "reboot"))[0] == 404
        response = await r.client.get(f"{admin_url(r)}/api/hosts/{address}/drain")
        assert response.code == 405 and response.headers.getRawHeaders(b"allow") == [b"POST"]
        await response.content()
        # A page of another origin may not steer the fleet.
        code, body = await act(r, address, "drain", headers={"origin": "http://evil.example"})
        assert code == 403
        assert not r.fleet.backends[0].draining
        # The page's own origin may.
        port = admin_url(r).rsplit(":", 1)[1]
        code, body = await act(r, address, "drain", headers={"origin": f"http://127.0.0.1:{port}"})
        assert code == 200 and r.fleet.backends[0].draining


@bounded(20)
async def test_the_proxy_port_forwards_admin_paths_and_never_acts_on_them() -> None:
    async with await rig(hosts(1), "--admin-actions") as r:
        address = r.hosts[0].address
        response = await r.client.post(f"{r.url}/api/hosts/{address}/drain")
        await response.content()
        assert response.code == 404  # the ML host's answer: it was forwarded as it is
        assert not r.fleet.backends[0].draining
        response = await r.client.get(r.url + "/api/status")
        assert response.code == 404 and b"hosts" not in await response.content()


@bounded(20)
async def test_admin_none_opens_no_listener() -> None:
    async with await rig(hosts(1), "--admin", "none") as r:
        assert r.balancer.admin is None
        response = await r.predict()
        assert response.code == 200
        await response.content()


def test_the_admin_listener_is_on_localhost_by_default() -> None:
    from imml.tap import Options

    options = Options()
    options.parseOptions(["--backends", "nas"])
    assert options["admin"] == "tcp:8080:interface=127.0.0.1"
    assert options["admin-actions"] == 0


def test_status_json_is_documented() -> None:
    """
    Every field of /api/status is named in docs/admin.md.
    """
    from pathlib import Path

    from twisted.internet.task import Clock

    from imml.backends import parse_backends
    from imml.dispatch import Dispatcher
    from imml.fleet import Fleet
    from imml.status import Status
    from imml.strategies import strategy_named
    from imml.window import RecentWindow

    clock = Clock()
    fleet = Fleet.from_addresses(parse_backends("a"), clock)
    doc = Status(fleet, Dispatcher(fleet, strategy_named("failover"), clock), RecentWindow(clock), clock).snapshot()
    text = (Path(__file__).resolve().parent.parent / "docs" / "admin.md").read_text()
    for name in [*doc["balancer"], *doc["hosts"][0]]:
        assert f"`{name}`" in text, name
    json.dumps(doc)
