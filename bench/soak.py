#!/usr/bin/env python3
"""
Soak benchmark (issue 13, point 9): imml under mixed load for a long while
(ten minutes by default), over fake ML hosts that are paused, killed and
restarted, with slow clients among the fast ones.  On loopback only.

    .venv/bin/python bench/soak.py                   # ten minutes
    .venv/bin/python bench/soak.py --minutes 2       # a short run
    .venv/bin/python bench/soak.py --json soak.json --keep

The balancer is ``twistd -n imml-balancer`` as a child process, in front of
three ``python -m imml.testing`` hosts (bench/fleet.py's ``Fake``); the load
is bench/fleet_client.py: closed-loop CLIP visual clients, a CLIP text
search every half second, and slow clients that send a request's head or
body, or read its answer, a few bytes at a time.  Every minute, in turn, one
host is paused (SIGSTOP) for 10 s, another killed for 6 s and restarted on
its port, and then every host is killed for 6 s (requests wait in the
balancer meanwhile).

Every ten seconds the balancer's resident memory, open file descriptors and
TCP connections are read from /proc.  The figures: how much they grew after
the warm-up (the mean of the first minute's samples against the last
minute's: a minute is one round of the disturbances), the descriptors open
while idle before and after the load, and every request sent, answered
(2xx) and failed (anything else, no answer within the request timeout
included).  Targets: under 10 % growth of memory and descriptors, and no
request lost.

Every process runs in its own process group; all are resumed (SIGCONT) and
killed at the end, also on Ctrl-C or SIGTERM.  The load stops after
``--minutes``; each request is bounded by ``--request-timeout``, the whole
run by the two.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
# Reused from the other benchmarks: process groups, ports, waiting for the
# balancer, the fake hosts, the balancer's command line and its log summary.
from balancer import Processes, free_port, wait_http, write_figures  # noqa: E402
from fleet import Fake, clean_up, client_command, imml_command, imml_log_summary, pct, ready, say  # noqa: E402

# name, slots, ms per image request, ms per text search
HOSTS = [("a", 2, 50.0, 12.5), ("b", 2, 50.0, 12.5), ("c", 1, 100.0, 25.0)]
SAMPLE_S = 10.0
#: One round of disturbances, in seconds; growth compares whole rounds.
CYCLE_S = 60.0
#: (start, end, what) within a round; the victims rotate from round to round.
DISTURBANCES = [(10.0, 20.0, "pause"), (28.0, 34.0, "kill"), (44.0, 50.0, "kill-all")]
#: No disturbance lasts into the load's last seconds.
SETTLE_S = 10.0
#: Seconds for pooled connections to close before an idle sample.
IDLE_S = 5.0
TARGET_GROWTH = 0.10


# --------------------------------------------------------------------------
# The balancer as /proc sees it
# --------------------------------------------------------------------------


def sample(pid: int) -> dict:
    """
    The resident memory (KiB), open descriptors, sockets and established
    TCP connections of process C{pid}.
    """
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    sockets = set()
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        fds += 1
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    established = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and fields[9] in sockets:
                        established += 1
        except OSError:
            continue
    return {"rss_kib": rss, "fds": fds, "sockets": len(sockets), "connections": established}


def growth(samples: list[dict], warmup: float) -> dict:
    """
    For each figure, the mean of the first round of samples after the
    warm-up, of the last round, and the growth between them (shorter
    windows when the run has fewer than two rounds after the warm-up).
    """
    after = [s for s in samples if s["t"] >= warmup]
    window = min(int(CYCLE_S / SAMPLE_S), len(after) // 2)
    if window == 0:
        return {}
    result = {"window_samples": window}
    for key in ("rss_kib", "fds", "sockets", "connections"):
        first = statistics.mean(s[key] for s in after[:window])
        last = statistics.mean(s[key] for s in after[-window:])
        result[key] = {
            "first": round(first, 1),
            "last": round(last, 1),
            "max": max(s[key] for s in after),
            "growth": round(last / first - 1, 4) if first else None,
        }
    return result


# --------------------------------------------------------------------------
# Disturbances
# --------------------------------------------------------------------------


def plan(seconds: float, hosts: int) -> list[tuple[float, str, int]]:
    """
    The disturbances of a run of C{seconds}: (seconds from the start, action,
    victim), each undone at least L{SETTLE_S} before the end.
    """
    steps = []
    for round_ in range(int(seconds // CYCLE_S) + 1):
        base = round_ * CYCLE_S
        victims = {"pause": round_ % hosts, "kill": (round_ + 1) % hosts, "kill-all": -1}
        for start, end, what in DISTURBANCES:
            if base + end <= seconds - SETTLE_S:
                steps.append((base + start, what, victims[what]))
                steps.append(
                    (base + end, {"pause": "resume", "kill": "restart"}.get(what, "restart-all"), victims[what])
                )
    return sorted(steps)


def disturb(what: str, victim: int, fakes: list[Fake]) -> str:
    """
    Do C{what} to the host C{victim} (or to every host); say what was done.
    """
    fake = fakes[victim] if victim >= 0 else None
    if what == "pause":
        fake.pause()
    elif what == "resume":
        fake.resume()
    elif what == "kill":
        fake.kill()
    elif what == "restart":
        fake.start()
    elif what == "kill-all":
        # Every host at the same instant, as in a power cut: one after the
        # other, a request would follow them from host to host.
        for f in fakes:
            if f.paused:
                f.resume()
        for f in fakes:
            try:
                os.killpg(f.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for f in fakes:
            f.kill()  # reaps it
    elif what == "restart-all":
        for f in fakes:
            f.start()
    else:
        raise ValueError(what)
    return f"{what} {fake.name}" if fake is not None else what


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def run(args, workdir: Path, procs: Processes) -> dict:
    seconds = args.minutes * 60
    fakes = [Fake(procs, spec) for spec in HOSTS]
    for fake in fakes:
        fake.start()
    port = free_port()
    imml = procs.start("imml", imml_command(workdir, port, fakes, args.strategy, args.imml_args.split()))
    wait_http(port, "/ping", b"pong", imml)
    ready(port)
    time.sleep(IDLE_S)
    idle_before = sample(imml.pid)
    out = workdir / "requests.json"
    start_at = time.monotonic() + 0.5
    client = procs.start(
        "client",
        client_command(port, start_at, seconds, args.clients, args.request_timeout, out)
        + ["--text-interval", str(args.text_interval), "--slow-clients", str(args.slow_clients)],
    )
    steps = plan(seconds, len(fakes))
    samples: list[dict] = []
    events: list[tuple[float, str]] = []
    next_sample = 0.0
    while True:
        now = time.monotonic() - start_at
        while steps and steps[0][0] <= now:
            _, what, victim = steps.pop(0)
            done = disturb(what, victim, fakes)
            events.append((round(time.monotonic() - start_at, 1), done))
            say(f"  {events[-1][0]:6.1f} s  {done}")
        now = time.monotonic() - start_at
        if next_sample <= now:
            if imml.poll() is not None:
                raise RuntimeError(f"the balancer exited with {imml.returncode}: {procs.log_of('imml')}")
            figures = sample(imml.pid)
            samples.append({"t": round(now, 1), **figures})
            say(
                f"  {now:6.1f} s  RSS {figures['rss_kib'] / 1024:6.1f} MiB  fds {figures['fds']:4}  "
                f"sockets {figures['sockets']:4}  connections {figures['connections']:4}"
            )
            next_sample += SAMPLE_S
        if next_sample > seconds and not steps:
            break
        wake = min([next_sample] + [s[0] for s in steps[:1]])
        time.sleep(max(0.0, wake - (time.monotonic() - start_at)))
    try:
        client.wait(max(0.0, start_at + seconds - time.monotonic()) + args.request_timeout + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError("the load client did not stop") from None
    if client.returncode != 0 or not out.exists():
        raise RuntimeError(f"the load client failed ({client.returncode}): {procs.log_of('client')}")
    time.sleep(IDLE_S)
    idle_after = sample(imml.pid)
    records = json.loads(out.read_text())
    failed = [r for r in records if not 200 <= r["status"] < 300]
    return {
        "seconds": seconds,
        "warmup_s": args.warmup,
        "samples": samples,
        "growth": growth(samples, args.warmup),
        "idle_before": idle_before,
        "idle_after": idle_after,
        "events": events,
        "requests": {
            "sent": len(records),
            "answered": len(records) - len(failed),
            "failed": len(failed),
            "by_kind": dict(Counter(r["kind"] for r in records)),
            "failed_by_kind": dict(Counter(r["kind"] for r in failed)),
            "failures": dict(Counter(f"{r['kind']}: {r.get('error')}" for r in failed).most_common(10)),
            "p99_s": round(pct([r["end"] - r["start"] for r in records], 99) or 0.0, 2),
            "slowest_s": round(max((r["end"] - r["start"] for r in records), default=0.0), 2),
        },
        "imml_log": imml_log_summary(workdir / "imml.log"),
    }


def report(result: dict) -> bool:
    """
    Print the figures and the verdicts; whether every target was met.
    """
    r = result["requests"]
    say(
        f"\nrequests: {r['sent']} sent, {r['answered']} answered (2xx), {r['failed']} failed "
        f"(by kind: {r['by_kind']}); p99 {r['p99_s']} s, slowest {r['slowest_s']} s"
    )
    if r["failed"]:
        say(f"  failures: {r['failures']}")
    g = result["growth"]
    ok = r["sent"] > 0 and r["failed"] == 0
    if g:
        say(
            f"after the {result['warmup_s']:g} s warm-up, mean of the first {g['window_samples']} samples "
            f"-> mean of the last {g['window_samples']} (max):"
        )
        for key, label, scale in (
            ("rss_kib", "RSS MiB", 1024),
            ("fds", "fds", 1),
            ("sockets", "sockets", 1),
            ("connections", "connections", 1),
        ):
            x = g[key]
            change = "n/a" if x["growth"] is None else f"{100 * x['growth']:+.1f} %"
            target = ""
            if key in ("rss_kib", "fds"):
                met = x["growth"] is not None and x["growth"] < TARGET_GROWTH
                ok = ok and met
                target = f"   target < {100 * TARGET_GROWTH:g} %: {'met' if met else 'MISSED'}"
            say(
                f"  {label:12} {x['first'] / scale:8.1f} -> {x['last'] / scale:8.1f} "
                f"({x['max'] / scale:.1f})  {change}{target}"
            )
    else:
        say("too short a run after the warm-up to measure growth")
        ok = False
    before, after = result["idle_before"], result["idle_after"]
    say(
        f"idle, before the load -> after it: RSS {before['rss_kib'] / 1024:.1f} -> {after['rss_kib'] / 1024:.1f} MiB, "
        f"fds {before['fds']} -> {after['fds']}, connections {before['connections']} -> {after['connections']}"
    )
    say(f"imml log: {result['imml_log']}")
    say(f"no request lost: {'met' if r['sent'] and not r['failed'] else 'MISSED'}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of load (1-60)")
    p.add_argument(
        "--warmup", type=float, default=None, help="seconds of load before growth counts (default: a fifth, 30-120)"
    )
    p.add_argument("--clients", type=int, default=4, help="closed-loop CLIP visual clients")
    p.add_argument("--text-interval", type=float, default=0.5, help="seconds between text searches")
    p.add_argument("--slow-clients", type=int, default=3, help="clients that send or read slowly")
    p.add_argument("--request-timeout", type=float, default=150.0, help="seconds one request may take")
    p.add_argument("--strategy", default="shortest-delay")
    p.add_argument("--imml-args", default="", help="more options for imml-balancer")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, every request's record)")
    args = p.parse_args(argv)
    if not 1 <= args.minutes <= 60:
        p.error("--minutes 1-60")
    if not 1 <= args.request_timeout <= 300:
        p.error("--request-timeout 1-300")
    if args.warmup is None:
        args.warmup = min(120.0, max(30.0, args.minutes * 60 / 5))

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="imml-soak-"))
    procs = Processes(workdir, None)
    say(
        f"# soak: {args.minutes:g} min of load ({args.clients} clients, a search every {args.text_interval:g} s, "
        f"{args.slow_clients} slow clients) over {len(HOSTS)} hosts; warm-up {args.warmup:g} s; temp dir {workdir}"
    )
    try:
        result = run(args, workdir, procs)
    except KeyboardInterrupt:
        say("# interrupted: every process stopped")
        return 130
    except RuntimeError as e:
        say(f"# failed: {e}")
        return 1
    finally:
        clean_up([procs], workdir, args.keep)
    met = report(result)
    write_figures(args.json, {"settings": vars(args), "hosts": HOSTS, **result})
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
