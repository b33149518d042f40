"""
The shared processor of a real-like fake host (L{imml.testing.cpu}), and a
fake host that uses it, under a task.Clock.
"""

from __future__ import annotations

import random

import pytest
from attrs import evolve
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from imml.body import BytesProducer
from imml.testing import ENTRIES, FakeMLHost, MemoryAgent, predict_body
from imml.testing.cpu import HEAVY, LIGHT, CPUProfile, SharedCPU


def run_until_idle(clock: Clock, limit: float = 1000.0) -> None:
    while clock.getDelayedCalls() and clock.seconds() < limit:
        clock.advance(max(0.0, min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds()))


def closed_loop(profile: CPUProfile, in_flight: int, answers: int = 600, jitter: float = 0.5) -> tuple[float, float]:
    """
    C{in_flight} requests kept on the processor: answers per second, and the
    median seconds per answer.
    """
    clock, rng = Clock(), random.Random(1)
    cpu = SharedCPU(clock, profile)
    times: list[float] = []
    ends: list[float] = []

    def start() -> None:
        began = clock.seconds()

        def done() -> None:
            times.append(clock.seconds() - began)
            ends.append(clock.seconds())
            if len(times) < answers:
                start()

        scale = [rng.uniform(1 - jitter, 1 + jitter) for _ in range(2)]
        cpu.submit(profile.python * scale[0], profile.inference * scale[1], done)

    for _ in range(in_flight):
        start()
    run_until_idle(clock)
    assert len(times) == answers + in_flight - 1 and cpu.running == 0 and not clock.getDelayedCalls()
    warm = answers // 4
    settled = sorted(times[warm:answers])
    return (answers - warm) / (ends[answers - 1] - ends[warm - 1]), settled[len(settled) // 2]


def test_one_request_alone_takes_its_python_work_then_its_inference():
    clock = Clock()
    cpu = SharedCPU(clock, LIGHT)
    done = []
    cpu.submit(LIGHT.python, LIGHT.inference, lambda: done.append(clock.seconds()))
    run_until_idle(clock)
    assert done == [pytest.approx(LIGHT.alone())]
    assert LIGHT.alone() == pytest.approx(LIGHT.python + LIGHT.inference / LIGHT.parallelism)


def test_throughput_rises_with_requests_in_flight_while_each_takes_longer():
    """
    The light model's host, fitted to the real service: alone about 14 ms
    and 72 answers/s; with 6 in flight about a quarter more answers, each
    taking several times longer.
    """
    curve = {k: closed_loop(LIGHT, k) for k in (1, 2, 3, 4, 6)}
    rates = [curve[k][0] for k in (1, 2, 3, 4, 6)]
    medians = [curve[k][1] for k in (1, 2, 3, 4, 6)]
    assert 65 < rates[0] < 80 and 0.012 < medians[0] < 0.016
    assert rates == sorted(rates) and medians == sorted(medians)
    assert 1.15 < rates[-1] / rates[0] < 1.45
    assert 0.055 < medians[-1] < 0.075


def test_a_heavy_model_fills_the_cores_with_one_request():
    one, _ = closed_loop(HEAVY, 1, answers=200)
    four, _ = closed_loop(HEAVY, 4, answers=200)
    assert four / one < 1.15  # little to gain from more in flight


def test_a_cpu_quota_of_a_fifth_gives_a_fifth_of_the_throughput():
    fast, _ = closed_loop(LIGHT, 6)
    slow, _ = closed_loop(evolve(LIGHT, cores=LIGHT.cores / 5), 6)
    assert slow / fast == pytest.approx(0.2, rel=0.1)


def test_no_more_inferences_at_once_than_threads():
    clock = Clock()
    profile = CPUProfile(cores=8.0, threads=2, parallelism=1.0, python=0.0, inference=1.0)
    cpu = SharedCPU(clock, profile)
    done = []
    for _ in range(4):
        cpu.submit(0.0, 1.0, lambda: done.append(clock.seconds()))
    run_until_idle(clock)
    assert done == pytest.approx([1.0, 1.0, 2.0, 2.0])


def test_a_cancelled_request_gives_its_share_back():
    clock = Clock()
    profile = CPUProfile(cores=1.0, threads=4, parallelism=1.0, python=0.0, inference=1.0)
    cpu = SharedCPU(clock, profile)
    done = []
    gone = cpu.submit(0.0, 1.0, lambda: done.append("gone"))
    cpu.submit(0.0, 1.0, lambda: done.append(clock.seconds()))
    clock.advance(0.5)  # each had half a core: a quarter done
    cpu.cancel(gone)
    assert cpu.busy() == pytest.approx(1.0)
    run_until_idle(clock)
    assert done == [pytest.approx(1.25)]  # the last three quarters on a whole core


def _predict(agent: MemoryAgent, clock: Clock, answers: list) -> None:
    content_type, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8 a picture")
    began = clock.seconds()
    d = agent.request(
        b"POST", b"http://10.0.0.1:3003/predict", Headers({b"content-type": [content_type]}), BytesProducer(body)
    )
    d.addCallback(lambda response: response.code)
    d.addCallback(lambda code: answers.append((code, clock.seconds() - began)))


def test_a_fake_host_with_a_processor_answers_as_the_processor_allows():
    clock = Clock()
    host = FakeMLHost(clock, name="real-like", cpu=LIGHT, jitter=0.0)
    agent = MemoryAgent()
    agent.add("10.0.0.1:3003", host)
    answers: list = []
    for _ in range(3):
        _predict(agent, clock, answers)
    assert host.in_flight == 3
    while len(answers) < 3 and clock.seconds() < 5:
        clock.advance(0.001)
        agent.flush()
    assert [code for code, _ in answers] == [200, 200, 200]
    # three at once take longer each than one alone, and less than three in turn
    assert all(LIGHT.alone() < seconds < 3 * LIGHT.alone() for _, seconds in answers)
    assert host.in_flight == 0 and host.served == 3
