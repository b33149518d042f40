"""
The fleet benchmarks' load (bench/fleet_client.py) connects as Immich's
server does: its requests share keep-alive connections, or with
C{--new-connections} each has its own.  The client runs as a child process
against a fake host listening on loopback.
"""

import json
import os
import sys
import time

from support import ROOT, bounded
from twisted.internet import reactor
from twisted.internet.utils import getProcessValue

from imml.testing import FakeMLHost


async def _load(tmp_path, *extra: str) -> tuple[FakeMLHost, list[dict]]:
    """
    Two image clients and a search every quarter of a second, for one
    second, through a fake host: the host, and every request's record.
    """
    host = FakeMLHost(reactor, name="a", service_time=0.01)
    await host.listen()
    out = tmp_path / "requests.json"
    try:
        code = await getProcessValue(
            sys.executable,
            [
                str(ROOT / "bench" / "fleet_client.py"),
                "--port",
                str(host.port),
                "--start-at",
                repr(time.monotonic() + 1.0),  # once the child has started
                "--seconds",
                "1",
                "--clients",
                "2",
                "--text-interval",
                "0.25",
                "--timeout",
                "10",
                "--out",
                str(out),
                *extra,
            ],
            env=dict(os.environ),
            reactor=reactor,
        )
    finally:
        await host.stop()
    assert code == 0
    return host, json.loads(out.read_text())


@bounded(30)
async def test_the_requests_share_kept_connections(tmp_path) -> None:
    host, log = await _load(tmp_path)
    assert {r["kind"] for r in log} == {"image", "text"}
    assert all(r["status"] == 200 for r in log)
    assert host.served == len(log) > 20
    # The two clients' connections, and one or two more for the searches
    # sent while both were busy.
    assert host.connections <= 5


@bounded(30)
async def test_new_connections_gives_each_request_its_own(tmp_path) -> None:
    host, log = await _load(tmp_path, "--new-connections")
    assert all(r["status"] == 200 for r in log)
    assert host.connections == host.served == len(log) > 20
