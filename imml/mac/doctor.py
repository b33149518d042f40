"""
``imml-mac doctor``: pre-flight, then run a tiny ONNX model through each
wanted provider in the Immich interpreter and say whether it ran and how
long it took.

The model (``tiny.onnx``, made by ``tools/make_tiny_onnx.py``) computes
``relu(2x + 1)`` on 16 floats; a provider passes if onnxruntime kept it in
the session and the answer is right.

The exit status is 0 only when the service would run as asked: on the
first of the wanted providers (Core ML, by default), with every wanted
provider that is there running the model.  The service itself still starts
on the CPU without Core ML; the doctor says so and why, and exits 1.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Optional, Sequence

from attrs import frozen

from imml.mac.interpreter import Interpreter, ProbeError
from imml.mac.preflight import Verdict, assess, unavailable_because

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
    lines += [f"  WARN  {warning}" for warning in verdict.warnings]
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

    @return: 0 if pre-flight passed, the most preferred provider is
        available, and every wanted provider that is available ran the
        model; 1 otherwise.
    """
    out(f"imml-mac doctor: {interpreter.python} in {interpreter.cwd}")
    try:
        facts = interpreter.ask("facts")
        verdict = assess(facts, wanted)
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
    out(conclusion(facts, verdict, runs, wanted))
    return 0 if ready(verdict, runs, wanted) else 1


def ready(verdict: Verdict, runs: Sequence[ProviderRun], wanted: Sequence[str]) -> bool:
    """
    Whether the service would run as asked: pre-flight passed, it would use
    the most preferred provider, and every provider it would use ran the
    test model.
    """
    broken = [run for run in runs if not run.ran and run.provider in verdict.providers]
    preferred = bool(verdict.providers) and verdict.providers[0] == wanted[0]
    return not verdict.problems and not broken and preferred and any(run.ran for run in runs)


def conclusion(facts: dict, verdict: Verdict, runs: Sequence[ProviderRun], wanted: Sequence[str]) -> str:
    """
    The doctor's last line: ready, or why not and what to do.
    """
    if ready(verdict, runs, wanted):
        return f"Ready: the service will run on {', '.join(verdict.providers)}."
    if verdict.problems or not verdict.providers:
        return "Not ready: the service cannot start; fix what FAIL says above."
    if verdict.providers[0] != wanted[0]:
        short = ",".join(p.removesuffix("ExecutionProvider") for p in verdict.providers)
        return (
            f"Not as asked: {wanted[0]}, the first of --providers, is not available "
            f"({unavailable_because(facts, wanted[0])}), so the service would run on "
            f"{', '.join(verdict.providers)}. Fix that, or accept it with --providers {short}."
        )
    return "Not ready: a provider the service would use did not run the test model; see FAIL above."
