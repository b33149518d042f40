"""
Fallback load generator, used only when wrk is not installed: N keep-alive
HTTP/1.1 connections POST the same body back to back for a fixed time, and
print the same WRKJSON line as bench/balancer.py's wrk script.  Much slower
than wrk: its throughput figures are a lower bound.
"""

import argparse
import asyncio
import json
import time


async def worker(port, request, deadline, latencies, counts):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            length, chunked = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).split(b";")[0], 16)
                    await asyncio.wait_for(reader.readexactly(size + 2), 10)
                    if size == 0:
                        break
            elif length:
                await asyncio.wait_for(reader.readexactly(length), 10)
            latencies.append(time.perf_counter() - start)
            if not 200 <= status < 400:
                counts["status"] += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except (
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        asyncio.TimeoutError,
        ValueError,
        IndexError,
    ):
        counts["errors"] += 1
    finally:
        writer.close()


async def run(args):
    body = open(args.body, "rb").read()
    request = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        f"Content-Type: {args.content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies, counts = [], {"status": 0, "errors": 0}
    started = time.monotonic()
    deadline = started + args.seconds
    await asyncio.gather(*(worker(args.port, request, deadline, latencies, counts) for _ in range(args.connections)))
    duration = time.monotonic() - started
    latencies.sort()
    n = len(latencies) or 1

    def pct(p):
        return 1e6 * latencies[min(n - 1, int(p / 100 * n))] if latencies else 0

    print(
        "WRKJSON "
        + json.dumps(
            {
                "requests": len(latencies),
                "duration_us": duration * 1e6,
                "p50_us": pct(50),
                "p99_us": pct(99),
                "mean_us": 1e6 * sum(latencies) / n,
                "max_us": 1e6 * max(latencies, default=0),
                "errors": counts["errors"],
                "status_errors": counts["status"],
                "timeouts": 0,
            }
        )
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--body", required=True)
    p.add_argument("--content-type", required=True)
    asyncio.run(run(p.parse_args()))
