"""
The command line: options, the LaunchAgent, the plugin, and the whole of
``twistd -n imml-mac`` run for real against the fake Immich checkout.
"""

import os
import pathlib
import plistlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mac_helpers import (
    FAKE_CHECKOUT,
    FAKE_ML,
    PYTHON,
    TWISTD,
    free_port,
    group_members,
    imml_mac_argv,
    kill_left,
    read_pids,
    wait_group_gone,
)
from twisted.copyright import version as twisted_version
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

import imml
from imml.mac import tap
from imml.mac.preflight import CORE_ML, CPU


def parse(*args):
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_defaults_and_the_checkout_or_its_folder():
    for given in (FAKE_CHECKOUT, FAKE_ML):
        options = parse("--immich", str(given))
        assert options["ml_dir"] == FAKE_ML
    assert options["python"] == str(FAKE_ML / ".venv" / "bin" / "python")
    assert (options["host"], options["port"]) == ("0.0.0.0", 3003)
    assert options["cache"] == str(pathlib.Path("~/.immich-model-cache").expanduser())
    assert options["providers"] == (CORE_ML, CPU)
    assert not options["allow-sleep"]


def test_settings_pass_through():
    options = parse(
        "--immich",
        str(FAKE_ML),
        "--model-ttl",
        "0",
        "--workers",
        "2",
        "--set",
        "PRELOAD__CLIP__TEXTUAL=ViT-B-32__openai",
        "--set",
        "MACHINE_LEARNING_REQUEST_THREADS=4",
    )
    assert dict(options.settings()) == {
        "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": "ViT-B-32__openai",
        "MACHINE_LEARNING_REQUEST_THREADS": "4",
        "MACHINE_LEARNING_MODEL_TTL": "0",
        "MACHINE_LEARNING_WORKERS": "2",
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--immich", "/nonexistent"], "neither an Immich checkout"),
        (["--immich", str(FAKE_ML), "--port", "70000"], "port"),
        (["--immich", str(FAKE_ML), "--providers", ","], "provider list is empty"),
        (["--immich", str(FAKE_ML), "--set", "TTL"], "NAME=VALUE"),
    ],
)
def test_bad_options_say_what_is_wrong(args, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(*args)


def test_a_relative_python_is_the_one_the_user_sees(tmp_path, monkeypatch):
    # Immich ML runs in its own folder: a path given from here must still
    # name the same interpreter there.
    monkeypatch.chdir(tmp_path)
    assert parse("--immich", str(FAKE_ML), "--python", "env/bin/python")["python"] == str(tmp_path / "env/bin/python")
    assert parse("--immich", str(FAKE_ML), "--python", "python3.11")["python"] == "python3.11"


def twistd_says(capsys, *args):
    """
    What C{twistd ARGS} prints before it exits (options only: no reactor).
    """
    with pytest.raises(SystemExit) as exited:
        ServerOptions().parseOptions(list(args))
    assert exited.value.code in (None, 0)
    return capsys.readouterr().out


@pytest.mark.parametrize("args", [["imml-mac"], ["imml-mac", "doctor"], ["imml-mac", "setup"], ["imml-balancer"]])
def test_version_is_immls(capsys, args):
    said = twistd_says(capsys, *args, "--version")
    assert said.startswith(f"imml {imml.__version__} (Twisted {twisted_version}, Python ")


def test_usage_lines_name_the_command(capsys):
    lines = twistd_says(capsys, "imml-mac", "--help").splitlines()
    assert lines[:2] == [
        "Usage: twistd [options] imml-mac [options]",
        "       twistd [options] imml-mac setup|doctor|launchagent [options]",
    ]
    for command, what in [
        ("setup", "Fetch Immich's machine-learning folder"),
        ("doctor", "run a tiny test model on each wanted provider"),
        ("launchagent", "Write a macOS LaunchAgent"),
    ]:
        said = twistd_says(capsys, "imml-mac", command, "--help")
        assert said.splitlines()[0] == f"Usage: twistd [options] imml-mac {command} [options]"
        assert what in " ".join(said.split())


def test_usage_lines_of_the_console_script(capsys):
    with pytest.raises(SystemExit):
        tap.main(["launchagent", "--help"])
    assert capsys.readouterr().out.splitlines()[0] == "Usage: imml-mac launchagent [options]"
    with pytest.raises(SystemExit):
        tap.main(["--help"], program="python -m imml.mac")
    assert capsys.readouterr().out.splitlines()[1] == "       python -m imml.mac setup|doctor|launchagent [options]"


def test_setup_needs_no_checkout_yet():
    options = parse("setup", "--immich", "/nonexistent/immich-ml", "--ref", "v1.2.3")
    plan = options.subOptions.plan()
    assert plan.ml_dir == pathlib.Path("/nonexistent/immich-ml/machine-learning")
    assert plan.ref == "v1.2.3"


def test_commands_exit_from_makeService(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    options = parse("launchagent", "--immich", str(FAKE_ML), "--python", PYTHON)
    with pytest.raises(SystemExit) as exited:
        tap.makeService(options)
    assert exited.value.code == 0
    assert "launchctl bootstrap" in capsys.readouterr().out


def test_launchagent(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    options = parse(
        "launchagent",
        "--immich",
        str(FAKE_CHECKOUT),
        "--python",
        PYTHON,
        "--port",
        "3004",
        "--providers",
        "CPU,CoreML",
        "--set",
        "MODEL_TTL=0",
        "--allow-sleep",
    )
    lines = []
    assert tap.run_command("launchagent", options.subOptions, out=lines.append) == 0
    path = tmp_path / "Library" / "LaunchAgents" / "app.imml.mac.plist"
    agent = plistlib.loads(path.read_bytes())
    assert agent["Label"] == "app.imml.mac"
    assert agent["KeepAlive"] is True and agent["RunAtLoad"] is True
    assert agent["StandardOutPath"] == str(tmp_path / "Library" / "Logs" / "imml-mac.log")
    assert "/usr/bin" in agent["EnvironmentVariables"]["PATH"].split(":")
    program = agent["ProgramArguments"]
    assert program[1:4] == ["-n", "--pidfile=", "imml-mac"]
    # The arguments give back the same configuration.
    again = parse(*program[4:])
    for key in ("ml_dir", "python", "host", "port", "cache", "providers", "allow-sleep"):
        assert again[key] == options.subOptions[key], key
    assert again.settings() == [("MACHINE_LEARNING_MODEL_TTL", "0")]
    report = "\n".join(lines)
    assert f"launchctl bootstrap gui/$(id -u) {path}" in report
    assert f"IMML_BACKENDS={socket.gethostname().split('.')[0]}.local:3004" in report


@pytest.mark.parametrize("platform", ["linux", "freebsd14"])
def test_launchagent_elsewhere_says_it_writes_a_file_for_macos(tmp_path, monkeypatch, platform):
    monkeypatch.setenv("HOME", str(tmp_path))
    options = parse("launchagent", "--immich", str(FAKE_ML), "--python", PYTHON)
    lines = []
    assert tap.run_command("launchagent", options.subOptions, out=lines.append, platform=platform) == 0
    assert lines[0].startswith(f"This is {platform}, not macOS: writing a LaunchAgent, a file for macOS's launchd")
    assert (tmp_path / "Library" / "LaunchAgents" / "app.imml.mac.plist").exists()


def test_launchagent_on_a_mac_says_nothing_of_the_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    options = parse("launchagent", "--immich", str(FAKE_ML), "--python", PYTHON)
    lines = []
    assert tap.run_command("launchagent", options.subOptions, out=lines.append, platform="darwin") == 0
    assert lines[0].startswith("Wrote ")
    assert "macOS" not in "\n".join(lines)


def test_the_plugin_is_found():
    names = {plugin.tapname: plugin for plugin in getPlugins(IPlugin) if hasattr(plugin, "tapname")}
    assert names["imml-mac"].module == "imml.mac.tap"


def test_python_dash_m_runs_commands(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "imml.mac",
            "doctor",
            "--immich",
            str(FAKE_ML),
            "--python",
            PYTHON,
            "--providers",
            "CPU",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    CPUExecutionProvider: ran the test model" in done.stdout


def ping(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as answer:
            return answer.read() == b"pong"
    except OSError:
        return False


def start_twistd(tmp_path, port, pids_file, extra_env=None):
    """
    ``twistd -n imml-mac`` on the fake Immich checkout, on a loopback port,
    with short health-check and stop intervals; its output in one pipe.
    """
    env = dict(os.environ, FAKE_IMMICH_PIDS=str(pids_file), **(extra_env or {}))
    env.pop("PYTHONPATH", None)
    return subprocess.Popen(
        # (Not advertised on this machine's network: test_mac_bonjour.py
        # advertises inside a network namespace of its own.)
        imml_mac_argv(tmp_path, "127.0.0.1", port, "--no-advertise"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_ping(port, twistd, timeout=30):
    """
    Whether the service answered /ping within C{timeout} seconds (while
    twistd still runs).
    """
    deadline = time.monotonic() + timeout
    while not ping(port) and time.monotonic() < deadline and twistd.poll() is None:
        time.sleep(0.1)
    return ping(port)


def test_twistd_runs_supervises_and_stops_without_orphans(tmp_path):
    port = free_port()
    pids_file = tmp_path / "pids"
    twistd = start_twistd(tmp_path, port, pids_file)
    try:
        assert wait_for_ping(port, twistd), "never answered /ping"
        # A crash of the service: the supervisor starts it again.
        ((first_main, first_server),) = read_pids(pids_file)
        os.kill(first_server, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(read_pids(pids_file)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        while not ping(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ping(port), "not back after a crash"
        time.sleep(1.2)  # let a few checks pass
    finally:
        twistd.send_signal(signal.SIGTERM)
        try:
            output, _ = twistd.communicate(timeout=20)
        finally:
            twistd.kill()
        pids = [pid for pair in read_pids(pids_file) for pid in pair]
        # Each Immich ML ran in a group led by its main process: nothing of
        # any group is left (the fake's processes, or anything imml added).
        left = [pid for main, _ in read_pids(pids_file) for pid in wait_group_gone(main, timeout=2)]
        kill_left(left)
    # twistd ends a SIGTERM shutdown by re-raising the signal on itself.
    assert twistd.returncode == -signal.SIGTERM, output
    assert "Main loop terminated" in output
    assert left == [], output
    assert len(pids) == 4
    assert "pre-flight: Core ML is NOT available: this is linux" in output
    assert "The service will use: CPUExecutionProvider" in output
    assert "not macOS (linux): skipping caffeinate" in output
    assert "is ready after" in output
    assert f"fake immich_ml listening on 127.0.0.1:{port}" in output
    assert "restarting in" in output
    assert "Starting factory" not in output, "the health checks log every connection"


@pytest.mark.parametrize(
    "extra_env", [{}, {"FAKE_IMMICH_IGNORE_TERM": "1"}], ids=["stops-on-sigterm", "ignores-sigterm"]
)
def test_immich_ml_goes_when_twistd_is_killed(tmp_path, extra_env):
    # SIGKILL gives twistd no chance to stop anything: Immich ML's process
    # group must notice by itself and go (SIGTERM, then SIGKILL after
    # --stop-timeout, 2 s here), freeing the port for the next start.
    port = free_port()
    pids_file = tmp_path / "pids"
    twistd = start_twistd(tmp_path, port, pids_file, extra_env)
    group = None
    try:
        assert wait_for_ping(port, twistd), "never answered /ping"
        ((group, server),) = read_pids(pids_file)
        assert {group, server} <= set(group_members(group))
        twistd.kill()
        output, _ = twistd.communicate(timeout=20)
        left = wait_group_gone(group, timeout=30)
    finally:
        twistd.kill()
        if group is not None:
            kill_left(group_members(group))
    assert left == [], output
    assert not ping(port)


def test_twistd_refuses_to_start_without_immich_ml(tmp_path):
    (tmp_path / "immich_ml").mkdir()  # looks like the folder, but cannot be imported
    done = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "imml-mac", "--immich", str(tmp_path), "--python", str(tmp_path / "nope")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "pre-flight failed" in done.stdout + done.stderr
    assert "imml-mac setup" in done.stdout + done.stderr
