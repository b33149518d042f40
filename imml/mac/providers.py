"""
The child's environment: where Immich runs, on which port, with which
providers, and how the provider choice reaches it without editing Immich.

The provider choice travels as IMML_PROVIDERS to the start-up hook in
``imml/mac/hook/sitecustomize.py``, whose folder goes first on PYTHONPATH.
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterable, Mapping, Optional, Sequence, Union

HOOK_DIR = str(pathlib.Path(__file__).with_name("hook"))
SETTING_PREFIX = "MACHINE_LEARNING_"


def setting_name(name: str) -> str:
    """
    C{MODEL_TTL} and C{MACHINE_LEARNING_MODEL_TTL} both name the same setting.
    """
    name = name.strip().upper()
    return name if name.startswith(SETTING_PREFIX) else SETTING_PREFIX + name


def child_environment(
    base: Mapping[str, str],
    python: str,
    host: str,
    port: Union[int, str],
    cache: Union[str, os.PathLike],
    providers: Optional[Sequence[str]],
    settings: Iterable[tuple[str, object]] = (),
) -> dict[str, str]:
    """
    The environment for C{python -m immich_ml}.

    @param base: the environment to start from (usually C{os.environ});
        MACHINE_LEARNING_* variables already in it pass through.
    @param python: the interpreter; its folder goes first on PATH because
        Immich's ``__main__`` starts gunicorn as plain ``python``.
    @param providers: the wanted providers, in order, or C{None} to leave
        Immich's own choice alone.
    @param settings: C{(name, value)} pairs of MACHINE_LEARNING_* settings.
    """
    env = dict(base)
    bindir = os.path.dirname(os.path.abspath(python))
    env["PATH"] = os.pathsep.join(p for p in (bindir, base.get("PATH", "")) if p)
    env["IMMICH_HOST"] = host
    env["IMMICH_PORT"] = str(port)
    env["MACHINE_LEARNING_CACHE_FOLDER"] = str(cache)
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in settings:
        env[setting_name(name)] = str(value)
    if providers:
        env["IMML_PROVIDERS"] = ",".join(providers)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (HOOK_DIR, base.get("PYTHONPATH", "")) if p)
    return env
