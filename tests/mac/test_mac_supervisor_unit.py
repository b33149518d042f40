"""
The supervisor's decisions with a fake clock and fake processes: restart
delays, reset after a stable run, hung children, TERM then KILL, and a stop
Deferred that waits for the child to be gone.
"""

import signal

import pytest
from mac_helpers import tagged
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from imml.mac.child_protocol import MAX_LINE
from imml.mac.process_group import LAUNCH_SCRIPT, Command
from imml.mac.supervisor import Supervisor


class FakeProcess:
    def __init__(self, protocol, pid):
        self.protocol = protocol
        self.pid = pid
        self.signals = []

    def signalProcess(self, signum):
        self.signals.append(signum)


class FakeReactor(Clock):
    """
    A clock that records spawnProcess calls and lets the test end processes.
    """

    def __init__(self):
        super().__init__()
        self.spawned = []
        self._next_pid = 1000

    def spawnProcess(self, protocol, executable, args, env=None, path=None, usePTY=False, childFDs=None):
        self._next_pid += 1
        process = FakeProcess(protocol, self._next_pid)
        process.spawn = dict(executable=executable, args=args, env=env, path=path, usePTY=usePTY, childFDs=childFDs)
        protocol.makeConnection(process)
        self.spawned.append(process)
        return process

    def end(self, process, code=0):
        reason = Failure(error.ProcessDone(0) if code == 0 else error.ProcessTerminated(code))
        process.protocol.processExited(reason)
        process.protocol.processEnded(reason)


class Kills:
    """
    An os.killpg stand-in: records (pgid, signal).  A group is missing
    before setsid (C{missing}); after its leader ended it is empty unless
    listed in C{lingering}.
    """

    def __init__(self):
        self.sent = []
        self.missing = set()
        self.lingering = set()

    def __call__(self, pgid, signum):
        if pgid in self.missing:
            raise ProcessLookupError(pgid)
        if signum == 0:
            if pgid not in self.lingering:
                raise ProcessLookupError(pgid)
            return
        self.sent.append((pgid, signum))


class Probe:
    """
    A health probe whose answers the test sets.
    """

    def __init__(self):
        self.healthy = False
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return defer.succeed(self.healthy)


def make(probe=None, **kwargs):
    reactor = FakeReactor()
    kills = Kills()
    args = dict(
        name="immich-ml",
        probe=probe,
        restart_delay=lambda attempt: [1.0, 2.0, 4.0, 8.0][min(attempt, 3)],
        stable_after=60.0,
        stop_timeout=10.0,
        ready_interval=0.5,
        ping_interval=5.0,
        ping_failures=3,
        start_timeout=30.0,
        kill=kills,
    )
    args.update(kwargs)
    command = Command(("python", "-m", "immich_ml"), env={"A": "1"}, cwd="/ml", launcher="/py")
    return reactor, kills, Supervisor(reactor, command, **args)


def test_spawns_through_the_launch_script_with_the_watch_pipe():
    reactor, kills, sup = make()
    sup.startService()
    (process,) = reactor.spawned
    assert process.spawn == dict(
        executable="/py",
        args=["/py", "-I", "-c", LAUNCH_SCRIPT.read_text(), "10.0", "python", "-m", "immich_ml"],
        env={"A": "1"},
        path="/ml",
        usePTY=False,
        childFDs={0: "w", 1: "r", 2: "r", 3: "w"},
    )


def test_quick_deaths_back_off_and_a_stable_run_resets(events):
    reactor, kills, sup = make()
    sup.startService()
    delays = []
    for _ in range(4):
        reactor.advance(1.0)  # dies after a second
        reactor.end(reactor.spawned[-1], code=3)
        delays.append(tagged(events, "child-restart-scheduled")[-1]["delay"])
        count = len(reactor.spawned)
        reactor.advance(delays[-1] - 0.01)
        assert len(reactor.spawned) == count, "restarted before its delay"
        reactor.advance(0.01)
        assert len(reactor.spawned) == count + 1
    assert delays == [1.0, 2.0, 4.0, 8.0]
    ended = tagged(events, "child-ended")
    assert [e["exit_code"] for e in ended] == [3, 3, 3, 3]
    # A run longer than stable_after: back to the first delay.
    reactor.advance(61.0)
    reactor.end(reactor.spawned[-1], code=1)
    assert tagged(events, "child-restart-scheduled")[-1]["delay"] == 1.0


def test_ready_then_hung_child_is_terminated_and_restarted(events):
    probe = Probe()
    reactor, kills, sup = make(probe)
    sup.startService()
    first = reactor.spawned[0]
    ready = sup.whenReady()
    reactor.advance(0.5)
    assert not tagged(events, "child-ready"), "ready before answering"
    probe.healthy = True
    reactor.advance(0.5)
    assert ready.result == first.pid
    assert tagged(events, "child-ready", pid=first.pid)
    probe.healthy = False
    reactor.advance(5.0)
    reactor.advance(5.0)
    assert kills.sent == [], "restarted before ping_failures checks failed"
    reactor.advance(5.0)
    assert tagged(events, "child-unresponsive", pid=first.pid)
    assert kills.sent == [(first.pid, signal.SIGTERM)]
    # It ignores TERM: KILL after stop_timeout.
    reactor.advance(10.0)
    assert kills.sent[-1] == (first.pid, signal.SIGKILL)
    reactor.end(first, code=-9)
    reactor.advance(1.0)
    assert len(reactor.spawned) == 2


def test_a_failure_between_successes_does_not_count(events):
    probe = Probe()
    probe.healthy = True
    reactor, kills, sup = make(probe)
    sup.startService()
    reactor.advance(0.5)
    for healthy in [False, False, True, False, False, True]:
        probe.healthy = healthy
        reactor.advance(5.0)
    assert not tagged(events, "child-unresponsive")
    assert kills.sent == []


def test_never_ready_within_start_timeout_is_restarted(events):
    probe = Probe()
    reactor, kills, sup = make(probe, start_timeout=3.0)
    sup.startService()
    reactor.advance(2.5)
    assert kills.sent == []
    reactor.advance(0.5)
    assert tagged(events, "child-start-timeout")
    assert kills.sent == [(reactor.spawned[0].pid, signal.SIGTERM)]


def test_stop_waits_for_the_child_to_be_gone():
    reactor, kills, sup = make()
    sup.startService()
    process = reactor.spawned[0]
    stopped = sup.stopService()
    assert kills.sent == [(process.pid, signal.SIGTERM)]
    assert not stopped.called
    reactor.advance(9.9)
    assert not stopped.called
    reactor.advance(0.1)
    assert kills.sent[-1] == (process.pid, signal.SIGKILL)
    assert not stopped.called
    reactor.end(process, code=-9)
    assert stopped.called
    reactor.advance(100)
    assert len(reactor.spawned) == 1, "restarted after stop"
    assert not reactor.getDelayedCalls()


def test_stop_waits_for_the_whole_group(events):
    # The leader is reaped and the pipes are closed, but a grandchild is
    # still exiting: the stop is not over yet.
    reactor, kills, sup = make()
    sup.startService()
    process = reactor.spawned[0]
    stopped = sup.stopService()
    kills.lingering.add(process.pid)
    reactor.end(process, code=-15)
    assert kills.sent[-1] == (process.pid, signal.SIGKILL)
    reactor.advance(0.5)
    assert not stopped.called
    kills.lingering.clear()
    reactor.advance(0.05)
    assert stopped.result == process.pid
    assert tagged(events, "child-ended", pid=process.pid)


def test_stop_during_restart_delay_cancels_it():
    reactor, kills, sup = make()
    sup.startService()
    reactor.end(reactor.spawned[0], code=1)
    stopped = sup.stopService()
    assert stopped.called
    reactor.advance(100)
    assert len(reactor.spawned) == 1
    assert not reactor.getDelayedCalls()


def test_term_before_setsid_goes_to_the_pid():
    # The wrapper has not made its group yet: killpg finds nothing, so the
    # signal goes to the process itself.
    reactor, kills, sup = make()
    sup.startService()
    process = reactor.spawned[0]
    kills.missing.add(process.pid)
    sup.stopService()
    assert process.signals == [signal.SIGTERM]


def test_leader_exit_terminates_what_it_left_in_its_group():
    reactor, kills, sup = make()
    sup.startService()
    process = reactor.spawned[0]
    process.protocol.processExited(Failure(error.ProcessTerminated(1)))
    assert kills.sent == [(process.pid, signal.SIGTERM)]


def test_output_is_logged_line_by_line_with_the_stream(events):
    reactor, kills, sup = make()
    sup.startService()
    protocol = reactor.spawned[0].protocol
    protocol.outReceived(b"one\ntw")
    protocol.errReceived(b"oops {not a field}\r\n")
    protocol.outReceived(b"o\nthree")
    reactor.end(reactor.spawned[0], code=0)
    lines = [(e["stream"], e["line"]) for e in tagged(events, "child-output")]
    assert lines == [
        ("stdout", "one"),
        ("stderr", "oops {not a field}"),
        ("stdout", "two"),
        ("stdout", "three"),
    ]
    assert all(e["pid"] == reactor.spawned[0].pid for e in tagged(events, "child-output"))


# Lines as Immich ML prints them on a terminal, and as they should be logged.
COLOURED = [
    # uvicorn's default formatter (click.style)
    (
        b"\x1b[32mINFO\x1b[0m:     Started server process [\x1b[36m4242\x1b[0m]",
        "INFO:     Started server process [4242]",
    ),
    (
        b"\x1b[32mINFO\x1b[0m:     Uvicorn running on \x1b[1mhttp://0.0.0.0:3003\x1b[0m (Press CTRL+C to quit)",
        "INFO:     Uvicorn running on http://0.0.0.0:3003 (Press CTRL+C to quit)",
    ),
    # rich's log handler: dim time, coloured level, highlighted numbers, and
    # the source file as an OSC 8 hyperlink ended by ST
    (
        b"\x1b[2;36m[12/05/26 15:21:40]\x1b[0m\x1b[2;36m \x1b[0m\x1b[32mINFO    \x1b[0m Starting gunicorn "
        b"\x1b[1;36m23.0\x1b[0m.\x1b[1;36m0\x1b[0m   "
        b"\x1b]8;id=668357;file:///opt/immich/machine-learning/immich_ml/main.py\x1b\\\x1b[2mmain.py\x1b[0m"
        b"\x1b]8;;\x1b\\\x1b[2m:\x1b[0m\x1b]8;id=138001;file:///opt/immich/machine-learning/immich_ml/main.py#87"
        b"\x1b\\\x1b[2m87\x1b[0m\x1b]8;;\x1b\\",
        "[12/05/26 15:21:40] INFO     Starting gunicorn 23.0.0   main.py:87",
    ),
    (
        b"\x1b[2;36m                   \x1b[0m\x1b[2;36m \x1b[0m\x1b[31mERROR   \x1b[0m Failed to load "
        b"\x1b[32m'buffalo_l'\x1b[0m",
        "                    ERROR    Failed to load 'buffalo_l'",
    ),
    # a window title (OSC ended by BEL), a progress bar's cursor moves, a
    # character set and a cursor save and restore
    (b"\x1b]0;immich_ml\x07ready", "ready"),
    (
        b"\x1b[A\x1b[2KDownloading model.onnx: 100%|\xe2\x96\x88\xe2\x96\x88| 2.1M/2.1M\r",
        "Downloading model.onnx: 100%|██| 2.1M/2.1M",
    ),
    (b"\x1b(B\x1b[mplain\x1b[K", "plain"),
    (b"\x1b7saved\x1b8", "saved"),
    # 8-bit CSI, and sequences cut short at the line's end
    ("\u009b1mbold\u009b0m".encode(), "bold"),
    (b"cut \x1b]8;;file:///no-end", "cut "),
    (b"lone \x1b", "lone "),
    # nothing to take out
    (b"[not an escape] {braces} 100% \xc3\xa9t\xc3\xa9", "[not an escape] {braces} 100% été"),
]


def test_output_is_logged_without_terminal_escapes(events):
    reactor, kills, sup = make()
    sup.startService()
    protocol = reactor.spawned[0].protocol
    for raw, _ in COLOURED:
        protocol.errReceived(raw + b"\n")
    # A sequence split between two reads is still one sequence.
    protocol.outReceived(b"\x1b[3")
    protocol.outReceived(b"1mred\x1b[0m\n")
    lines = [(e["stream"], e["line"]) for e in tagged(events, "child-output")]
    assert lines == [("stderr", logged) for _, logged in COLOURED] + [("stdout", "red")]


def test_a_line_redrawn_in_place_is_logged_as_its_last_state_and_memory_stays_bounded(events):
    reactor, kills, sup = make()
    sup.startService()
    protocol = reactor.spawned[0].protocol
    # a progress bar: states ended by CR, then the final one by a newline
    for percent in range(0, 100, 10):
        protocol.errReceived(b"Downloading model: %d%%\r" % percent)
    protocol.errReceived(b"Downloading model: 100%\r\n")
    # a CRLF split between two reads
    protocol.outReceived(b"ready\r")
    protocol.outReceived(b"\n")
    # a line that never ends is logged in bounded pieces
    protocol.outReceived(b"x" * (MAX_LINE * 2 + 10))
    lines = [(e["stream"], e["line"]) for e in tagged(events, "child-output")]
    assert lines == [
        ("stderr", "Downloading model: 100%"),
        ("stdout", "ready"),
        ("stdout", "x" * MAX_LINE),
        ("stdout", "x" * MAX_LINE),
    ]


def test_a_spawn_that_raises_is_retried_with_backoff(events):
    reactor, kills, sup = make()
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise OSError("no such file")

    reactor.spawnProcess = broken
    sup.startService()
    assert tagged(events, "child-spawn-failed")
    reactor.advance(1.0)
    assert len(calls) == 2
    reactor.advance(1.9)
    assert len(calls) == 2
    reactor.advance(0.1)
    assert len(calls) == 3
    assert sup.stopService().called


def test_a_command_is_a_value_whose_hash_ignores_its_environment():
    command = Command(["python", "-m", "immich_ml"], env={"A": "1"}, cwd="/ml")
    assert command.argv == ("python", "-m", "immich_ml")
    assert command == Command(("python", "-m", "immich_ml"), env={"A": "1"}, cwd="/ml")
    other_env = Command(("python", "-m", "immich_ml"), env={"A": "2"}, cwd="/ml")
    assert command != other_env and hash(command) == hash(other_env)
    with pytest.raises(AttributeError):
        command.cwd = "/elsewhere"


def test_readiness_watchers_hear_ready_unresponsive_ended_and_stopped():
    """
    What the Bonjour advertisement follows: ready, then not serving as
    soon as the child stops answering (before it is restarted), ready
    again, and not serving when the service stops.
    """
    probe = Probe()
    probe.healthy = True
    reactor, kills, sup = make(probe)
    heard = []
    sup.watch_readiness(heard.append)
    sup.startService()
    reactor.advance(0.5)
    assert heard == [True]
    probe.healthy = False
    for _ in range(3):
        reactor.advance(5.0)
    assert heard == [True, False], "still advertised after it stopped answering"
    reactor.end(reactor.spawned[0], code=-15)
    reactor.advance(1.0)
    probe.healthy = True
    reactor.advance(0.5)
    assert heard == [True, False, True]
    # A child that dies by itself: not serving at once.
    reactor.end(reactor.spawned[1], code=1)
    assert heard == [True, False, True, False]
    reactor.advance(2.0)
    reactor.advance(0.5)
    assert heard[-1] is True
    sup.stopService()
    assert heard[-1] is False
