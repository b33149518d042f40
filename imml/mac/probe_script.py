"""
Run *inside the Immich interpreter* by pre-flight and the doctor.

This file is executed as a script (``python probe_script.py facts`` or
``python probe_script.py doctor MODEL PROVIDER...``) by the interpreter that
will run ``immich_ml``, which has its own virtual environment and knows
nothing about imml.  It therefore uses only the standard library, plus
onnxruntime and numpy when they are there, and prints exactly one JSON
document on stdout.  Everything that interprets the answer lives in
:mod:`imml.mac.preflight` and :mod:`imml.mac.doctor`.
"""

# No ``from __future__ import annotations``, and annotations that any Python 3
# evaluates: this runs in an interpreter not yet checked, which may be too
# old, and pre-flight must still hear from it.

import json
import platform
import sys
import time
import traceback


def _error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def facts() -> dict:
    """
    What this interpreter can do: its version, whether ``immich_ml`` and
    onnxruntime import, and onnxruntime's available providers.
    """
    answer = {
        "python": list(sys.version_info[:3]),
        "executable": sys.executable,
        "platform": sys.platform,
        "machine": platform.machine(),
        "immich_ml": None,
        "immich_ml_error": None,
        "onnxruntime": None,
        "onnxruntime_error": None,
        "providers": [],
    }
    try:
        import immich_ml

        answer["immich_ml"] = getattr(immich_ml, "__file__", None) or "namespace"
    except Exception as exc:  # anything: a broken install raises more than ImportError
        answer["immich_ml_error"] = _error(exc)
    try:
        import onnxruntime

        answer["onnxruntime"] = getattr(onnxruntime, "__version__", "unknown")
        answer["providers"] = list(onnxruntime.get_available_providers())
    except Exception as exc:
        answer["onnxruntime_error"] = _error(exc)
    return answer


def doctor(model: str, providers: list) -> dict:
    """
    Run the tiny model once through each provider on its own and time it.

    A provider counts as having run the model only if onnxruntime kept it
    in the session (onnxruntime silently drops unavailable providers) and the
    output is right.
    """
    results = []
    try:
        import numpy
        import onnxruntime
    except Exception as exc:
        return {"error": _error(exc), "results": []}
    available = list(onnxruntime.get_available_providers())
    x = numpy.arange(-8, 8, dtype=numpy.float32).reshape(1, 16)
    expected = numpy.maximum(x * 2 + 1, 0)
    for provider in providers:
        result = {"provider": provider, "available": provider in available}
        results.append(result)
        if not result["available"]:
            continue
        try:
            started = time.perf_counter()
            session = onnxruntime.InferenceSession(model, providers=[provider])
            loaded = time.perf_counter()
            (y,) = session.run(None, {"x": x})
            finished = time.perf_counter()
        except Exception as exc:
            result["error"] = _error(exc)
            continue
        result["session_providers"] = list(session.get_providers())
        result["load_seconds"] = loaded - started
        result["run_seconds"] = finished - loaded
        result["correct"] = bool(numpy.allclose(y, expected))
    return {"onnxruntime": onnxruntime.__version__, "available": available, "results": results}


def main(argv: list) -> int:
    if argv[1:2] == ["facts"]:
        answer = facts()
    elif argv[1:2] == ["doctor"] and len(argv) >= 3:
        answer = doctor(argv[2], argv[3:])
    else:
        sys.stderr.write("usage: probe_script.py facts | doctor MODEL PROVIDER...\n")
        return 2
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
