"""
The recent window of latencies and answers, on a task.Clock.
"""

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from imml.interfaces import IReporter
from imml.records import ANSWERED, FAILED, RETRIED, AttemptRecord, RequestRecord
from imml.window import RecentWindow, percentile


def answered(window, backend, seconds, task="clip-visual", outcome=ANSWERED):
    window.attempt_finished(AttemptRecord(backend, task, 200, None, seconds, outcome))


def test_it_is_a_reporter():
    assert verifyObject(IReporter, RecentWindow(Clock()))


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([], 0.5) is None


def test_latency_per_host_and_task():
    clock = Clock()
    window = RecentWindow(clock)
    for ms in range(1, 21):
        answered(window, "a:3003", ms / 1000)
    answered(window, "a:3003", 2.0, task="ocr")
    answered(window, "b:3003", 0.5)
    answered(window, "a:3003", 9.0, outcome=RETRIED)  # failed tries are no latency sample
    window.attempt_finished(AttemptRecord("a:3003", None, None, "timed out", 300.0, FAILED))
    assert window.latency("a:3003") == {
        "clip-visual": {"p50": 0.010, "p95": 0.019, "count": 20},
        "ocr": {"p50": 2.0, "p95": 2.0, "count": 1},
    }
    assert window.latency("b:3003")["clip-visual"]["count"] == 1
    assert window.latency("c:3003") == {}


def test_old_samples_leave_the_window():
    clock = Clock()
    window = RecentWindow(clock, span=60.0)
    answered(window, "a:3003", 5.0)
    clock.advance(30)
    answered(window, "a:3003", 1.0)
    assert window.latency("a:3003")["clip-visual"]["count"] == 2
    clock.advance(31)
    assert window.latency("a:3003")["clip-visual"] == {"p50": 1.0, "p95": 1.0, "count": 1}
    clock.advance(30)
    assert window.latency("a:3003") == {}


def test_throughput_counts_answers_per_interval_oldest_first():
    clock = Clock()
    window = RecentWindow(clock, span=60.0, bucket=10.0)
    clock.advance(1000)
    for _ in range(3):
        answered(window, "a:3003", 0.1)
    clock.advance(20)
    answered(window, "a:3003", 0.1)
    assert window.throughput("a:3003") == [0, 0, 0, 3, 0, 1]
    assert window.throughput("b:3003") == [0] * 6
    clock.advance(50)
    assert window.throughput("a:3003") == [1, 0, 0, 0, 0, 0]  # the 1 is now the oldest interval


def test_totals_split_answered_failed_and_cancelled():
    window = RecentWindow(Clock())
    for status in (200, 200, 422, 503, 500, "cancelled"):
        window.request_finished(RequestRecord("POST", "/predict", "ocr", status, None, (), 0.1))
    assert dict(window.totals) == {"answered": 3, "failed": 2, "cancelled": 1}


def test_the_fleets_rate_is_answers_per_second_over_about_the_last_minute():
    clock = Clock()
    clock.advance(1000)
    window = RecentWindow(clock, span=300.0, bucket=10.0)
    assert window.rate() == 0.0
    answered(window, "a:3003", 0.1)
    answered(window, "a:3003", 0.1)
    assert window.rate() == 2 / 10  # at least one interval: the first answers are no burst
    clock.advance(30)
    for backend in ("a:3003", "b:3003", "b:3003", "b:3003"):
        answered(window, backend, 0.1)
    answered(window, "b:3003", 9.0, outcome=RETRIED)  # a failed try is no answer
    assert window.rate() == 6 / 30  # since the window began
    clock.advance(45)  # 1075: the intervals from 1020 on
    assert window.rate() == 4 / 55
    clock.advance(25)
    assert window.rate() == 0.0
