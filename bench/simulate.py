#!/usr/bin/env python3
"""
The balancer's decisions over simulated hosts, on a simulated clock: what
its learned limits and its strategy make of a fleet over minutes, in
seconds, the same on every run.

    .venv/bin/python bench/simulate.py                       # real-light, 8 clients, 30 s, 8 seeds
    .venv/bin/python bench/simulate.py --seconds 120         # the steady state
    .venv/bin/python bench/simulate.py --fleet heterogeneous --clients 8
    .venv/bin/python bench/simulate.py --imml-from /tmp/other-checkout   # another imml package
    .venv/bin/python bench/simulate.py --caps 4,4 --caps 5,3             # splits fixed in advance

Nothing goes over a socket: imml's own L{Fleet}, L{Dispatcher} and
strategy (C{--strategy}) bind each request to a host, as the balancer does,
and each host is a L{SharedCPU} (imml/testing/cpu.py), the processor the
real-like fake hosts of bench/fleet.py run on, driven by a
L{twisted.internet.task.Clock}.  Closed-loop clients send Immich's CLIP
visual request again as soon as one is answered.  Beside imml it runs what
nginx's C{least_conn} does with no limits (every request sent at once to
the host with the fewest in flight), on the same hosts; and with C{--caps}
a split fixed in advance (at most so many in flight on each host, the rest
waiting in turn for the first host below its cap): what a split fixed in
advance makes of the fleet, a yardstick for a balancer's decisions.

bench/fleet.py measures the real processes over 25 s; the limits are
learned from scratch at each start, so its runs show the first half
minute.  This shows what the fleet settles to after minutes (C{--seconds}),
and which seeds do worse: a run is a few seconds for a simulated minute.
C{--imml-from} takes the whole imml package from another checkout, its
model of the hosts (imml/testing/cpu.py) too.  It prints, for each target,
the throughput and p99 (medians over the seeds
and their range), each host's share of the time at each number of
requests in flight and at each limit, and with C{--verbose} the curve each
host's learned limit measured.  The figures are the model's, not a
machine's: they compare decisions, not speed.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
from collections import Counter, deque
from pathlib import Path
from typing import Optional

#: How many hosts each fleet has (L{FLEETS}, made once imml is imported).
HOSTS = {"real-light": 2, "real-heavy": 2, "heterogeneous": 3}


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fleet", choices=tuple(HOSTS), default="real-light")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients (default 8)")
    parser.add_argument("--seconds", type=float, default=30.0, help="simulated seconds a run (default 30)")
    parser.add_argument("--warm", type=float, default=5.0, help="simulated seconds not measured (default 5)")
    parser.add_argument("--seeds", type=int, default=8, help="runs, each with its own random draws (default 8)")
    parser.add_argument("--strategy", default="shortest-delay", help="imml's strategy (default shortest-delay)")
    parser.add_argument("--imml-from", metavar="PATH", help="simulate the imml package of another checkout")
    parser.add_argument("--verbose", action="store_true", help="each run's learned curves")
    parser.add_argument(
        "--caps",
        action="append",
        default=[],
        metavar="N,N,...",
        help="also a balancer that keeps at most N in flight on each host, in the fleet's order (the rest wait"
        " in turn for the first host below its cap): what a split fixed in advance makes; may be given several times",
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= args.warm or args.seeds < 1:
        parser.error("needs --clients >= 1, --seconds > --warm and --seeds >= 1")
    hosts = HOSTS[args.fleet]
    for caps in args.caps:
        if not re.fullmatch(r"\d+(,\d+)*", caps):
            parser.error(f"--caps {caps!r}: expected numbers of requests, one a host, such as 5,3")
        numbers = [int(n) for n in caps.split(",")]
        if len(numbers) > hosts or not any(numbers):
            parser.error(f"--caps {caps!r}: expected at most {hosts} numbers for {args.fleet}'s hosts, not all 0")
    return args


# Parsed before imml is imported: --imml-from says which imml that is.
ARGS = _parse(None if __name__ == "__main__" else [])
if ARGS.imml_from:
    sys.path.insert(0, ARGS.imml_from)

from attrs import evolve, fields  # noqa: E402
from twisted.internet import task  # noqa: E402

from imml.backends import BackendAddress  # noqa: E402
from imml.classify import RequestInfo  # noqa: E402
from imml.dispatch import Dispatcher  # noqa: E402
from imml.fleet import Fleet  # noqa: E402
from imml.strategies import strategy_named  # noqa: E402
from imml.testing.cpu import HEAVY, LIGHT, CPUProfile, SharedCPU  # noqa: E402
from imml.testing.fakehost import FakeMLHost  # noqa: E402

# bench/fleet.py's fleets (imported after imml, so that --imml-from's stays)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import HETEROGENEOUS, SLOW_CORES, SLOW_PERIOD  # noqa: E402

BATCH = RequestInfo(b"POST", b"/predict", "clip-visual")


def _slots(count: int, seconds: float) -> CPUProfile:
    """A host that is a set of slots: C{count} requests of C{seconds} at once."""
    return CPUProfile(cores=float(count), threads=count, parallelism=1.0, python=0.0, inference=seconds)


def _quota(profile: CPUProfile) -> CPUProfile:
    """
    bench/fleet.py's slow real-like host, as the fake host's command line
    makes it (C{--cores}, C{--period}): a quota on the profile's machine.
    """
    return evolve(profile, cores=SLOW_CORES, period=SLOW_PERIOD, machine=profile.cores)


#: The jitter of each request's work on a real-like fake host.
JITTER = fields(FakeMLHost).jitter.default
#: The hosts of bench/fleet.py's scenarios, and the jitter of each
#: request's work (none on slots).
FLEETS = {
    "real-light": ({"fast": LIGHT, "slow": _quota(LIGHT)}, JITTER),
    "real-heavy": ({"fast": HEAVY, "slow": _quota(HEAVY)}, JITTER),
    "heterogeneous": ({name: _slots(slots, ms / 1000) for name, slots, ms, _ in HETEROGENEOUS}, 0.0),
}
# (--caps was checked against HOSTS, before imml was imported)
assert {fleet: len(hosts) for fleet, (hosts, _) in FLEETS.items()} == HOSTS
#: What the fake host's own handling adds to an answer, at most, in seconds,
#: before the request reaches its processor and after (a loopback hop).
HANDLING = (0.002, 0.002)


def run(target: str, seed: int) -> dict:
    """
    One run of C{target} ("imml", "least_conn" or "caps N,N"): its throughput, p99, and
    each host's time at each number in flight and at each limit.
    """
    profiles, jitter = FLEETS[ARGS.fleet]
    draw = random.Random(seed)
    clock = task.Clock()
    fleet = Fleet.from_addresses([BackendAddress(name) for name in profiles], clock)
    for backend in fleet.backends:
        fleet.check_passed(backend)
    cpus = {backend: SharedCPU(clock, profile) for backend, profile in zip(fleet.backends, profiles.values())}
    dispatcher = Dispatcher(fleet, strategy_named(ARGS.strategy), clock, 60.0, 1000)
    latencies: list[float] = []
    #: requests the dispatcher refused (none, unless a host never answers)
    lost: list = []
    seen = {backend: Counter() for backend in fleet.backends}
    #: with a split fixed in advance ("caps N,N"): each host's cap, and the
    #: requests waiting for one
    caps: list[int] = []
    if target.startswith("caps"):
        caps = [int(n) for n in target.split()[1].split(",")]
        caps += [0] * (len(fleet.backends) - len(caps))
    waiting: deque = deque()

    def send() -> None:
        asked = clock.seconds()

        def bound(load) -> None:
            cpu = cpus[load.backend]
            sent = clock.seconds()

            def done() -> None:
                def answered() -> None:
                    fleet.finish(load, clock.seconds() - sent)
                    if caps:
                        fill()
                    if clock.seconds() >= ARGS.warm:
                        latencies.append(clock.seconds() - asked)
                    send()

                clock.callLater(draw.uniform(0, HANDLING[1]), answered)

            python = cpu.profile.python * draw.uniform(1 - jitter, 1 + jitter)
            inference = cpu.profile.inference * draw.uniform(1 - jitter, 1 + jitter)
            clock.callLater(draw.uniform(0, HANDLING[0]), cpu.submit, python, inference, done)

        if target == "imml":
            dispatcher.acquire(BATCH).addCallbacks(bound, lost.append)
        elif caps:
            waiting.append(bound)
            fill()
        else:
            fewest = min(fleet.backends, key=lambda b: (b.in_flight, draw.random()))
            bound(fleet.start(fewest, BATCH.task))

    def fill() -> None:
        """Send the requests waiting, in turn, each to the first host below its cap."""
        while waiting:
            free = [b for b, cap in zip(fleet.backends, caps) if b.in_flight < cap]
            if not free:
                return
            waiting.popleft()(fleet.start(free[0], BATCH.task))

    def sample() -> None:
        if clock.seconds() >= ARGS.warm:
            for backend, counts in seen.items():
                counts[backend.in_flight] += 1
                counts[f"L{backend.limit}"] += 1
        clock.callLater(0.002, sample)

    sample()
    for _ in range(ARGS.clients):
        send()
    while clock.seconds() < ARGS.seconds:
        clock.advance(max(0.0, min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds()))
    latencies.sort()
    curves = {str(b.address.host): {k: round(v, 2) for k, v in b.limiter.measured().items()} for b in fleet.backends}
    return {
        "rate": len(latencies) / (ARGS.seconds - ARGS.warm),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "seen": {str(b.address.host): counts for b, counts in seen.items()},
        "curves": curves,
        "lost": len(lost),
    }


def _shares(counts: list[Counter], kind: type) -> dict:
    """The mean share of samples at each key of C{kind} (in flight, or limit)."""
    total: Counter = Counter()
    for counts_ in counts:
        keys = {k: v for k, v in counts_.items() if isinstance(k, kind)}
        whole = sum(keys.values()) or 1
        for key, value in keys.items():
            total[key] += value / whole / len(counts)
    order = sorted(total, key=lambda key: int(str(key).lstrip("L")))
    return {key: f"{100 * total[key]:.0f}%" for key in order if total[key] >= 0.005}


def main() -> None:
    print(
        f"# {ARGS.fleet}, {ARGS.clients} clients, {ARGS.seconds:g} simulated s ({ARGS.warm:g} not measured),"
        f" {ARGS.seeds} seeds; imml {ARGS.strategy}" + (f" from {ARGS.imml_from}" if ARGS.imml_from else "")
    )
    for target in ("imml", "least_conn", *(f"caps {caps}" for caps in ARGS.caps)):
        runs = [run(target, seed) for seed in range(ARGS.seeds)]
        rates = [r["rate"] for r in runs]
        p99s = [1000 * r["p99"] for r in runs]
        print(
            f"{target:10}  {statistics.median(rates):6.1f} req/s ({min(rates):.1f}-{max(rates):.1f}),"
            f" p99 {statistics.median(p99s):5.0f} ms ({min(p99s):.0f}-{max(p99s):.0f})"
            + (f", {sum(r['lost'] for r in runs)} refused" if any(r["lost"] for r in runs) else "")
        )
        for host in runs[0]["seen"]:
            counts = [r["seen"][host] for r in runs]
            limits = _shares(counts, str) if target == "imml" else {}
            print(f"    {host:7} in flight {_shares(counts, int)}" + (f"  limit {limits}" if limits else ""))
        if ARGS.verbose and target == "imml":
            for seed, r in enumerate(runs):
                print(f"    seed {seed}: work/s by level {r['curves']}")


if __name__ == "__main__":
    main()
