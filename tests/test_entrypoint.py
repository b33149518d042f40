"""
``imml-balancer``, the container's entrypoint: IMML_STRATEGY and
IMML_CONFIG stand for their options when the command line does not give
them, a bad value is refused in one line naming the variable, and the
process becomes twistd (so that ``docker stop`` reaches it).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import fetch, free_port

from imml.entrypoint import BadVariable, given_options, options_from_environment

ENTRYPOINT = str(Path(sys.executable).with_name("imml-balancer"))


def test_the_variables_become_options(tmp_path):
    config = tmp_path / "imml.toml"
    config.write_text("")
    environ = {"IMML_STRATEGY": "round-robin", "IMML_CONFIG": str(config), "IMML_BACKENDS": "nas"}
    assert options_from_environment(["--listen", "tcp:80"], environ) == [
        "--strategy",
        "round-robin",
        "--config",
        str(config),
    ]
    assert options_from_environment([], {"IMML_STRATEGY": " ", "IMML_CONFIG": ""}) == []


@pytest.mark.parametrize(
    "argv", [["--strategy", "failover"], ["--strategy=failover"], ["-s", "failover"], ["-sfailover"]]
)
def test_the_command_line_wins_over_a_variable_even_a_bad_one(argv):
    assert given_options(argv) == {"strategy"}
    assert options_from_environment(argv, {"IMML_STRATEGY": "no-such-strategy"}) == []


def test_a_bad_strategy_names_the_variable():
    with pytest.raises(BadVariable, match="^IMML_STRATEGY: unknown strategy 'fastest'; choose one of"):
        options_from_environment([], {"IMML_STRATEGY": "fastest"})


def test_a_config_that_cannot_be_read_names_the_variable_and_the_file(tmp_path):
    missing = tmp_path / "imml.toml"
    with pytest.raises(BadVariable, match=f"^IMML_CONFIG: {missing}: cannot read it: No such file"):
        options_from_environment([], {"IMML_CONFIG": str(missing)})


def run_entrypoint(*args, env):
    return subprocess.run([ENTRYPOINT, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env})


@pytest.mark.parametrize(
    "env, says",
    [
        ({"IMML_STRATEGY": "fastest"}, "imml-balancer: IMML_STRATEGY: unknown strategy 'fastest'"),
        ({"IMML_CONFIG": "/nonexistent/imml.toml"}, "imml-balancer: IMML_CONFIG: /nonexistent/imml.toml: cannot read"),
    ],
)
def test_a_bad_variable_stops_start_up_in_one_line(env, says):
    done = run_entrypoint("--demo", "1", env=env)
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(says)


def status(port):
    body = fetch(port, "/api/status")
    return None if body is None else json.loads(body)


def test_the_container_entrypoint_runs_the_balancer_as_the_variables_say(tmp_path):
    listen, admin = free_port(), free_port()
    config = tmp_path / "imml.toml"
    config.write_text(
        f'[balancer]\nlisten = "tcp:{listen}:interface=127.0.0.1"\nadmin = "tcp:{admin}:interface=127.0.0.1"\n'
    )
    env = {**os.environ, "IMML_STRATEGY": "round-robin", "IMML_CONFIG": str(config)}
    balancer = subprocess.Popen(
        [ENTRYPOINT, "--demo", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while status(admin) is None and balancer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        seen = status(admin)
        # The process we started is twistd itself: its SIGTERM stops the balancer.
        balancer.send_signal(signal.SIGTERM)
        output, _ = balancer.communicate(timeout=30)
    finally:
        balancer.kill()
    assert seen is not None, output
    assert seen["balancer"]["strategy"] == "round-robin"
    assert seen["balancer"]["config"] == str(config)
    assert "Server Shut Down" in output
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", listen), timeout=2).close()
