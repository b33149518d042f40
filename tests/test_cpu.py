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


def closed_loop(
    profile: CPUProfile, in_flight: int, answers: int = 600, jitter: float = 0.5, gap: float = 0.0
) -> tuple[float, float]:
    """
    C{in_flight} requests kept on the processor, each sent C{gap} seconds
    after the one before it was answered: answers per second, and the
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
                if gap:
                    clock.callLater(gap, start)
                else:
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
    The light model's host, fitted to the real service as a fake host shows
    it (which adds about 2 ms to an answer alone): its processor alone takes
    about 12.5 ms, 80 answers/s; a few percent more from 3 in flight on,
    where the cores are full, each answer taking several times longer.
    """
    curve = {k: closed_loop(LIGHT, k) for k in (1, 2, 3, 4, 6)}
    rates = [curve[k][0] for k in (1, 2, 3, 4, 6)]
    medians = [curve[k][1] for k in (1, 2, 3, 4, 6)]
    assert 75 < rates[0] < 86 and 0.011 < medians[0] < 0.014
    assert medians == sorted(medians) and rates[2] > rates[0]
    assert 1.02 < rates[-1] / rates[0] < 1.15
    assert 0.06 < medians[-1] < 0.08


def test_a_heavy_model_fills_the_cores_with_one_request():
    """
    More in flight buy nothing on the heavy model's host: its threads
    busy-wait for each other, and it answers less than alone.
    """
    one, _ = closed_loop(HEAVY, 1, answers=200)
    two, _ = closed_loop(HEAVY, 2, answers=200)
    four, _ = closed_loop(HEAVY, 4, answers=200)
    assert 0.8 < two / one < 0.95 and 0.8 < four / one < 0.95


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


def test_requests_that_contend_for_the_cores_waste_a_share_of_them():
    clock = Clock()
    profile = CPUProfile(cores=2.0, threads=2, parallelism=2.0, python=0.0, inference=1.0, waste=0.2)
    cpu = SharedCPU(clock, profile)
    done: list[float] = []
    cpu.submit(0.0, 1.0, lambda: done.append(clock.seconds()))
    run_until_idle(clock)
    assert done == [pytest.approx(0.5)]  # alone: both cores, nothing lost
    for _ in range(2):
        cpu.submit(0.0, 1.0, lambda: done.append(clock.seconds()))
    assert cpu.busy() == pytest.approx(1.6)
    run_until_idle(clock)
    assert done[1:] == [pytest.approx(0.5 + 1.25)] * 2  # one core each, a fifth of it lost


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
    # one core per inference: one request's Python work overlaps another's inference
    profile = CPUProfile(cores=2.0, threads=2, parallelism=1.0, python=0.005, inference=0.015)
    clock = Clock()
    host = FakeMLHost(clock, name="real-like", cpu=profile, jitter=0.0)
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
    assert all(profile.alone() < seconds < 3 * profile.alone() for _, seconds in answers)
    assert host.in_flight == 0 and host.served == 3


#: A light host held to 0.4 cores by a quota of 40 ms of CPU every 100 ms.
#: The light host held to 0.4 cores by periods, its threads never spinning
#: (the spinning's own test is below).
QUOTA = evolve(LIGHT, cores=0.4, period=0.1, machine=2.0, spin=0.0)


def test_a_quota_runs_the_service_at_full_speed_until_the_period_is_spent():
    """
    0.1 CPU-seconds on 2 cores under a quota of 0.04 a period: 20 ms of work,
    80 ms of waiting, twice, then the last 0.02 in 10 ms.  A smooth share of
    0.4 cores would take 250 ms.
    """
    clock = Clock()
    profile = CPUProfile(cores=0.4, threads=1, parallelism=2.0, python=0.0, inference=0.1, period=0.1, machine=2.0)
    cpu = SharedCPU(clock, profile)
    done = []
    cpu.submit(0.0, 0.1, lambda: done.append(clock.seconds()))
    cores = [(0.0, cpu.busy())]
    while clock.getDelayedCalls():
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
        cores.append((round(clock.seconds(), 6), cpu.busy()))
    assert cores == [(0.0, 2.0), (0.02, 0.0), (0.1, 2.0), (0.12, 0.0), (0.2, 2.0), (0.21, 0.0)]
    assert done == [pytest.approx(0.21)]
    smooth = SharedCPU(Clock(), evolve(profile, period=None))
    assert evolve(profile, period=None).alone() == pytest.approx(0.25)
    assert smooth.profile.speed == 0.4 and profile.speed == 2.0


def test_under_a_quota_a_host_alone_is_quick_at_times_and_slow_at_others():
    """
    As a real host held to a CPU quota: its throughput is what the quota
    allows, but an answer alone is quick early in a period
    and slow when it meets the period's end, so its quickest answers are
    not its usual ones.
    """
    rate, median = closed_loop(QUOTA, 1)
    assert rate == pytest.approx(QUOTA.cores / (QUOTA.python + QUOTA.inference), rel=0.1)
    clock, rng = Clock(), random.Random(2)
    cpu = SharedCPU(clock, QUOTA)
    times: list[float] = []

    def start() -> None:
        began = clock.seconds()

        def done() -> None:
            times.append(clock.seconds() - began)
            if len(times) < 200:
                clock.callLater(rng.uniform(0, 0.002), start)

        cpu.submit(QUOTA.python, QUOTA.inference, done)

    start()
    run_until_idle(clock)
    assert min(times) == pytest.approx(QUOTA.alone())
    assert sum(times) / len(times) > 2.5 * min(times)
    assert median > 2 * QUOTA.alone()


def test_the_fake_hosts_command_line_holds_it_to_a_quota_by_period(capsys):
    from imml.testing.cli import _arguments, _profile

    profile = _profile(_arguments(["--cpu", "light", "--cores", "0.4", "--period", "0.1"]))
    assert profile == evolve(QUOTA, spin=LIGHT.spin)
    assert _profile(_arguments(["--cpu", "light", "--cores", "0.4"])) == evolve(LIGHT, cores=0.4)
    assert _profile(_arguments([])) is None
    with pytest.raises(SystemExit) as exit:
        _arguments(["--cpu", "light", "--period", "0.1"])
    assert exit.value.code == 2
    assert "--period goes with --cpu and --cores" in capsys.readouterr().err


def test_threads_spinning_after_an_inference_cost_a_host_with_cores_to_spare_nothing():
    """
    The threads of the last inference spin on the cores no work wants: one
    request at a time on 2 cores goes as fast as if they slept.
    """
    still = evolve(LIGHT, spin=0.0)
    for in_flight in (1, 3):
        assert closed_loop(LIGHT, in_flight, gap=0.002) == closed_loop(still, in_flight, gap=0.002)


def test_under_a_quota_spinning_threads_spend_it_and_two_in_flight_do_more():
    """
    Held to 0.4 cores by periods, as the real service under a cgroup: one
    request at a time (each sent 2 ms after the last answer, as over HTTP)
    spends part of each period spinning, so two in flight do more, where
    without spinning they did less.
    """
    quota = evolve(QUOTA, spin=LIGHT.spin)
    one, two = closed_loop(quota, 1, gap=0.002)[0], closed_loop(quota, 2, gap=0.002)[0]
    assert two > 1.05 * one
    assert closed_loop(QUOTA, 2, gap=0.002)[0] < closed_loop(QUOTA, 1, gap=0.002)[0]
