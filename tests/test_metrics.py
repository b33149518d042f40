"""
Prometheus metrics: counted from the forwarder's records, levels read from
the fleet at scrape time, served by prometheus_client on the admin listener.
"""

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from imml.backends import parse_backends
from imml.dispatch import Dispatcher
from imml.fleet import Fleet
from imml.interfaces import IReporter
from imml.metrics import Metrics
from imml.records import ANSWERED, RETRIED, AttemptRecord, RequestRecord
from imml.strategies import strategy_named
from steering import admin_url, metrics, sample
from support import bounded, rig, until


def fleet_metrics():
    clock = Clock()
    fleet = Fleet.from_addresses(parse_backends("a,b"), clock)
    dispatcher = Dispatcher(fleet, strategy_named("round-robin"), clock)
    return fleet, dispatcher, Metrics(fleet, dispatcher, clock)


def test_each_balancer_has_its_own_registry():
    _, _, one = fleet_metrics()
    _, _, two = fleet_metrics()
    assert verifyObject(IReporter, one)
    one.attempt_finished(AttemptRecord("a:3003", "ocr", 200, None, 0.3, ANSWERED))
    value = one.registry.get_sample_value
    assert value("imml_backend_requests_total", {"backend": "a:3003", "task": "ocr", "status": "200"}) == 1
    assert two.registry.get_sample_value(
        "imml_backend_requests_total", {"backend": "a:3003", "task": "ocr", "status": "200"}) is None


def test_attempts_count_by_status_and_task_errors_by_kind_and_retries():
    _, _, m = fleet_metrics()
    m.attempt_finished(AttemptRecord("a:3003", "faces", 503, "status 503", 0.01, RETRIED))
    m.attempt_finished(AttemptRecord("a:3003", "faces", None, "connection refused", 0.0, RETRIED))
    m.attempt_finished(AttemptRecord("b:3003", "faces", 200, None, 0.2, ANSWERED))
    m.request_finished(RequestRecord("POST", "/predict", "faces", 200, "b:3003", ("a:3003", "a:3003", "b:3003"), 0.25))
    value = m.registry.get_sample_value
    assert value("imml_backend_requests_total", {"backend": "a:3003", "task": "faces", "status": "503"}) == 1
    assert value("imml_backend_requests_total", {"backend": "a:3003", "task": "faces", "status": "none"}) == 1
    assert value("imml_backend_errors_total", {"backend": "a:3003", "kind": "connection refused"}) == 1
    assert value("imml_backend_retries_total", {"backend": "a:3003"}) == 2
    assert value("imml_backend_retries_total", {"backend": "b:3003"}) is None
    # Only answers are latency samples: b's 0.2 s, in the 0.25 s bucket.
    assert value("imml_backend_request_duration_seconds_count", {"backend": "b:3003", "task": "faces"}) == 1
    assert value("imml_backend_request_duration_seconds_bucket", {"backend": "b:3003", "task": "faces", "le": "0.1"}) == 0
    assert value("imml_backend_request_duration_seconds_bucket", {"backend": "b:3003", "task": "faces", "le": "0.25"}) == 1
    assert value("imml_backend_request_duration_seconds_count", {"backend": "a:3003", "task": "faces"}) is None
    assert value("imml_requests_total", {"status": "200", "task": "faces"}) == 1


def test_latency_buckets_are_cumulative_and_a_bound_is_inside_its_bucket():
    _, _, m = fleet_metrics()
    for seconds in (0.25, 0.25, 0.02, 400.0):
        m.request_finished(RequestRecord("POST", "/predict", "ocr", 200, "a:3003", ("a:3003",), seconds))
    value = m.registry.get_sample_value

    def bucket(le):
        return value("imml_request_duration_seconds_bucket", {"task": "ocr", "le": le})

    assert [bucket("0.01"), bucket("0.025"), bucket("0.1"), bucket("0.25"), bucket("300.0"), bucket("+Inf")] == [
        0, 1, 1, 3, 3, 4]
    assert value("imml_request_duration_seconds_count", {"task": "ocr"}) == 4
    assert value("imml_request_duration_seconds_sum", {"task": "ocr"}) == 400.52


def test_levels_are_read_from_the_fleet_when_scraped():
    fleet, dispatcher, m = fleet_metrics()
    a, b = fleet.backends
    fleet.check_passed(a)
    fleet.check_failed(b, "connection refused")
    fleet.drain(a)
    a.in_flight = 2
    value = m.registry.get_sample_value
    assert value("imml_backend_in_flight", {"backend": "a:3003"}) == 2
    assert value("imml_backend_up", {"backend": "a:3003"}) == 1
    assert value("imml_backend_up", {"backend": "b:3003"}) == 0
    assert value("imml_backend_state", {"backend": "a:3003", "state": "draining"}) == 1
    assert value("imml_backend_state", {"backend": "a:3003", "state": "up"}) == 0
    assert value("imml_backend_state", {"backend": "b:3003", "state": "down"}) == 1
    assert value("imml_queue_depth", {}) == 0
    assert value("imml_build_info", {"version": __import__("imml").__version__, "strategy": "round-robin"}) == 1


def hosts(n, **kw):
    return [dict(name=f"h{i}", **kw) for i in range(n)]


@bounded(20)
async def test_metrics_over_loopback_count_what_the_hosts_did():
    async with await rig(hosts(2), "--strategy", "failover") as r:
        r.hosts[0].mode = "error503"
        for task in ("clip-visual", "ocr", "ocr"):
            response = await r.predict(task=task)
            assert response.code == 200
            await response.content()
        first, second = (h.address for h in r.hosts)
        s = await metrics(r)
        assert sample(s, "imml_backend_requests_total", backend=first, task="ocr", status="503") == 2
        assert sample(s, "imml_backend_requests_total", backend=second, task="ocr", status="200") == 2
        assert sample(s, "imml_backend_requests_total", backend=second, task="clip-visual", status="200") == 1
        assert sample(s, "imml_backend_retries_total", backend=first) == 3
        assert sample(s, "imml_backend_errors_total", backend=first, kind="status 503") == 3
        assert sample(s, "imml_backend_request_duration_seconds_count", backend=second, task="ocr") == 2
        assert sample(s, "imml_requests_total", status="200", task="ocr") == 2
        assert sample(s, "imml_backend_up", backend=second) == 1
        assert sample(s, "imml_queue_depth") == 0


@bounded(20)
async def test_in_flight_and_queue_depth_while_requests_wait():
    async with await rig(hosts(1, service_time=30)) as r:
        r.fleet.backends[0].limiter.slots = 1  # one request at a time: the others wait
        pending = [r.predict() for _ in range(3)]
        await until(lambda: r.hosts[0].in_flight == 1 and r.service.dispatcher.queue_depth == 2)
        s = await metrics(r)
        assert sample(s, "imml_backend_in_flight", backend=r.hosts[0].address) == 1
        assert sample(s, "imml_queue_depth") == 2
        for d in pending:
            d.addErrback(lambda f: None)
            d.cancel()
        await until(lambda: r.fleet.backends[0].in_flight == 0 and r.service.dispatcher.queue_depth == 0)


@bounded(20)
async def test_the_proxy_port_does_not_serve_metrics():
    async with await rig(hosts(1)) as r:
        response = await r.client.get(r.url + "/metrics")
        await response.content()
        assert response.code == 404  # forwarded to the ML host, which has no such page
        assert r.url != admin_url(r)
