"""
Helpers for imml-mac's tests: the fake Immich checkout, log capture, free
loopback ports and checks that no process is left behind.  (A module with
a unique name rather than conftest.py, so that other test folders may have
their own conftest.)
"""

import os
import pathlib
import socket
import sys
import time

import pytest
from twisted.logger import globalLogPublisher

HERE = pathlib.Path(__file__).resolve().parent
FAKE_CHECKOUT = HERE / "fake_immich"
FAKE_ML = FAKE_CHECKOUT / "machine-learning"
FAKE_ORT = HERE / "fake_ort"
# The interpreter running the tests has onnxruntime (the test extra): it
# plays the Immich virtual environment's python.
PYTHON = sys.executable
TWISTD = str(pathlib.Path(sys.executable).with_name("twistd"))


def imml_mac_argv(tmp_path, host, port, *extra):
    """
    ``twistd -n imml-mac`` on the fake Immich checkout, with short
    health-check and stop intervals.
    """
    return [
        TWISTD,
        "-n",
        "--pidfile=",
        "imml-mac",
        "--immich",
        str(FAKE_CHECKOUT),
        "--python",
        PYTHON,
        "--host",
        host,
        "--port",
        str(port),
        "--cache",
        str(tmp_path / "cache"),
        "--providers",
        "CoreML,CPU",
        "--ping-interval",
        "0.5",
        "--stop-timeout",
        "2",
        *extra,
    ]


@pytest.fixture
def events():
    """
    Every log event emitted while the test runs.
    """
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def tagged(events, imml_event, **match):
    """
    The events tagged C{imml_event}, optionally with given field values.
    """
    return [e for e in events if e.get("imml_event") == imml_event and all(e.get(k) == v for k, v in match.items())]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(pid):
    """
    Whether process C{pid} no longer runs: absent, or a zombie waiting for
    a parent that is not ours to reap it.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = pathlib.Path(f"/proc/{pid}/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith("State:"):
                return "Z" in line.split()[1]
    except OSError:
        return True
    return False


def group_members(pgid):
    """
    The pids of the processes of process group C{pgid} that still run
    (zombies left for a parent that is not ours to reap them do not count),
    read from /proc.
    """
    members = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_group_gone(pgid, timeout):
    """
    Wait for process group C{pgid} to have no running member; returns the
    members still running at C{timeout}.
    """
    deadline = time.monotonic() + timeout
    left = group_members(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = group_members(pgid)
    return left


def kill_left(pids):
    """
    Last-resort cleanup so a failing test leaves nothing behind.
    """
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def read_pids(path):
    """
    The (main pid, server pid) pairs the fake server wrote to C{path}.
    """
    if not path.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in path.read_text().split("\n") if line.strip()]
