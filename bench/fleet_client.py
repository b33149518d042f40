#!/usr/bin/env python3
"""
The load of the fleet benchmarks (bench/fleet.py): closed-loop image clients
and, optionally, an open-loop stream of text searches, in one asyncio
process.  Every request and its outcome is written to a JSON file.

- ``--clients N`` closed-loop clients each POST a CLIP visual request (a small
  picture) and send the next one when the answer arrives; after an error
  (non-2xx, connection error, timeout) a client pauses ``--error-pause``
  seconds, so a proxy that fails at once is not hammered thousands of times a
  second.
- ``--text-interval S`` sends one CLIP textual request (a search query) every
  S seconds, whether or not the previous one was answered.

Each request uses a new connection (``Connection: close``): a closed keep-alive
connection can then never be mistaken for a proxy's error.  Times are
``time.monotonic()`` (one clock for every process on Linux), so the
orchestrator can place its events (pause, kill) on the same time line.

Every loop is bounded in count and time: clients stop sending at
``--start-at + --seconds``; each request times out after ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imml.testing import ENTRIES, predict_body  # noqa: E402

#: The most requests one closed-loop client sends (a bound, never reached at
#: these rates).
MAX_PER_CLIENT = 100_000


def bodies(image_kb: int) -> dict[str, tuple[bytes, bytes]]:
    image = bytes((i * 131 + 7) % 256 for i in range(image_kb * 1024))
    return {
        "image": predict_body(ENTRIES["clip-visual"], image=image),
        "text": predict_body(ENTRIES["clip-textual"], text="a photo of a dog on the beach"),
    }


def raw_request(port: int, content_type: bytes, body: bytes) -> bytes:
    return (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: %s\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (port, content_type, len(body))
    ) + body


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if length is not None:
            body = await reader.readexactly(int(length))
        else:
            body = await reader.read()  # until the server closes: bounded by the caller's timeout
        return status, headers, body
    finally:
        writer.close()


async def one(port: int, kind: str, request: bytes, timeout: float, log: list) -> bool:
    start = time.monotonic()
    record = {"kind": kind, "start": start}
    try:
        status, headers, body = await asyncio.wait_for(exchange(port, request), timeout)
        record.update(status=status, backend=headers.get("x-imml-backend"), host=headers.get("x-fake-host"))
        ok = 200 <= status < 300
        if not ok:
            record["error"] = f"status {status}"
            record["body"] = body[:300].decode("utf-8", "replace")
    except asyncio.TimeoutError:
        record.update(status=0, error="timeout")
        ok = False
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
        record.update(status=0, error=type(e).__name__)
        ok = False
    record["end"] = time.monotonic()
    log.append(record)
    return ok


async def closed_loop(args, request: bytes, log: list) -> None:
    for _ in range(MAX_PER_CLIENT):
        if time.monotonic() >= args.end_at:
            return
        if not await one(args.port, "image", request, args.timeout, log):
            await asyncio.sleep(args.error_pause)


async def text_stream(args, request: bytes, log: list) -> None:
    count = int(args.seconds / args.text_interval)
    tasks = []
    for i in range(count):
        at = args.start_at + i * args.text_interval
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() >= args.end_at:
            break
        tasks.append(asyncio.ensure_future(one(args.port, "text", request, args.timeout, log)))
    await asyncio.gather(*tasks)


async def run(args) -> list:
    made = bodies(args.image_kb)
    log: list = []
    delay = args.start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    jobs = [closed_loop(args, raw_request(args.port, *made["image"]), log) for _ in range(args.clients)]
    if args.text_interval > 0:
        jobs.append(text_stream(args, raw_request(args.port, *made["text"]), log))
    await asyncio.gather(*jobs)
    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--start-at", type=float, required=True, help="time.monotonic() at which to start")
    p.add_argument("--seconds", type=float, required=True, help="send for this long")
    p.add_argument("--clients", type=int, default=8, help="closed-loop image clients")
    p.add_argument("--text-interval", type=float, default=0.0, help="seconds between text searches (0: none)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument("--error-pause", type=float, default=0.1, help="a client's pause after an error")
    p.add_argument("--image-kb", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not (0 < args.seconds <= 600 and 0 <= args.clients <= 64 and 0 < args.timeout <= 300):
        p.error("seconds 0-600, clients 0-64, timeout 0-300")
    args.end_at = args.start_at + args.seconds
    log = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
