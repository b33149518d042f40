"""
``imml-mac setup`` against a local git repository standing in for Immich
(two release tags, a machine-learning/ folder and another folder that the
sparse clone must leave out) and a fake ``uv`` on PATH.  No network.
"""

import os
import shutil
import stat
import subprocess

import pytest
from mac_helpers import FAKE_ML, PYTHON

from imml.mac import install
from imml.mac.tap import Options, run_command

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env={**os.environ, **GIT_ENV})


@pytest.fixture
def upstream(tmp_path):
    """
    A repository like Immich's: tags v1.9.0, v1.10.0 (newest) and v2.0.0-rc1.
    """
    repo = tmp_path / "immich.git"
    shutil.copytree(FAKE_ML, repo / "machine-learning")
    (repo / "server").mkdir()
    (repo / "server" / "big.ts").write_text("// not wanted\n")
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "one", cwd=repo)
    git("tag", "v1.9.0", cwd=repo)
    (repo / "machine-learning" / "VERSION").write_text("1.10.0\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "two", cwd=repo)
    git("tag", "v1.10.0", cwd=repo)
    (repo / "machine-learning" / "VERSION").write_text("2.0.0-rc1\n")
    git("commit", "-q", "-am", "three", cwd=repo)
    git("tag", "v2.0.0-rc1", cwd=repo)
    return f"file://{repo}"


@pytest.fixture
def tools(tmp_path, monkeypatch):
    """
    PATH with git and a fake uv that records its calls and makes .venv.
    """
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "uv.calls"
    uv = bindir / "uv"
    uv.write_text(
        f"#!{PYTHON}\n"
        "import os, sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "    f.write(os.getcwd() + ' ' + ' '.join(sys.argv[1:]) + '\\n')\n"
        "if os.environ.get('FAKE_UV_FAIL'):\n"
        "    print('error: no network', file=sys.stderr); sys.exit(2)\n"
        "print('Resolved 42 packages in 1ms', flush=True)\n"
        "os.makedirs('.venv/bin', exist_ok=True)\n"
        # The test interpreter, which has onnxruntime, plays the new venv's.
        "with open('.venv/bin/python', 'w') as f:\n"
        f"    f.write('#!/bin/sh\\nexec {PYTHON} \"$@\"\\n')\n"
        "os.chmod('.venv/bin/python', 0o755)\n"
        "print('Installed 42 packages in 2ms')\n"
    )
    uv.chmod(uv.stat().st_mode | stat.S_IXUSR)
    os.symlink(shutil.which("git"), bindir / "git")
    monkeypatch.setenv("PATH", str(bindir))
    for name, value in GIT_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FAKE_UV_FAIL", raising=False)
    return calls


def setup(tmp_path, *args):
    options = Options()
    options.parseOptions(["setup", "--immich", str(tmp_path / "immich-ml"), "--cache", str(tmp_path / "cache"), *args])
    lines = []
    code = run_command("setup", options.subOptions, out=lines.append)
    return code, "\n".join(lines)


def test_fresh_setup_then_rerun(tmp_path, upstream, tools):
    code, report = setup(tmp_path, "--repo", upstream)
    assert code == 0, report
    target = tmp_path / "immich-ml"
    assert "newest release: v1.10.0" in report
    assert (target / "machine-learning" / "VERSION").read_text() == "1.10.0\n"
    assert not (target / "server").exists(), "the sparse clone fetched more than machine-learning/"
    assert (target / "machine-learning" / ".venv" / "bin" / "python").exists()
    assert (tmp_path / "cache").is_dir()
    # Progress from the long steps, then a summary.
    assert "uv: Resolved 42 packages" in report
    assert "[3/4]" in report and "done in" in report
    assert f"cloned {upstream} at v1.10.0" in report
    assert "created the environment" in report and "created the model cache" in report
    assert f"twistd -n --pidfile= imml-mac --immich {target}" in report
    # Pre-flight in the new environment (here: Linux, so no Core ML).
    assert "Core ML is NOT available: this is linux" in report
    (call,) = tools.read_text().splitlines()
    assert call == f"{target / 'machine-learning'} sync --extra cpu --no-dev"

    # Again: safe, and says there was nothing to fetch.
    code, report = setup(tmp_path, "--repo", upstream)
    assert code == 0, report
    assert "is already at v1.10.0" in report
    assert "updated the environment" in report
    assert "already exists" in report
    assert len(tools.read_text().splitlines()) == 2


def test_moving_to_another_release(tmp_path, upstream, tools):
    assert setup(tmp_path, "--repo", upstream, "--ref", "v1.9.0")[0] == 0
    assert not (tmp_path / "immich-ml" / "machine-learning" / "VERSION").exists()
    code, report = setup(tmp_path, "--repo", upstream, "--ref", "v1.10.0")
    assert code == 0, report
    assert "moved" in report and "to v1.10.0" in report
    assert (tmp_path / "immich-ml" / "machine-learning" / "VERSION").read_text() == "1.10.0\n"


def test_missing_uv_says_how_to_install_it(tmp_path, upstream, tools):
    (tools.parent / "bin" / "uv").unlink()
    code, report = setup(tmp_path, "--repo", upstream)
    assert code == 1
    assert "uv is not installed" in report and "brew install uv" in report


def test_missing_git_says_how_to_install_it(tmp_path, upstream, tools):
    (tools.parent / "bin" / "git").unlink()
    code, report = setup(tmp_path, "--repo", upstream)
    assert code == 1
    assert "git is not installed" in report and "xcode-select --install" in report


def test_unknown_release(tmp_path, upstream, tools):
    code, report = setup(tmp_path, "--repo", upstream, "--ref", "v9.9.9")
    assert code == 1
    assert "git clone of" in report and "v9.9.9 failed" in report and "ls-remote" in report


def test_unreachable_repository(tmp_path, tools):
    code, report = setup(tmp_path, "--repo", f"file://{tmp_path}/nothing-here")
    assert code == 1
    assert "could not list the release tags" in report and "--ref" in report


def test_target_that_is_not_a_checkout(tmp_path, upstream, tools):
    (tmp_path / "immich-ml").mkdir()
    (tmp_path / "immich-ml" / "notes.txt").write_text("mine\n")
    code, report = setup(tmp_path, "--repo", upstream)
    assert code == 1
    assert "is not a git checkout: remove it or choose another --immich" in report


def test_uv_failure_is_reported(tmp_path, upstream, tools, monkeypatch):
    monkeypatch.setenv("FAKE_UV_FAIL", "1")
    code, report = setup(tmp_path, "--repo", upstream)
    assert code == 1
    assert "uv: error: no network" in report
    assert "sync --extra cpu --no-dev` failed" in report and "exit code 2" in report


def test_newest_release():
    assert install.newest_release(["v1.9.0", "v1.10.0", "v2.0.0-rc1", "latest"]) == "v1.10.0"
    assert install.newest_release(["nightly"]) is None


def test_stream_shows_progress_updates_and_heartbeats():
    lines = []
    code = install.stream(
        [
            PYTHON,
            "-c",
            "import sys, time; sys.stdout.write('a 1%\\ra 50%\\ra 100%\\n'); sys.stdout.flush(); "
            "time.sleep(0.5); print('late')",
        ],
        lines.append,
        label="x",
        heartbeat=0.2,
    )
    assert code == 0
    assert lines[0] == "    x: a 1%"  # the first update is shown...
    assert "    x: a 50%" not in lines  # ...then at most one a second
    assert "    x: a 100%" in lines and "    x: late" in lines
    assert any("x still running" in line for line in lines)


def test_a_plan_expands_its_folders_and_is_a_value():
    plan = install.SetupPlan(target="~/immich-ml", cache="~/cache")
    home = os.path.expanduser("~")
    assert (str(plan.target), str(plan.cache)) == (f"{home}/immich-ml", f"{home}/cache")
    assert (plan.repo, plan.ref, plan.python) == (install.DEFAULT_REPO, None, None)
    assert str(plan.venv_python) == f"{home}/immich-ml/machine-learning/.venv/bin/python"
    same = install.SetupPlan(target=plan.target, cache=plan.cache)
    assert plan == same and hash(plan) == hash(same)
    with pytest.raises(AttributeError):
        plan.ref = "v1.0.0"
