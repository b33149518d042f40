"""
Diagnostic strategies for bench/fleet.py --probe: imml's own strategies,
unchanged, that also record what they see of each host at every decision
(the learned concurrency limit, requests in flight, the service-time
estimate), so the benchmark can say why a target was missed.

They are loaded by imml through ``--strategy bench.fleet_probe.<Class>`` (a
dotted path, which imml accepts) with the repository root on PYTHONPATH, and
write a JSON summary to $IMML_PROBE_OUT at most once a second.  Nothing in
imml/ is changed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

from imml.strategies import LeastConnections, ShortestDelay


class _Probe:
    def _record(self, request, candidates, chosen) -> None:
        now = time.monotonic()
        state = self.__dict__.setdefault(
            "_probe",
            {
                "decisions": 0,
                "waited_with_free_host": 0,
                "chosen": Counter(),
                "limit": {},
                "limit_changes": Counter(),
                "last_limit": {},
                "over_limit": Counter(),
                "estimate_ms": {},
                "last_dump": 0.0,
                "series": [],
            },
        )
        state["decisions"] += 1
        if chosen is None and any(c.has_free_slot() for c in candidates):
            state["waited_with_free_host"] += 1
        if request.interactive and len(state.setdefault("interactive", [])) < 300:
            # every search's decision, with what each host looked like
            state["interactive"].append(
                [
                    round(now, 3),
                    str(chosen) if chosen is not None else "(wait)",
                    request.ahead,
                    {
                        str(c): [
                            c.in_flight,
                            c.limit,
                            c.proven_limit,
                            c.throughput and round(c.throughput, 1),
                            c.service_time(request.task) and round(1000 * c.service_time(request.task), 1),
                            c.next_answer_in() is not None and round(1000 * c.next_answer_in(), 1),
                        ]
                        for c in candidates
                    },
                ]
            )
        if not request.interactive and len(state.setdefault("batch", [])) < 300:
            # batch decisions, with how much each host's requests stretch
            state["batch"].append(
                [
                    str(chosen) if chosen is not None else "(wait)",
                    request.ahead,
                    {
                        str(c): [
                            c.in_flight,
                            c.limit,
                            c.throughput and round(c.throughput, 2),
                            c.service_time(request.task) and round(1000 * c.service_time(request.task), 1),
                            c.next_answer_in() is not None and round(1000 * c.next_answer_in(), 1),
                            [round(c.stretch(n), 2) for n in range(1, c.limit + 2)],
                        ]
                        for c in candidates
                    },
                ]
            )
        key = str(chosen) if chosen is not None else "(wait)"
        state["chosen"][f"{request.task}->{key}"] += 1
        for c in candidates:
            address = str(c)
            # the host's own limit, not the view's (which may add the room
            # past it, or keep a slot for searches)
            limit = getattr(c, "backend", c).limit
            state["limit"].setdefault(address, Counter())[limit] += 1
            state.setdefault("in_flight", {}).setdefault(address, Counter())[c.in_flight] += 1
            if state["last_limit"].get(address) not in (None, limit):
                state["limit_changes"][address] += 1
            state["last_limit"][address] = limit
            t = c.service_time(request.task)
            if t is not None:
                state["estimate_ms"].setdefault(f"{request.task}@{address}", []).append(round(1000 * t, 1))
        if now - state["last_dump"] >= 1.0:
            state["last_dump"] = now
            state["series"].append([round(now, 2), {str(c): _limit_state(c) for c in candidates}])
            path = os.environ.get("IMML_PROBE_OUT")
            if path:
                out = {k: v for k, v in state.items() if k not in ("last_dump", "last_limit", "estimate_ms")}
                out["estimate_ms"] = {
                    k: {"n": len(v), "min": min(v), "median": sorted(v)[len(v) // 2], "max": max(v)}
                    for k, v in state["estimate_ms"].items()
                }
                out["limit"] = {a: dict(sorted(c.items())) for a, c in state["limit"].items()}
                out["in_flight"] = {a: dict(sorted(c.items())) for a, c in state.get("in_flight", {}).items()}
                with open(path + ".tmp", "w") as f:
                    json.dump(out, f)
                os.replace(path + ".tmp", path)


def _limit_state(view):
    """
    A host's limit, requests in flight and, when the view is a host of
    imml's fleet, what its learned limit measured: work per second by level,
    the level seen to buy nothing, and the most requests seen to run at
    once.
    """
    state = [getattr(view, "backend", view).limit, view.in_flight]
    limiter = getattr(getattr(view, "backend", view), "limiter", None)
    if limiter is not None:
        rates = {level: round(rate, 3) for level, (rate, _) in sorted(limiter._rates.items())}
        state += [rates, limiter.ceiling, limiter.side_by_side]
    return state


class ShortestDelayProbe(ShortestDelay, _Probe):
    def choose(self, request, candidates):
        chosen = ShortestDelay.choose(self, request, candidates)
        self._record(request, candidates, chosen)
        return chosen


class LeastConnectionsProbe(LeastConnections, _Probe):
    def choose(self, request, candidates):
        chosen = LeastConnections.choose(self, request, candidates)
        self._record(request, candidates, chosen)
        return chosen
