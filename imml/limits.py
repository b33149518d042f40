"""
How many requests to keep in flight on one host.

A host's limit is its configured C{slots}, or one learned from its
throughput.  A real Immich ML host is not a set of slots: the requests on it
share its processor, and one request's decoding overlaps another's
inference, so a request more in flight may still buy throughput while every
request takes longer.  So the learned limit climbs the host's throughput
curve, as a gradient limiter does (TCP Vegas, Netflix's concurrency-limits):
at each level it measures the work the host completes per second while kept
at that level, and

- raises the limit while a request more in flight buys at least L{GAIN}
  more throughput than the level below, in two windows running (the
  second smoothed with the first);
- holds at the knee, the highest level that still does, and tries one more
  only now and then (the probe's request pays for it on a host with slots,
  waiting inside it), less often each time it buys nothing;
- falls back to the level below when the level it holds gives no more
  than that one (the host got slower, or busier with other work): at once
  when it gives clearly less, else when a second window says so too (on a
  busy machine one window of a level that pays can measure no better); a
  level whose throughput is older than L{STALE} seconds is measured again.

A level is measured as the work the host did while it held just that
many requests, over the time it held them: not the time it had none
(between an answer and the next request sent, a host at one request in
flight is idle by the balancer's doing, not its own), fewer (the next
request went elsewhere) or more (the room past the limit, a search).  The
work is each answer's share done at the level: a request carries the
host's clock of shares from its sending (L{Limit.shares}), and its answer
counts the share of the host it had at the level over the share it had in
all (a request sent as another is nearly done ends a short stay at a
level with an answer whose work was mostly done below it).  A
measurement takes at least L{WINDOW} answers' work and L{MIN_SPAN}
seconds at the level, so that a moment when the machine takes the host's
CPU away weighs little.

While requests wait in the balancer anyway, a host seen to run one more
than its limit at once, or its limit of two or more, may take one request
past it (L{Limit.room}): when the level above its knee was lately
measured to do not clearly less work than the knee (it bought too little
to climb to: on a real host each request more in flight still buys a
little, which one window cannot tell from nothing), the request more runs
at once or waits inside the host for the first answer rather than in the
balancer, starts as soon as the host can take it, and the host does a
little more.  A host seen to run all of its room at once, or all of it
but one, may take one request more, and so on, while each level it adds
does not clearly less work than the knee (a deeper level, held only for
moments, may read up to L{ROOM_SLACK} less): on Immich ML with a light
model each request more in flight buys a few per cent, too little for the
knee to climb on, and one waiting there for a thread of its pool has its
decoding done meanwhile; the host then runs as many as its curve allows
while requests wait.  (For its room, a knee one past what the host was
seen to run at once, two or more, counts as run at once: the knee paid,
and a request past a pool's threads pays a little but seldom ends before
all it joined.)
What the host does while it holds more than its limit (the room, a
search past it) does not count for the knee: it measures the levels above
(L{Limit._measure_room}).  A host kept in its room (a job's
steady stream) holds its knee only for moments, so the room measures
itself while it is used, stays open while it does not clearly less work
than the knee, and closes once it does; the host then holds its knee
until the level above is tried again.  The room's measure is the level
above's: when the knee is next judged with nothing recent below it (as for
a host long in its room), a room that did L{GAIN} more than the knee is
climbed to, as a level measured again from above.

Work is counted in each answer's usual time alone on the host for its task
(the average of its answers given alone, slowly moving; its quickest answer
until there is one), so a mix of cheap searches and costly images measures
as one throughput, and levels measured at different moments compare in one
unit.  (The quickest answer, which every quicker one lowers at once, would
not: where answers vary, it counts a level measured just after a quick
answer in a smaller unit than one measured before.)  A host that comes back
up starts slow: its limit is capped at one request and the cap grows by one
with each answer, until the full limit is reached.
"""

from __future__ import annotations

from typing import Optional

from attrs import define, field

#: An answer slower than this many times the baseline shows queueing...
QUEUEING = 1.25
#: ... plus this many seconds, so that tiny service times are not noise.
QUEUEING_SLACK = 0.005
#: An answer slower than this many times its task's usual time alone (its
#: quickest answer until there is one), times the requests in flight when
#: it was sent, is an outlier (a model loading): it tells nothing.
OUTLIER = 10.0
#: Seconds a task may go unanswered on a host before its model may have
#: been unloaded (Immich ML's MACHINE_LEARNING_MODEL_TTL, by default): the
#: requests sent after such a pause, until one of them is answered, may have
#: waited for the model to load.
MODEL_TTL = 300.0
#: How fast a baseline follows slower answers given alone (a new normal).
BASELINE_DRIFT = 0.05
#: Weight of a new answer given alone in its task's unit of work, once
#: there are 1 / UNIT_ALPHA of them (the first ones are averaged plainly).
UNIT_ALPHA = 0.02
#: An answer counts in the unit as at most this many times the unit.
UNIT_CAP = 3.0
#: The most a learned limit grows to.
MAX_LEARNED = 64
#: A level is worth keeping when it completes this much more work per second
#: than the level below.
GAIN = 0.05
#: Answers measured at a level before it is judged: at least this many, and
#: at least four per request in flight.
WINDOW = 20
#: Seconds after which a level's measured throughput is measured again.
STALE = 30.0
#: The shortest span a level is measured over, in seconds: a busy machine
#: gives a host more and less of its CPU from one tenth of a second to the
#: next.
MIN_SPAN = 0.5
#: A level of the room two or more past a learned limit is kept while it
#: does no more than this much less work than the limit (the first one
#: past it, as the levels of the knee's climb, within L{GAIN}): a level
#: the host holds only for moments, measured by its answers' shares there,
#: reads a few per cent low (on Immich ML with a light model, the fifth
#: request in flight reads 5 % below the fourth, and held for good makes
#: 0.5 % more).  The first
#: level is a heavy host's whole room, where a request more costs a sixth
#: of the throughput: it must not read as no less.
ROOM_SLACK = 0.10
#: Weight of a new measurement of a level in its running throughput.
SMOOTHING = 0.5
#: Answers at a probed level after which it is left at once if they took,
#: on average, as much longer as pure waiting would make them (a host with
#: slots).
QUICK = 4
#: Weight of a new answer in a level's average stretch.
STRETCH_ALPHA = 0.1
#: Answers at the knee before the level above it is tried again; doubled
#: each time it buys nothing, up to MAX_PROBE_AFTER.
PROBE_AFTER = 50
MAX_PROBE_AFTER = 800


@define
class _Window:
    """
    Answers being measured at one level.
    """

    level: int
    #: Answers still to pass before measuring: those sent at the level before.
    skip: int
    started: Optional[float] = None
    #: The seconds the host held its limit, in all (L{Limit.at_limit}),
    #: when it started.
    at_start: float = 0.0
    #: The host's shares at the level (L{Limit.shares}) when it started.
    shares_start: float = 0.0
    work: float = 0.0
    #: The answers counted, and how many whole answers' work they did at
    #: the level (their shares there, L{Limit._share}).
    answers: int = 0
    whole: float = 0.0
    #: The sum of its answers' stretches.
    stretched: float = 0.0


@define
class Limit:
    """
    @ivar slots: configured slots, or None to learn the limit.
    @ivar learned: the learned limit (used when C{slots} is None).
    @ivar ramp: the slow-start cap, or None when not starting.
    @ivar ceiling: the lowest level seen to buy no throughput, or None:
        trying it again is a probe, made after C{probe_after} answers at the
        level below.
    """

    slots: Optional[int] = None
    learned: int = 1
    ramp: Optional[int] = None
    ceiling: Optional[int] = None
    probe_after: int = PROBE_AFTER
    #: The most requests in flight at which one was seen to run at once
    #: (L{ran_at_once}).
    side_by_side: int = 1
    #: Per task, the host's unloaded service time: its quickest answer,
    #: moving (L{BASELINE_DRIFT}) towards slower answers sent while it held
    #: no other.
    _baseline: dict[str, float] = field(factory=dict)
    #: Per task, when it was last answered, and before when a request sent
    #: may have waited for its model to load (L{MODEL_TTL}).
    _answered_at: dict[str, float] = field(factory=dict)
    _cold_before: dict[str, float] = field(factory=dict)
    #: Per task, the unit its work is counted in (L{_unit_of}), and how many
    #: answers it averages.
    _unit: dict[str, tuple[float, int]] = field(factory=dict)
    #: Per level, the work per second measured there, and when; how many
    #: times that changed.
    _rates: dict[int, tuple[float, float]] = field(factory=dict)
    _rates_changed: int = 0
    #: The last L{room}: what it was worked out from (the learned limit,
    #: the most seen at once, the rates' changes), from when, until when
    #: (a measure it used gets stale), and the room.
    _room_known: Optional[tuple[int, int, int, float, float, int]] = None
    #: Per level, a moving average of how many times its usual time alone an
    #: answer took there.
    _stretches: dict[int, float] = field(factory=dict)
    _window: Optional[_Window] = None
    #: Per level above the learned limit, answers being measured there
    #: while the host holds it (the room past the limit, a search past it).
    _room_windows: dict[int, _Window] = field(factory=dict)
    #: Answers at the knee since the level above was last tried.
    _held: int = 0
    #: The level held (a probe above the ceiling, or a level climbed to)
    #: bought throughput in its last window already.
    _confirmed: bool = False
    #: The level held measured no gain over the one below in its last
    #: window (not clearly less): one more such window and it is left.
    _doubted: bool = False
    #: Seconds the host held just its learned limit of requests, in all;
    #: how many it holds now, since when.
    at_limit: float = 0.0
    _holding: int = 0
    _holding_since: Optional[float] = None
    #: Per number of requests held (the index), in all, the seconds the
    #: host held just that many over that number: the share of the host
    #: each of them had there, processor sharing's clock.
    _shares: list[float] = field(factory=list)

    @property
    def value(self) -> int:
        full = self.slots if self.slots is not None else self.learned
        if self.ramp is not None:
            return min(full, self.ramp)
        return full

    @property
    def proven(self) -> int:
        """
        The limit the host has been seen to take with profit: L{value}, less
        one while a learned limit tries the level where it bought nothing
        before (a probe: on a host with slots, the request sent into that
        last slot waits inside it).
        """
        value = self.value
        if self.slots is None and self.ceiling is not None and self.learned >= self.ceiling and value > 1:
            return value - 1
        return value

    def throughput(self, level: int) -> Optional[float]:
        """
        The work per second (in seconds of answers given alone) measured with
        C{level} requests in flight, or None.
        """
        measured = self._rates.get(level)
        return measured[0] if measured is not None else None

    def measured(self) -> dict[int, float]:
        """
        The work per second measured at each level (L{throughput}), by
        level: the host's throughput curve as far as it was climbed.
        """
        return {level: rate for level, (rate, _) in sorted(self._rates.items())}

    def stretch(self, in_flight: int) -> float:
        """
        How many times longer a request takes with C{in_flight} requests on
        the host than alone: C{in_flight} over the throughput gained there
        (Little's law).  A level not measured yet within the learned limit
        (the limit climbed to it, so the level below paid) is expected to
        pay as well: to stretch requests no more than the highest level
        measured below it, so that the host is kept at the level until it
        is measured.  Past the limit, more in flight buys nothing: each one
        more is pure waiting.  1.0 when nothing is known.
        """
        one = self.throughput(1)
        if one is None or in_flight <= 1:
            return 1.0
        rates = self._rates
        level = in_flight
        while level > 1 and level not in rates:
            level -= 1
        if level == 1:
            return 1.0
        if level < in_flight <= self.learned:
            return level * one / rates[level][0]
        return in_flight * one / rates[level][0]

    def knows(self, level: int) -> bool:
        """
        Whether the host's throughput at C{level} has been measured (so that
        holding it below that level for a while costs no measurement).
        """
        return level in self._rates

    def ran_at_once(self, level: int) -> None:
        """
        A request sent as the C{level}-th in flight was answered before each
        of the requests it joined: with that many in flight the host runs
        them side by side (a host that queues requests past its slots would
        have ended one of them first).
        """
        if level > self.side_by_side:
            self.side_by_side = level

    def room(self, now: float) -> int:
        """
        How many requests past its learned limit the host may take for
        batch work while nobody searches: work that would otherwise wait in
        the balancer, or go to a slower host.

        One, when it was seen to run that many at once (a real host,
        sharing its processor: the request runs at once), or its limit is
        two or more (the request more waits inside the host only for the
        first of them to end, as it would wait in the balancer for that
        end, and then starts without a trip back: on Immich ML it waits
        for a thread of its pool while its decoding overlaps the others'
        inference); and one more in flight was measured, in the last
        L{STALE} seconds, to do not clearly less work than its limit (no
        less by more than L{GAIN}: the level bought too little to climb
        to, and one window cannot tell a little from nothing).  The room's
        own answers keep that measure fresh while it is used
        (L{_measure_room}); once it is older, the host is held at its limit
        until the level above is tried again.  A host seen to run only one
        at once has no room at one (the request more would wait a whole
        request inside it), nor one whose limit is past what it was seen to
        run at once (requests may already wait inside it), except at a
        knee one past it, where that is two or more: for its room, the knee
        counts as run at once.  The limit climbed past the knee, so the
        knee paid, which a host that queues requests past its slots does
        only by luck.  On Immich ML with two threads, a third request waits
        for a thread while its decoding overlaps the others' inference, and
        pays a little; that it ends before both it joined, and so is seen
        to run at once, is luck, and a room that waited for that luck could
        leave the host at its limit for minutes.  (A probe of the level
        above the knee, or a level just climbed to, is not a knee.)

        One more, and so on, while the host was seen to run all of the
        room at once, or all of it but its last request (a real host; on
        Immich ML, whose pool of threads runs as many inferences as it has
        threads, the requests past them wait inside it for one with their
        decoding done, and keep the pool busy), and the level it adds was
        measured, lately, to do not clearly less work than the limit (no
        less by more than L{ROOM_SLACK}: a level held only for moments
        reads a few per cent low), or was not measured lately: then it is
        tried, and measured while it is used.  (A host with slots, not told
        to the balancer, may then hold two requests past its slots while
        batch work waits: its throughput is the same, and the strategy
        weighs each one's wait inside it.)  A level of the room the host
        only passes through (a deeper one is used) is seldom measured again:
        once its measure is old, it is taken to do no less where a level
        above it does no less.  On a real host with a light model, each
        request more in flight buys a few per
        cent more throughput, less than one window can tell from nothing:
        the knee is judged low, and the room keeps the host as busy as its
        curve allows while requests wait anyway.
        """
        if self.slots is not None or self.ramp is not None:
            return 0
        level, at_once = self.learned, self.side_by_side
        known = self._room_known
        if known is not None and known[:3] == (level, at_once, self._rates_changed) and known[3] <= now < known[4]:
            return known[5]  # (asked at every choice of a host for batch work)
        room, until = self._room(level, at_once, now)
        self._room_known = (level, at_once, self._rates_changed, now, until, room)
        return room

    def _room(self, level: int, at_once: int, now: float) -> tuple[int, float]:
        """
        L{room}, and until when it holds (the first of the measures it
        used to get stale).
        """
        until = float("inf")
        here = self.throughput(level)
        # a knee (below a level that bought nothing) one past what the host
        # was seen to run at once counts as run at once (see room)
        knee = self.ceiling is not None and level < self.ceiling
        if at_once < max(level - 1 if knee else level, 2) or here is None:
            return 0, until
        at_once = max(at_once, level)
        # the deepest level above the limit lately measured to do no less,
        # up to the first lately measured to do clearly less (the levels
        # between, which the host passes through for moments, age)
        reach = 0
        for above in range(level + 1, at_once + 3):
            least = here * (1 - (GAIN if above == level + 1 else ROOM_SLACK))
            measured = self._rates.get(above)
            if measured is None:
                continue
            rate, when = measured
            if now < when:
                until = min(until, when)  # (a clock set back)
                continue
            if now - when > STALE:
                continue
            until = min(until, when + STALE)
            if rate < least:
                return reach, until
            reach = above - level
        if reach and level + reach <= at_once + 1:
            return reach + 1, until  # tried, and measured while it is used
        return reach, until

    def holds(self, in_flight: int, now: float) -> None:
        """
        The host holds C{in_flight} requests from C{now} on: the time it
        held just its learned limit is the time its level is measured over.
        """
        held, since = self._holding, self._holding_since
        if since is not None and now > since and held:
            if held == self.learned:
                self.at_limit += now - since
            shares = self._shares
            if len(shares) <= held:
                shares.extend([0.0] * (held + 1 - len(shares)))
            shares[held] += (now - since) / held
        self._holding, self._holding_since = in_flight, now

    def shares(self) -> tuple[float, ...]:
        """
        The host's clock of shares now (see L{holds}): given back with a
        request's answer (L{answered}), it tells how far the request got at
        each number of requests held while it ran.
        """
        return tuple(self._shares)

    def restart(self) -> None:
        """
        The host came back up: start slow, and measure it afresh.
        """
        self.ramp = 1
        self.side_by_side = 1
        # Its units are averaged afresh from its next answers given alone
        # (it may be other hardware now); until then, they stay.
        self._unit = {key: (value, 0) for key, (value, _) in self._unit.items()}
        self._rates.clear()
        self._rates_changed += 1
        self._stretches.clear()
        self._window = None
        self._room_windows.clear()

    def failed(self) -> None:
        """
        A request failed on the host: what is being measured is spoilt.
        """
        self._window = None
        self._room_windows.clear()

    def answered(
        self,
        task: Optional[str],
        seconds: float,
        in_flight: int,
        now: float = 0.0,
        busy: bool = False,
        alone: bool = False,
        over: bool = False,
        sent: Optional[tuple[float, ...]] = None,
    ) -> Optional[float]:
        """
        A request of C{task} was answered in C{seconds}, at C{now}; C{in_flight}
        requests were on the host when it was sent (itself included); C{busy}:
        the host had its limit of requests when it answered; C{over}: it had
        more (the room past a learned limit, a search); C{alone}: no other
        request was on the host from its start to its answer; C{sent}: the
        host's L{shares} when it was sent, if known.

        @return: what the answer says of the host's unloaded service time,
            or None when it says nothing (a model loading; a wait inside a
            host with slots):
              - an answer given alone: its time, however long it took (a
                host held to a CPU quota is quick at the start of each
                period, slow at its end: its quickest answers are not its
                usual ones);
              - an answer hardly slower than the quickest: its time;
              - an answer given beside others, at a level whose throughput
                is measured: its time over the stretch there.  Taking the
                quick ones alone would tell a quota-held host's quickest
                answers, not its usual ones.
        """
        key = task or "other"
        baseline = self._baseline.get(key)
        # A task's first answer may have loaded its model; answers while the
        # host starts again may be its first since.
        usual = alone and baseline is not None and self.ramp is None
        if baseline is None or seconds < baseline:
            self._baseline[key] = baseline = seconds
        elif in_flight == 1 and seconds < baseline * OUTLIER:
            # Alone on the host, an answer was slowed by nothing of ours: it
            # is the host's unloaded service time (which may change).
            self._baseline[key] = baseline = baseline + BASELINE_DRIFT * (seconds - baseline)
        if self.ramp is not None:
            self.ramp += 1
            full = self.slots if self.slots is not None else self.learned
            if self.ramp >= full:
                self.ramp = None
        # Against the task's usual time alone, not its quickest: a host held
        # to a CPU quota by periods answers at full speed at a period's
        # start, ten times quicker than at its end, and its answers beside
        # others are its work all the same.
        known = self._unit.get(key)
        cold = self._cold(key, now - seconds, now)
        if cold or seconds >= max(baseline, known[0] if known is not None else 0.0) * OUTLIER * max(1, in_flight):
            return None
        unit = self._unit_of(key, seconds if usual else None, baseline)
        if self.slots is None and self.ramp is None:
            if sent is None:
                share = 1.0 if busy and not over else 0.0
            else:
                # the host's share it had in all, for both levels' shares
                total = sum(self._shares) - sum(sent)
                share = self._share(sent, total, self.learned, self._window)
            self._measure(unit, seconds / unit if unit > 0 else 1.0, now, share)
            if sent is not None:
                self._measure_room(unit, now, sent, total)
        if alone or seconds <= baseline * QUEUEING + QUEUEING_SLACK:
            return seconds
        if in_flight > 1 and in_flight in self._rates:
            return seconds / self.stretch(in_flight)
        return None

    def _cold(self, key: str, sent: float, now: float) -> bool:
        """
        Whether a request of task C{key} sent at C{sent} and answered at
        C{now} may have waited for its model to load: it was sent after the
        task went unanswered for L{MODEL_TTL} seconds (Immich ML unloads an
        idle model), or before the first answer since.  Such an answer may
        be many times its usual time and still not ten times it for the
        requests in flight (a heavy model's slow host at two in flight:
        16 s): it tells nothing.
        """
        last = self._answered_at.get(key)
        self._answered_at[key] = max(now, last) if last is not None else now
        if last is not None and sent - last > MODEL_TTL:
            self._cold_before[key] = now
            return True
        return sent < self._cold_before.get(key, float("-inf"))

    def _unit_of(self, key: str, seconds: Optional[float], baseline: float) -> float:
        """
        The unit the work of task C{key} is counted in, taking into it an
        answer given alone in C{seconds} (None: no such answer): the
        average of those answers, plain over the first ones, then slowly
        moving, each counting as at most L{UNIT_CAP} units (a model loaded
        again after a while idle).  Its C{baseline} until there is one.
        """
        known = self._unit.get(key)
        if seconds is not None:
            value, count = known if known is not None else (seconds, 0)
            count += 1
            value += max(UNIT_ALPHA, 1.0 / count) * (min(seconds, UNIT_CAP * value) - value)
            self._unit[key] = known = (value, count)
        return known[0] if known is not None else baseline

    # -- climbing the throughput curve --------------------------------------

    def _share(self, sent: tuple[float, ...], total: float, level: int, window: Optional[_Window]) -> float:
        """
        The share of its work an answer whose request was sent at C{sent}
        (L{shares}) did while the host held C{level} requests, and since
        C{window} measuring that level started: the share of the host it
        had there over the share it had in all (C{total}).  That is how far it got
        there where the host shares its processor and does as much at each
        level; where a level does more (two slots do twice what one does)
        its share there is counted a little short, and less so the more of
        its time the request spent at one level, as it does on a host kept
        at its limit.  (Weighing each level's share by the throughput
        measured there would feed a level's error back into its next
        measure.)
        """
        shares = self._shares
        if total <= 0 or level >= len(shares):
            return 0.0
        before = sent[level] if level < len(sent) else 0.0
        if window is not None and window.level == level and window.started is not None:
            before = max(before, window.shares_start)
        return max(0.0, shares[level] - before) / total

    def _measure(self, work: float, stretch: float, now: float, share: float) -> None:
        """
        Count C{share} of an answer of C{work} seconds alone, which took
        C{stretch} times that, towards the level's throughput: the work the
        host did while it held its limit, over the time it held it
        (L{holds}).  The share is what of the answer's work was done at the
        level (L{_share}), or, its request's share of the host not known,
        all of it when the host held its limit at the answer and none
        otherwise.  The time the host held fewer says nothing of the level.
        (Throwing away what was measured whenever the host was not full
        would keep only the runs of answers in which it stayed full: those
        in which it answered quickly enough to be chosen again and again, a
        measure biased high.  Counting an answer's work all at the level
        where it was given biases short stays at a level high too: on a
        host that shares its processor, a request sent when an answer left
        joins others nearly done, whose work was mostly done below.)
        """
        level = self.learned
        window = self._window
        if window is None or window.level != level:
            window = self._window = _Window(level, skip=level)
        if share <= 0:
            return
        if window.skip:
            window.skip -= 1
            return
        previous = self._stretches.get(level)
        self._stretches[level] = stretch if previous is None else previous + STRETCH_ALPHA * (stretch - previous)
        if window.started is None or now - window.started > STALE:
            # A first answer; or a window the host has held its level too
            # little of for too long: what it holds would be stale.
            window.started, window.at_start = now, self.at_limit
            window.shares_start = self._shares[level] if level < len(self._shares) else 0.0
            window.work, window.answers, window.whole, window.stretched = 0.0, 0, 0.0, 0.0
            return
        window.work += work * share
        window.answers += 1
        window.whole += share
        window.stretched += stretch
        # Trying again a level that bought nothing before, on a host not
        # seen to run that many requests at once (a host with slots: the
        # request more waits inside it) ...
        probing = self.ceiling is not None and level >= self.ceiling and self.side_by_side < level
        if probing and window.answers == QUICK and self._only_waiting(level, window.stretched / QUICK):
            # ... the answers took as much longer as if the request more in
            # flight only waited: no need to pay for measuring on.  (On a
            # host that shares its processor, a few answers cannot tell a
            # small gain from none: the level is measured in full.)
            self._window = None
            below = self._rates.get(level - 1)
            if below is not None:
                self._rates[level] = (below[0], now)  # as much work done as below
                self._rates_changed += 1
            self._reject(level)
        elif window.whole >= max(WINDOW, 4 * level) and self.at_limit - window.at_start >= MIN_SPAN:
            self._window = None
            self._judge(level, window.work / (self.at_limit - window.at_start), now)

    def _measure_room(self, work: float, now: float, sent: tuple[float, ...], total: float) -> None:
        """
        Count an answer of C{work} seconds alone towards each level above
        the learned limit, for its share done while the host held that many
        (the room past the limit, a search past it; L{_share}): the room is
        measured while it is used.  A host kept in its room holds its limit
        only for moments, between an answer and the request that takes its
        place, so the measure of the level above, which keeps the room
        open, would otherwise only age, and with it the room would close
        (and the host wait at its limit for its probe).  A completed window
        refreshes that level's throughput, smoothed as any level's is: the
        room stays open while it does not clearly less work than the limit,
        and closes once it does.  It moves no limit itself: the knee's next
        judgement weighs it (L{_judge}: with nothing recent below the knee,
        a level above that does L{GAIN} more is climbed to).
        """
        learned = self.learned
        windows = self._room_windows
        shares = self._shares
        for level in range(learned + 1, len(shares)):
            window = windows.get(level)
            share = self._share(sent, total, level, window)
            if share <= 0:
                continue
            if window is None:
                window = windows[level] = _Window(level, skip=0)
            if window.started is None or now - window.started > STALE:
                window.started, window.shares_start = now, shares[level]
                window.work, window.whole = 0.0, 0.0
                continue
            window.work += work * share
            window.whole += share
            held = (shares[level] - window.shares_start) * level  # seconds
            if window.whole >= max(WINDOW, 4 * level) and held >= MIN_SPAN:
                del windows[level]
                self._record(level, window.work / held, now)

    def _only_waiting(self, level: int, stretch: float) -> bool:
        """
        Whether the first answers at C{level} took, on average, nearly as
        much longer than at the level below as if the request more in
        flight bought nothing (Little's law: the same throughput with one
        more in flight stretches each answer by level / (level - 1)): they
        show less than half of L{GAIN}.  On a host with slots they show
        none; on Immich ML, whose pool of threads makes the request more
        wait for one while its decoding overlaps the others' inference,
        they show a little, which only the full window can weigh.
        """
        below = self._stretches.get(level - 1)
        return below is not None and level > 1 and stretch >= below * level / (level - 1) / (1 + GAIN / 2)

    def _record(self, level: int, rate: float, now: float) -> float:
        """
        C{level} was measured at C{rate}: its throughput from now on, the
        measure smoothed with the last one while that is fresh.
        """
        fresh = self._fresh(level, now)
        if fresh is not None:
            rate = fresh + SMOOTHING * (rate - fresh)
        self._rates[level] = (rate, now)
        self._rates_changed += 1
        return rate

    def _fresh(self, level: int, now: float) -> Optional[float]:
        measured = self._rates.get(level)
        if measured is None or not 0 <= now - measured[1] <= STALE:
            return None
        return measured[0]

    def _judge(self, level: int, rate: float, now: float) -> None:
        """
        C{level} was measured at C{rate}: keep it, go up, or go down.
        """
        rate = self._record(level, rate, now)
        below = self._fresh(level - 1, now) if level > 1 else None
        above = self._fresh(level + 1, now)
        doubted, self._doubted = self._doubted, False
        if below is not None and rate < below * (1 + GAIN):
            self._confirmed = False
            if rate < below * (1 - GAIN) or doubted:
                self._reject(level)
            else:
                # No more than the level below, but not clearly less: one
                # window on a busy machine can be unlucky, so measure again
                # (the two smoothed together) before coming down.
                self._doubted = True
        elif above is not None and below is None:
            # Measured again from above: is the level above still worth it?
            if above >= rate * (1 + GAIN):
                self._move(level + 1)
            else:
                self.ceiling = level + 1
                self._held = 0
        elif below is None and level > 1:
            # Nothing recent to compare with: measure the level below again.
            self._move(level - 1)
        elif self.ceiling is not None and level + 1 >= self.ceiling:
            if level >= self.ceiling:
                # The probe bought throughput: the host takes more than
                # before, if a second measurement says so too (one window
                # can be lucky).
                if not self._confirmed:
                    self._confirmed = True
                    return
                self.ceiling = None
                self.probe_after = PROBE_AFTER
                self._move(level + 1)
                return
            # At the knee: try the level above now and then.
            self._held += max(WINDOW, 4 * level)
            if self._held >= self.probe_after:
                self._move(level + 1)
        elif level > 1 and not self._confirmed:
            # The level paid over the one below: climb on once a second
            # window says so too (one window can be lucky, and a host that
            # gains nothing from a request more, a CPU quota's, would climb
            # on luck alone and make every request wait longer).
            self._confirmed = True
        else:
            self._move(level + 1)

    def _reject(self, level: int) -> None:
        """
        C{level} buys nothing over the one below: the knee is lower.
        """
        if self.ceiling is not None and level >= self.ceiling:
            self.probe_after = min(self.probe_after * 2, MAX_PROBE_AFTER)
        self.ceiling = level if self.ceiling is None else min(self.ceiling, level)
        self._move(level - 1)

    def _move(self, level: int) -> None:
        self.learned = max(1, min(level, MAX_LEARNED))
        for above in [above for above in self._room_windows if above <= self.learned]:
            del self._room_windows[above]  # measured as the limit now
        self._held = 0
        self._confirmed = False
        self._doubted = False
