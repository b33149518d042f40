"""
The supervisor with real child processes: the fake Immich checkout run as
``python -m immich_ml`` (which starts its server as a grandchild, as Immich
starts gunicorn), on a free loopback port, with the real reactor.

Every test stops its supervisor and checks that nothing of the child's
process group (the child, the grandchild, the watcher the launcher leaves)
is left running.
"""

import os

import pytest_twisted
import treq
from mac_helpers import FAKE_ML, FAKE_ORT, PYTHON, free_port, gone, group_members, kill_left, read_pids, tagged
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from imml.mac.process_group import Command
from imml.mac.providers import HOOK_DIR, child_environment
from imml.mac.readiness import PingProbe, ping_url
from imml.mac.supervisor import Supervisor

TIMEOUT = 20


def fetch_json(url):
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    d = client.get(url, timeout=5)
    d.addCallback(treq.json_content)
    return d


class Run:
    """
    A supervisor of the fake Immich, and the bookkeeping to clean it up.
    """

    def __init__(
        self, tmp_path, providers=("CPUExecutionProvider",), base=None, extra=None, settings=(), **supervision
    ):
        self.port = free_port()
        self.pids_file = tmp_path / "pids"
        base = dict(os.environ if base is None else base)
        base.update(extra or {})
        base["FAKE_IMMICH_PIDS"] = str(self.pids_file)
        self.env = child_environment(base, PYTHON, "127.0.0.1", self.port, str(tmp_path / "cache"), providers, settings)
        self.probe = PingProbe(reactor, ping_url("127.0.0.1", self.port), timeout=1.0)
        arguments = dict(
            name="immich-ml",
            probe=self.probe,
            restart_delay=lambda attempt: 0.2,
            ready_interval=0.1,
            ping_interval=0.2,
            ping_failures=3,
            stop_timeout=2.0,
            start_timeout=15.0,
        )
        arguments.update(supervision)
        self.supervisor = Supervisor(
            reactor, Command((PYTHON, "-m", "immich_ml"), env=self.env, cwd=str(FAKE_ML)), **arguments
        )

    def all_pids(self):
        return [pid for pair in read_pids(self.pids_file) for pid in pair]

    @defer.inlineCallbacks
    def stop(self):
        started = self.all_pids()
        try:
            yield self.supervisor.stopService().addTimeout(TIMEOUT, reactor)
        finally:
            # The fake's processes, and anything else in their groups.
            groups = [pid for pid in self.all_pids() if not gone(pid)]
            groups += [pid for main, _ in read_pids(self.pids_file) for pid in group_members(main)]
            left = sorted(set(groups))
            kill_left(left)
        assert left == [], f"left running after stop: {left}"
        return started

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    @defer.inlineCallbacks
    def env_when_ready(self):
        """
        Start, wait until ready, and return what the server reports at /env;
        stops whatever happens.
        """
        self.supervisor.startService()
        try:
            yield self.supervisor.whenReady().addTimeout(TIMEOUT, reactor)
            seen = yield fetch_json(self.url("/env"))
        finally:
            yield self.stop()
        return seen


@pytest_twisted.inlineCallbacks
def test_environment_and_provider_order_reach_the_child(tmp_path, events):
    # The fake onnxruntime offers Core ML and the CPU, as on an Apple Silicon
    # Mac; Immich's own order would be [CoreML, CPU].
    run = Run(
        tmp_path,
        providers=("CPUExecutionProvider", "CoreMLExecutionProvider"),
        extra={"PYTHONPATH": str(FAKE_ORT)},
        settings=[("MACHINE_LEARNING_MODEL_TTL", "600"), ("MACHINE_LEARNING_WORKERS", "2")],
    )
    seen = yield run.env_when_ready()
    assert seen["providers"] == ["CPUExecutionProvider", "CoreMLExecutionProvider"]
    env = seen["env"]
    assert env["IMMICH_HOST"] == "127.0.0.1"
    assert env["IMMICH_PORT"] == str(run.port)
    assert env["MACHINE_LEARNING_CACHE_FOLDER"] == str(tmp_path / "cache")
    assert env["MACHINE_LEARNING_MODEL_TTL"] == "600"
    assert env["MACHINE_LEARNING_WORKERS"] == "2"
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [HOOK_DIR, str(FAKE_ORT)]
    # The server runs in its own process group, led by the supervised child.
    main_pid, server_pid = read_pids(run.pids_file)[0]
    assert seen["pid"] == server_pid and seen["ppid"] == main_pid
    assert seen["pgid"] == main_pid
    # Immich starts its server as plain `python`: the one given must win.
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(PYTHON)


@pytest_twisted.inlineCallbacks
def test_providers_are_filtered_to_those_wanted(tmp_path):
    run = Run(tmp_path, providers=("CoreMLExecutionProvider",), extra={"PYTHONPATH": str(FAKE_ORT)})
    seen = yield run.env_when_ready()
    assert seen["providers"] == ["CoreMLExecutionProvider"]


@pytest_twisted.inlineCallbacks
def test_ready_once_ping_answers_and_output_is_logged(tmp_path, events):
    run = Run(tmp_path)
    run.supervisor.startService()
    try:
        pid = yield run.supervisor.whenReady().addTimeout(TIMEOUT, reactor)
    finally:
        yield run.stop()
    assert pid == read_pids(run.pids_file)[0][0]
    (ready,) = tagged(events, "child-ready")
    assert ready["pid"] == pid and ready["seconds"] > 0
    output = {(e["stream"], e["line"]) for e in tagged(events, "child-output", pid=pid)}
    assert ("stdout", f"fake immich_ml listening on 127.0.0.1:{run.port}") in output
    assert ("stderr", "fake immich_ml: a line on stderr") in output


@pytest_twisted.inlineCallbacks
def test_a_crashing_child_is_restarted_with_growing_delays(tmp_path, events):
    delays = [0.1, 0.3, 0.9, 2.7]
    run = Run(
        tmp_path, extra={"FAKE_IMMICH_CRASH": "3"}, probe=None, restart_delay=lambda attempt: delays[min(attempt, 3)]
    )
    run.supervisor.startService()
    try:
        while len(tagged(events, "child-ended")) < 4:
            yield run.supervisor.whenEnded().addTimeout(TIMEOUT, reactor)
            if run.supervisor.process is None:
                # Wait for the restart, so whenEnded waits for that child.
                d = defer.Deferred()
                reactor.callLater(0.05, d.callback, None)
                yield d
    finally:
        yield run.stop()
    ended = tagged(events, "child-ended")
    assert [e["exit_code"] for e in ended[:4]] == [3, 3, 3, 3]
    scheduled = [e["delay"] for e in tagged(events, "child-restart-scheduled")]
    assert scheduled[:3] == [0.1, 0.3, 0.9]
    crashes = [e["line"] for e in tagged(events, "child-output", stream="stderr")]
    assert "fake immich_ml crashing with exit code 3" in crashes
    started = tagged(events, "child-started")
    assert len({e["pid"] for e in started}) == len(started) >= 4


@pytest_twisted.inlineCallbacks
def test_a_hung_child_is_detected_and_restarted(tmp_path, events):
    # The server answers two pings, then /ping hangs (as a stuck gunicorn).
    run = Run(tmp_path, extra={"FAKE_IMMICH_HANG_AFTER": "2"})
    run.supervisor.startService()
    try:
        first = yield run.supervisor.whenReady().addTimeout(TIMEOUT, reactor)
        second = yield run.supervisor.whenReady().addTimeout(TIMEOUT, reactor)
    finally:
        yield run.stop()
    assert second != first
    assert tagged(events, "child-unresponsive", pid=first)
    failed = tagged(events, "child-ping-failed", pid=first)
    assert [e["failures"] for e in failed] == [1, 2, 3]
    # The hung server (a grandchild) went with its parent.
    assert len(run.all_pids()) == 4


@pytest_twisted.inlineCallbacks
def test_stop_kills_a_group_that_ignores_sigterm(tmp_path, events):
    run = Run(tmp_path, extra={"FAKE_IMMICH_IGNORE_TERM": "1"}, stop_timeout=0.5)
    run.supervisor.startService()
    try:
        yield run.supervisor.whenReady().addTimeout(TIMEOUT, reactor)
    finally:
        pids = yield run.stop()
    assert len(pids) == 2
    assert tagged(events, "child-killed")
    assert not run.supervisor.running
    # Nothing is restarted after a stop.
    d = defer.Deferred()
    reactor.callLater(0.5, d.callback, None)
    yield d
    assert len(tagged(events, "child-started")) == 1
