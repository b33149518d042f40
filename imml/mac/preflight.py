"""
Pre-flight: can this interpreter run Immich ML, and on which providers?

:func:`assess` is a pure function of the facts that
:mod:`imml.mac.probe_script` reports from inside the Immich interpreter and
of the providers the user wants.  It never refuses to start because Core ML
is missing: it warns plainly and the service runs on the CPU.
"""

from __future__ import annotations

from typing import Sequence

from attrs import field, frozen

CORE_ML = "CoreMLExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (CORE_ML, CPU)
MIN_PYTHON = (3, 11)


@frozen
class Verdict:
    """
    The outcome of pre-flight.

    @ivar problems: what stops the service from starting, each saying what
        to fix.  Empty when it can start.
    @ivar notes: what the user should know (versions, what onnxruntime
        offers, the providers the service will use).
    @ivar coreml: whether onnxruntime offers the Core ML provider.
    @ivar providers: the providers the service will use, in order.
    @ivar warnings: what does not stop the service but keeps it from
        running as asked (no Core ML, a wanted provider skipped), each
        saying why.
    """

    problems: tuple = field(converter=tuple)
    notes: tuple = field(converter=tuple)
    coreml: bool
    providers: tuple = field(converter=tuple)
    warnings: tuple = field(converter=tuple, default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_providers(text: str) -> tuple[str, ...]:
    """
    Split a comma-separated provider list, accepting short names such as
    C{CoreML} or C{cpu} for C{CoreMLExecutionProvider} / C{CPUExecutionProvider}.
    """
    names = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.endswith("ExecutionProvider"):
            known = {p[: -len("ExecutionProvider")].lower(): p for p in KNOWN_PROVIDERS}
            part = known.get(part.lower(), part + "ExecutionProvider")
        if part not in names:
            names.append(part)
    if not names:
        raise ValueError("the provider list is empty")
    return tuple(names)


KNOWN_PROVIDERS = (
    "CUDAExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    CORE_ML,
    CPU,
)


def unavailable_because(facts: dict, provider: str) -> str:
    """
    Why the interpreter the C{facts} describe cannot use C{provider}.
    """
    where = facts.get("platform", "?")
    machine = facts.get("machine", "?")
    runtime = f"onnxruntime {facts.get('onnxruntime')} in {facts.get('executable')}"
    if provider != CORE_ML:
        return f"{runtime} does not offer it"
    if where != "darwin":
        return f"this is {where} ({machine}); Core ML exists only on macOS"
    if machine != "arm64":
        return (
            f"this Python runs as {machine}: on an Intel Mac there is no Neural "
            f"Engine, and on an Apple Silicon Mac this Python runs under Rosetta "
            f"(install an arm64 Python and re-run `imml-mac setup`)"
        )
    return f"{runtime} was built without it (a wrong wheel: reinstall with `uv sync --extra cpu --no-dev`)"


def assess(facts: dict, wanted: Sequence[str] = DEFAULT_PROVIDERS) -> Verdict:
    """
    Judge the facts reported by the probe script.

    @param facts: the dictionary printed by C{probe_script.py facts}.
    @param wanted: the providers the user allows, in order of preference.
    """
    problems, notes, warnings = [], [], []
    version = tuple(facts.get("python") or ())
    shown = ".".join(str(part) for part in version) or "unknown"
    executable = facts.get("executable", "?")
    if version[:2] < MIN_PYTHON:
        problems.append(
            f"Python {shown} at {executable} is too old: Immich ML needs Python "
            f">= 3.11. Re-run `imml-mac setup` (uv creates the environment with "
            f"a suitable Python) or pass --python."
        )
    else:
        notes.append(f"Python {shown} at {executable}")
    if facts.get("immich_ml_error"):
        problems.append(
            f"immich_ml cannot be imported: {facts['immich_ml_error']}. Check that "
            f"--immich points at an Immich checkout (or its machine-learning/ "
            f"folder) and that its dependencies are installed: `imml-mac setup`, "
            f"or `uv sync --extra cpu --no-dev` in that folder."
        )
    else:
        notes.append(f"immich_ml importable ({facts.get('immich_ml')})")
    available = list(facts.get("providers") or ())
    if facts.get("onnxruntime_error"):
        problems.append(
            f"onnxruntime cannot be imported: {facts['onnxruntime_error']}. "
            f"Install Immich's dependencies: `uv sync --extra cpu --no-dev`."
        )
    else:
        notes.append(f"onnxruntime {facts.get('onnxruntime')} offers: {', '.join(available) or 'nothing'}")
    coreml = CORE_ML in available
    if coreml:
        notes.append("Core ML is available: models can run on the Neural Engine and GPU.")
    elif not facts.get("onnxruntime_error"):
        warnings.append(
            f"Core ML is NOT available: {unavailable_because(facts, CORE_ML)}. The service will run on the CPU."
        )
    chosen = [p for p in wanted if p in available]
    for provider in wanted:
        if provider not in available and provider != CORE_ML and not facts.get("onnxruntime_error"):
            warnings.append(f"{provider} was asked for but is not available: skipped.")
    if not chosen and available:
        if CPU in available:
            chosen = [CPU]
            warnings.append(f"None of the wanted providers ({', '.join(wanted)}) is available: using {CPU}.")
        else:
            problems.append(f"None of the wanted providers ({', '.join(wanted)}) is available and there is no {CPU}.")
    if chosen:
        notes.append(f"The service will use: {', '.join(chosen)}")
    return Verdict(problems=problems, notes=notes, coreml=coreml, providers=chosen, warnings=warnings)
