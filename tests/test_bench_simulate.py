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


def test_a_split_fixed_in_advance_keeps_each_host_at_its_cap():
    done = simulate("--seconds", "4", "--warm", "1", "--seeds", "1", "--caps", "5,3", "--caps", "8")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("caps 5,3 ")))
    assert float(re.search(r"([\d.]+) req/s", lines[at]).group(1)) > 50
    # eight clients: five on the fast host, three on the slow one, always
    assert lines[at + 1 : at + 3] == ["    fast    in flight {5: '100%'}", "    slow    in flight {3: '100%'}"]
    # a host left out of the caps takes nothing
    at = lines.index(next(line for line in lines if line.startswith("caps 8 ")))
    assert lines[at + 2] == "    slow    in flight {0: '100%'}"


def test_caps_that_are_not_numbers_are_refused():
    done = simulate("--caps", "5,x")
    assert done.returncode == 2 and done.stdout == ""
    assert "--caps '5,x': expected numbers of requests, one a host, such as 5,3" in done.stderr.splitlines()[-1]


def test_caps_for_more_hosts_than_the_fleet_has_or_none_are_refused():
    for caps in ("5,3,2", "0,0"):
        done = simulate("--caps", caps)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.splitlines()[-1].endswith(
            f"--caps '{caps}': expected at most 2 numbers for real-light's hosts, not all 0"
        )
