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


def wait_gone(pids, timeout=5.0):
    """
    Wait for every pid to be gone; returns those still running.
    """
    deadline = time.monotonic() + timeout
    left = [p for p in pids if not gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if not gone(p)]
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
