"""
Pre-flight and the doctor: the pure verdict, and real runs of the probe
script in an interpreter (the test one, which has onnxruntime but, being on
Linux, no Core ML) against the fake Immich checkout.
"""

import os
import sys

import pytest
from mac_helpers import FAKE_ML, FAKE_ORT, PYTHON

from imml.mac.doctor import MODEL, conclusion, interpret, ready, run_doctor
from imml.mac.interpreter import Interpreter, ProbeError
from imml.mac.preflight import CORE_ML, CPU, assess, parse_providers

MAC_FACTS = {
    "python": [3, 11, 9],
    "executable": "/Users/me/immich-ml/machine-learning/.venv/bin/python",
    "platform": "darwin",
    "machine": "arm64",
    "immich_ml": "/Users/me/immich-ml/machine-learning/immich_ml/__init__.py",
    "immich_ml_error": None,
    "onnxruntime": "1.20.1",
    "onnxruntime_error": None,
    "providers": [CORE_ML, "AzureExecutionProvider", CPU],
}


RAN = {
    "available": True,
    "session_providers": [CORE_ML, CPU],
    "correct": True,
    "load_seconds": 0.01,
    "run_seconds": 0.001,
}


def facts(**changes):
    return {**MAC_FACTS, **changes}


def test_apple_silicon_with_coreml():
    verdict = assess(MAC_FACTS)
    assert verdict.ok and verdict.coreml
    assert verdict.providers == (CORE_ML, CPU)
    assert any("Core ML is available" in note for note in verdict.notes)


@pytest.mark.parametrize(
    "changes, hint",
    [
        (dict(platform="linux", machine="x86_64"), "only on macOS"),
        (dict(machine="x86_64"), "Rosetta"),
        (dict(), "wrong wheel"),
    ],
)
def test_missing_coreml_is_said_plainly_and_runs_on_cpu(changes, hint):
    verdict = assess(facts(providers=[CPU], **changes))
    assert verdict.ok and not verdict.coreml
    assert verdict.providers == (CPU,)
    (warning,) = [w for w in verdict.warnings if "Core ML is NOT available" in w]
    assert hint in warning and "run on the CPU" in warning


def test_old_python_and_missing_immich_ml_are_problems_with_a_fix():
    verdict = assess(facts(python=[3, 10, 4], immich_ml_error="ModuleNotFoundError: No module named 'immich_ml'"))
    assert not verdict.ok
    assert len(verdict.problems) == 2
    assert ">= 3.11" in verdict.problems[0] and "imml-mac setup" in verdict.problems[0]
    assert "No module named 'immich_ml'" in verdict.problems[1]
    assert "uv sync --extra cpu --no-dev" in verdict.problems[1]


def test_missing_onnxruntime_is_a_problem():
    verdict = assess(facts(onnxruntime=None, providers=[], onnxruntime_error="ModuleNotFoundError: onnxruntime"))
    assert not verdict.ok
    assert "onnxruntime cannot be imported" in verdict.problems[0]


def test_order_is_the_users_and_none_available_falls_back_to_cpu():
    assert assess(MAC_FACTS, (CPU, CORE_ML)).providers == (CPU, CORE_ML)
    verdict = assess(MAC_FACTS, ("CUDAExecutionProvider",))
    assert verdict.providers == (CPU,)
    assert any("CUDAExecutionProvider was asked for but is not available" in w for w in verdict.warnings)
    assert any("None of the wanted providers" in w for w in verdict.warnings)


def test_short_provider_names():
    assert parse_providers("coreml, CPU") == (CORE_ML, CPU)
    assert parse_providers("CPUExecutionProvider,CPUExecutionProvider") == (CPU,)
    with pytest.raises(ValueError):
        parse_providers(" , ")


def env_without_hook(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IMML_PROVIDERS")}
    env.update(extra)
    return env


def test_real_probe_on_linux_reports_missing_coreml():
    answer = Interpreter(PYTHON, str(FAKE_ML), env_without_hook()).ask("facts")
    assert answer["immich_ml"].startswith(str(FAKE_ML))
    assert answer["python"][:2] == list(sys.version_info[:2])
    assert CPU in answer["providers"]
    verdict = assess(answer)
    assert verdict.ok and not verdict.coreml
    assert verdict.providers == (CPU,)
    assert any("Core ML is NOT available: this is linux" in w for w in verdict.warnings)


def test_real_probe_where_immich_ml_is_missing(tmp_path):
    answer = Interpreter(PYTHON, str(tmp_path), env_without_hook()).ask("facts")
    verdict = assess(answer)
    assert not verdict.ok
    assert "immich_ml cannot be imported" in verdict.problems[0]


def test_a_missing_interpreter_says_to_run_setup(tmp_path):
    with pytest.raises(ProbeError, match="imml-mac setup"):
        Interpreter(str(tmp_path / "nope" / "python"), str(FAKE_ML), {}).ask("facts")


def test_doctor_runs_the_tiny_model_on_the_cpu_for_real():
    assert MODEL.stat().st_size < 1000
    lines = []
    code = run_doctor(Interpreter(PYTHON, str(FAKE_ML), env_without_hook()), (CPU,), out=lines.append)
    report = "\n".join(lines)
    assert code == 0, report
    (cpu,) = [line for line in lines if line.startswith(f"  ok    {CPU}: ran the test model in")]
    assert float(cpu.split(" in ")[1].split(" ms")[0]) >= 0
    assert lines[-1] == f"Ready: the service will run on {CPU}."


def test_doctor_fails_when_the_preferred_provider_is_missing_and_says_why():
    # On Linux, as on a Mac whose onnxruntime lacks Core ML: the service
    # would run on the CPU, not as asked.
    lines = []
    code = run_doctor(Interpreter(PYTHON, str(FAKE_ML), env_without_hook()), (CORE_ML, CPU), out=lines.append)
    report = "\n".join(lines)
    assert code == 1, report
    assert f"  ok    {CPU}: ran the test model in" in report
    assert f"  FAIL  {CORE_ML}: not available in this onnxruntime" in report
    assert "  WARN  Core ML is NOT available: this is linux" in report
    assert lines[-1].startswith(f"Not as asked: {CORE_ML}, the first of --providers, is not available")
    assert "Core ML exists only on macOS" in lines[-1]
    assert lines[-1].endswith("accept it with --providers CPU.")


def test_the_doctors_verdict_on_a_mac():
    with_coreml = interpret({"results": [{**RAN, "provider": p} for p in (CORE_ML, CPU)]})
    assert ready(assess(MAC_FACTS), with_coreml, (CORE_ML, CPU))
    assert conclusion(MAC_FACTS, assess(MAC_FACTS), with_coreml, (CORE_ML, CPU)) == (
        f"Ready: the service will run on {CORE_ML}, {CPU}."
    )
    # An onnxruntime wheel without Core ML: the reason names the wheel.
    cpu_only = facts(providers=[CPU])
    runs = interpret({"results": [{"provider": CORE_ML, "available": False}, {**RAN, "provider": CPU}]})
    assert not ready(assess(cpu_only), runs, (CORE_ML, CPU))
    assert "was built without it" in conclusion(cpu_only, assess(cpu_only), runs, (CORE_ML, CPU))
    # Asking for the CPU first is as asked, Core ML or not.
    assert ready(assess(cpu_only, (CPU,)), runs[1:], (CPU,))


def test_doctor_answer_interpretation():
    runs = interpret(
        {
            "results": [
                {"provider": CORE_ML, "available": True, "session_providers": [CPU]},
                {
                    "provider": CPU,
                    "available": True,
                    "session_providers": [CPU],
                    "correct": False,
                    "load_seconds": 0.01,
                    "run_seconds": 0.001,
                },
                {"provider": "X", "available": True, "error": "boom"},
            ]
        }
    )
    assert [(r.provider, r.ran) for r in runs] == [(CORE_ML, False), (CPU, False), ("X", False)]
    assert "dropped" in runs[0].detail and "wrong answer" in runs[1].detail and "boom" in runs[2].detail


def test_doctor_fails_when_immich_ml_is_missing(tmp_path):
    lines = []
    code = run_doctor(Interpreter(PYTHON, str(tmp_path), env_without_hook()), (CPU,), out=lines.append)
    assert code == 1
    assert any("FAIL  immich_ml cannot be imported" in line for line in lines)


def test_doctor_with_a_fake_coreml_onnxruntime_that_cannot_run_models():
    # The fake onnxruntime offers Core ML but has no InferenceSession.
    lines = []
    env = env_without_hook(PYTHONPATH=str(FAKE_ORT))
    code = run_doctor(Interpreter(PYTHON, str(FAKE_ML), env), (CORE_ML,), out=lines.append)
    assert code == 1
    assert any("Core ML is available" in line for line in lines)
    assert any(line.startswith(f"  FAIL  {CORE_ML}: failed:") for line in lines)
