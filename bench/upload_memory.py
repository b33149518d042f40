#!/usr/bin/env python3
"""
Benchmark: the balancer's memory while large uploads wait for a host, on
loopback only.

    .venv/bin/python bench/upload_memory.py                   # 40 clients x 50 MiB
    .venv/bin/python bench/upload_memory.py --clients 10 --mib 20
    .venv/bin/python bench/upload_memory.py --imml-from /path/to/other/checkout

It starts C{twistd -n imml-balancer} as a child process, in front of one
host address where nothing listens yet: no host is up.  Each client posts a
C{/predict} as Immich's server does (a CLIP image request) whose picture is
C{--mib} MiB of pseudo-random bytes, generated as they are sent.  Once every
request waits in the balancer's queue, a fake ML host
(L{imml.testing.FakeMLHost}, in this process) starts listening at that
address; every request then reaches it and is answered.

It prints the balancer's peak RSS (the kernel's high-water mark, C{VmHWM}),
its RSS and temporary files while the uploads wait, and whether every body
reached the host byte for byte (the SHA-256 the host computed against the
one the client computed).  The balancer runs in its own process group and is
stopped when the script ends; the whole run is bounded by C{--deadline}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import treq
from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from balancer import TWISTD, Processes, free_port  # noqa: E402

from imml.body import PacedProducer  # noqa: E402
from imml.testing import ENTRIES, FakeMLHost, predict_body  # noqa: E402

MIB = 1024 * 1024
BLOCK = 256 * 1024
BOUNDARY = b"----immlUploadMemoryBench7MA4YWxkTrZu0gW"


def status_of(pid: int) -> dict[str, int]:
    """C{VmRSS} and C{VmHWM} of a process, in bytes."""
    figures = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures[name] = int(value.split()[0]) * 1024
    return figures


def deleted_files(pid: int) -> int:
    """Files the process holds open that are deleted (its temporary files)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(" (deleted)"):
                count += 1
        except OSError:
            pass
    return count


class Upload(PacedProducer):
    """
    One client's C{/predict} body, the picture generated as it is sent (so
    forty of them never sit in this process's memory), and its SHA-256.
    """

    def __init__(self, number: int, size: int) -> None:
        _, sample = predict_body(ENTRIES["clip-visual"], image=b"@", boundary=BOUNDARY)
        prefix, suffix = sample.split(b"@")
        super().__init__(len(prefix) + size + len(suffix))
        self.content_type = b"multipart/form-data; boundary=" + BOUNDARY
        self.sha256 = hashlib.sha256()
        self._random = random.Random(number)
        blocks = [BLOCK] * (size // BLOCK) + ([size % BLOCK] if size % BLOCK else [])
        self._parts = iter([prefix, *blocks, suffix])

    def next_block(self) -> bytes:
        part = next(self._parts, b"")
        if isinstance(part, int):
            part = self._random.randbytes(part)
        self.sha256.update(part)
        return part


async def get_json(agent: Agent, url: str) -> dict:
    response = await agent.request(b"GET", url.encode())
    return await treq.json_content(response)


async def wait_for(what: str, check, seconds: float, step: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if await check():
                return
        except Exception:  # noqa: BLE001  (not listening yet, say)
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {seconds} s")
        await task.deferLater(reactor, step, lambda: None)


async def run(args: argparse.Namespace, procs: Processes) -> dict:
    listen, admin, host_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    if args.imml_from:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.imml_from, env.get("PYTHONPATH")]))
    balancer = procs.start(
        "balancer",
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "imml-balancer",
            "--listen",
            f"tcp:{listen}:interface=127.0.0.1",
            "--admin",
            f"tcp:{admin}:interface=127.0.0.1",
            "--backends",
            f"127.0.0.1:{host_port}",
            "--health-interval",
            "0.5",
            "--rise",
            "1",
            "--queue-timeout",
            str(args.deadline),
            "--response-timeout",
            str(args.deadline),
        ],
        env=env,
    )
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = args.clients + 2
    agent = Agent(reactor, pool=pool)
    api = f"http://127.0.0.1:{admin}/api/status"

    async def listening() -> bool:
        return "balancer" in await get_json(agent, api)

    await wait_for("the balancer's admin listener", listening, 30)
    peak = {"rss": 0}

    def sample() -> None:
        try:
            peak["rss"] = max(peak["rss"], status_of(balancer.pid)["VmRSS"])
        except OSError:
            pass

    sampler = task.LoopingCall(sample)
    sampler.start(0.1)
    started = time.monotonic()
    uploads = [Upload(n, args.mib * MIB) for n in range(args.clients)]
    answers = [
        agent.request(
            b"POST",
            f"http://127.0.0.1:{listen}/predict".encode(),
            Headers({b"content-type": [u.content_type], b"x-upload": [b"%d" % n]}),
            u,
        )
        for n, u in enumerate(uploads)
    ]

    async def all_waiting() -> bool:
        doc = await get_json(agent, api)
        return all(u.finished.called for u in uploads) and doc["balancer"]["queue_depth"] == args.clients

    await wait_for("every upload waiting in the balancer", all_waiting, args.deadline)
    uploaded = time.monotonic() - started
    sample()
    waiting = {"rss": status_of(balancer.pid)["VmRSS"], "files": deleted_files(balancer.pid)}

    host = FakeMLHost(reactor, name="late-host")
    await host.listen(f"tcp:{host_port}:interface=127.0.0.1")
    came_up = time.monotonic()
    responses = await gatherResults(answers, consumeErrors=True)
    codes = [r.code for r in responses]
    await gatherResults([treq.content(r) for r in responses], consumeErrors=True)
    answered = time.monotonic() - came_up
    sample()
    figures = status_of(balancer.pid)
    after_files = deleted_files(balancer.pid)
    sampler.stop()
    received = {int(x.headers["x-upload"][0]): x.sha256 for x in host.received}
    identical = sum(received.get(n) == u.sha256.hexdigest() for n, u in enumerate(uploads))
    await pool.closeCachedConnections()
    await host.stop()
    return {
        "clients": args.clients,
        "mib_each": args.mib,
        "imml": args.imml_from or str(ROOT),
        "upload_seconds": round(uploaded, 1),
        "answer_seconds": round(answered, 1),
        "answers_200": codes.count(200),
        "byte_identical": identical,
        "rss_waiting_mib": round(waiting["rss"] / MIB, 1),
        "temp_files_waiting": waiting["files"],
        "rss_peak_sampled_mib": round(peak["rss"] / MIB, 1),
        "rss_peak_hwm_mib": round(figures["VmHWM"] / MIB, 1),
        "rss_end_mib": round(figures["VmRSS"] / MIB, 1),
        "temp_files_end": after_files,
    }


def report(figures: dict) -> None:
    n = figures["clients"]
    print(f"imml from:                         {figures['imml']}")
    print(f"uploads:                           {n} x {figures['mib_each']} MiB, no host up")
    print(f"all uploads in the balancer after: {figures['upload_seconds']} s")
    print(f"balancer RSS while they wait:      {figures['rss_waiting_mib']} MiB")
    print(f"balancer temporary files then:     {figures['temp_files_waiting']}")
    print(f"host up, all answered after:       {figures['answer_seconds']} s")
    print(f"answers 200:                       {figures['answers_200']} / {n}")
    print(f"bodies byte-identical at the host: {figures['byte_identical']} / {n}")
    print(f"balancer peak RSS (VmHWM):         {figures['rss_peak_hwm_mib']} MiB")
    print(f"balancer peak RSS (sampled):       {figures['rss_peak_sampled_mib']} MiB")
    print(f"balancer RSS at the end:           {figures['rss_end_mib']} MiB")
    print(f"balancer temporary files at end:   {figures['temp_files_end']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=40, help="uploads at once (default 40)")
    parser.add_argument("--mib", type=int, default=50, help="MiB of picture in each (default 50)")
    parser.add_argument("--deadline", type=float, default=600.0, help="the whole run stops past this many seconds")
    parser.add_argument("--imml-from", default=None, help="run the balancer from this checkout's imml package")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="imml-upload-bench-"))
    procs = Processes(workdir, None)
    outcome: dict = {}

    def finish(result: object) -> None:
        outcome["result"] = result
        if reactor.running:
            reactor.stop()

    def start() -> None:
        d = ensureDeferred(run(args, procs))
        d.addTimeout(args.deadline, reactor)
        d.addBoth(finish)

    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.callWhenRunning(start)
    try:
        reactor.run()
    finally:
        procs.stop_all()
    result = outcome.get("result")
    if not isinstance(result, dict):
        print(f"the run failed: {getattr(result, 'value', result)!r}", file=sys.stderr)
        print(procs.log_of("balancer"), file=sys.stderr)
        return 1
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    ok = result["byte_identical"] == result["clients"] == result["answers_200"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
