"""
The README's first commands as a newcomer runs them: ``make run`` sets up a
virtual environment with imml's runtime dependencies only, in which twistd
finds both plugins and the demo runs; ``make test`` says so before it
installs a browser for the status page's test.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

from support import fetch, free_port

import imml

ROOT = Path(__file__).resolve().parent.parent
#: Packages of the test extra that the balancer does not need.
TEST_ONLY = ("pytest", "pytest_twisted", "onnxruntime", "numpy", "selenium", "build", "ruff")


def make(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_make_run_installs_the_runtime_only_and_the_demo_runs_there(tmp_path):
    venv = tmp_path / "venv"
    done = make(f"VENV={venv}", "run", "ARGS=--version")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"imml {imml.__version__}" in done.stdout
    present = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))",
            *TEST_ONLY,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert present.returncode == 0, present.stderr
    assert present.stdout.split() == []
    assert not (venv / "bin" / "ruff").exists()

    # Set up once: running again installs nothing; `make test` adds its extra.
    assert "pip install" not in make("-n", f"VENV={venv}", "run").stdout
    assert "pip install -q -e '.[test]'" in make("-n", f"VENV={venv}", "test").stdout

    # twistd finds both plugins from any folder, not only from the checkout.
    listed = subprocess.run(
        [str(venv / "bin" / "twistd"), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert "imml-balancer" in listed.stdout and "imml-mac" in listed.stdout

    # The demo, as `make run` starts it, with nothing but the runtime.
    port = free_port()
    balancer = subprocess.Popen(
        [
            str(venv / "bin" / "twistd"),
            "-n",
            "--pidfile=",
            "imml-balancer",
            "--demo",
            "2",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--admin",
            "none",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while fetch(port, "/ping") != b"pong" and balancer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        answer = fetch(port, "/ping")
    finally:
        balancer.send_signal(signal.SIGTERM)
        try:
            output, _ = balancer.communicate(timeout=30)
        finally:
            balancer.kill()
    assert answer == b"pong", output


def ensure_browser(tmp_path, uid):
    """
    Run tools/ensure-browser.sh as user C{uid} with bash, an C{id} that says
    C{uid} and an C{apt-get} that only says what it was asked on PATH: no
    chromium.
    """
    bin = tmp_path / "bin"
    bin.mkdir()
    (bin / "bash").symlink_to("/bin/bash")
    for name, script in {
        "id": f"#!/bin/bash\necho {uid}\n",
        "apt-get": '#!/bin/bash\necho "apt-get $*"\n',
    }.items():
        (bin / name).write_text(script)
        (bin / name).chmod(0o755)
    return subprocess.run(
        [str(ROOT / "tools" / "ensure-browser.sh")],
        env={"PATH": str(bin)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_browser_install_is_announced_before_it_starts(tmp_path):
    done = ensure_browser(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "installing Debian's chromium and chromium-driver" in lines[0]
    assert "apt-get install -y -q chromium chromium-driver" in lines[-1]


def test_without_root_the_browser_check_says_how_to_install_it(tmp_path):
    done = ensure_browser(tmp_path, 1000)
    assert done.returncode == 0
    assert "apt-get" not in done.stdout
    assert "sudo apt-get install chromium chromium-driver" in done.stderr
