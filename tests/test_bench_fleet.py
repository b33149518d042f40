"""
bench/fleet.py: its options for the real Immich ML service (--immich,
--immich-python) and --rounds, a mistake a usage error naming it before
anything starts; and the figures of several rounds put together.  The runs
themselves need nginx, HAProxy or Immich and are not tested here.
"""

import argparse
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


@pytest.mark.parametrize("rounds", ["0", "21"])
def test_rounds_out_of_bounds_are_refused(rounds):
    line = refused(fleet("--scenarios", "real-light", "--rounds", rounds))
    assert line == "fleet.py: error: --rounds 1-20"


@pytest.fixture
def figures():
    """bench/fleet.py as a module, for its figures' arithmetic."""
    path = list(sys.path)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fleet as module
    finally:
        sys.path[:] = path
    return module


def case(rps, p99, errors, shares, max_ms, kinds=None):
    return {
        "requests": 100,
        "errors": errors,
        "error_kinds": kinds or {},
        "image_rps": rps,
        "image_p99_ms": p99,
        "image_max_ms": max_ms,
        "image_hosts": shares,
        "cpu_us_per_request": 600.0,
        "probe": {"round": rps},
    }


def test_rounds_give_medians_counts_added_up_and_the_largest_maximum(figures):
    runs = [
        case(120.0, 110.0, 0, {"fast": 0.8, "slow": 0.2}, 300.0),
        case(100.0, 180.0, 2, {"fast": 0.9, "slow": 0.1}, 900.0, {"timeout": 2}),
        case(110.0, 100.0, 1, {"fast": 1.0}, 250.0, {"timeout": 1}),
    ]
    got = figures.combine(runs)
    assert got["image_rps"] == 110.0
    assert got["image_p99_ms"] == 110.0
    assert got["requests"] == 300
    assert got["errors"] == 3
    assert got["error_kinds"] == {"timeout": 3}
    assert got["image_max_ms"] == 900.0
    assert got["image_hosts"] == {"fast": 0.9, "slow": 0.1}
    assert got["each_round"]["image_rps"] == [120.0, 100.0, 110.0]
    assert got["probe"] == {"round": 110.0}


def test_one_round_is_reported_as_it_ran(figures):
    run = case(120.0, 110.0, 0, {"fast": 1.0}, 300.0)
    assert figures.combine([run]) is run


def test_the_real_verdict_gives_each_rounds_ratio_beside_the_medians(figures):
    mine = figures.combine([case(90.0, 80.0, 0, {}, 1.0), case(120.0, 90.0, 0, {}, 1.0), case(100.0, 85.0, 0, {}, 1.0)])
    peer = figures.combine(
        [case(100.0, 200.0, 0, {}, 1.0), case(100.0, 210.0, 0, {}, 1.0), case(100.0, 190.0, 0, {}, 1.0)]
    )
    text, ok, ratio = figures.real_verdict(mine, [peer], None)
    assert ratio == 1.0
    assert ok
    assert "req/s by round 0.90, 1.20, 1.00 x" in text


def test_a_failed_round_keeps_its_place_and_fails_the_verdict(figures):
    mine = figures.combine([case(90.0, 80.0, 0, {}, 1.0), None, case(110.0, 90.0, 0, {}, 1.0)])
    peer = figures.combine([None, case(100.0, 200.0, 0, {}, 1.0), case(100.0, 210.0, 0, {}, 1.0)])
    assert mine["each_round"]["image_rps"] == [90.0, None, 110.0]
    assert mine["image_rps"] == 100.0
    assert mine["failed_rounds"] == 1
    text, ok, ratio = figures.real_verdict(mine, [peer], None)
    assert "req/s by round -, -, 1.10 x" in text
    verdict = figures.verdicts(
        {"real-light": {"imml:shortest-delay": mine, "nginx": peer}}, ["nginx", "imml:shortest-delay"]
    )
    text, ok, _ = verdict["imml:shortest-delay"]["real-light"]
    assert not ok and text.endswith("1 round failed")
    assert figures.combine([None, None]) is None


def test_a_round_without_a_figure_does_not_hide_the_others(figures):
    runs = [case(100.0, 50.0, 0, {}, 1.0), case(100.0, 60.0, 0, {}, 1.0), case(100.0, None, 0, {}, 1.0)]
    del runs[2]["probe"]
    got = figures.combine(runs)
    assert got["image_p99_ms"] == 55.0
    assert got["probe"] == {"round": 100.0}
    assert got["each_round"]["image_p99_ms"] == [50.0, 60.0, None]


def test_a_round_of_nothing_shows_in_the_ratios(figures):
    mine = figures.combine([case(0.0, 80.0, 0, {}, 1.0), case(100.0, 90.0, 0, {}, 1.0)])
    peer = figures.combine([case(100.0, 200.0, 0, {}, 1.0), case(100.0, 210.0, 0, {}, 1.0)])
    text, _, _ = figures.real_verdict(mine, [peer], None)
    assert "req/s by round 0.00, 1.00 x" in text


def test_each_scenario_and_each_round_starts_one_target_later(figures):
    order = list(figures.cases(["a", "b"], ["x", "y", "z"], 2))
    assert order == [
        (0, "a", "x"), (0, "a", "y"), (0, "a", "z"),
        (0, "b", "y"), (0, "b", "z"), (0, "b", "x"),
        (1, "a", "y"), (1, "a", "z"), (1, "a", "x"),
        (1, "b", "z"), (1, "b", "x"), (1, "b", "y"),
    ]  # fmt: skip


def test_another_checkout_without_imml_is_refused(tmp_path):
    line = refused(fleet("--scenarios", "real-light", "--imml-from", str(tmp_path)))
    assert line == f"fleet.py: error: --imml-from {tmp_path}: no imml package there"


def test_another_checkout_s_imml_is_named_apart_in_the_tables(figures):
    assert figures.label("imml:shortest-delay+from") == "imml shortest-delay (from)"
    assert figures.label("imml:shortest-delay") == "imml shortest-delay"


@pytest.mark.parametrize("given", ["5", "5,0", "five,3", "5,3,1", "-1,3"])
def test_slots_for_the_diagnostic_that_are_not_two_counts_are_refused(given):
    line = refused(fleet("--scenarios", "real-light-8", f"--slots-diagnostic={given}"))
    assert line == f"fleet.py: error: --slots-diagnostic {given}: give the fast and the slow host's slots, e.g. 5,3"


def test_the_diagnostic_gives_the_real_like_hosts_the_split_it_names(figures):
    parser = argparse.ArgumentParser()
    assert figures.diagnostic_slots(parser, "") == figures.DIAGNOSTIC_SLOTS
    split = figures.diagnostic_slots(parser, "5,3")
    assert split == {"light": (5, 3), "heavy": (5, 3)}
    hosts = figures.real_fleet("light", split["light"])
    assert [(name, slots) for name, slots, *_ in hosts] == [("fast", 5), ("slow", 3)]
    # the same processors as the fleet the scenarios run by default
    assert [h[4] for h in hosts] == [h[4] for h in figures.REAL_FLEETS["light"]]
