#!/usr/bin/env python3
"""
Benchmark: imml against a direct hit, a minimal Twisted Agent proxy, nginx
(configured like the immich_ml_balancer image) and HAProxy, side by side in
one run, on loopback only.

    make bench ARGS="--rounds 3 --json bench.json"

See bench/README.md for what each figure means.  Every process this script
starts runs in its own process group and is killed when the script ends;
every load run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
TWISTD = str(Path(PYTHON).with_name("twistd"))

sys.path.insert(0, str(ROOT))
from imml.testing import ENTRIES, _embedding, predict_body  # noqa: E402

TARGETS = ("direct", "imml", "minimal", "nginx", "haproxy")
TARGET_LABELS = {
    "direct": "direct (one host)",
    "imml": "imml",
    "minimal": "minimal Agent proxy",
    "nginx": "nginx (image config)",
    "haproxy": "haproxy",
}
TARGET_ADDED_P50_MS = 1.0
TARGET_THROUGHPUT_RATIO = 0.75
HARD_DEADLINE_S = 1800  # the whole run stops past this, whatever the options


def say(*args) -> None:
    print(*args, flush=True)


def write_figures(path: str | None, data: dict) -> None:
    """Write every figure to C{path} as JSON (the --json option), if given."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2))
        say(f"# figures written to {path}")


# --------------------------------------------------------------------------
# Tools: wrk, nginx, haproxy from Debian
# --------------------------------------------------------------------------


DEFAULT_TOOLS = {"wrk": ["wrk"], "nginx": ["nginx-light", "nginx"], "haproxy": ["haproxy"]}


def ensure_tools(install: bool, wanted: dict[str, list[str]] = DEFAULT_TOOLS) -> dict[str, str | None]:
    """
    Find the programs named in C{wanted} (wrk, nginx and haproxy by default:
    each with the Debian packages to try, in order); install the missing
    ones from Debian when allowed and run as root.
    """

    def find(name: str) -> str | None:
        return shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
        )

    found = {name: find(name) for name in wanted}
    missing = [name for name, path in found.items() if path is None]
    if missing and install:
        if os.geteuid() != 0:
            say(f"# not root: cannot install {', '.join(missing)}; those targets are skipped")
        elif shutil.which("apt-get"):
            say(f"# installing {', '.join(missing)} from Debian (apt-get)...")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=False, stdout=subprocess.DEVNULL)
            for name in missing:
                for package in wanted[name]:
                    r = subprocess.run(
                        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                        env=env,
                        timeout=600,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                    if r.returncode == 0:
                        break
                found[name] = find(name)
                if found[name] is None:
                    say(f"# could not install {name}")
    elif missing:
        say(f"# --no-install: {', '.join(missing)} not installed, not installing; skipped")
    return found


def versions(tools: dict[str, str | None]) -> dict[str, str]:
    out: dict[str, str] = {}

    def run(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"unknown ({e})"

    import twisted

    out["python"] = platform.python_version()
    out["twisted"] = twisted.__version__
    if tools.get("nginx"):
        out["nginx"] = run([tools["nginx"], "-v"])
    if tools.get("haproxy"):
        out["haproxy"] = run([tools["haproxy"], "-v"])
    if tools.get("wrk"):
        out["wrk"] = run([tools["wrk"], "-v"])
    out["nproc"] = str(os.cpu_count())
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out["cpu"] = model
    out["kernel"] = platform.release()
    return out


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


class Processes:
    """Every child process, each in its own process group; all killed at the end."""

    def __init__(self, workdir: Path, pin: str | None) -> None:
        self.workdir = workdir
        self.pin = pin
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], cpu: str | None = None, **kw) -> subprocess.Popen:
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", cpu] + cmd
        log = open(self.workdir / f"{name}.out", "wb")
        proc = subprocess.Popen(
            cmd,
            stdout=kw.pop("stdout", log),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(self.workdir),
            **kw,
        )
        self.children.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)

    def stop_all(self) -> None:
        for _, proc in reversed(self.children):
            self.stop(proc)
        self.children.clear()

    def log_of(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.out").read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def group_cpu_seconds(pgids: set[int]) -> float:
    """User + system CPU seconds of every live process in these process groups."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
        if int(fields[2]) in pgids:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, expect: bytes, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200 and r.read().startswith(expect):
                    return
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port}{path} did not answer {expect!r} within {timeout} s ({last})")


def check_predict(port: int, content_type: bytes, body: bytes) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict",
        data=body,
        method="POST",
        headers={"Content-Type": content_type.decode()},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        answer = r.read()
        if r.status != 200 or not answer.startswith(b'{"clip"'):
            raise RuntimeError(f"bad /predict answer on port {port}: {r.status} {answer[:80]!r}")


# --------------------------------------------------------------------------
# Upstreams ("ML hosts") and the proxies under test
# --------------------------------------------------------------------------


def nginx_upstream_conf(workdir: Path, ports: list[int], answer: str) -> str:
    # nginx caps one config token at 4 KB: the answer is set in pieces.
    pieces = [answer[i : i + 2000] for i in range(0, len(answer), 2000)]
    sets = " ".join(f"set $a{i} '{piece}';" for i, piece in enumerate(pieces))
    joined = "".join(f"$a{i}" for i in range(len(pieces)))
    servers = "\n".join(
        f"""
    server {{
        listen 127.0.0.1:{p};
        keepalive_requests 1000000;
        keepalive_timeout 75s;
        default_type application/json;
        location = /ping {{ default_type text/plain; return 200 'pong'; }}
        location = /predict {{ {sets} return 200 "{joined}"; }}
        location = / {{ return 200 '{{"message":"Immich ML"}}'; }}
    }}"""
        for p in ports
    )
    return f"""
worker_processes 1;
pid {workdir}/upstream.pid;
error_log {workdir}/upstream-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/upstream-body;
    client_max_body_size 100M;
    client_body_buffer_size 1M;
    {servers}
}}
"""


def nginx_balancer_conf(workdir: Path, port: int, backends: list[int]) -> str:
    """The immich_ml_balancer image's configuration, on loopback."""
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    return f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format imml '$remote_addr - $remote_user [$time_local] "$request" '
                    '$status $body_bytes_sent "$http_referer" "$http_user_agent" '
                    'upstream=$upstream_addr';
    access_log {workdir}/nginx-access.log imml;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    upstream immich_ml {{
        least_conn;
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 100M;
        client_body_buffer_size 1M;
        location / {{
            proxy_pass http://immich_ml;
            proxy_next_upstream error timeout http_500 http_502 http_503 http_504;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 10s;
        }}
    }}
}}
"""


def haproxy_conf(
    workdir: Path,
    port: int,
    backends: list[int],
    *,
    check: str = "check inter 5s",
    client_timeout: str = "60s",
    server_timeout: str = "300s",
    reuse: bool = True,
) -> str:
    """
    HAProxy, one thread, leastconn with /ping checks: the figures of both
    benchmarks (the fleet one passes its own check and timeouts).
    """
    servers = "\n".join(f"    server h{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    reuse_line = "    http-reuse safe\n" if reuse else ""
    return f"""
global
    nbthread 1
    maxconn 4096
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client {client_timeout}
    timeout server {server_timeout}
    retries 3
    option redispatch
{reuse_line}frontend immich_ml
    bind 127.0.0.1:{port}
    default_backend ml_hosts
backend ml_hosts
    balance leastconn
    option httpchk GET /ping
    default-server {check}
{servers}
"""


def start_upstreams(procs: Processes, args, tools, answer: str, cpu: str | None) -> list[int]:
    """Two loopback 'ML hosts'; returns their ports."""
    workdir = procs.workdir
    if args.upstream == "nginx":
        if not tools.get("nginx"):
            raise SystemExit("--upstream nginx needs nginx (installed by this script as root), or use --upstream fake")
        ports = [free_port(), free_port()]
        conf = workdir / "upstream.conf"
        conf.write_text(nginx_upstream_conf(workdir, ports, answer))
        proc = procs.start(
            "upstream",
            [
                tools["nginx"],
                "-p",
                str(workdir),
                "-c",
                str(conf),
                "-e",
                str(workdir / "upstream-error.log"),
                "-g",
                "daemon off;",
            ],
            cpu=cpu,
        )
        for p in ports:
            wait_http(p, "/ping", b"pong", proc)
        return ports
    ports = []
    for i in (1, 2):
        proc = procs.start(
            f"fake{i}",
            [
                PYTHON,
                "-m",
                "imml.testing",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--name",
                f"fake{i}",
                "--slots",
                "1000",
                "--service-ms",
                "0",
            ],
            cpu=cpu,
            stdout=subprocess.PIPE,
        )
        line = proc.stdout.readline().decode().strip()  # bounded: the host prints it or exits
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"fake host {i} did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        wait_http(port, "/ping", b"pong", proc)
        ports.append(port)
    return ports


def start_target(
    procs: Processes, name: str, backends: list[int], tools, cpu: str | None, profile: Path | None = None
) -> int | None:
    """Start one target; returns its port, or None when it is not available."""
    workdir = procs.workdir
    if name == "direct":
        return backends[0]
    port = free_port()
    addrs = ",".join(f"127.0.0.1:{p}" for p in backends)
    if name == "imml" or name.startswith("imml:"):
        log = "imml-profile" if profile else name.replace(":", "-")
        cmd = [TWISTD, "-n", "--pidfile=", f"--logfile={workdir}/{log}.log"]
        if profile is not None:
            cmd += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        # The admin listener runs as in production, on a free port (two
        # imml processes may be up at once: the measured one and the profiled).
        cmd += [
            "imml-balancer",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--admin",
            "tcp:0:interface=127.0.0.1",
            "--backends",
            addrs,
        ]
        if name.startswith("imml:"):
            cmd += ["--strategy", name.split(":", 1)[1]]
        proc = procs.start("imml-profile" if profile else name, cmd, cpu=cpu)
    elif name == "minimal":
        proc = procs.start("minimal", [PYTHON, str(HERE / "minimal_proxy.py"), str(port), addrs], cpu=cpu)
    elif name == "nginx":
        if not tools.get("nginx"):
            return None
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_balancer_conf(workdir, port, backends))
        proc = procs.start(
            "nginx",
            [
                tools["nginx"],
                "-p",
                str(workdir),
                "-c",
                str(conf),
                "-e",
                str(workdir / "nginx-error.log"),
                "-g",
                "daemon off;",
            ],
            cpu=cpu,
        )
    elif name == "haproxy":
        if not tools.get("haproxy"):
            return None
        conf = workdir / "haproxy.cfg"
        conf.write_text(haproxy_conf(workdir, port, backends))
        proc = procs.start("haproxy", [tools["haproxy"], "-f", str(conf), "-db"], cpu=cpu)
    else:
        raise ValueError(name)
    try:
        wait_http(port, "/ping", b"pong", proc)
    except RuntimeError as e:
        raise RuntimeError(f"{name} did not start: {e}\n{procs.log_of(name)}") from None
    return port


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "%(content_type)s"
local f = assert(io.open("%(body)s", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%.0f,"duration_us":%%.0f,"p50_us":%%.0f,"p99_us":%%.0f,"mean_us":%%.1f,' ..
    '"max_us":%%.0f,"errors":%%.0f,"status_errors":%%.0f,"timeouts":%%.0f}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.connect + e.read + e.write, e.status, e.timeout))
end
"""


class Load:
    def __init__(self, procs: Processes, tools, content_type: bytes, body: bytes, cpu: str | None) -> None:
        self.procs = procs
        self.wrk = tools.get("wrk")
        self.cpu = cpu
        workdir = procs.workdir
        (workdir / "body.bin").write_bytes(body)
        self.content_type = content_type
        self.lua = workdir / "post.lua"
        self.lua.write_text(WRK_LUA % {"content_type": content_type.decode(), "body": workdir / "body.bin"})

    def run(self, port: int, connections: int, seconds: float) -> dict:
        if self.wrk:
            threads = 1 if (connections == 1 or self.cpu is not None) else 2
            cmd = [
                self.wrk,
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                f"{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(self.lua),
                f"http://127.0.0.1:{port}/predict",
            ]
        else:
            cmd = [
                PYTHON,
                str(HERE / "loadgen.py"),
                "--port",
                str(port),
                "--connections",
                str(connections),
                "--seconds",
                str(seconds),
                "--body",
                str(self.procs.workdir / "body.bin"),
                "--content-type",
                self.content_type.decode(),
            ]
        if self.cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", self.cpu] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, start_new_session=True)
        for line in r.stdout.splitlines():
            if line.startswith("WRKJSON "):
                data = json.loads(line[len("WRKJSON ") :])
                data["rps"] = data["requests"] / (data["duration_us"] / 1e6) if data["duration_us"] else 0.0
                return data
        raise RuntimeError(f"load generator failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def measure(args) -> dict:
    started = time.monotonic()
    tools = ensure_tools(not args.no_install)
    if args.load == "python":
        tools["wrk"] = None
    info = versions(tools)
    if not tools.get("wrk"):
        say(
            "# wrk not available: using the Python load generator (bench/loadgen.py); "
            "it saturates far earlier than wrk, so throughput figures are a lower bound"
        )
    ncpu = os.cpu_count() or 1
    pin = ncpu >= 2 and args.taskset and shutil.which("taskset") is not None
    proxy_cpu, load_cpu = ("1", "0") if pin else (None, None)

    # A small /predict: CLIP textual (a search query), as Immich sends it.
    if args.payload == "text":
        content_type, body = predict_body(ENTRIES["clip-textual"], text="a photo of a dog on the beach")
    else:
        image = bytes((i * 131 + 7) % 256 for i in range(args.image_kb * 1024))
        content_type, body = predict_body(ENTRIES["clip-visual"], image=image)
    answer = json.dumps({"clip": _embedding(b"bench")}, separators=(",", ":"))

    workdir = Path(tempfile.mkdtemp(prefix="imml-bench-"))
    os.chmod(workdir, 0o755)  # nginx workers run as nobody
    procs = Processes(workdir, pin)
    results: dict[str, list[dict]] = {}
    profile_report = None
    try:
        backends = start_upstreams(procs, args, tools, answer, load_cpu)
        ports: dict[str, int] = {}
        groups: dict[str, set[int]] = {"direct": {p.pid for _, p in procs.children}}
        skipped = []
        for name in [t for t in TARGETS if t in args.targets] + [f"imml:{v}" for v in args.imml_strategies]:
            before = len(procs.children)
            port = start_target(procs, name, backends, tools, proxy_cpu)
            if name != "direct":
                groups[name] = {p.pid for _, p in procs.children[before:]}
            if port is None:
                skipped.append(name)
                continue
            check_predict(port, content_type, body)
            ports[name] = port
        load = Load(procs, tools, content_type, body, load_cpu)
        order = list(ports)
        say(f"# targets: {', '.join(order)}" + (f"; skipped (not installed): {', '.join(skipped)}" if skipped else ""))
        say(
            f"# {args.rounds} rounds x {len(order)} targets: warm-up {args.warmup:g} s, "
            f"latency 1 conn {args.latency_seconds:g} s, throughput {args.connections} conns "
            f"{args.seconds:g} s; upstream: {args.upstream}; pinning: "
            + (f"proxies on CPU {proxy_cpu}, load generator and upstream on CPU {load_cpu}" if pin else "none")
        )
        for rnd in range(args.rounds):
            # Interleave: each round starts one target later.
            rotated = order[rnd % len(order) :] + order[: rnd % len(order)]
            for name in rotated:
                if time.monotonic() - started > HARD_DEADLINE_S:
                    raise RuntimeError("hard deadline reached")
                load.run(ports[name], args.connections, args.warmup)
                lat = load.run(ports[name], 1, args.latency_seconds)
                cpu0 = group_cpu_seconds(groups[name])
                thr = load.run(ports[name], args.connections, args.seconds)
                cpu = group_cpu_seconds(groups[name]) - cpu0
                row = {
                    "cpu_us_per_request": 1e6 * cpu / thr["requests"] if thr["requests"] else 0.0,
                    "cpu_share": cpu / (thr["duration_us"] / 1e6) if thr["duration_us"] else 0.0,
                    "round": rnd + 1,
                    "rps": thr["rps"],
                    "p50_ms": lat["p50_us"] / 1000,
                    "p99_ms": lat["p99_us"] / 1000,
                    "seq_rps": lat["rps"],
                    "loaded_p50_ms": thr["p50_us"] / 1000,
                    "loaded_p99_ms": thr["p99_us"] / 1000,
                    "requests": lat["requests"] + thr["requests"],
                    "errors": lat["errors"]
                    + thr["errors"]
                    + lat["status_errors"]
                    + thr["status_errors"]
                    + lat["timeouts"]
                    + thr["timeouts"],
                }
                results.setdefault(name, []).append(row)
                say(
                    f"  round {rnd + 1} {name:24} {row['rps']:9.0f} req/s  p50 {row['p50_ms']:.3f} ms  "
                    f"p99 {row['p99_ms']:.3f} ms  cpu {row['cpu_us_per_request']:.0f} us/req "
                    f"({row['cpu_share']:.0%} of a core)  ({row['requests']} requests, {row['errors']} errors)"
                )
        summary = summarize(results)
        ratios = summary["ratios"]
        if "imml" in ports and "minimal" in ports:
            # Three estimates of the throughput ratio, each disturbed by this
            # shared machine in its own way; the one judged is their median.
            estimates = {"rounds": ratios.get("imml_vs_minimal_rps")}
            if args.pairs:
                summary["pairs"] = paired_slices(load, ports["imml"], ports["minimal"], args)
                estimates["pairs"] = summary["pairs"]["ratio"]
            if args.together and ncpu >= 2 and shutil.which("taskset"):
                summary["together"] = together(
                    load, {n: (ports[n], sorted(groups[n])) for n in ("imml", "minimal")}, args, ncpu
                )
                estimates["together"] = summary["together"]["ratio"]
            estimates = {k: v for k, v in estimates.items() if v is not None}
            for how, value in estimates.items():
                ratios[f"imml_vs_minimal_rps_{how}"] = value
            if estimates:
                ratios["imml_vs_minimal_rps"] = statistics.median(estimates.values())
        missed = "imml" in summary["targets"] and (
            summary["ratios"].get("imml_vs_minimal_rps", 1) < TARGET_THROUGHPUT_RATIO
            or summary["ratios"].get("imml_added_p50_ms", 0) > TARGET_ADDED_P50_MS
        )
        if args.profile == "always" or (args.profile == "auto" and missed):
            profile_report = profile_imml(procs, backends, tools, load, args, proxy_cpu)
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"# kept {workdir}")
    return {
        "versions": info,
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "latency_seconds": args.latency_seconds,
            "connections": args.connections,
            "upstream": args.upstream,
            "payload": args.payload,
            "request_bytes": len(body),
            "answer_bytes": len(answer),
            "pinned": pin,
            "load_generator": "wrk" if tools.get("wrk") else "python",
        },
        "rounds": results,
        **summary,
        "profile": profile_report,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def paired_slices(load: Load, imml_port: int, minimal_port: int, args) -> dict:
    """
    imml and the minimal proxy, one second each, back to back, N times
    (which goes first alternates): the ratio of each pair of neighbouring
    seconds, and their median.  On a shared machine the CPU a process gets
    drifts over seconds; two runs a second apart see nearly the same.
    """
    ratios = []
    say(f"# paired slices: imml and minimal, {args.connections} conns, 1 s each, {args.pairs} pairs")
    for i in range(args.pairs):
        pair = [("imml", imml_port), ("minimal", minimal_port)]
        rps = {}
        for name, port in pair if i % 2 == 0 else pair[::-1]:
            rps[name] = load.run(port, args.connections, 1.0)["rps"]
        if rps["minimal"]:
            ratios.append(rps["imml"] / rps["minimal"])
    ratios.sort()
    result = {"ratios": [round(r, 3) for r in ratios], "ratio": statistics.median(ratios) if ratios else 0.0}
    say(f"  paired ratios imml/minimal, sorted: {' '.join(f'{r:.2f}' for r in ratios)}")
    return result


def together(load: Load, targets: dict, args, ncpu: int) -> dict:
    """
    imml and the minimal proxy loaded at the same time, each with its own
    wrk, each pinned to its own CPU, the CPUs swapped every run: what the
    machine does at that moment, and a CPU slower than the other, count
    alike for both.  The figure is the geometric mean of the median ratio
    with imml on CPU 0 and with imml on CPU 1 (a fixed speed difference
    between the CPUs cancels out).  Pinning is undone afterwards.
    """
    say(f"# together: imml and minimal loaded at once, CPUs swapped every run, {args.together} runs of 2 s")
    by_place: dict[int, list[float]] = {0: [], 1: []}

    def pin(pids: list[int], cpus: str) -> None:
        for pid in pids:
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True, timeout=10)

    try:
        for i in range(args.together):
            place = i % 2
            pin(targets["imml"][1], str(place))
            pin(targets["minimal"][1], str(1 - place))
            rps: dict[str, float] = {}

            def run(name: str) -> None:
                rps[name] = load.run(targets[name][0], args.connections, 2.0)["rps"]

            threads = [threading.Thread(target=run, args=(name,)) for name in targets]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            if rps.get("minimal"):
                by_place[place].append(rps.get("imml", 0.0) / rps["minimal"])
    finally:
        for _, pids in targets.values():
            pin(pids, f"0-{ncpu - 1}")
    medians = [statistics.median(v) for v in by_place.values() if v]
    ratio = statistics.geometric_mean(medians) if len(medians) == 2 and all(medians) else None
    if ratio is not None:
        say(
            f"  imml/minimal with imml on CPU 0: {medians[0]:.2f}, on CPU 1: {medians[1]:.2f}; "
            f"geometric mean {ratio:.2f}"
        )
    return {"imml_on_cpu0": by_place[0], "imml_on_cpu1": by_place[1], "ratio": ratio}


def summarize(results: dict[str, list[dict]]) -> dict:
    med = statistics.median
    targets: dict[str, dict] = {}
    direct = results.get("direct")
    for name, rows in results.items():
        t = {
            "rps": med(r["rps"] for r in rows),
            "p50_ms": med(r["p50_ms"] for r in rows),
            "p99_ms": med(r["p99_ms"] for r in rows),
            "loaded_p50_ms": med(r["loaded_p50_ms"] for r in rows),
            "cpu_us_per_request": med(r["cpu_us_per_request"] for r in rows),
            "cpu_share": med(r["cpu_share"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
        }
        if direct:
            # Added latency: per round against the direct figure of the same round.
            t["added_p50_ms"] = med(r["p50_ms"] - d["p50_ms"] for r, d in zip(rows, direct))
        targets[name] = t
    ratios: dict[str, float] = {}

    def per_round_ratio(a: str, b: str, key: str = "rps") -> float | None:
        if a in results and b in results:
            return med(x[key] / y[key] for x, y in zip(results[a], results[b]) if y[key])
        return None

    if "imml" in targets:
        for other in ("minimal", "nginx", "haproxy", "direct"):
            r = per_round_ratio("imml", other)
            if r is not None:
                ratios[f"imml_vs_{other}_rps"] = r
        if "added_p50_ms" in targets["imml"]:
            ratios["imml_added_p50_ms"] = targets["imml"]["added_p50_ms"]
        for other in ("nginx", "haproxy", "minimal"):
            if other in targets and "added_p50_ms" in targets[other]:
                ratios[f"imml_minus_{other}_added_p50_ms"] = (
                    targets["imml"]["added_p50_ms"] - targets[other]["added_p50_ms"]
                )
    return {"targets": targets, "ratios": ratios}


def profile_imml(procs: Processes, backends, tools, load: Load, args, cpu) -> dict:
    """Run imml under cProfile for one throughput run; the top functions."""
    stats_file = procs.workdir / "imml.prof"
    say(f"# profiling imml (cProfile, {args.connections} conns, {args.seconds:g} s; figures above are unaffected)")
    port = start_target(procs, "imml", backends, tools, cpu, profile=stats_file)
    proc = procs.children[-1][1]
    thr = load.run(port, args.connections, args.seconds)
    procs.stop(proc, signal.SIGINT, grace=20)  # twistd writes the stats on a clean stop
    if not stats_file.exists():
        return {"error": "no profile written", "log": procs.log_of("imml-profile")}
    st = pstats.Stats(str(stats_file))
    total = st.total_tt or 1.0
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "file": file,
                "calls": nc,
                "tottime_s": tt,
                "cumtime_s": ct,
                "tottime_pct": 100 * tt / total,
            }
        )
    requests = thr["requests"] or 1
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])[:25]
    ours = sorted((r for r in rows if "/imml/" in r["file"]), key=lambda r: -r["cumtime_s"])[:20]
    # Costs known to be avoidable in a proxy, by cumulative time.
    known = {
        "_getMultiPartArgs": "twisted.web parses the multipart body (email package)",
        "emit": "structured log events (Logger.emit)",
        "__call__": None,
        "_getEndpoint": "Agent builds an endpoint per request (idna encoding)",
        "getAllRawHeaders": "header copying",
        "copy": None,
        "classify": "imml classify()",
    }
    selected = []
    for r in rows:
        func = r["function"].rsplit("(", 1)[1].rstrip(")")
        if func in known and known[func] and not (func == "copy" and "http_headers" not in r["file"]):
            selected.append(dict(r, note=known[func]))
    for r in rows:
        if r["file"].endswith("http_headers.py") and r["function"].endswith("(copy)"):
            selected.append(dict(r, note="Headers.copy"))
        if "twisted/logger/" in r["file"] and r["function"].endswith("(__call__)") and "_observer" in r["file"]:
            selected.append(dict(r, note="log observers (formatting, writing the log file)"))
    for r in by_tot + ours + selected:
        r["us_per_request"] = 1e6 * r["cumtime_s"] / requests
    selected.sort(key=lambda r: -r["cumtime_s"])
    return {
        "requests": thr["requests"],
        "rps_under_profiler": thr["rps"],
        "total_s": total,
        "top_tottime": by_tot,
        "imml_cumtime": ours,
        "known_costs": selected,
        "stats_file": str(stats_file),
    }


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def report(data: dict) -> None:
    v = data["versions"]
    say("")
    say("Versions: " + "; ".join(f"{k}: {v[k]}" for k in ("twisted", "python", "nginx", "haproxy", "wrk") if k in v))
    say(f"Machine: nproc {v['nproc']}, {v['cpu']}, kernel {v['kernel']}")
    s = data["settings"]
    say(
        f"Request: POST /predict, {s['payload']} ({s['request_bytes']} B), answer {s['answer_bytes']} B; "
        f"upstream {s['upstream']}; load {s['load_generator']}; {s['rounds']} rounds, medians; "
        f"pinned: {'yes' if s['pinned'] else 'no'}"
    )
    say("")
    header = (
        f"{'target':22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'p50@load':>9} "
        f"{'CPU us/req':>10} {'CPU':>5} {'errors':>7}"
    )
    say(header)
    say("-" * len(header))
    extra = [n for n in data["targets"] if n not in TARGETS]
    for name in list(TARGETS) + extra:
        t = data["targets"].get(name)
        if t is None:
            say(f"{TARGET_LABELS[name]:22} {'(skipped)':>9}")
            continue
        label = TARGET_LABELS.get(name, name)
        added = f"{t['added_p50_ms']:+.3f}" if "added_p50_ms" in t else "-"
        say(
            f"{label:22} {t['rps']:9.0f} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f} {added:>10} "
            f"{t['loaded_p50_ms']:9.3f} {t['cpu_us_per_request']:10.0f} {t['cpu_share']:5.0%} {t['errors']:7d}"
        )
    say("")
    r = data["ratios"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    estimates = {
        "rounds": "median of the rounds' ratios",
        "pairs": f"median of {len((data.get('pairs') or {}).get('ratios', []))} paired 1 s slices",
        "together": "loaded together on swapped CPUs",
    }
    shown = [how for how in estimates if f"imml_vs_minimal_rps_{how}" in r]
    for how in shown:
        say(f"imml / minimal Agent proxy throughput, {estimates[how]}: {r[f'imml_vs_minimal_rps_{how}']:.2f}")
    if "imml_vs_minimal_rps" in r:
        x = r["imml_vs_minimal_rps"]
        how = f", median of the {len(shown)} estimates" if len(shown) > 1 else ""
        say(
            f"imml / minimal Agent proxy throughput{how}: {x:.2f}  (target >= {TARGET_THROUGHPUT_RATIO}) "
            f"{verdict(x >= TARGET_THROUGHPUT_RATIO)}"
        )
    if "imml_added_p50_ms" in r:
        x = r["imml_added_p50_ms"]
        say(
            f"imml added median latency: {x:.3f} ms  (target <= {TARGET_ADDED_P50_MS} ms) "
            f"{verdict(x <= TARGET_ADDED_P50_MS)}"
        )
    for other in ("nginx", "haproxy", "direct"):
        if f"imml_vs_{other}_rps" in r:
            line = f"imml / {other} throughput: {r[f'imml_vs_{other}_rps']:.2f}"
            if f"imml_minus_{other}_added_p50_ms" in r:
                line += f"; imml added p50 - {other} added p50: {r[f'imml_minus_{other}_added_p50_ms']:+.3f} ms"
            say(line)
    direct = data["targets"].get("direct")
    if direct:
        for name, t in data["targets"].items():
            if name != "direct" and t["rps"] > 0.8 * direct["rps"]:
                say(
                    f"note: {name} reaches {t['rps'] / direct['rps']:.0%} of the direct rate: "
                    "it may be bound by the upstream or the load generator, not by itself"
                )
    p = data.get("profile")
    if p and "top_tottime" in p:
        say("")
        say(
            f"Profile of imml under load (cProfile; {p['requests']} requests at {p['rps_under_profiler']:.0f} req/s; "
            f"{p['total_s']:.1f} s CPU in Python functions)"
        )
        say(f"  {'tottime %':>9} {'cum us/req':>10} {'calls':>9}  function")
        for row in p["top_tottime"][:15]:
            say(f"  {row['tottime_pct']:9.1f} {row['us_per_request']:10.1f} {row['calls']:9d}  {row['function']}")
        say("  imml's own functions by cumulative time:")
        for row in p["imml_cumtime"][:12]:
            say(f"  {row['tottime_pct']:9.1f} {row['us_per_request']:10.1f} {row['calls']:9d}  {row['function']}")
        if p.get("known_costs"):
            say("  known avoidable costs, by cumulative time (nested: Logger.emit includes the observers):")
            for row in p["known_costs"][:10]:
                say(
                    f"  {100 * row['cumtime_s'] / p['total_s']:8.1f}% {row['us_per_request']:10.1f} "
                    f"{row['calls']:9d}  {row['function']}: {row['note']}"
                )
    elif p:
        say(f"profile failed: {p}")
    say("")
    say(f"Run took {data['elapsed_s']:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument(
        "--pairs",
        type=int,
        default=20,
        help="after the rounds, this many pairs of 1 s throughput runs of imml and minimal, "
        "back to back; their median ratio is the one judged (0: the rounds' ratio)",
    )
    parser.add_argument(
        "--together",
        type=int,
        default=12,
        help="after the pairs, this many 2 s runs with imml and minimal loaded at the same "
        "time on swapped CPUs, as a check (0: none; needs 2 CPUs and taskset)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run per target and round")
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=4.0,
        help="sequential (1 connection) run per target and round, for p50/p99",
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up before each target's runs (wrk takes whole seconds)"
    )
    parser.add_argument("--connections", type=int, default=16, help="connections for the throughput run")
    parser.add_argument(
        "--upstream",
        choices=("nginx", "fake"),
        default="nginx",
        help="the two ML hosts: a fast nginx stand-in (default) or imml.testing fakes",
    )
    parser.add_argument(
        "--payload",
        choices=("text", "image"),
        default="text",
        help="CLIP textual query (default) or a small CLIP visual image",
    )
    parser.add_argument("--image-kb", type=int, default=4, help="image size for --payload image")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma separated subset of " + ",".join(TARGETS))
    parser.add_argument(
        "--imml-strategies",
        default="",
        help="also measure imml with these strategies (comma separated), as extra rows "
        "named imml:STRATEGY; the targets' ratios stay those of imml's default",
    )
    parser.add_argument(
        "--load",
        choices=("wrk", "python"),
        default="wrk",
        help="load generator: wrk (default; the Python one is used when wrk is missing)",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk, nginx, haproxy")
    parser.add_argument(
        "--taskset",
        action="store_true",
        help="pin the proxy under test to CPU 1, the load generator and upstream to CPU 0 "
        "(off by default: on a shared machine a busy neighbour on CPU 1 then halves the proxy)",
    )
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="profile imml after the rounds: when it misses a target (auto), always, never",
    )
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, profile)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.latency_seconds, args.warmup = 1, 2.0, 2.0, 1.0
        args.pairs = min(args.pairs, 3)
        args.together = min(args.together, 2)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.imml_strategies = [t.strip() for t in args.imml_strategies.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")
    if not (
        1 <= args.rounds <= 20
        and 0 < args.seconds <= 120
        and 0 < args.latency_seconds <= 120
        and 1 <= args.connections <= 256
        and 0 <= args.pairs <= 200
        and 0 <= args.together <= 200
    ):
        parser.error("rounds 1-20, seconds 0-120, connections 1-256, pairs 0-200, together 0-200")

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        data = measure(args)
    except KeyboardInterrupt:
        say("# interrupted: every process this run started has been stopped")
        return 130
    report(data)
    write_figures(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
