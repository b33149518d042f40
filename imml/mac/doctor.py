"""
``imml-mac doctor``: pre-flight, then run a tiny ONNX model through each
wanted provider in the Immich interpreter and say whether it ran and how
long it took.

The model (``tiny.onnx``, made by ``tools/make_tiny_onnx.py``) computes
``relu(2x + 1)`` on 16 floats; a provider passes if onnxruntime kept it in
the session and the answer is right.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Optional, Sequence

from attrs import frozen

from imml.mac.interpreter import Interpreter, ProbeError
from imml.mac.preflight import Verdict, assess

MODEL = pathlib.Path(__file__).with_name("tiny.onnx")


@frozen
class ProviderRun:
    """
    How one provider did on the tiny model.
    """

    provider: str
    ran: bool
    detail: str
    load_seconds: Optional[float] = None
    run_seconds: Optional[float] = None


def interpret(answer: dict) -> list[ProviderRun]:
    """
    Turn the probe script's doctor answer into L{ProviderRun}s.
    """
    runs = []
    for result in answer.get("results", []):
        provider = result["provider"]
        if not result.get("available"):
            runs.append(ProviderRun(provider, False, "not available in this onnxruntime"))
        elif result.get("error"):
            runs.append(ProviderRun(provider, False, f"failed: {result['error']}"))
        elif provider not in result.get("session_providers", []):
            runs.append(
                ProviderRun(
                    provider,
                    False,
                    f"onnxruntime dropped it (session used {result.get('session_providers')})",
                )
            )
        elif not result.get("correct"):
            runs.append(ProviderRun(provider, False, "ran but computed a wrong answer"))
        else:
            runs.append(
                ProviderRun(
                    provider,
                    True,
                    "ran",
                    load_seconds=result["load_seconds"],
                    run_seconds=result["run_seconds"],
                )
            )
    return runs


def report_lines(verdict: Verdict, runs: Sequence[ProviderRun]) -> list[str]:
    """
    The doctor's report, one line each, for a terminal.
    """
    lines = [f"  ok    {note}" for note in verdict.notes]
    lines += [f"  FAIL  {problem}" for problem in verdict.problems]
    for run in runs:
        if run.ran:
            lines.append(
                f"  ok    {run.provider}: ran the test model in "
                f"{run.run_seconds * 1000:.2f} ms (session set-up {run.load_seconds * 1000:.1f} ms)"
            )
        else:
            lines.append(f"  FAIL  {run.provider}: {run.detail}")
    return lines


def run_doctor(
    interpreter: Interpreter,
    wanted: Sequence[str],
    model: pathlib.Path = MODEL,
    out: Callable[[str], object] = print,
) -> int:
    """
    Pre-flight and the model run; print the report with C{out}.

    @return: 0 if pre-flight passed and every wanted provider that is
        available ran the model; 1 otherwise.
    """
    out(f"imml-mac doctor: {interpreter.python} in {interpreter.cwd}")
    try:
        verdict = assess(interpreter.ask("facts"), wanted)
    except ProbeError as exc:
        out(f"  FAIL  {exc}")
        return 1
    runs = []
    if not verdict.problems:
        try:
            answer = interpreter.ask("doctor", str(model), *wanted)
        except ProbeError as exc:
            out(f"  FAIL  {exc}")
            return 1
        if answer.get("error"):
            out(f"  FAIL  could not run the test model: {answer['error']}")
            return 1
        runs = interpret(answer)
    for line in report_lines(verdict, runs):
        out(line)
    broken = [run for run in runs if not run.ran and run.provider in verdict.providers]
    return 1 if verdict.problems or broken or not any(run.ran for run in runs) else 0
