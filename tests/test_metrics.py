"""
Prometheus metrics: counted from the forwarder's records, levels read from
the fleet at scrape time, served on the admin listener from the reactor
thread.
"""

import gzip
import sys
from typing import Any, Iterator, Optional

import pytest
import treq
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from steering import admin_url, answered_one_at_a_time, metrics, sample
from support import bounded, rig, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, LoopingCall
from twisted.python.threadable import isInIOThread
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from imml.backends import parse_backend, parse_backends
from imml.dispatch import Dispatcher
from imml.fleet import BackendSettings, Fleet
from imml.interfaces import IReporter
from imml.limits import Limit
from imml.metrics import Metrics
from imml.records import ANSWERED, CANCELLED, RETRIED, AttemptRecord, RequestRecord
from imml.status import STATE_NAMES
from imml.strategies import strategy_named
from imml.testing import start_fake_hosts


def fleet_metrics() -> tuple[Fleet, Dispatcher, Metrics]:
    clock = Clock()
    fleet = Fleet.from_addresses(parse_backends("a,b"), clock)
    dispatcher = Dispatcher(fleet, strategy_named("round-robin"), clock)
    return fleet, dispatcher, Metrics(fleet, dispatcher, clock)


def test_each_balancer_has_its_own_registry() -> None:
    _, _, one = fleet_metrics()
    _, _, two = fleet_metrics()
    assert verifyObject(IReporter, one)
    one.attempt_finished(AttemptRecord("a:3003", "ocr", 200, None, 0.3, ANSWERED))
    value = one.registry.get_sample_value
    assert value("imml_backend_requests_total", {"backend": "a:3003", "task": "ocr", "status": "200"}) == 1
    assert (
        two.registry.get_sample_value(
            "imml_backend_requests_total", {"backend": "a:3003", "task": "ocr", "status": "200"}
        )
        is None
    )


def test_attempts_count_by_status_and_task_errors_by_kind_and_retries() -> None:
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
    assert (
        value("imml_backend_request_duration_seconds_bucket", {"backend": "b:3003", "task": "faces", "le": "0.1"}) == 0
    )
    assert (
        value("imml_backend_request_duration_seconds_bucket", {"backend": "b:3003", "task": "faces", "le": "0.25"}) == 1
    )
    assert value("imml_backend_request_duration_seconds_count", {"backend": "a:3003", "task": "faces"}) is None
    assert value("imml_requests_total", {"status": "200", "task": "faces"}) == 1


def test_hedged_attempts_and_queue_waits_are_counted() -> None:
    _, _, m = fleet_metrics()
    m.attempt_finished(AttemptRecord("a:3003", "ocr", None, None, 9.0, CANCELLED, hedged=True))
    m.attempt_finished(AttemptRecord("b:3003", "ocr", 200, None, 0.2, ANSWERED))
    m.request_finished(RequestRecord("POST", "/predict", "ocr", 200, "b:3003", ("a:3003", "b:3003"), 9.2, waited=3.0))
    m.request_finished(RequestRecord("POST", "/predict", "ocr", 200, "b:3003", ("b:3003",), 0.2))
    value = m.registry.get_sample_value
    assert value("imml_backend_hedges_total", {"backend": "a:3003"}) == 1
    assert value("imml_backend_hedges_total", {"backend": "b:3003"}) is None
    assert value("imml_queue_wait_seconds_count", {"task": "ocr"}) == 2
    assert value("imml_queue_wait_seconds_sum", {"task": "ocr"}) == 3.0
    assert value("imml_queue_wait_seconds_bucket", {"task": "ocr", "le": "0.01"}) == 1
    assert value("imml_queue_wait_seconds_bucket", {"task": "ocr", "le": "5.0"}) == 2


def test_latency_buckets_are_cumulative_and_a_bound_is_inside_its_bucket() -> None:
    _, _, m = fleet_metrics()
    for seconds in (0.25, 0.25, 0.02, 400.0):
        m.request_finished(RequestRecord("POST", "/predict", "ocr", 200, "a:3003", ("a:3003",), seconds))
    value = m.registry.get_sample_value

    def bucket(le: str) -> Optional[float]:
        return value("imml_request_duration_seconds_bucket", {"task": "ocr", "le": le})

    assert [bucket("0.01"), bucket("0.025"), bucket("0.1"), bucket("0.25"), bucket("300.0"), bucket("+Inf")] == [
        0,
        1,
        1,
        3,
        3,
        4,
    ]
    assert value("imml_request_duration_seconds_count", {"task": "ocr"}) == 4
    assert value("imml_request_duration_seconds_sum", {"task": "ocr"}) == 400.52


def test_levels_are_read_from_the_fleet_when_scraped() -> None:
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
    assert value("imml_queue_oldest_wait_seconds", {}) == 0
    assert value("imml_queue_max", {}) == dispatcher.max_queue == 1000
    assert value("imml_build_info", {"version": __import__("imml").__version__, "strategy": "round-robin"}) == 1


def test_a_learned_limit_s_curve_what_the_host_ran_at_once_and_the_searches_surprise_are_read_when_scraped() -> None:
    clock = Clock()
    fleet = Fleet.from_addresses(parse_backends("a"), clock)
    m = Metrics(fleet, Dispatcher(fleet, strategy_named("round-robin"), clock), clock)
    [a] = fleet.backends
    fleet.check_passed(a)
    answered_one_at_a_time(clock, fleet, a)
    value = m.registry.get_sample_value
    work = "imml_backend_work_per_second"
    # kept busy at one request in flight: one second of work a second
    assert value(work, {"backend": "a:3003", "in_flight": "1"}) == pytest.approx(1.0, abs=0.02)
    assert value(work, {"backend": "a:3003", "in_flight": "3"}) is None  # not measured
    assert value("imml_backend_ran_at_once", {"backend": "a:3003"}) == 1
    a.limiter.ran_at_once(3)
    assert value("imml_backend_ran_at_once", {"backend": "a:3003"}) == 3
    assert value("imml_backend_search_surprise", {"backend": "a:3003"}) == 1.0
    slots = Fleet.from_addresses(parse_backends("b"), clock)
    [b] = slots.backends
    b.limiter = Limit(slots=2)
    seen = Metrics(slots, Dispatcher(slots, strategy_named("round-robin"), clock), clock).registry.get_sample_value
    assert seen("imml_backend_ran_at_once", {"backend": "b:3003"}) is None  # configured slots: nothing learned


def hosts(n: int, **kw: Any) -> list[dict[str, Any]]:
    return [dict(name=f"h{i}", **kw) for i in range(n)]


@bounded(20)
async def test_metrics_over_loopback_count_what_the_hosts_did() -> None:
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
async def test_in_flight_and_queue_depth_while_requests_wait() -> None:
    async with await rig(hosts(1, service_time=30)) as r:
        r.fleet.backends[0].limiter.slots = 1  # one request at a time: the others wait
        pending = [r.predict() for _ in range(3)]
        await until(lambda: r.hosts[0].in_flight == 1 and r.balancer.dispatcher.queue_depth == 2)
        s = await metrics(r)
        assert sample(s, "imml_backend_in_flight", backend=r.hosts[0].address) == 1
        assert sample(s, "imml_queue_depth") == 2
        assert sample(s, "imml_queue_oldest_wait_seconds") > 0
        for d in pending:
            d.addErrback(lambda f: None)
            d.cancel()
        await until(lambda: r.fleet.backends[0].in_flight == 0 and r.balancer.dispatcher.queue_depth == 0)


@bounded(20)
async def test_the_proxy_port_does_not_serve_metrics() -> None:
    async with await rig(hosts(1)) as r:
        response = await r.client.get(r.url + "/metrics")
        await response.content()
        assert response.code == 404  # forwarded to the ML host, which has no such page
        assert r.url != admin_url(r)


class _ThreadProbe:
    """
    A collector that notes, at each scrape, whether it runs on the reactor
    thread.
    """

    def __init__(self) -> None:
        self.threads: list[bool] = []

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self.threads.append(isInIOThread())
        return iter([])


@bounded(20)
async def test_a_scrape_collects_on_the_reactor_thread() -> None:
    """
    The registry's collectors run on the reactor thread, the one that
    changes what they read (prometheus_client's own Twisted resource ran
    them in a thread pool).
    """
    async with await rig(hosts(1)) as r:
        probe = _ThreadProbe()
        r.balancer.metrics.registry.register(probe)
        assert isInIOThread()
        s = await metrics(r)
        assert sample(s, "imml_backend_up", backend=r.hosts[0].address) == 1
        assert probe.threads == [True]


#: What a scraper that names no format gets, as from prometheus_client's own
#: exposition.
TEXT = b"text/plain; version=0.0.4; charset=utf-8"


@bounded(20)
async def test_metrics_answers_get_and_head_only() -> None:
    async with await rig(hosts(1)) as r:
        url = admin_url(r) + "/metrics"
        response = await r.client.get(url)
        body = await response.content()
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [TEXT]
        assert b"imml_backend_up{" in body
        response = await r.client.head(url)
        assert response.code == 200 and await response.content() == b""
        assert response.headers.getRawHeaders(b"content-type") == [TEXT]
        for method in ("post", "put", "delete"):
            response = await getattr(r.client, method)(url)
            await response.content()
            assert response.code == 405, method
            assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]


@bounded(20)
async def test_metrics_are_served_as_the_scraper_asks() -> None:
    """
    As prometheus_client's own exposition: OpenMetrics when the scraper
    accepts it, gzip when it accepts that, and only the families named in
    C{name[]}.
    """
    async with await rig(hosts(1)) as r:
        url = admin_url(r) + "/metrics"
        openmetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8"
        response = await r.client.get(url, headers={"accept": openmetrics})
        body = await response.content()
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        # (treq would decode gzip itself: ask with a plain Agent)
        headers = Headers({b"accept-encoding": [b"gzip"]})
        response = await Agent(reactor, pool=r.pool).request(b"GET", url.encode(), headers)
        assert response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
        assert b"imml_backend_up{" in gzip.decompress(await treq.content(response))
        response = await r.client.get(url + "?name[]=imml_queue_depth")
        body = await response.content()
        assert b"imml_queue_depth " in body and b"imml_backend_up" not in body


@bounded(10)
async def test_scrapes_while_hosts_join_and_leave_all_answer() -> None:
    """
    Scraped 300 times while hosts join and leave and requests are answered
    (new hosts make new label values): every answer is 200 and parses, and
    each is one moment's snapshot: a host listed is in exactly one state,
    and each task's count of requests is its latency histogram's count.
    """
    extra = await start_fake_hosts(reactor, hosts(4))
    # Switch threads as often as possible: a scrape that read the counts
    # on another thread than the reactor's would catch them mid-change.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        async with await rig(hosts(2), "--health-interval", "0.05", "--rise", "1") as r:
            base = [(parse_backend(h.address), BackendSettings()) for h in r.hosts]
            others = [parse_backend(h.address) for h in extra]
            step = 0

            def churn() -> None:
                # At each step, one of the extra hosts joins or leaves.
                nonlocal step
                step += 1
                present = [a for i, a in enumerate(others) if (step >> i) & 1]
                r.fleet.reconfigure(base + [(a, BackendSettings()) for a in present])

            churning = LoopingCall(churn)
            churning.clock = reactor
            churning.start(0.01)
            codes, problems, stop = [], [], []

            async def traffic() -> None:
                tasks = ("clip-visual", "clip-textual", "ocr", "faces")
                i = 0
                while not stop:
                    response = await r.predict(task=tasks[i % len(tasks)])
                    await response.content()
                    i += 1

            def check(code: int, text: str) -> None:
                assert code == 200, text
                states, requests, observed = {}, {}, {}
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name == "imml_backend_state":
                            states.setdefault(s.labels["backend"], []).append(s.value)
                        elif s.name == "imml_requests_total":
                            requests[s.labels["task"]] = requests.get(s.labels["task"], 0) + s.value
                        elif s.name == "imml_request_duration_seconds_count":
                            observed[s.labels["task"]] = s.value
                one_state = [0.0] * (len(STATE_NAMES) - 1) + [1.0]
                assert states and all(sorted(v) == one_state for v in states.values()), states
                assert requests == observed

            async def scrape(n: int) -> None:
                # Every loop stops at the first problem, so that no scrape is
                # left running when the balancer stops.
                for _ in range(n):
                    if problems:
                        return
                    response = await r.client.get(admin_url(r) + "/metrics")
                    text = (await response.content()).decode()
                    codes.append(response.code)
                    try:
                        check(response.code, text)
                    except AssertionError as e:
                        problems.append(e)

            running = [Deferred.fromCoroutine(traffic()) for _ in range(4)]
            try:
                await gatherResults([Deferred.fromCoroutine(scrape(75)) for _ in range(4)])
            finally:
                stop.append(True)
                churning.stop()
                await gatherResults(running, consumeErrors=True)
            if problems:
                raise problems[0]
            assert codes == [200] * 300
            # Hosts did join and leave, and the new ones served requests.
            assert step > 20 and sum(h.served for h in extra) > 0
    finally:
        sys.setswitchinterval(interval)
        await gatherResults([h.stop() for h in extra], consumeErrors=True)
