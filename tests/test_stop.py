"""
Graceful stop, as twistd does on SIGTERM (it stops the service tree): the
listener closes, /ping answers 503, and every accepted request is answered
before the stop completes, up to --drain-timeout.
"""

import pytest
from steering import events
from support import bounded, rig, until
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.web.client import Agent, HTTPConnectionPool


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
            pending = [r.predict() for _ in range(8)]
            await until(lambda: r.balancer.dispatcher.queue_depth == 6)
            stopped = r.service.stopService()
            assert not stopped.called
            response = await idle.get(r.url + "/ping")
            assert response.code == 503
            await response.content()
            fresh = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
            with pytest.raises(ConnectionRefusedError):
                await fresh.get(r.url + "/ping")
            codes = []
            for d in pending:
                response = await d
                await response.content()
                codes.append(response.code)
            assert codes == [200] * 8
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
