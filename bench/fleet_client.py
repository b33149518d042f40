#!/usr/bin/env python3
"""
The load of the fleet benchmarks (bench/fleet.py): closed-loop image clients
and, optionally, an open-loop stream of text searches, in one asyncio
process.  Every request and its outcome is written to a JSON file.

- ``--clients N`` closed-loop clients each POST a CLIP visual request (a small
  picture: ``--image-kb`` of pseudo-random bytes, or the file ``--image``, a
  picture the real Immich ML service can decode) and send the next one when the answer arrives; after an error
  (non-2xx, connection error, timeout) a client pauses ``--error-pause``
  seconds, so a proxy that fails at once is not hammered thousands of times a
  second.
- ``--text-interval S`` sends one CLIP textual request (a search query) every
  S seconds, whether or not the previous one was answered.
- ``--slow-clients N`` closed-loop clients that take their time, in turn:
  one sends its request's head a few bytes at a time (a CLIP visual
  request), then one its body (a faces request with a larger picture), then
  one reads the answer a few bytes at a time (an OCR request).

The image clients and the searches keep their connections open between
requests and share them, as Immich's server does (Node's ``fetch``: one pool
of keep-alive connections per origin, an idle one closed after
``KEEP_IDLE`` seconds); a request that fails on a kept connection counts as
an error, as it would for Immich.  ``--new-connections`` sends each request on
a new connection (``Connection: close``) instead.  The slow clients always
use a new connection.  Times are
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

#: Seconds an idle kept connection stays in the pool (Node's fetch: 4 s).
KEEP_IDLE = 4.0

#: What the slow clients do, in turn: the kind of request, and its task.
SLOW_KINDS = {"slow-head": "clip-visual", "slow-body": "faces", "slow-read": "ocr"}
#: A slow client sends (or reads) this many bytes of the head, of the body
#: (or of the answer) at a time, and pauses SLOW_PAUSE seconds in between.
SLOW_HEAD_PIECE = 16
SLOW_BODY_PIECE = 2048
SLOW_READ_PIECE = 64
SLOW_PAUSE = 0.05
#: Bytes a slow reader's stream buffers before it stops reading the socket.
SLOW_READ_LIMIT = 1024


def bodies(image_kb: int, picture: bytes | None = None) -> dict[str, tuple[bytes, bytes]]:
    """
    The image request (with C{picture}, or C{image_kb} KiB of bytes no
    real service could decode) and the search request.
    """
    image = picture if picture is not None else bytes((i * 131 + 7) % 256 for i in range(image_kb * 1024))
    return {
        "image": predict_body(ENTRIES["clip-visual"], image=image),
        "text": predict_body(ENTRIES["clip-textual"], text="a photo of a dog on the beach"),
    }


def raw_request(port: int, content_type: bytes, body: bytes, keep: bool = False) -> bytes:
    return (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: %s\r\n"
        b"Content-Length: %d\r\nConnection: %s\r\n\r\n"
        % (port, content_type, len(body), b"keep-alive" if keep else b"close")
    ) + body


def slow_bodies(image_kb: int) -> dict[str, tuple[bytes, bytes]]:
    """
    The slow clients' requests by kind: the slow body's picture is 16 times
    the others'.
    """
    made = {}
    for kind, task in SLOW_KINDS.items():
        size = image_kb * 1024 * (16 if kind == "slow-body" else 1)
        made[kind] = predict_body(ENTRIES[task], image=bytes((i * 131 + 7) % 256 for i in range(size)))
    return made


async def read_answer(reader: asyncio.StreamReader, piece: int = 0) -> tuple[int, dict[str, str], bytes]:
    """
    Read an answer: status, headers, body; with C{piece}, the body C{piece}
    bytes at a time with a pause in between.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is None:
        return status, headers, await reader.read()  # until the server closes: bounded by the caller's timeout
    if not piece:
        return status, headers, await reader.readexactly(int(length))
    body = b""
    while len(body) < int(length):
        body += await reader.readexactly(min(piece, int(length) - len(body)))
        await asyncio.sleep(SLOW_PAUSE)
    return status, headers, body


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


class Kept:
    """
    Keep-alive connections to the proxy, shared by every request of the
    process: a request takes the connection idle the shortest time (or opens
    one), and gives it back once its answer is whole, unless the answer
    closes it.  A connection found idle for L{KEEP_IDLE} seconds or more
    when a request looks for one is closed, not used.
    """

    def __init__(self) -> None:
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def take(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.monotonic()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < KEEP_IDLE and not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return await asyncio.open_connection("127.0.0.1", port)

    def give(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.idle.append((reader, writer, time.monotonic()))

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()

    async def exchange(self, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await self.take(port)
        kept = False
        try:
            writer.write(request)
            await writer.drain()
            status, headers, body = await read_answer(reader)
            if headers.get("connection", "").lower() != "close" and "content-length" in headers:
                self.give(reader, writer)
                kept = True
            return status, headers, body
        finally:
            if not kept:
                writer.close()


def slow_exchange(kind: str):
    """
    An exchange as a slow client of C{kind} makes it (see L{SLOW_KINDS}).
    """

    async def run(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
        split = request.index(b"\r\n\r\n") + 4
        head, body = request[:split], request[split:]
        if kind == "slow-head":
            pieces = [head[i : i + SLOW_HEAD_PIECE] for i in range(0, len(head), SLOW_HEAD_PIECE)] + [body]
        elif kind == "slow-body":
            pieces = [head] + [body[i : i + SLOW_BODY_PIECE] for i in range(0, len(body), SLOW_BODY_PIECE)]
        else:
            pieces = [request]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=SLOW_READ_LIMIT)
        try:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                if len(pieces) > 1:
                    await asyncio.sleep(SLOW_PAUSE)
            return await read_answer(reader, SLOW_READ_PIECE if kind == "slow-read" else 0)
        finally:
            writer.close()

    return run


async def one(port: int, kind: str, request: bytes, timeout: float, log: list, how=exchange) -> bool:
    start = time.monotonic()
    record = {"kind": kind, "start": start}
    try:
        status, headers, body = await asyncio.wait_for(how(port, request), timeout)
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
        if not await one(args.port, "image", request, args.timeout, log, args.exchange):
            await asyncio.sleep(args.error_pause)


async def slow_loop(args, number: int, requests: dict[str, bytes], log: list) -> None:
    kinds = list(SLOW_KINDS)
    for i in range(number, number + MAX_PER_CLIENT):
        if time.monotonic() >= args.end_at:
            return
        kind = kinds[i % len(kinds)]
        if not await one(args.port, kind, requests[kind], args.timeout, log, slow_exchange(kind)):
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
        tasks.append(asyncio.ensure_future(one(args.port, "text", request, args.timeout, log, args.exchange)))
    await asyncio.gather(*tasks)


async def run(args) -> list:
    made = bodies(args.image_kb, Path(args.image).read_bytes() if args.image else None)
    log: list = []
    delay = args.start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    keep = not args.new_connections
    kept = Kept()
    args.exchange = kept.exchange if keep else exchange
    jobs = [closed_loop(args, raw_request(args.port, *made["image"], keep), log) for _ in range(args.clients)]
    if args.text_interval > 0:
        jobs.append(text_stream(args, raw_request(args.port, *made["text"], keep), log))
    if args.slow_clients:
        slow = {kind: raw_request(args.port, *parts) for kind, parts in slow_bodies(args.image_kb).items()}
        jobs += [slow_loop(args, number, slow, log) for number in range(args.slow_clients)]
    try:
        await asyncio.gather(*jobs)
    finally:
        kept.close()
    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--start-at", type=float, required=True, help="time.monotonic() at which to start")
    p.add_argument("--seconds", type=float, required=True, help="send for this long")
    p.add_argument("--clients", type=int, default=8, help="closed-loop image clients")
    p.add_argument("--text-interval", type=float, default=0.0, help="seconds between text searches (0: none)")
    p.add_argument("--slow-clients", type=int, default=0, help="closed-loop clients that send or read slowly")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument("--error-pause", type=float, default=0.1, help="a client's pause after an error")
    p.add_argument("--image-kb", type=int, default=4, help="KiB of the image requests' picture (pseudo-random bytes)")
    p.add_argument(
        "--image", metavar="FILE", help="send this picture in the image requests instead (a real host decodes it)"
    )
    p.add_argument(
        "--new-connections",
        action="store_true",
        help="send each request on a new connection (Connection: close) instead of keeping them",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not (0 < args.seconds <= 3600 and 0 <= args.clients <= 64 and 0 <= args.slow_clients <= 16):
        p.error("seconds 0-3600, clients 0-64, slow clients 0-16")
    if not 0 < args.timeout <= 300:
        p.error("timeout 0-300")
    args.end_at = args.start_at + args.seconds
    log = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
