"""
The launch script with real processes: the command runs in a group of its
own, and the group stops itself once the pipe from imml-mac is closed.
(That twistd killed with SIGKILL takes Immich ML with it is in
test_mac_tap.py.)
"""

import os
import signal
import subprocess

import pytest
import pytest_twisted
from mac_helpers import PYTHON, group_members, kill_left, wait_group_gone
from twisted.internet import defer, protocol, reactor

from imml.mac.process_group import CHILD_FDS, Command

TIMEOUT = 20
SLEEPER = (PYTHON, "-c", "import os, time; print(os.getpid(), os.getpgid(0), flush=True); time.sleep(60)")


class Sleeper(protocol.ProcessProtocol):
    """
    The sleeper's first line (its pid and group) and how it ended.
    """

    def __init__(self):
        self.started = defer.Deferred()
        self.ended = defer.Deferred()
        self.output = b""

    def outReceived(self, data):
        self.output += data
        if b"\n" in self.output and not self.started.called:
            self.started.callback(tuple(int(x) for x in self.output.split()))

    def processEnded(self, reason):
        self.ended.callback(reason.value)


@pytest.mark.parametrize("closed", ["while-watched", "before-the-watch-began"])
@pytest_twisted.inlineCallbacks
def test_the_group_stops_itself_when_the_pipe_from_imml_mac_closes(closed):
    sleeper = Sleeper()
    executable, args = Command(SLEEPER).spawn_args(grace=0.5)
    process = reactor.spawnProcess(sleeper, executable, args, env=dict(os.environ), childFDs=CHILD_FDS)
    pid = process.pid
    try:
        if closed == "while-watched":
            started = yield sleeper.started.addTimeout(TIMEOUT, reactor)
            # The command kept the launcher's pid and leads its own group,
            # with the watcher in it.
            assert started == (pid, pid)
            assert len(group_members(pid)) == 2
        # As when imml-mac dies: the write end of the pipe closes.  (Closed
        # before the watcher could read, the read ends at once.)
        process.closeChildFD(3)
        reason = yield sleeper.ended.addTimeout(TIMEOUT, reactor)
    finally:
        # The watcher goes last, after its grace (SIGKILL to the group).
        left = wait_group_gone(pid, timeout=10)
        kill_left(left)
    assert reason.signal == signal.SIGTERM
    assert left == []


def test_without_the_pipe_the_command_runs_and_says_it_is_not_watched():
    executable, args = Command((PYTHON, "-c", "print('ran')")).spawn_args(grace=5.0)
    done = subprocess.run(args, executable=executable, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran\n"
    assert "will not stop with imml-mac" in done.stderr
