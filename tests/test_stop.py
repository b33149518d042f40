"""
Graceful stop, as twistd does on SIGTERM (it stops the service tree): the
listener closes, /ping answers 503, and every accepted request is answered
before the stop completes, up to --drain-timeout.
"""

import json

import pytest
from memory import memory_balancer
from steering import events
from support import bounded, codes_of, connect_raw, free_port, rig, spawn_twistd, until
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from imml.control import GracefulStop
from imml.records import CANCELLED
from imml.testing import ENTRIES, predict_body, start_fake_hosts


def hosts(n, **kw):
    return [dict(name=f"h{i}", **kw) for i in range(n)]


@bounded(30)
async def test_stopping_under_load_answers_every_accepted_request():
    async with await rig(hosts(2, service_time=0.2), "--strategy", "round-robin") as r:
        for backend in r.fleet.backends:
            backend.limiter.slots = 1
        # An idle keep-alive connection, as Immich keeps one, for /ping.
        pool = HTTPConnectionPool(reactor)
        pool.maxPersistentPerHost = 1
        idle = HTTPClient(Agent(reactor, pool=pool))
        try:
            response = await idle.get(r.url + "/ping")
            assert response.code == 200 and await response.content() == b"pong"
            raw = await connect_raw(r.balancer.listener.port.getHost().port)
            pending = [r.predict() for _ in range(8)]
            await until(lambda: r.balancer.dispatcher.queue_depth == 6)
            stopped = r.service.stopService()
            assert not stopped.called
            response = await idle.get(r.url + "/ping")
            assert response.code == 503
            await response.content()
            # A client on a connection opened before is answered, and told to
            # take its next request elsewhere: the connection closes.
            raw.transport.write(b"GET /ping HTTP/1.1\r\nhost: balancer\r\n\r\n")
            said = await raw.closed
            assert said.startswith(b"HTTP/1.1 503 ") and b"\r\nconnection: close\r\n" in said.lower()
            fresh = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
            with pytest.raises(ConnectionRefusedError):
                await fresh.get(r.url + "/ping")
            assert await codes_of(pending) == [200] * 8
            await stopped
            assert sum(h.served for h in r.hosts) == 8
            [draining] = events(r, "stop-draining")
            assert (draining["active"], draining["in_flight"], draining["queued"]) == (8, 2, 6)
            assert len(events(r, "stop-drained")) == 1 and events(r, "stop-timeout") == []
        finally:
            await pool.closeCachedConnections()


@bounded(20)
async def test_stopping_gives_up_after_the_drain_timeout():
    async with await rig(hosts(1), "--drain-timeout", "0.3") as r:
        r.hosts[0].mode = "hang"
        pending = r.predict()
        pending.addErrback(lambda f: None)
        await until(lambda: r.fleet.backends[0].in_flight == 1)
        started = reactor.seconds()
        await r.service.stopService()
        [event] = events(r, "stop-timeout")
        # (The rest of the tree then stops; the health check of the hung
        # host may take its own --health-timeout.)
        assert 0.3 <= event["log_time"] - started < 1.0
        assert (event["active"], event["in_flight"]) == (1, 1)
        pending.cancel()


@bounded(20)
async def test_an_idle_balancer_stops_at_once():
    async with await rig(hosts(1), "--drain-timeout", "20") as r:
        started = reactor.seconds()
        await r.service.stopService()
        assert reactor.seconds() - started < 1
        assert len(events(r, "stop-drained")) == 1
        # The admin listener stopped after the requests were answered.
        assert not r.balancer.admin.running and not r.balancer.listener.running


@bounded(60)
async def test_a_second_sigterm_while_draining_stops_at_once_and_answers_what_was_waiting():
    [host] = await start_fake_hosts(reactor, hosts(1, service_time=3600.0))
    port = free_port()
    # A drain timeout far longer than the test: only the second signal can end it.
    # (No agreement check: the test counts the requests on the host.)
    child, process = spawn_twistd(
        *"-n --pidfile= imml-balancer --admin none --health-interval 0.2 --drain-timeout 3600".split(),
        *"--agreement off".split(),
        *["--listen", f"tcp:{port}:interface=127.0.0.1", "--backends", host.address],
    )
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        url = f"http://127.0.0.1:{port}"
        client = HTTPClient(Agent(reactor, pool=pool))
        await child.said(f"ML host {host.address} is up")
        ctype, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8 a picture")
        pending = client.post(url + "/predict", data=body, headers={"content-type": ctype})
        await until(lambda: host.in_flight == 1)
        process.signalProcess("TERM")
        await child.said("stopping: no new connections")
        process.signalProcess("TERM")
        response = await pending
        assert response.code == 503
        assert (await response.json())["detail"] == "the balancer stopped before this request was answered"
        await child.ended
        await until(lambda: host.cancelled == 1)  # the request on the host was cancelled
        assert "stopping at once; 1 requests cancelled (1 in flight, 0 queued)" in child.output
        assert "Traceback" not in child.output and "ReactorNotRunning" not in child.output
    finally:
        await child.killed(process)
        await pool.closeCachedConnections()
        await host.stop()


def test_hurrying_a_stop_answers_every_request_under_way_with_503_and_frees_the_hosts():
    b = memory_balancer({"name": "a", "mode": "hang"})
    b.fleet.backends[0].limiter.slots = 1
    stopper = GracefulStop(Service(), b.site.resource, b.fleet, b.dispatcher, b.clock, timeout=3600)
    clients = [b.predict() for _ in range(3)]  # one on the host, two waiting for it
    seen: list = []
    globalLogPublisher.addObserver(seen.append)
    try:
        stopped: list = []
        stopper.stopService().addBoth(stopped.append)
        b.advance(10)
        assert not stopped and stopper.busy() == (3, 1, 2)
        stopper.hurry("SIGTERM")
        b.advance(0.1)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert stopped == [None]
    for client in clients:
        status, _, body = client.answer()
        assert status == 503 and json.loads(body)["detail"] == "the balancer stopped before this request was answered"
    assert stopper.busy() == (0, 0, 0) and b.host("a").in_flight == 0
    # The one on the host was cancelled; the waiting ones never reached it.
    assert [a.outcome for a in b.records.attempts] == [CANCELLED] and len(b.host("a").received) == 1
    assert sorted(str(r.status) for r in b.records.requests) == ["503", "503", "cancelled"]
    [now] = [e for e in seen if e.get("imml_event") == "stop-now"]
    assert (now["why"], now["active"], now["in_flight"], now["queued"]) == ("SIGTERM", 3, 1, 2)
    assert not [e for e in seen if e.get("imml_event") in ("stop-drained", "stop-timeout")]
