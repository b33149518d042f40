"""
imml's start-up hook for Immich ML: limit and order execution providers.

imml-mac puts this folder first on the child's PYTHONPATH, so Python's
``site`` module imports this file at start-up in ``python -m immich_ml``,
in the gunicorn process it starts, and in every worker.  It does nothing
unless IMML_PROVIDERS is set (a comma-separated list, most preferred first).

Immich picks its providers in ``immich_ml/sessions/ort.py``::

    available = set(ort.get_available_providers())
    [p for p in SUPPORTED_PROVIDERS if p in available]

where SUPPORTED_PROVIDERS is a list in ``immich_ml/models/constants.py``
(imported by name into ``sessions/ort.py``).  The hook therefore, without
touching Immich's files:

* rewrites that list *in place* right after ``immich_ml.models.constants``
  has run, so every module that imported it by name sees the new order;
* wraps ``onnxruntime.get_available_providers`` right after onnxruntime has
  run, so it returns only the wanted providers, in the wanted order (this
  filters for any code that does not go through SUPPORTED_PROVIDERS).

Both patches are applied through an import hook, whatever the import order,
and immediately when the module is already imported.  A ``sitecustomize``
that the environment had before this one is still run afterwards.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Any, Callable

_WANTED = [p.strip() for p in os.environ.get("IMML_PROVIDERS", "").split(",") if p.strip()]


def _say(message: str) -> None:
    sys.stderr.write(f"imml provider hook [{os.getpid()}]: {message}\n")


def _patch_constants(module: types.ModuleType) -> None:
    listed = getattr(module, "SUPPORTED_PROVIDERS", None)
    if isinstance(listed, list):
        listed[:] = list(_WANTED)
        _say(f"SUPPORTED_PROVIDERS set to {listed}")


def _patch_onnxruntime(module: types.ModuleType) -> None:
    original = getattr(module, "get_available_providers", None)
    if original is None or getattr(original, "_imml_wrapped", False):
        return

    def get_available_providers() -> list[str]:
        available = list(original())
        return [p for p in _WANTED if p in available]

    get_available_providers._imml_wrapped = True
    get_available_providers.__wrapped__ = original
    module.get_available_providers = get_available_providers


_PATCHES = {
    "immich_ml.models.constants": _patch_constants,
    "onnxruntime": _patch_onnxruntime,
}


class _PatchingLoader(importlib.abc.Loader):
    """
    Run the real loader, then the patch; delegate everything else.
    """

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[types.ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        name: str,
        path: Any,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def _chain_previous_sitecustomize() -> None:
    """
    Run the sitecustomize that this file hides, if the environment has one.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        _say(f"the environment's own sitecustomize failed: {exc!r}")


def _install() -> None:
    if not _WANTED:
        return
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


import importlib.util  # noqa: E402  (used by _chain_previous_sitecustomize)

_install()
_chain_previous_sitecustomize()
