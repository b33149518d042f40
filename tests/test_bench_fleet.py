"""
bench/fleet.py's options for the real Immich ML service (--immich,
--immich-python): a mistake is a usage error naming it, before anything
starts.  The runs themselves need Immich and are not tested here.
"""

import subprocess
import sys

import pytest
from support import ROOT

FLEET = str(ROOT / "bench" / "fleet.py")


def fleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, FLEET, "--no-install", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


@pytest.fixture
def checkout(tmp_path):
    """A folder shaped like Immich's machine-learning/ (nothing in it runs)."""
    (tmp_path / "immich_ml").mkdir()
    (tmp_path / "immich_ml" / "__main__.py").write_text("")
    return str(tmp_path)


def refused(done: subprocess.CompletedProcess) -> str:
    """The error line of a usage error, after checking that nothing ran."""
    assert done.returncode == 2, done
    assert done.stdout == ""
    return done.stderr.strip().splitlines()[-1]


def test_immich_needs_its_interpreter(checkout):
    line = refused(fleet("--scenarios", "real", "--immich", checkout))
    assert line.startswith("fleet.py: error: --immich needs --immich-python")


def test_an_interpreter_without_immich_is_refused():
    line = refused(fleet("--scenarios", "real", "--immich-python", sys.executable))
    assert line == "fleet.py: error: --immich-python goes with --immich"


def test_a_folder_that_is_not_immichs_is_named(tmp_path):
    line = refused(fleet("--scenarios", "real-light", "--immich", str(tmp_path), "--immich-python", sys.executable))
    assert line == f"fleet.py: error: {tmp_path} is not Immich's machine-learning/ folder (no immich_ml/__main__.py)"


def test_a_missing_interpreter_is_named(checkout, tmp_path):
    python = str(tmp_path / "no-python")
    line = refused(fleet("--scenarios", "real-heavy", "--immich", checkout, "--immich-python", python))
    assert line == f"fleet.py: error: {python} is not an interpreter"


def test_immich_without_a_real_like_scenario_is_refused(checkout):
    line = refused(fleet("--scenarios", "heterogeneous,mixed", "--immich", checkout, "--immich-python", sys.executable))
    assert line.startswith("fleet.py: error: --immich runs the real-like scenarios")
