#!/usr/bin/env python3
"""
The real-like fake host (python -m imml.testing --cpu, imml/testing/cpu.py)
against the real Immich ML service, side by side in one run, on loopback.

    .venv/bin/python bench/realhost.py --immich /path/to/immich/machine-learning \\
        --python /path/to/immich-venv/bin/python            # 25-35 minutes
    .venv/bin/python bench/realhost.py ... --quick          # 1 round of 2 s points
    .venv/bin/python bench/realhost.py ... --models light --hosts fast

The Immich checkout is not part of imml: the script takes its path and the
interpreter of a virtual environment where its CPU extra is installed.  It
makes tiny CLIP models (bench/realhost_models.py, run by that interpreter) in
a temporary model cache, a light one (a request alone about 14 ms) and a
heavy one (about 140 ms of inference), starts the real service
(python -m immich_ml, on 127.0.0.1) and beside it the fake with the matching
profile, and drives each directly: a closed loop of N requests in flight
(Immich's CLIP visual request with a small JPEG) for a few seconds per point,
real and fake interleaved, several rounds; then the search probes: one
CLIP text request every 250 ms while 2, then 1, images are kept in flight.  The slow
host is the real service held to a share of the CPU by a cgroup (cgroup v2
cpu.max, or the v1 cpu controller's CFS quota; needs root) against the fake
with --cores.  Prints req/s and p50 per level (medians of the rounds, with
their range) and the searches' p50 and p99.

Every process runs in its own process group and is killed (TERM, then KILL)
when the script ends, also on Ctrl-C or SIGTERM; every point is bounded in
time and every request by a timeout.  See bench/README.md, "Real hosts".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import balancer  # noqa: E402
from balancer import Processes, group_cpu_seconds  # noqa: E402
from fleet import Fake, pct  # noqa: E402
from realservice import (  # noqa: E402
    MODELS,
    Connection,
    CPUQuota,
    Real,
    clip_requests,
    immich_problem,
    prepare_models,
    timed_request,
    warm_up,
)

from imml.testing.cpu import PROFILES  # noqa: E402

HARD_DEADLINE_S = 2700  # the run stops past this, whatever the options


def say(*args) -> None:
    print(*args, flush=True)


# --------------------------------------------------------------------------
# The hosts
# --------------------------------------------------------------------------


def busy_seconds() -> float:
    """CPU-seconds every process of the machine has used since boot (all CPUs)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def ours_seconds(procs: Processes) -> float:
    """CPU-seconds of this script (the load) and of every process it started."""
    mine = os.times()
    return mine.user + mine.system + group_cpu_seconds({proc.pid for _, proc in procs.children})


class FakeHost:
    """The fake, python -m imml.testing --cpu MODEL [--cores C --period 0.1]."""

    def __init__(self, procs: Processes, name: str, model: str, cores: float | None, extra: list[str]) -> None:
        # a slow host's quota by 100 ms periods, as the real one's cgroup holds it
        options = ["--cpu", model] + (["--cores", f"{cores:g}", "--period", "0.1"] if cores else []) + extra
        self.fake = Fake(procs, (name, None, None, None, options))
        self.fake.start()
        self.procs, self.name, self.port, self.proc = procs, name, self.fake.port, self.fake.proc

    def cpu_seconds(self) -> float:
        return group_cpu_seconds({self.proc.pid})


# --------------------------------------------------------------------------
# The load: closed loops over kept-alive connections, and a search stream
# --------------------------------------------------------------------------


async def _point(host, image: bytes, in_flight: int, plan: dict, text: bytes | None) -> dict:
    """
    C{in_flight} closed loops of C{image} for the plan's warm-up and window;
    with C{text}, also one text request every C{plan["every"]} seconds.
    """
    images: list = []
    texts: list = []
    stop = asyncio.Event()
    timeout = plan["timeout"]

    async def loop() -> None:
        conn = Connection(host.port)
        try:
            while not stop.is_set():
                if not await timed_request(conn, image, timeout, images):
                    await asyncio.sleep(0.1)
        finally:
            conn.close()

    async def searches(until: float) -> None:
        idle: list[Connection] = []
        pending = []

        async def search() -> None:
            conn = idle.pop() if idle else Connection(host.port)
            await timed_request(conn, text, timeout, texts)
            idle.append(conn)

        at = time.monotonic()
        while at < until:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            pending.append(asyncio.ensure_future(search()))
            at += plan["every"]
        await asyncio.gather(*pending)
        for conn in idle:
            conn.close()

    started = time.monotonic()
    window_start = started + plan["warm"]
    loops = [asyncio.ensure_future(loop()) for _ in range(in_flight)]
    await asyncio.sleep(plan["warm"])
    cpu_start, busy_start, ours_start = host.cpu_seconds(), busy_seconds(), ours_seconds(host.procs)
    if text is not None:
        await searches(window_start + plan["seconds"])
    while True:
        await asyncio.sleep(0.05)
        now = time.monotonic()
        done = sum(1 for _, end, ok in images if ok and end >= window_start)
        if now - window_start >= plan["cap"] or (now - window_start >= plan["seconds"] and done >= plan["min_answers"]):
            break
    window_end = time.monotonic()
    cpu = host.cpu_seconds() - cpu_start
    others = (busy_seconds() - busy_start) - (ours_seconds(host.procs) - ours_start)
    stop.set()
    await asyncio.gather(*loops)
    window = window_end - window_start
    answered = [(b, e) for b, e, ok in images if ok and window_start <= e <= window_end]
    latency = [1000 * (e - b) for b, e in answered]
    result = {
        "rps": len(answered) / window,
        "p50": pct(latency, 50),
        "p99": pct(latency, 99),
        "errors": sum(1 for *_, ok in images + texts if not ok),
        "cpu_ms": 1000 * cpu / len(answered) if answered else None,
        "cores": cpu / window,
        "others": max(0.0, others / window),
        "seconds": window,
    }
    if text is not None:
        result["texts"] = [1000 * (e - b) for b, e, ok in texts if ok]
    return result


def point(host, image: bytes, in_flight: int, plan: dict, text: bytes | None = None) -> dict:
    """
    One point, measured again (up to C{plan["retries"]} times) while other
    processes of the machine used more than C{plan["quiet"]} cores: the
    quietest try counts, with how many tries it took.
    """
    tries = []
    for attempt in range(1 + plan["retries"]):
        if attempt:
            time.sleep(plan["pause"])
        tries.append(asyncio.run(_point(host, image, in_flight, plan, text)))
        if tries[-1]["others"] <= plan["quiet"]:
            break
    best = min(tries, key=lambda x: x["others"])
    best["tries"] = len(tries)
    return best


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def plan_for(args, alone_s: float, in_flight: int) -> dict:
    # Long enough for a few answers per request in flight on a slow host.
    warm = max(args.warm, alone_s * in_flight)
    return {
        "warm": warm,
        "seconds": args.seconds,
        "cap": 4 * args.seconds,
        "min_answers": args.min_answers,
        "timeout": args.timeout,
        "every": args.search_every,
        "quiet": args.quiet,
        "retries": args.retries,
        "pause": 1.0,
    }


def median_range(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def run_pair(args, procs: Processes, workdir: Path, model: str, speed: str, cache: Path, image_bytes: bytes) -> dict:
    """One real host and its fake, driven in turn: every level, every round."""
    cores = args.slow_cores if speed == "slow" else None
    quota = None
    if cores:
        made = CPUQuota.make(f"imml-realhost-{os.getpid()}-{model}", cores)
        if isinstance(made, str):
            say(f"# slow host unavailable: {made}")
            return {"unavailable": made}
        quota = made
    try:
        real = Real(procs, args.immich, args.python, cache, f"real-{model}-{speed}", quota, args.request_threads)
        real.ready()
        fake = FakeHost(procs, f"fake-{model}-{speed}", model, cores, args.fake_args.split())
        hosts = {"real": real, "fake": fake}
        bodies = {name: clip_requests(host.port, image_bytes) for name, host in hosts.items()}
        alone_both = {name: warm_up(host, *bodies[name], args.timeout) for name, host in hosts.items()}
        alone = {name: x["image"] for name, x in alone_both.items()}
        say(
            f"  {model} {speed}: alone, an image: real {1000 * alone['real']:.1f} ms, fake {1000 * alone['fake']:.1f} ms; "
            f"a search: real {1000 * alone_both['real']['text']:.1f} ms, fake {1000 * alone_both['fake']['text']:.1f} ms"
        )
        rounds: dict = {name: {n: [] for n in args.levels} for name in hosts}
        searches: dict = {name: {k: [] for k in args.search_images} for name in hosts}
        for r in range(args.rounds):
            levels = args.levels[r % len(args.levels) :] + args.levels[: r % len(args.levels)]
            for i, n in enumerate(levels):
                order = ["real", "fake"] if (r + i) % 2 == 0 else ["fake", "real"]
                for name in order:
                    check_deadline(args)
                    res = point(hosts[name], bodies[name][0], n, plan_for(args, alone[name], n))
                    rounds[name][n].append(res)
                    say(
                        f"    round {r + 1} {name:4} {n} in flight: {res['rps']:6.1f} req/s, "
                        f"p50 {fmt(res['p50'])} ms, {res['cores']:.2f} cores, others {res['others']:.2f} cores "
                        f"({res['tries']} tries), {res['errors']} errors"
                    )
            for k in args.search_images if speed == "fast" and args.search_rounds > r else ():
                for name in ["real", "fake"] if r % 2 == 0 else ["fake", "real"]:
                    check_deadline(args)
                    plan = dict(plan_for(args, alone[name], k), seconds=args.search_seconds, min_answers=0)
                    res = point(hosts[name], bodies[name][0], k, plan, text=bodies[name][1])
                    searches[name][k].append(res)
                    say(
                        f"    round {r + 1} {name:4} searches beside {k} images: p50 {fmt(pct(res['texts'], 50))} "
                        f"p99 {fmt(pct(res['texts'], 99))} ms ({len(res['texts'])}), images {res['rps']:.1f} req/s, "
                        f"others {res['others']:.2f} cores ({res['tries']} tries)"
                    )
        return {
            "alone_ms": {k: {kind: 1000 * v for kind, v in x.items()} for k, x in alone_both.items()},
            "rounds": rounds,
            "searches": searches,
        }
    finally:
        procs.stop_all()
        if quota is not None:
            quota.remove()


def fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def check_deadline(args) -> None:
    if time.monotonic() - args.started > HARD_DEADLINE_S:
        raise RuntimeError("hard deadline reached")


def summary(pair: dict, levels: list[int]) -> dict:
    out: dict = {}
    for name, by_level in pair["rounds"].items():
        out[name] = {
            n: {key: median_range([x[key] for x in by_level[n]]) for key in ("rps", "p50", "cpu_ms", "cores", "others")}
            for n in levels
        }
        out[name]["errors"] = sum(x["errors"] for n in levels for x in by_level[n])
    for name, by_images in pair["searches"].items():
        out[name]["search"] = {}
        for k, runs in by_images.items():
            if not runs:
                continue
            texts = [t for x in runs for t in x["texts"]]
            out[name]["search"][k] = {
                "count": len(texts),
                "p50": pct(texts, 50),
                "p99": pct(texts, 99),
                "max": max(texts, default=None),
                "p99_per_round": [pct(x["texts"], 99) for x in runs],
                "image_rps": statistics.median(x["rps"] for x in runs),
                "errors": sum(x["errors"] for x in runs),
            }
    return out


def report(data: dict) -> None:
    levels = data["levels"]
    for key, pair in data["pairs"].items():
        model, speed = key.split("/")
        if "unavailable" in pair:
            say(f"\n{model} model, {speed} host: unavailable ({pair['unavailable']})")
            continue
        s = pair["summary"]
        facts = data["models"][model]
        where = f"{data['slow_cores']:g} cores (cgroup)" if speed == "slow" else "unrestricted"
        say(
            f"\n{model} model (visual inference {facts['visual_ms']} ms, text {facts['text_ms']} ms), "
            f"{speed} host ({where}); medians of {data['rounds']} rounds (range)"
        )
        say(
            f"{'in flight':>9} | {'real req/s':>18} {'p50 ms':>12} {'CPU ms/req':>10} | {'fake req/s':>18} {'p50 ms':>12}"
        )
        for n in levels:
            real, fake = s["real"][n], s["fake"][n]

            def cell(m: tuple, spec: str) -> str:
                return f"{fmt(m[0], spec)} ({fmt(m[1], spec)}-{fmt(m[2], spec)})"

            say(
                f"{n:>9} | {cell(real['rps'], '.1f'):>18} {cell(real['p50'], '.0f'):>12} {fmt(real['cpu_ms'][0], '.1f'):>10} | "
                f"{cell(fake['rps'], '.1f'):>18} {cell(fake['p50'], '.0f'):>12}"
            )
        say(f"{'errors':>9} | {s['real']['errors']:>18} {'':>12} {'':>10} | {s['fake']['errors']:>18}")
        alone = pair["alone_ms"]
        say(
            f"alone (warm-up medians): an image real {alone['real']['image']:.1f} ms, fake {alone['fake']['image']:.1f} ms; "
            f"a search real {alone['real']['text']:.1f} ms, fake {alone['fake']['text']:.1f} ms; "
            f"other processes of the machine used {fmt(median_range([s['real'][n]['others'][0] for n in levels])[0], '.2f')} "
            "cores (median of the real points)"
        )
        for k in s["real"]["search"]:
            say(
                f"searches every {data['search_every'] * 1000:.0f} ms beside {k} images in flight, all rounds together:"
            )
            for name in ("real", "fake"):
                x = s[name]["search"][k]
                rounds = ", ".join(fmt(v) for v in x["p99_per_round"])
                say(
                    f"  {name}: p50 {fmt(x['p50'])} ms, p99 {fmt(x['p99'])} ms (per round {rounds}), "
                    f"max {fmt(x['max'])} ms, {x['count']} searches; images {x['image_rps']:.1f} req/s; "
                    f"{x['errors']} errors"
                )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--immich", required=True, help="an Immich checkout's machine-learning/ folder")
    p.add_argument("--python", required=True, help="the interpreter of a venv with Immich ML's CPU extra and onnx")
    p.add_argument("--models", default="light,heavy", help="comma separated: light, heavy")
    p.add_argument("--hosts", default="fast,slow", help="comma separated: fast, slow (held to --slow-cores)")
    p.add_argument("--levels", default="1,2,3,4,6", help="requests in flight, comma separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="the measured window of one point")
    p.add_argument("--warm", type=float, default=0.5, help="seconds of load before the window")
    p.add_argument("--min-answers", type=int, default=20, help="a window grows (to 4x) until this many answers")
    p.add_argument("--slow-cores", type=float, default=0.4, help="the slow host's share of the CPU")
    p.add_argument("--search-images", default="2,1", help="images kept in flight during the search probes")
    p.add_argument("--search-every", type=float, default=0.25, help="seconds between searches in the probe")
    p.add_argument("--search-seconds", type=float, default=10.0, help="length of one search probe")
    p.add_argument("--search-rounds", type=int, default=3, help="rounds with a search probe (fast host)")
    p.add_argument("--light-ms", type=float, help="calibrate the light model's depth to this inference time, ms")
    p.add_argument("--heavy-ms", type=float, help="calibrate the heavy model's depth to this inference time, ms")
    for model in MODELS:
        p.add_argument(
            f"--{model}-depth", type=int, help=f"the {model} model's depth (default {MODELS[model]['depth']})"
        )
        p.add_argument(
            f"--{model}-width",
            type=int,
            help=f"the {model} model's width (default {MODELS[model]['width']}; at 128 ONNX Runtime runs it on one thread)",
        )
    p.add_argument("--image", default="320x240", help="the JPEG's width x height")
    p.add_argument("--request-threads", type=int, help="MACHINE_LEARNING_REQUEST_THREADS of the real service")
    p.add_argument("--fake-args", default="", help="extra python -m imml.testing options, e.g. '--threads 3'")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="measure a point again while other processes of the machine use more cores than this",
    )
    p.add_argument("--retries", type=int, default=2, help="at most this many measurements again per point")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s points, one search probe of 5 s")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (models, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.search_rounds, args.search_seconds = 1, 2.0, 1, 5.0
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.search_images = [int(x) for x in args.search_images.split(",") if x.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    speeds = [s.strip() for s in args.hosts.split(",") if s.strip()]
    if set(models) - set(MODELS) or set(models) - set(PROFILES) or set(speeds) - {"fast", "slow"}:
        p.error("models are light, heavy; hosts are fast, slow")
    if not (all(1 <= n <= 32 for n in args.levels + args.search_images) and args.levels and 1 <= args.rounds <= 20):
        p.error("levels and search images 1-32, rounds 1-20")
    if not (0 < args.seconds <= 60 and 0 < args.slow_cores <= 64 and 0 < args.timeout <= 300):
        p.error("seconds 0-60, slow cores 0-64, timeout 0-300")
    problem = immich_problem(args.immich, args.python)
    if problem:
        p.error(problem)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    args.started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="imml-realhost-"))
    procs = Processes(workdir, None)
    data: dict = {
        "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]),
        "levels": args.levels,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "slow_cores": args.slow_cores,
        "search_every": args.search_every,
        "profiles": {m: repr(PROFILES[m]) for m in models},
        "models": {},
        "pairs": {},
    }
    say(f"# models {', '.join(models)}; hosts {', '.join(speeds)}; levels {args.levels}; temp dir {workdir}")
    try:
        for model in models:
            cache, facts = prepare_models(
                args.python,
                workdir,
                model,
                args.image,
                getattr(args, f"{model}_width"),
                getattr(args, f"{model}_depth"),
                getattr(args, f"{model}_ms"),
            )
            data["models"][model] = facts
            say(f"# {model} models: {facts}")
            image_bytes = (cache / "image.jpg").read_bytes()
            for speed in speeds:
                pair = run_pair(args, procs, workdir, model, speed, cache, image_bytes)
                if "rounds" in pair:
                    pair["summary"] = summary(pair, args.levels)
                data["pairs"][f"{model}/{speed}"] = pair
    except KeyboardInterrupt:
        say("# interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            say(f"# kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    data["elapsed_s"] = round(time.monotonic() - args.started, 1)
    report(data)
    say(f"\n# {data['elapsed_s']:.0f} s; load average at the start {data['loadavg']}")
    balancer.write_figures(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
