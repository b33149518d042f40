"""
Keeping the Mac awake: caffeinate runs only on macOS (the platform is
injected), with the right arguments, and goes away when the service stops.
A fake ``caffeinate`` on PATH records its arguments and pid.
"""

import os
import stat

import pytest_twisted
from mac_helpers import kill_left, tagged, wait_group_gone
from twisted.internet import defer, reactor

from imml.mac.sleep import sleep_guard


def fake_caffeinate(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "caffeinate.args"
    script = bindir / "caffeinate"
    script.write_text(f'#!/bin/sh\necho "$$ $*" >> {record}\nexec sleep 60\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return env, record


def until(predicate, timeout=10.0):
    d = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def poll():
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError("timed out waiting"))
        else:
            reactor.callLater(0.05, poll)

    poll()
    return d


@pytest_twisted.inlineCallbacks
def test_on_macos_caffeinate_waits_for_our_pid_and_stops_with_the_service(tmp_path, events):
    env, record = fake_caffeinate(tmp_path)
    guard = sleep_guard(reactor, platform="darwin", env=env, stop_timeout=2.0)
    guard.startService()
    try:
        yield until(lambda: record.exists() and record.read_text().strip())
    finally:
        yield guard.stopService().addTimeout(10, reactor)
    pid, args = record.read_text().split(" ", 1)
    assert args.split() == ["-i", "-w", str(os.getpid())]
    # caffeinate led its own process group: nothing of it is left.
    left = wait_group_gone(int(pid), timeout=1.0)
    kill_left(left)
    assert left == []
    assert tagged(events, "child-started", name="caffeinate")
    assert not tagged(events, "sleep-skipped")


@pytest_twisted.inlineCallbacks
def test_elsewhere_caffeinate_is_skipped_with_a_log_line(tmp_path, events):
    env, record = fake_caffeinate(tmp_path)
    guard = sleep_guard(reactor, platform="linux", env=env)
    guard.startService()
    yield guard.stopService()
    assert not record.exists()
    (skipped,) = tagged(events, "sleep-skipped")
    assert "not macOS (linux)" in skipped["reason"]


@pytest_twisted.inlineCallbacks
def test_switched_off_on_macos(tmp_path, events):
    env, record = fake_caffeinate(tmp_path)
    guard = sleep_guard(reactor, platform="darwin", env=env, enabled=False)
    guard.startService()
    yield guard.stopService()
    assert not record.exists()
    assert "--allow-sleep" in tagged(events, "sleep-skipped")[0]["reason"]


def test_missing_caffeinate_on_macos_is_said(tmp_path, events):
    guard = sleep_guard(reactor, platform="darwin", env={"PATH": str(tmp_path)})
    guard.startService()
    guard.stopService()
    assert "caffeinate not found" in tagged(events, "sleep-skipped")[0]["reason"]
