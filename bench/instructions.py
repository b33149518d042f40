#!/usr/bin/env python3
"""
The cost of one request through imml and through the minimal Agent proxy
(and its lean variants: bench/lean_client_proxy.py, bench/lean_server_proxy.py),
in CPU instructions counted by valgrind's callgrind: the same figure
whatever else the machine is doing, where requests/s on a shared machine
vary by a quarter from one round to the next.

    .venv/bin/python bench/instructions.py                 # about 1 minute
    .venv/bin/python bench/instructions.py --requests 3000 --targets imml
    .venv/bin/python bench/instructions.py --targets minimal,lean-client,lean-server,lean-both,imml
    .venv/bin/python bench/instructions.py --upstream real-heavy --targets imml --warm-up 150 --requests 600

Each proxy runs under callgrind with counting off; the script sends it
warm-up requests (pools filled, code paths seen), turns counting on
(callgrind_control -i on), sends the measured requests one at a time on one
keep-alive connection, turns counting off and reads the total.  User-space
instructions only: the kernel's share (syscalls) is not counted.  The ML
hosts are one nginx worker (as in bench/balancer.py), or two
python -m imml.testing fakes with --upstream fake.  The request is the
small CLIP text search of bench/balancer.py.  imml logs to a file, as in
production.

With --upstream real-heavy (or real-light) the hosts are bench/fleet.py's
real-like pair with the heavy (or light) model: a fast host, and a slow one
held to a CPU quota; the requests are its batch of CLIP image requests,
eight at once (unless --connections says otherwise).  The heavy hosts are
slow enough that imml, even under callgrind, keeps requests waiting in its
queue, as in front of real hosts, so that its learned limits and its
choices of host are counted too; the light ones are not (imml under
callgrind takes about 80 requests a second), and their count moves by a
tenth from run to run with how often requests waited.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import balancer as B  # noqa: E402  (the benchmark's helpers)
import fleet as F  # noqa: E402  (its real-like hosts and batch request)

from imml.testing import ENTRIES, predict_body  # noqa: E402

#: The proxies other than imml, each a script here and its arguments after PORT BACKENDS.
PROXIES = {
    "minimal": ["minimal_proxy.py"],  # twisted.web's Site and Resource; Agent and HTTPConnectionPool
    "lean-client": ["lean_client_proxy.py"],  # Site and Resource; the lean client on a Protocol
    "lean-agent": ["minimal_proxy.py", "--lean-agent"],  # minimal, its Agent replaced by imml's HostAgent
    "lean-server": ["lean_server_proxy.py"],  # a bare Protocol server; Agent and HTTPConnectionPool
    "lean-both": ["lean_server_proxy.py", "--lean-client"],  # a bare Protocol server and the lean client
    "null-web": ["null_proxy.py"],  # Site and Resource answering themselves: no client to the hosts
    "null-bare": ["null_proxy.py", "--bare"],  # the bare Protocol server answering itself
}
TARGETS = ["imml", *PROXIES]


def total_instructions(outputs: list[Path]) -> int:
    total = 0
    for out in outputs:
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def count(
    procs: B.Processes, target: str, backends: list[int], warm: int, requests: int, connections: int, batch: bool
) -> int:
    """
    Instructions the proxy C{target} spent on C{requests} requests: CLIP
    image requests when C{batch}, else text searches.
    """
    workdir = procs.workdir
    port = B.free_port()
    addrs = ",".join(f"127.0.0.1:{p}" for p in backends)
    out = workdir / f"callgrind-{target}.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    if target == "imml":
        cmd = valgrind + [
            B.TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={workdir}/imml.log",
            "imml-balancer",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--admin",
            "none",
            "--backends",
            addrs,
        ]
        ready = "/ping"
    else:
        script, *flags = PROXIES[target]
        cmd = valgrind + [B.PYTHON, str(HERE / script), str(port), addrs, *flags]
        ready = "/"
    proc = procs.start(target, cmd)
    B.wait_http(port, ready, b"", proc, timeout=180)
    if batch:
        content_type, body = predict_body(ENTRIES["clip-visual"], image=F.FAKE_PICTURE)
    else:
        content_type, body = predict_body(ENTRIES["clip-textual"], text="a photo of a dog on the beach")
    headers = {"Content-Type": content_type.decode()}

    def one_connection(n: int, errors: list) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(n):
                c.request("POST", "/predict", body, headers)
                response = c.getresponse()
                answer = response.read()
                if response.status != 200 or not answer.startswith(b'{"clip"'):
                    errors.append(f"{target}: bad answer {response.status} {answer[:80]!r}")
                    return
        except OSError as e:
            errors.append(f"{target}: {e}")
        finally:
            c.close()

    def send(n: int) -> None:
        # n requests over `connections` keep-alive connections at once
        errors: list = []
        threads = [
            threading.Thread(target=one_connection, args=(n // connections + (i < n % connections), errors))
            for i in range(connections)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        if errors or any(t.is_alive() for t in threads):
            raise RuntimeError(errors[0] if errors else f"{target}: requests did not finish")

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(proc.pid)], capture_output=True, timeout=120, check=True)

    send(warm)
    control("-i", "on")
    send(requests)
    control("-i", "off")
    control("-d")
    procs.stop(proc, signal.SIGTERM, grace=30)
    return total_instructions(sorted(workdir.glob(f"callgrind-{target}.out*")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per target (default 1000)")
    parser.add_argument("--warm-up", type=int, default=300, help="requests before counting (default 300)")
    parser.add_argument(
        "--connections",
        type=int,
        default=0,
        help="requests at once, each connection sending one after another (default 1; 8 with a real-like upstream)",
    )
    parser.add_argument(
        "--targets", default="imml,minimal", help=f"comma separated, of {', '.join(TARGETS)} (default imml,minimal)"
    )
    parser.add_argument(
        "--upstream",
        choices=("nginx", "fake", "real-light", "real-heavy"),
        default="nginx",
        help="the hosts: nginx answering at once, two fakes answering at once, or a real-like pair (light or heavy)",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="copy each target's callgrind output into DIR (read it with callgrind_annotate --inclusive=yes)",
    )
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if not targets or not set(targets) <= set(TARGETS):
        parser.error(f"--targets: some of {', '.join(TARGETS)}")
    if not B.ensure_tools(not args.no_install, {"valgrind": ["valgrind"]})["valgrind"]:
        B.say("valgrind is not installed (Debian package valgrind): nothing measured")
        return 1
    tools = B.ensure_tools(not args.no_install) if args.upstream == "nginx" else {}

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM stops the run like Ctrl-C: every process it started is stopped.
    signal.signal(signal.SIGTERM, interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="imml-instructions-"))
    os.chmod(workdir, 0o755)  # nginx workers run as nobody
    procs = B.Processes(workdir, None)
    started = time.monotonic()
    figures: dict[str, float] = {}
    try:
        answer = json.dumps({"clip": B._embedding(b"bench")}, separators=(",", ":"))
        batch = args.upstream.startswith("real-")
        if batch:
            hosts = [F.Fake(procs, spec) for spec in F.REAL_FLEETS[args.upstream.removeprefix("real-")]]
            for host in hosts:
                host.start()
            backends = [host.port for host in hosts]
        else:
            backends = B.start_upstreams(procs, args, tools, answer, None)
        connections = args.connections or (8 if batch else 1)
        for target in targets:
            total = count(procs, target, backends, args.warm_up, args.requests, connections, batch)
            figures[target] = total / args.requests
            B.say(f"  {target:11} {figures[target]:12,.0f} instructions per request ({total:,} for {args.requests})")
    except KeyboardInterrupt:
        B.say("# interrupted: every process this run started has been stopped")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for out in workdir.glob("callgrind-*.out*"):
                shutil.copy(out, args.keep)
        shutil.rmtree(workdir, ignore_errors=True)
    if "imml" in figures and "minimal" in figures:
        ratio = figures["minimal"] / figures["imml"]
        B.say(
            f"minimal / imml instructions per request: {ratio:.2f} "
            f"(the throughput ratio imml / minimal that these counts predict; target >= "
            f"{B.TARGET_THROUGHPUT_RATIO})"
        )
        figures["ratio"] = ratio
    B.say(f"Run took {time.monotonic() - started:.0f} s")
    B.write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
