"""
Concurrency limits: learned from service times, or configured; slow start.
"""

from imml.limits import Limit


def feed(limit, samples):
    for seconds, in_flight in samples:
        limit.answered("clip-visual", seconds, in_flight)


def test_configured_slots_are_the_limit():
    limit = Limit(slots=4)
    assert limit.value == 4
    feed(limit, [(1.0, 4)] * 10)
    assert limit.value == 4


def test_a_learned_limit_grows_while_the_host_keeps_up():
    limit = Limit()
    assert limit.value == 1
    feed(limit, [(0.04, 1)])
    assert limit.value == 2
    feed(limit, [(0.04, 2), (0.04, 2)])
    assert limit.value == 3


def test_a_learned_limit_does_not_grow_while_the_host_is_not_at_it():
    limit = Limit(learned=3)
    feed(limit, [(0.04, 1)] * 20)
    assert limit.value == 3


def test_queueing_inside_the_host_shrinks_the_limit():
    # a host with two slots: the third request waits for one inside it
    limit = Limit(learned=2)
    feed(limit, [(0.04, 2), (0.04, 2)])
    assert limit.value == 3
    feed(limit, [(0.04, 3), (0.08, 3)])
    assert limit.value == 2 and limit.ceiling == 3
    feed(limit, [(0.04, 2)] * 50)  # a probe, later
    assert limit.value == 3
    feed(limit, [(0.08, 3)])
    assert limit.value == 3  # one slow answer may be noise
    feed(limit, [(0.08, 3)])
    assert limit.value == 2


def test_the_limit_settles_near_the_hosts_real_concurrency():
    """
    A simulated host with 2 slots: service time doubles for the requests
    beyond them.
    """
    limit = Limit()
    seen = []
    for _ in range(200):
        n = limit.value
        seconds = 0.04 if n <= 2 else 0.04 * (1 + (n - 2) / 2 + 0.5)
        limit.answered("clip-visual", seconds, n)
        seen.append(limit.value)
    assert set(seen[50:]) <= {2, 3}
    assert seen[50:].count(2) > seen[50:].count(3)


def test_a_cold_model_load_teaches_nothing():
    limit = Limit(learned=3)
    feed(limit, [(0.04, 3)])
    feed(limit, [(20.0, 3)])  # the model was loading
    assert limit.value >= 3


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


def test_after_queueing_is_seen_the_limit_probes_above_it_rarely():
    """
    A host with 2 slots: each probe of a third request costs that request a
    whole service time of waiting inside the host, so probes get rarer.
    """
    limit = Limit()
    probes = 0
    for _ in range(2000):
        n = limit.value
        seconds = 0.04 if n <= 2 else 0.08
        before = limit.value
        limit.answered("clip-visual", seconds, n)
        if before == 2 and limit.value == 3:
            probes += 1
    assert limit.ceiling == 3
    # well under 1 % of the answers pay for a probe
    assert 1 <= probes <= 10


def test_a_host_that_takes_more_later_is_followed():
    limit = Limit(learned=2, ceiling=3)
    feed(limit, [(0.04, 2)] * 50)  # a probe to 3 ...
    assert limit.value == 3
    feed(limit, [(0.04, 3)] * 50)  # ... that holds, and the next one too
    assert limit.value == 4 and limit.ceiling is None


def test_the_proven_limit_leaves_out_a_probing_slot():
    limit = Limit(learned=2, ceiling=3)
    assert limit.proven == 2
    feed(limit, [(0.04, 2)] * 50)  # a probe to 3: not proven yet
    assert limit.value == 3 and limit.proven == 2
    feed(limit, [(0.04, 3)] * 49)
    assert limit.proven == 2
    feed(limit, [(0.04, 3)])  # it held long enough: the next probe is to 4
    assert limit.value == 4 and limit.proven == 4 and limit.ceiling is None
    assert Limit(slots=2).proven == 2


def test_a_stall_below_a_rarely_probed_ceiling_is_left_behind_soon():
    """
    A host with 2 slots whose probes of a third request have grown rare
    stalls once: two answers at 2 in flight queue, so the limit drops to 1.
    The probe back to 2 comes after as few answers as a first probe, not
    after the grown interval.
    """
    limit = Limit(learned=2, ceiling=3, probe_after=400)
    feed(limit, [(0.04, 2)] * 10)
    assert limit.value == 2
    feed(limit, [(0.08, 2), (0.08, 2)])
    assert limit.value == 1 and limit.ceiling == 2
    feed(limit, [(0.04, 1)] * 49)
    assert limit.value == 1
    feed(limit, [(0.04, 1)])
    assert limit.value == 2
    # a failed probe at the new ceiling still makes the next one rarer
    feed(limit, [(0.08, 2), (0.08, 2)])
    assert limit.value == 1 and limit.probe_after == 100
