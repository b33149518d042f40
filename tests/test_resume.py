"""
Resuming after an outage: while every host is down and requests wait, a
host that answers again is checked within a second, comes up after one
passing check, and serves the waiting requests (one at first, as any host
that comes back).
"""

from memory import memory_balancer
from support import bounded, rig, until

from imml.health import DOWN, UP, HealthChecker
from imml.upstream import make_pinger


def with_checker(*specs: dict) -> tuple:
    """
    A balancer in memory (L{memory_balancer}) whose hosts are checked as
    the balancer's are: every 5 s while up, 2 s while down, every second
    while requests wait.
    """
    b = memory_balancer(*specs)
    checker = HealthChecker(
        b.fleet,
        make_pinger(b.agent, b.clock, 2.0),
        b.clock,
        interval=5,
        down_interval=2,
        fast_interval=1,
        waiting=lambda: b.dispatcher.queue_depth > 0,
    )
    b.dispatcher.when_waiting(checker.requests_wait)
    checker.start()
    b.agent.flush()
    return b, checker


def test_waiting_requests_are_answered_within_2_s_of_a_host_answering_again():
    b, checker = with_checker({"name": "a", "service_time": 0.5})
    host, backend = b.host("a"), b.fleet.backends[0]
    b.agent.remove("10.0.0.1:3003")  # the service is gone: connections refused
    clients = [b.predict() for _ in range(3)]
    assert backend.health.state == DOWN  # the first request found it gone
    b.advance(6.1)  # just after a check: every 2 s, the next would be 1.9 s away
    assert b.dispatcher.queue_depth == 3 and not any(c.answer() for c in clients)

    b.agent.add("10.0.0.1:3003", host)
    pings, back = host.pings, b.clock.seconds()
    while not backend.in_flight and b.clock.seconds() - back < 10:
        b.advance(0.05)
    assert backend.health.state == UP and host.pings == pings + 1  # one passing check
    assert (backend.in_flight, b.dispatcher.queue_depth) == (1, 2)  # slow start: one request at first
    while clients[0].answer() is None and b.clock.seconds() - back < 10:
        b.advance(0.05)
    assert clients[0].answer()[0] == 200
    assert b.clock.seconds() - back <= 2.0
    b.advance(3)
    assert [c.answer()[0] for c in clients] == [200, 200, 200]
    checker.stop()


def test_with_another_host_up_a_returning_host_still_rises():
    b, checker = with_checker({"name": "a"}, {"name": "b"})
    b.agent.remove("10.0.0.2:3003")
    b.advance(16)  # b fails its checks at 5, 10 and 15 s: down, then checked every 2 s
    backend, host = b.fleet.backends[1], b.host("b")
    assert backend.health.state == DOWN
    b.agent.add("10.0.0.2:3003", host)
    pings = host.pings
    b.advance(1.05)  # its next check, at 17 s
    assert host.pings == pings + 1 and not backend.up  # a is up: b needs two passes in a row
    b.advance(1.0)  # on its way up, checked a second later
    assert host.pings == pings + 2 and backend.up
    checker.stop()


@bounded(30)
async def test_over_loopback_a_host_that_comes_back_serves_the_waiting_request_after_one_check():
    # Up hosts are checked every minute and a down one needs 100 passes;
    # only the fast checks while the request waits, and one pass to come up
    # with no other host up, answer it within the test's bound.
    args = ("--health-interval", "60", "--health-down-interval", "60", "--health-fast-interval", "0.2", "--rise", "100")
    async with await rig([{"name": "h0"}], *args) as r:
        host = r.hosts[0]
        port = host.port
        await host.stop()
        answer = r.predict()
        await until(lambda: r.balancer.dispatcher.queue_depth == 1)  # refused: the host is down
        await host.listen(f"tcp:{port}:interface=127.0.0.1")
        response = await answer
        assert response.code == 200
        assert response.headers.getRawHeaders(b"x-fake-host") == [b"h0"]
        ups = [e for e in r.events if e.get("imml_event") == "health" and e["new"] == UP and e["old"] == DOWN]
        assert [e["reason"] for e in ups] == ["health check passed, and no other host is up"]
