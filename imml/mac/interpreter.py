"""
Running :mod:`imml.mac.probe_script` in the Immich interpreter.

Pre-flight and the doctor both ask the interpreter that will run
``immich_ml`` (not the one running twistd) what it can do: it has its own
virtual environment, its own onnxruntime wheel and its own providers.  The
script is passed with ``-c`` so that, as with ``python -m immich_ml``, the
working directory (Immich's ``machine-learning/`` folder) is first on the
import path and nothing of imml's is.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any, Callable

from attrs import field, frozen

SCRIPT = pathlib.Path(__file__).with_name("probe_script.py")


class ProbeError(Exception):
    """
    The interpreter could not be run or gave no answer: the message says
    what to fix.
    """


@frozen
class Interpreter:
    """
    The interpreter, environment and folder the service will run with.
    """

    python: str
    cwd: str
    env: dict = field(factory=dict, hash=False)

    def ask(
        self,
        *args: str,
        timeout: float = 120.0,
        run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    ) -> Any:
        """
        Run the probe script with C{args} and return its JSON answer.
        """
        argv = [self.python, "-c", SCRIPT.read_text(), *args]
        try:
            done = run(
                argv,
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except FileNotFoundError:
            raise ProbeError(
                f"the Python interpreter {self.python} does not exist: run "
                f"`imml-mac setup` to create Immich's virtual environment, or "
                f"pass --python"
            ) from None
        except PermissionError:
            raise ProbeError(f"{self.python} is not executable: pass --python") from None
        except subprocess.TimeoutExpired:
            raise ProbeError(f"{self.python} did not answer within {timeout:.0f} s") from None
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise ProbeError(
                f"{self.python} failed (exit code {done.returncode}): {done.stderr.strip()[-2000:] or 'no output'}"
            )
        try:
            return json.loads(lines[-1])
        except ValueError:
            raise ProbeError(f"{self.python} gave an answer that is not JSON: {lines[-1]!r}") from None
