"""
Concurrency limits: configured, or learned by climbing a host's throughput
curve; slow start.  Learned limits are driven against simulated hosts (a
processor shared by the requests running, L{imml.testing.cpu}) under a
task.Clock: kept at their limit, as when requests wait in the balancer.
"""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest
from attrs import define, evolve, field
from twisted.internet.task import Clock

from imml.backends import BackendAddress
from imml.classify import RequestInfo
from imml.dispatch import Dispatcher
from imml.fleet import Fleet
from imml.limits import PROBE_AFTER, QUICK, STALE, WINDOW, Limit
from imml.strategies import ShortestDelay
from imml.testing.cpu import HEAVY, LIGHT, CPUProfile, SharedCPU

#: Two slots of 40 ms: a host that is a set of slots.
SLOTS_2 = CPUProfile(cores=2.0, threads=2, parallelism=1.0, python=0.0, inference=0.04)


@define(eq=False)
class Driven:
    """
    A host kept at its limit: as many requests in flight as the limit says,
    each answer told to the limit.
    """

    limit: Limit
    profile: CPUProfile
    clock: Clock = field(factory=Clock)
    jitter: float = 0.3
    #: The most seconds a request spends on the host outside its processor
    #: (its HTTP handling, the network): what keeps the requests on a real
    #: host out of step.
    handling: float = 0.003
    in_flight: int = 0
    #: The limit at each answer.
    seen: list[int] = field(factory=list)
    answers: int = 0
    cpu: SharedCPU = field(init=False)
    _random: random.Random = field(factory=lambda: random.Random(3))
    _alone: dict = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.cpu = SharedCPU(self.clock, self.profile)

    def fill(self) -> None:
        while self.in_flight < self.limit.value:
            self._send()

    def _send(self) -> None:
        self.in_flight += 1
        sent, at = self.clock.seconds(), self.in_flight
        self.limit.holds(self.in_flight, sent)
        shares = self.limit.shares()
        jitter = self._random.uniform
        # Whether it is alone on the host from its start to its answer: the
        # requests on it are no longer alone once it joins them.
        for running in self._alone:
            self._alone[running] = False
        me = object()
        self._alone[me] = at == 1

        def done() -> None:
            busy = self.in_flight >= self.limit.value
            self.in_flight -= 1
            self.limit.holds(self.in_flight, self.clock.seconds())
            self.answers += 1
            alone = self._alone.pop(me)
            self.limit.answered(
                "clip-visual", self.clock.seconds() - sent, at, self.clock.seconds(), busy, alone=alone, sent=shares
            )
            self.seen.append(self.limit.value)
            self.fill()

        profile = self.cpu.profile
        self.clock.callLater(
            jitter(0, self.handling),
            self.cpu.submit,
            profile.python * jitter(1 - self.jitter, 1 + self.jitter),
            profile.inference * jitter(1 - self.jitter, 1 + self.jitter),
            done,
        )

    def run(self, seconds: float) -> None:
        self.fill()
        end = self.clock.seconds() + seconds
        while self.clock.getDelayedCalls() and self.clock.seconds() < end:
            self.clock.advance(max(0.0, min(c.getTime() for c in self.clock.getDelayedCalls()) - self.clock.seconds()))

    def share(self, since: int = 0) -> Counter:
        """How often each limit was in force, as shares of the answers."""
        counts = Counter(self.seen[since:])
        total = sum(counts.values())
        return Counter({k: v / total for k, v in counts.items()})


def test_configured_slots_are_the_limit():
    driven = Driven(Limit(slots=4), LIGHT)
    driven.run(5.0)
    assert set(driven.seen) == {4} and driven.limit.value == 4


def test_on_a_host_with_two_slots_the_limit_rises_to_two_and_holds_there():
    driven = Driven(Limit(), SLOTS_2, handling=0.0)
    driven.run(60.0)
    assert driven.limit.value == 2 and driven.limit.ceiling == 3
    share = driven.share(since=200)
    assert share[2] > 0.85  # held at the knee ...
    assert share[3] + share[4] < 0.1  # ... trying a third slot rarely: its requests wait inside the host
    assert driven.limit.probe_after > PROBE_AFTER


def test_on_a_real_host_the_limit_rises_while_requests_in_flight_buy_throughput():
    """
    A light model on a shared processor: each request takes longer with
    more in flight, yet throughput rises up to about three; the limit
    climbs there rather than stay at one.
    """
    driven = Driven(Limit(), LIGHT)
    driven.run(60.0)
    share = driven.share(since=500)
    assert share[2] + share[3] + share[4] > 0.85 and share[1] < 0.1
    assert driven.limit.throughput(3) > 1.15 * driven.limit.throughput(1)


def test_a_heavy_model_that_fills_the_cores_alone_gets_little_more_than_one():
    driven = Driven(Limit(), HEAVY)
    driven.run(300.0)
    share = driven.share(since=100)
    assert share[1] + share[2] > 0.85


def test_the_limit_falls_when_the_host_gives_no_more_for_fewer():
    """
    The host gets busy with other work (a quarter of its cores left): more
    in flight no longer buys anything, and the limit comes down.
    """
    driven = Driven(Limit(), LIGHT)
    driven.run(30.0)
    assert driven.limit.value >= 2
    driven.cpu.profile = evolve(LIGHT, cores=0.5)
    before = len(driven.seen)
    driven.run(120.0)
    share = driven.share(since=before + (len(driven.seen) - before) // 2)
    assert share[1] > 0.6


def test_the_limit_learns_nothing_while_the_host_is_not_kept_at_it():
    limit = Limit(learned=3)
    for i in range(200):
        limit.answered("clip-visual", 0.04, 1, now=i * 0.04, busy=False)
    assert limit.value == 3 and limit.throughput(3) is None


def test_a_cold_model_load_teaches_nothing():
    limit = Limit(learned=3)
    limit.answered("clip-visual", 0.04, 3)
    assert limit.answered("clip-visual", 20.0, 3) is None  # the model was loading
    assert limit.value == 3


def test_a_host_quick_at_the_start_of_a_quota_period_is_measured_by_its_usual_answers():
    """
    A host held to a CPU quota by periods answers alone at full speed at a
    period's start, many times quicker than at its end.  Its answers are
    its work all the same: only an answer far slower than its usual time
    alone, for the requests on the host, is a model loading.  (Measured
    against its quickest answer, every usual answer looked like one, and
    the level was never measured.)
    """
    limit = Limit()
    limit.answered("clip-visual", 0.0009, 1, 0.0)  # at a period's start
    for i in range(20):  # alone, at the start of a period or further on
        limit.answered("clip-visual", 0.0009 if i % 2 else 0.008, 1, 0.0, alone=True)
    paced = Paced(limit)  # then kept at its limit, each answer eleven times the quickest
    paced.until_judged(1.0)
    assert limit.throughput(1) is not None and limit.value == 2
    assert limit.answered("clip-visual", 2.0, 2, paced.now) is None  # the model was loading


def test_answers_that_may_have_waited_for_a_model_to_load_teach_nothing():
    """
    Immich ML unloads a model idle for five minutes.  A request sent after
    such a pause may wait for it to load: on a heavy model's host (0.8 s an
    image) it takes 5 s, not ten times its usual time, and yet tells
    nothing of the host.  After a shorter pause, an answer is the host's
    own time.
    """
    limit = Limit()
    limit.answered("clip-visual", 0.8, 1, 1.0)
    assert limit.answered("clip-visual", 0.8, 1, 2.0, alone=True) == 0.8
    assert limit.answered("clip-visual", 5.0, 1, 405.0, alone=True) is None  # sent at 400.0
    assert limit.answered("clip-visual", 0.9, 1, 406.0, alone=True) == 0.9
    assert limit.answered("clip-visual", 0.8, 1, 600.0, alone=True) == 0.8


def test_slow_start_after_coming_back():
    limit = Limit(slots=4)
    limit.restart()
    values = [limit.value]
    for _ in range(4):
        limit.answered("clip-visual", 0.04, 1)
        values.append(limit.value)
    assert values == [1, 2, 3, 4, 4]
    learned = Limit(learned=8)
    learned.restart()
    assert learned.value == 1


def test_the_proven_limit_leaves_out_a_probing_slot():
    limit = Limit(learned=3, ceiling=3)
    assert limit.value == 3 and limit.proven == 2
    assert Limit(learned=2, ceiling=3).proven == 2
    assert Limit(slots=2).proven == 2


def test_the_stretch_of_a_request_follows_the_throughput_measured_at_each_level():
    driven = Driven(Limit(), LIGHT)
    driven.run(60.0)
    limit = driven.limit
    assert limit.stretch(1) == 1.0
    # a real host: each request more in flight makes each one slower, but
    # less than in proportion while throughput still rises
    assert 1.2 < limit.stretch(2) < 2.0 and limit.stretch(2) < limit.stretch(3) < 3.0
    # past the highest level measured, each one more is pure waiting
    top = max(level for level in range(1, 20) if limit.throughput(level) is not None)
    assert limit.stretch(top + 2) == pytest.approx((top + 2) / top * limit.stretch(top))
    slots = Driven(Limit(), SLOTS_2)
    slots.run(30.0)
    # two slots: the second request waits for nothing (its handling outside
    # the slots, which two overlap, keeps one request alone under 2 x)
    assert slots.limit.stretch(2) < 1.25 < limit.stretch(2)
    assert Limit().stretch(4) == 1.0  # nothing known


def test_a_level_the_limit_climbed_to_is_expected_to_pay_until_it_is_measured():
    """
    The limit climbed to three because two paid: until three is measured,
    a third request is expected to stretch the others no more than two
    did, so that the host is kept at three and three gets measured.  Past
    the limit, it would be pure waiting.
    """
    paced = Paced(Limit())
    paced.until_judged(1.0)
    paced.until_judged(1.5)
    paced.until_judged(1.5)
    limit = paced.limit
    assert limit.value == 3 and limit.throughput(3) is None
    assert limit.stretch(2) == pytest.approx(2 / 1.5)
    assert limit.stretch(3) == pytest.approx(limit.stretch(2))
    assert limit.stretch(4) == pytest.approx(4 / 1.5)


@define
class Paced:
    """
    A host kept at its limit whose answers come at a rate the test sets: a
    level measures what the test says it does.
    """

    limit: Limit
    now: float = 0.0
    #: An answer's unloaded service time: alone (at a rate of 1.0), an
    #: answer takes just that.
    work: float = 0.01

    def __attrs_post_init__(self) -> None:
        self.limit.answered("clip-visual", self.work, 1, self.now)  # alone: the baseline

    def answers(self, rate: float, count: int) -> list[int]:
        """
        C{count} answers at C{rate} seconds of work a second; the limit after
        each.
        """
        seen = []
        for _ in range(count):
            level = self.limit.value
            gap = self.work / rate
            self.limit.holds(level, self.now)  # (the level the limit says now)
            self.now += gap
            # held at the level until the answer, whose request is sent
            # again at once: the host never holds fewer
            self.limit.holds(level, self.now)
            self.limit.answered("clip-visual", level * gap, level, self.now, busy=True)
            seen.append(self.limit.value)
        return seen

    def until_judged(self, rate: float) -> list[int]:
        """
        Answers at C{rate} until the level held is judged (it changes or its
        window ends), at most a few seconds' worth.
        """
        level, seen = self.limit.value, []
        for _ in range(2000):
            seen += self.answers(rate, 1)
            if self.limit.value != level or self.limit._window is None:
                break
        return seen


def _knee_at_two(side_by_side: int = 3, third: float = 1.22) -> Paced:
    """
    A host whose third request in flight did C{third} work per second against
    1.2 at two: too little to climb to.
    """
    paced = Paced(Limit())
    paced.limit.ran_at_once(side_by_side)
    paced.until_judged(1.0)
    paced.until_judged(1.2)
    paced.until_judged(1.2)
    assert paced.limit.value == 3
    paced.until_judged(third)
    if paced.limit.value == 3:
        paced.until_judged(third)
    assert paced.limit.value == 2 and paced.limit.ceiling == 3
    return paced


def test_one_unlucky_measurement_does_not_bring_the_limit_down():
    """
    On a busy machine one window at a level can measure no better than the
    level below while the level does pay: the limit measures it again before
    coming down, and climbs on when two windows show the gain.
    """
    paced = Paced(Limit())
    paced.until_judged(1.0)
    assert paced.limit.value == 2
    assert set(paced.until_judged(0.99)) == {2}  # unlucky, not clearly less: measured again
    assert set(paced.until_judged(1.2)) == {2}  # a gain: measured again
    paced.until_judged(1.2)
    assert paced.limit.value == 3 and paced.limit.ceiling is None


def test_one_lucky_measurement_does_not_raise_the_limit():
    """
    A host that gains nothing from a second request (one held to a CPU
    quota) can measure better at two in one window by luck: the limit
    climbs only when a second window says so too, and here comes back down.
    """
    paced = Paced(Limit())
    paced.until_judged(1.0)
    assert paced.limit.value == 2
    seen = paced.until_judged(1.08)  # lucky
    seen += paced.until_judged(0.98)
    seen += paced.until_judged(0.98)
    assert 3 not in seen
    assert paced.limit.value == 1 and paced.limit.ceiling == 2


def test_a_level_measured_twice_without_gain_is_left():
    paced = Paced(Limit())
    paced.until_judged(1.0)
    paced.until_judged(1.01)
    assert paced.limit.value == 2
    paced.until_judged(1.01)
    assert paced.limit.value == 1 and paced.limit.ceiling == 2


def test_a_level_clearly_worse_than_the_one_below_is_left_at_once():
    paced = Paced(Limit())
    paced.until_judged(1.0)
    paced.until_judged(0.9)
    assert paced.limit.value == 1 and paced.limit.ceiling == 2


def test_a_knee_of_one_left_by_an_unlucky_first_window_is_tried_again_once_that_measure_is_stale():
    """
    A host that measured clearly worse at two than at one while its
    service warmed up is held at one, the level above known to do less.
    Once that measure is older than L{STALE}, two is tried again after a
    few windows at one, and climbed past when it pays: the host is held
    down for about half a minute, not for good.
    """
    paced = Paced(Limit())
    paced.until_judged(1.0)
    assert paced.limit.value == 2
    paced.until_judged(0.65)
    assert paced.limit.value == 1 and paced.limit.ceiling == 2
    left = paced.now
    while paced.limit.value == 1 and paced.now - left < 120:
        paced.answers(1.0, 1)
    assert paced.limit.value == 2 and STALE <= paced.now - left < STALE + 5
    paced.until_judged(1.2)
    paced.until_judged(1.2)
    assert paced.limit.value == 3 and paced.limit.ceiling is None


def test_the_time_a_host_had_no_request_is_not_counted():
    """
    A host at one request in flight that the balancer leaves idle between
    its requests (the next one went elsewhere) is measured over the time it
    had one: as fast as it is, not half as fast, or a second request in
    flight would seem to double its throughput.
    """
    limit = Limit()
    now, work = 0.0, 0.01
    limit.answered("clip-visual", work, 1, now)  # alone: the baseline
    limit.holds(0, now)
    for _ in range(200):
        now += work  # idle as long as it works
        limit.holds(1, now)
        now += work
        limit.holds(0, now)
        limit.answered("clip-visual", work, 1, now, busy=True, alone=True)
        if limit.throughput(1) is not None:
            break
    assert limit.throughput(1) == pytest.approx(1.0)


def test_a_level_is_measured_over_the_time_the_host_held_it_though_not_full_all_along():
    """
    With a few clients over two hosts, the fast one holds its limit only
    part of the time: now and then the next request goes to the other host,
    and for a while it holds one fewer.  The level is measured over the
    time the host held it, at the rate it worked then; the answers and the
    time below it count for nothing.  (Were each such answer to throw the
    measurement away, only the runs in which the host stayed full would be
    measured: the runs in which it answered quickly enough to be chosen
    again and again.)
    """
    limit = Limit(learned=2)
    now, work = 0.0, 0.01
    limit.answered("clip-visual", work, 1, now)  # alone: the baseline
    limit.holds(2, now)
    for answer in range(1000):
        gap = work / 1.5  # held at two, the host does 1.5 s of work a second
        now += gap
        limit.holds(1, now)
        limit.answered("clip-visual", 2 * gap, 2, now, busy=True)
        if answer % 3 == 2:
            # the next request went elsewhere: the host holds one, slowly
            now += 0.05
            limit.holds(0, now)
            limit.answered("clip-visual", 0.06, 2, now)  # sent beside another
        limit.holds(2, now)
        if limit.throughput(2) is not None:
            break
    assert limit.throughput(2) == pytest.approx(1.5, rel=0.01)


def test_short_stays_at_a_level_measure_what_the_host_does_there():
    """
    On a host that shares its processor, a request sent as another is
    nearly done makes a short stay at two in flight, which the answer of
    the first ends: most of that answer's work was done alone.  Counted
    all at two, it would make two look 2.5 times as good as one; counted
    by the share of the host each request had there, two measure what the
    host does, as much as one.
    """
    limit, now, work = Limit(learned=2), 0.0, 0.05
    limit.answered("clip-visual", work, 1, now, alone=True)  # the baseline
    running = []  # [work left, when sent, in flight then, the shares then]

    def send():
        limit.holds(len(running) + 1, now)
        running.append([work, now, len(running) + 1, limit.shares()])

    def run(seconds=None):
        # one unit of work a second, shared evenly; until the next answer
        nonlocal now
        each = 1.0 / len(running)
        first = min(running, key=lambda r: r[0])
        step = first[0] / each if seconds is None else seconds
        now += step
        for r in running:
            r[0] -= each * step
        if seconds is None:
            running.remove(first)
            busy = len(running) + 1 >= limit.value
            limit.holds(len(running), now)
            limit.answered("clip-visual", now - first[1], first[2], now, busy, sent=first[3])

    send()
    run(0.04)
    while limit.throughput(2) is None and now < 60:
        send()  # the other has 10 ms of work left
        run()  # its answer, 20 ms later
        run(0.03)  # alone again
    assert limit.throughput(2) == pytest.approx(1.0, rel=0.1)


def test_a_level_held_too_seldom_is_measured_afresh_not_over_minutes():
    """
    A host that held its limit for a moment now and then, over more than
    STALE seconds, is not measured over all those moments at once: the
    oldest tell little of the host now.  The window starts again.
    """
    limit = Limit(learned=2)
    now, work = 0.0, 0.05
    limit.answered("clip-visual", work, 1, now)  # alone: the baseline
    for _ in range(4):
        for _ in range(WINDOW // 2):  # held at two for a third of a second
            limit.holds(2, now)
            now += work / 1.5
            limit.holds(1, now)
            limit.answered("clip-visual", 2 * work / 1.5, 2, now, busy=True)
        now += STALE / 2  # then a long while with one
    assert limit.throughput(2) is None


def test_a_probe_on_a_host_that_runs_requests_at_once_is_measured_in_full():
    """
    On a host seen to run three requests at once (a real host), the first
    few answers of a probe of three that took as long as pure waiting
    would make them (an unlucky moment) do not end it: the level is
    measured in full, and kept when it pays.  On a host with slots they
    would (the request more waits inside it).
    """
    for side_by_side, kept in ((3, True), (2, False)):
        paced = _knee_at_two(side_by_side, third=1.2)  # no gain at 3, twice: the ceiling
        while paced.limit.value == 2:
            paced.answers(1.2, 1)  # held at the knee until the probe
        seen = paced.answers(0.9, QUICK + 3)  # unlucky first answers
        seen += paced.until_judged(1.45)
        assert (min(seen) == 3) is kept


def test_a_probe_whose_first_answers_gain_a_little_is_measured_in_full():
    """
    Immich ML's pool of two threads makes a third request in flight wait
    for a thread, but its decoding overlaps the others' inference: the
    host is not seen to run three at once, yet three do a little more than
    two.  First answers of a probe of three that show such a gain, not the
    pure waiting of a host with slots, do not end it: the level is measured
    in full, and kept when it pays.
    """
    paced = _knee_at_two(side_by_side=2, third=1.2)
    while paced.limit.value == 2:
        paced.answers(1.2, 1)  # held at the knee until the probe
    seen = paced.answers(1.25, QUICK + 4)  # 4 % more than two: a little
    seen += paced.until_judged(1.45)
    assert min(seen) == 3


def test_an_answer_beside_others_tells_the_unloaded_time_over_the_stretch_there():
    """
    An answer given beside another request, slower than the quickest by
    more than queueing's margin, still tells the host's unloaded time: its
    time over the stretch measured at two in flight (a host held to a CPU
    quota is quick only early in a period: taking its quick answers alone
    would take it for faster than it is).  Where nothing is measured, it
    tells nothing.
    """
    paced = Paced(Limit())
    paced.until_judged(1.0)
    paced.until_judged(1.0)
    limit = paced.limit
    assert limit.throughput(2) is not None
    assert limit.answered("clip-visual", 0.05, 2, paced.now) == pytest.approx(0.05 / limit.stretch(2))
    assert limit.answered("clip-visual", 0.05, 5, paced.now) is None  # five in flight: never measured
    assert limit.answered("clip-visual", 0.012, 2, paced.now) == 0.012  # hardly slower than the quickest


def _over(paced: Paced, rate: float, seconds: float, depth: int = 1) -> None:
    """
    Answers at C{rate} for C{seconds} while the host holds C{depth} requests
    more than its limit (the room past it), each answer's request sent
    again at once, each answer given with the host's clock of shares at its
    sending.
    """
    limit = paced.limit
    level = limit.value + depth
    limit.holds(level, paced.now)
    sent = deque([limit.shares()] * level)
    end = paced.now + seconds
    while paced.now < end:
        gap = paced.work / rate
        paced.now += gap
        limit.holds(level - 1, paced.now)
        limit.answered("clip-visual", level * gap, level, paced.now, busy=True, over=True, sent=sent.popleft())
        limit.holds(level, paced.now)
        sent.append(limit.shares())
    limit.holds(limit.value, paced.now)


def test_a_level_above_the_knee_that_does_no_less_is_room_while_requests_wait():
    """
    A host whose third request in flight bought too little to climb to has
    room for it while requests wait in the balancer, as long as three did
    not clearly less than two (one window cannot tell a little less from a
    little more): a real host that runs three at once, and one seen to run
    its two at once (Immich ML with two threads), where the third waits
    inside only for the first of them to end.  A host seen to run only one
    at once has none (a request may already wait inside it at two), nor one
    where three did clearly less, nor one with configured slots.  At a
    knee of one, the host must have been seen to run two at once: the
    request more would wait a whole request inside a host that runs one.
    """
    paced = _knee_at_two()
    assert paced.limit.room(paced.now)
    assert _knee_at_two(third=1.16).limit.room(paced.now)
    assert not _knee_at_two(third=1.1).limit.room(paced.now)
    assert _knee_at_two(side_by_side=2).limit.room(paced.now)
    assert not _knee_at_two(side_by_side=1).limit.room(paced.now)
    assert not _knee_at_two(third=1.0).limit.room(paced.now)
    slots = Limit(slots=2)
    slots.ran_at_once(3)
    assert not slots.room(0.0)
    one = _knee_at_one(side_by_side=1)
    assert not one.limit.room(one.now)
    two = _knee_at_one(side_by_side=2)
    assert two.limit.room(two.now)


def test_the_room_grows_while_the_host_runs_all_of_it_but_one_at_once_and_it_does_no_less():
    """
    A real host with a light model: each request more in flight buys a few
    per cent, too little to climb to.  Seen to run all of its room at once,
    or all of it but the last request, it may take one request more, and
    that level is measured while it is used: kept while it does not clearly
    less work than the knee, given up once it does, and tried again once
    that measure is old.  On Immich ML with two threads the requests past
    them wait inside it for one with their decoding done, and keep both
    busy: a host seen to run only its limit of two at once gets a room of
    two, and no more.
    """
    paced = _knee_at_two()  # seen to run three at once
    limit = paced.limit
    assert limit.room(paced.now) == 2  # the fourth is tried
    _over(paced, 1.25, STALE / 2, depth=2)
    assert limit.throughput(4) == pytest.approx(1.25, abs=0.03)
    assert limit.value == 2 and limit.room(paced.now) == 3  # the fifth is tried
    _over(paced, 1.0, STALE / 2, depth=3)  # five do clearly less than two
    assert limit.value == 2 and limit.room(paced.now) == 2
    _over(paced, 1.25, STALE + 1, depth=2)
    assert limit.room(paced.now) == 3  # five measured long ago: tried again
    # a deeper level of the room, which the host holds only for moments,
    # reads a few per cent low: 5-10 % less than the limit is not clearly
    # less there
    _over(paced, 1.14, STALE / 2, depth=3)
    assert 1.2 * 0.9 < limit.throughput(5) < 1.2 * 0.95
    assert limit.room(paced.now) == 3  # not seen to run four at once: no sixth
    limit.ran_at_once(4)
    assert limit.room(paced.now) == 4
    assert limit.room(paced.now + STALE + 1) == 0  # nothing above the limit measured lately
    two = _knee_at_two(side_by_side=2)
    assert two.limit.room(two.now) == 2
    _over(two, 1.25, STALE / 2, depth=2)
    assert two.limit.room(two.now) == 2


def _climbed_to(knee: int, side_by_side: int) -> Paced:
    """
    A host seen to run C{side_by_side} requests at once, whose limit climbed
    to C{knee} because each level up to it paid (each did 0.2 more work a
    second than the one below), and whose level above the knee did about
    as much as the knee: too little to climb to.
    """
    paced = Paced(Limit())
    paced.limit.ran_at_once(side_by_side)
    for level in range(1, knee + 1):
        for _ in range(2):  # a level is judged at most twice before the climb
            if paced.limit.value == level:
                paced.until_judged(1.0 + 0.2 * (level - 1))
    assert paced.limit.value == knee + 1
    for _ in range(2):  # doubted, then left
        if paced.limit.value == knee + 1:
            paced.until_judged(1.0 + 0.2 * (knee - 1) + 0.01)
    assert paced.limit.value == knee and paced.limit.ceiling == knee + 1
    return paced


def test_a_knee_one_past_what_was_seen_at_once_has_room():
    """
    Immich ML with two threads: a third request in flight waits for a
    thread while its decoding overlaps the others' inference, and pays a
    little, but seldom ends before both it joined: the host is seen to run
    only two at once.  A knee of three, which the limit climbed past, counts
    as run at once: while requests wait, the host has room past it as a
    host seen to run three at once has (two: the fourth did no less than
    three).  Seen to run only one at once, a host at three has none
    (requests may already wait inside it), nor one at four seen to run
    two, nor one at two seen to run one.  Nor has a probe of three on a
    host seen to run two, whose knee is two: three has not paid there.
    """
    for side_by_side in (2, 3):
        paced = _climbed_to(3, side_by_side)
        assert paced.limit.room(paced.now) == 2
    for knee, side_by_side, room in ((3, 1, 0), (4, 2, 0), (4, 3, 2), (2, 1, 0)):
        paced = _climbed_to(knee, side_by_side)
        assert paced.limit.room(paced.now) == room
    paced = _knee_at_two(side_by_side=2)
    _over(paced, 1.25, STALE / 2, depth=2)  # four measured, in the room
    for _ in range(5000):
        if paced.limit.value != 2:
            break
        paced.answers(1.22, 1)  # held at the knee until the probe
    assert paced.limit.value == 3 and paced.limit.throughput(4) is not None
    assert paced.limit.room(paced.now) == 0


def _knee_at_one(side_by_side: int) -> Paced:
    """
    A host whose second request in flight did about as much as one: too
    little to climb to, not clearly less.
    """
    paced = Paced(Limit())
    paced.limit.ran_at_once(side_by_side)
    paced.until_judged(1.0)
    for _ in range(2):
        if paced.limit.value == 2:
            paced.until_judged(1.01)
    assert paced.limit.value == 1 and paced.limit.ceiling == 2
    return paced


def test_the_room_is_measured_while_it_is_used_and_the_knee_is_not_slowed_by_it():
    """
    The time the host holds the room, and the answers then, are not the
    knee's: a few seconds of room between its answers do not make the knee
    look slower.  They measure the level above instead: a host kept in its
    room for minutes (a job's steady stream) holds its knee only for
    moments, and the room stays open as long as it does not clearly less
    work than the knee, however long ago the knee's probe was; its own
    answers move no limit.  Once the room does clearly less, it closes, and
    the host is held at its knee until the level above is tried again,
    which gives the room back if it does no less.
    """
    paced = _knee_at_two()
    paced.answers(1.2, 10)
    _over(paced, 1.25, STALE / 2)
    assert paced.limit.room(paced.now)
    paced.until_judged(1.2)
    assert paced.limit.value == 2 and paced.limit.throughput(2) == pytest.approx(1.2, abs=0.01)
    _over(paced, 1.25, 3 * STALE)
    assert paced.limit.room(paced.now)
    assert paced.limit.throughput(3) == pytest.approx(1.25, abs=0.03)
    _over(paced, 1.5, STALE)  # more than a probe that pays, but not the knee's measure
    assert paced.limit.value == 2 and paced.limit.room(paced.now)
    _over(paced, 1.0, STALE / 2)
    assert not paced.limit.room(paced.now)
    assert paced.limit.value == 2
    curve = {1: 1.0, 2: 1.2, 3: 1.21}
    for _ in range(5000):  # at the knee (the level below measured again) until the probe is judged
        paced.answers(curve[paced.limit.value], 1)
        if paced.limit.value == 2 and paced.limit.room(paced.now):
            break
    assert paced.limit.value == 2 and paced.limit.room(paced.now)


def test_a_room_that_pays_is_climbed_to_when_the_knee_is_judged_again():
    """
    The room's measure is the level above's.  A host long in its room has
    nothing recent below its knee to compare the knee with: when the knee
    is judged again, a room that did a twentieth more than it is climbed
    to, as a level measured again from above; one that did about as much
    is not.
    """
    paying = _knee_at_two()
    paying.answers(1.2, 10)
    _over(paying, 1.5, STALE)
    paying.until_judged(1.2)
    assert paying.limit.value == 3
    even = _knee_at_two()
    even.answers(1.2, 10)
    _over(even, 1.22, STALE)
    even.until_judged(1.2)
    assert even.limit.value == 2 and even.limit.room(even.now)


#: One core the requests share, and nothing else: a request more in flight
#: buys nothing.
ONE_CORE = CPUProfile(cores=1.0, threads=8, parallelism=1.0, python=0.0, inference=0.02)


def test_work_is_counted_in_the_usual_time_alone_not_the_quickest():
    """
    Answers that vary by half their time either way: the quickest is half
    the usual, and a unit that every quicker answer lowers at once would
    count one level's work in one unit and the next level's in another.
    Counted in the average time alone, one core does one second of work a
    second, at one request in flight as at two.
    """
    driven = Driven(Limit(), ONE_CORE, jitter=0.5, handling=0.0)
    driven.run(60.0)
    one, two = driven.limit.throughput(1), driven.limit.throughput(2)
    assert one == pytest.approx(1.0, abs=0.05)
    assert two is not None and two < one * 1.05
    # a request more, which buys nothing, is seldom kept
    assert driven.share(since=200)[1] > 0.6


def test_a_first_answer_that_loaded_the_model_is_not_the_unit():
    """
    A task's first answer took a hundred times the usual (its model was
    loading): the work done since is counted in the usual time all the same.
    """
    limit = Limit()
    limit.answered("clip-visual", 2.0, 1, 0.0, alone=True)
    driven = Driven(limit, ONE_CORE, jitter=0.5, handling=0.0)
    driven.run(2.0)
    # the first levels measured, one second of work a second each
    assert limit.throughput(1) == pytest.approx(1.0, abs=0.1)
    assert limit.throughput(2) == pytest.approx(1.0, abs=0.1)


def test_batch_work_that_would_wait_takes_the_room_and_waits_inside_for_the_first_answer():
    """
    A host whose learned limit of two was measured as above (three did no
    less), seen to run its two at once: while nobody searches, a third and
    a fourth batch request go to it rather than waiting in the balancer,
    counted as waiting inside the host, and start at the first answers,
    when the request at the head of the queue takes the room again.  A
    search then is not sent in past the limit (the host does not run three
    at once): it waits in the balancer, ahead of the batch, for the answer
    after the requests inside have started (two answers more than without
    the room, once: the room is left to searches from then on).  On a host
    seen to run only one at once, the third batch request waits in the
    balancer.
    """
    batch = RequestInfo(b"POST", b"/predict", "clip-visual")
    search = RequestInfo(b"POST", b"/predict", "clip-textual", interactive=True)

    def host_with(paced: Paced):
        clock = Clock()
        clock.advance(paced.now)
        fleet = Fleet.from_addresses([BackendAddress("h0")], clock)
        [host] = fleet.backends
        fleet.check_passed(host)
        host.limiter = paced.limit
        return clock, fleet, host, Dispatcher(fleet, ShortestDelay(), clock, 60.0, 100)

    def bound(d):
        got = []
        d.addCallback(got.append)
        return got[0] if got else None

    clock, fleet, host, dispatcher = host_with(_knee_at_two(side_by_side=2))
    first, second, third = (bound(dispatcher.acquire(batch)) for _ in range(3))
    clock.advance(0.001)
    fourth = bound(dispatcher.acquire(batch))
    assert first and second and third and fourth and host.in_flight == 4
    assert third.starts is None and fourth.starts is None and host.queued_inside == 2
    fifth = dispatcher.acquire(batch)
    fifth_bound = []
    fifth.addCallback(fifth_bound.append)
    assert not fifth_bound and dispatcher.queue_depth == 1
    clock.advance(0.02)
    fleet.finish(first, 0.02)
    assert third.starts == clock.seconds()
    [fifth] = fifth_bound
    assert host.in_flight == 4 and fifth.starts is None and host.queued_inside == 2
    searched = []
    dispatcher.acquire(search).addCallback(searched.append)
    assert not searched and dispatcher.queue_depth == 1 and host.in_flight == 4
    for ended, starts in ((second, fourth), (third, fifth)):
        clock.advance(0.02)
        fleet.finish(ended, 0.04)
        assert starts.starts == clock.seconds() and not searched
    assert host.in_flight == 2
    clock.advance(0.02)
    fleet.finish(fourth, 0.04)
    assert searched and host.in_flight == 2 and dispatcher.queue_depth == 0
    batch_again = []
    dispatcher.acquire(batch).addCallback(batch_again.append)
    assert not batch_again and dispatcher.queue_depth == 1  # no room while people search

    clock, fleet, host, dispatcher = host_with(_knee_at_two(side_by_side=1))
    first, second, third = (bound(dispatcher.acquire(batch)) for _ in range(3))
    assert first and second and third is None and host.in_flight == 2 and dispatcher.queue_depth == 1
