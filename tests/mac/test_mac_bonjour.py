"""
Bonjour end to end: ``twistd imml-mac`` advertises Immich ML while it
serves, and ``twistd imml-balancer --discover mdns`` finds it, sends it
requests, and drains it when the advertisement is withdrawn.

Both run as child processes inside a network namespace that the test
makes, whose loopback carries multicast: nothing is advertised on this
machine's own network.  That needs root and ``ip`` (iproute2): elsewhere
the test skips, saying why; under CI (``CI`` set, as ``.ci/run`` runs) it
fails instead.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from mac_helpers import TWISTD, imml_mac_argv

import imml
from imml.testing import ENTRIES, predict_body

#: Seconds any one thing the test waits for may take.
PATIENCE = 45.0


def _run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _unavailable():
    """
    Why a network namespace cannot be made here, or None.
    """
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    if shutil.which("ip") is None:
        return "making a network namespace needs ip (iproute2)"
    try:
        import zeroconf  # noqa: F401
    except ImportError:
        return "python-zeroconf is not installed (the test extra has it)"
    return None


@pytest.fixture
def netns():
    """
    A network namespace of the test's own: loopback up, with multicast and
    a route for it.
    """
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Bonjour test, but {reason}")
        pytest.skip(reason)
    name = f"imml-mdns-{os.getpid()}"
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot make a network namespace: {made.stderr.strip()}")
        pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        for step in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "link", "set", "lo", "multicast", "on"),
            ("ip", "route", "add", "224.0.0.0/4", "dev", "lo"),
        ):
            done = _run("ip", "netns", "exec", name, *step)
            assert done.returncode == 0, done.stderr
        yield name
    finally:
        _run("ip", "netns", "del", name)


class Child:
    """
    A child process in the namespace, its output read as it comes.
    """

    def __init__(self, ns, argv, cwd, env=None):
        self.lines = []
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self):
        return "\n".join(self.lines)

    def events(self, imml_event, **match):
        found = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("imml_event") == imml_event and all(event.get(k) == v for k, v in match.items()):
                found.append(event)
        return found

    def wait_for(self, imml_event, other=None, **match):
        """
        The first event C{imml_event} with the fields C{match}; fail when
        it does not come (C{other}: the other child, whose output helps).
        """
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline and self.process.poll() is None:
            found = self.events(imml_event, **match)
            if found:
                return found[0]
            time.sleep(0.05)
        found = self.events(imml_event, **match)
        assert found, f"no {imml_event} {match}:\n{self.output}\n--- the other:\n{other.output if other else ''}"
        return found[0]

    def said(self, text):
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline and self.process.poll() is None and text not in self.output:
            time.sleep(0.05)
        assert text in self.output, self.output

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        return self.process.returncode


class UnixHTTPConnection(http.client.HTTPConnection):
    """
    HTTP over the balancer's UNIX socket: the test, outside the namespace,
    cannot reach its loopback; a socket file it can.
    """

    def __init__(self, path):
        super().__init__("localhost", timeout=PATIENCE)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(PATIENCE)
        self.sock.connect(self.socket_path)


def predict(path):
    ctype, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8 a small picture")
    connection = UnixHTTPConnection(path)
    try:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
        answer = connection.getresponse()
        return answer.status, answer.getheader("X-Imml-Backend"), answer.read()
    finally:
        connection.close()


def balancer(ns, tmp_path):
    return Child(
        ns,
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "imml-balancer",
            "--discover",
            "mdns",
            "--listen",
            f"unix:{tmp_path / 'ml.sock'}",
            "--admin",
            "none",
            "--log-format",
            "json",
            "--health-interval",
            "0.5",
            "--health-down-interval",
            "0.5",
        ],
        cwd=tmp_path,
    )


def mac(ns, tmp_path, *extra, env=None):
    env = dict(os.environ, **(env or {}))
    env.pop("PYTHONPATH", None)
    return Child(
        ns,
        imml_mac_argv(tmp_path, "0.0.0.0", 3003, "--advertise-name", "Studio", *extra),
        cwd=tmp_path,
        env=env,
    )


def test_an_advertised_mac_joins_serves_and_drains_when_it_stops(netns, tmp_path):
    front = balancer(netns, tmp_path)
    studio = None
    try:
        front.wait_for("browsing")
        studio = mac(netns, tmp_path)
        found = front.wait_for("discovered", studio, name="Studio")
        # Its TXT records: imml's version and the providers it uses.
        assert found["version"] == imml.__version__
        assert "CPU" in found["providers"].split(","), found
        assert found["address"] == "127.0.0.1:3003"
        front.wait_for("health", studio, new="up")

        status, via, body = predict(str(tmp_path / "ml.sock"))
        assert status == 200, body
        assert "127.0.0.1:3003" in via
        assert json.loads(body) == {"clip": "[0.1,0.2,0.3]"}

        studio.stop()
        front.wait_for("discovery-gone", studio, name="Studio")
        drained = front.wait_for("drain", studio)
        assert drained["why"] == "no longer advertised"
        front.wait_for("leave", studio)
    finally:
        if studio is not None:
            studio.stop()
        front.stop()


def test_an_unhealthy_mac_is_withdrawn_and_drained(netns, tmp_path):
    """
    Immich ML stops answering its health check (it hangs after a few
    pings): imml-mac withdraws the advertisement before it restarts it,
    and the balancer drains the host.
    """
    front = balancer(netns, tmp_path)
    studio = None
    try:
        front.wait_for("browsing")
        studio = mac(netns, tmp_path, "--ping-failures", "2", env={"FAKE_IMMICH_HANG_AFTER": "6"})
        front.wait_for("discovered", studio, name="Studio")
        studio.said("stopped answering")
        front.wait_for("discovery-gone", studio, name="Studio")
        assert front.wait_for("drain", studio)["why"] == "no longer advertised"
    finally:
        if studio is not None:
            studio.stop()
        front.stop()
