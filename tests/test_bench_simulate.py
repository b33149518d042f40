"""
bench/simulate.py: a short simulation prints each target's figures, the
same on every run; a mistake is a usage error before anything runs.
"""

import re
import subprocess
import sys

from support import ROOT

SIMULATE = str(ROOT / "bench" / "simulate.py")


def simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SIMULATE, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_short_simulation_reports_both_targets_and_is_the_same_twice():
    args = ("--seconds", "6", "--warm", "1", "--seeds", "2")
    first, second = simulate(*args), simulate(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    figures = dict(re.findall(r"^(imml|least_conn)\s+([\d.]+) req/s", first.stdout, re.MULTILINE))
    assert set(figures) == {"imml", "least_conn"}
    # two hosts of the real-like fleet, each busy: neither target leaves the
    # fleet idle
    assert all(float(rate) > 50 for rate in figures.values())
    assert first.stdout.count("    fast    in flight") == 2
    assert first.stdout.count("    slow    in flight") == 2


def test_the_slot_fleet_names_its_three_hosts():
    done = simulate("--fleet", "heterogeneous", "--seconds", "4", "--warm", "1", "--seeds", "1")
    assert done.returncode == 0, done.stderr
    for host in ("fast", "medium", "slow"):
        assert f"    {host:7} in flight" in done.stdout


def test_a_run_shorter_than_its_warm_up_is_refused():
    done = simulate("--seconds", "2", "--warm", "5")
    assert done.returncode == 2 and done.stdout == ""
    assert "needs --clients >= 1, --seconds > --warm and --seeds >= 1" in done.stderr.splitlines()[-1]
