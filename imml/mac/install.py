"""
``imml-mac setup``: the manual recipe, as one re-runnable command.

1. check that git and uv are installed;
2. fetch Immich's ``machine-learning/`` folder at a release tag (the newest
   ``vX.Y.Z`` unless ``--ref`` says otherwise) with a shallow, sparse clone,
   or move an existing checkout to that tag;
3. create its virtual environment: ``uv sync --extra cpu --no-dev``;
4. create the model cache folder.

Every step says what it did (or that there was nothing to do), the long
ones stream their tool's output with a heartbeat, and a failure raises
:class:`SetupError` whose message says what to install or fix.  This is a
command-line step, not a service: it runs synchronously, before any reactor.
"""

from __future__ import annotations

import os
import pathlib
import queue
import re
import shutil
import subprocess
import threading
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

from attrs import field, frozen

DEFAULT_REPO = "https://github.com/immich-app/immich.git"
DEFAULT_TARGET = "~/immich-ml"
DEFAULT_CACHE = "~/.immich-model-cache"
SPARSE_FOLDER = "machine-learning"
_TAG = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


class SetupError(Exception):
    """
    A step failed; the message says what to install or fix.
    """


def _expanded(path: Union[str, os.PathLike]) -> pathlib.Path:
    return pathlib.Path(path).expanduser()


@frozen
class SetupPlan:
    """
    What ``imml-mac setup`` does, from its options.
    """

    target: pathlib.Path = field(converter=_expanded)
    cache: pathlib.Path = field(converter=_expanded)
    repo: str = DEFAULT_REPO
    ref: Optional[str] = None
    python: Optional[str] = None

    @property
    def ml_dir(self) -> pathlib.Path:
        return self.target / SPARSE_FOLDER

    @property
    def venv_python(self) -> pathlib.Path:
        return self.ml_dir / ".venv" / "bin" / "python"


def newest_release(tags: Iterable[str]) -> Optional[str]:
    """
    The highest C{vX.Y.Z} among C{tags} (release candidates and other names
    are ignored), or C{None}.
    """
    releases = [(tuple(int(n) for n in m.groups()), t) for t in tags if (m := _TAG.match(t))]
    return max(releases)[1] if releases else None


def stream(
    argv: Sequence[str],
    out: Callable[[str], object],
    cwd: Optional[pathlib.Path] = None,
    env: Optional[Mapping[str, str]] = None,
    label: Optional[str] = None,
    heartbeat: float = 15.0,
) -> int:
    """
    Run C{argv}, printing its output as it comes (progress updates that end
    in a carriage return at most once a second) and a heartbeat line when it
    is silent for C{heartbeat} seconds.  Returns the exit code.
    """
    label = label or os.path.basename(argv[0])
    started = time.monotonic()
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    pieces = queue.Queue()

    def read() -> None:
        buffer = b""
        while chunk := process.stdout.read1(4096):
            buffer += chunk
            while (cut := re.search(rb"[\r\n]", buffer)) is not None:
                end = cut.start()
                pieces.put((buffer[:end], buffer[end : end + 1] == b"\r"))
                buffer = buffer[end + 1 :]
        if buffer:
            pieces.put((buffer, False))
        pieces.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    last_shown = 0.0
    while True:
        try:
            item = pieces.get(timeout=heartbeat)
        except queue.Empty:
            out(f"    ... {label} still running ({time.monotonic() - started:.0f} s)")
            continue
        if item is None:
            break
        text, is_update = item
        line = text.decode("utf-8", "replace").rstrip()
        now = time.monotonic()
        if not line or (is_update and now - last_shown < 1.0):
            continue
        last_shown = now
        out(f"    {label}: {line}")
    reader.join()
    return process.wait()


def _quiet(
    argv: Sequence[str],
    cwd: Optional[pathlib.Path] = None,
    env: Optional[Mapping[str, str]] = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _tool(name: str, env: Mapping[str, str], advice: str) -> str:
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise SetupError(f"{name} is not installed (not found on PATH). {advice}")
    return found


def _release_tags(git: str, repo: str, env: Mapping[str, str]) -> list[str]:
    done = _quiet([git, "ls-remote", "--tags", "--refs", repo, "v*"], env=env)
    if done.returncode != 0:
        raise SetupError(
            f"could not list the release tags of {repo}: {done.stderr.strip()}. Check the "
            f"network and the address, or name a release with --ref vX.Y.Z."
        )
    return [line.split("refs/tags/", 1)[1] for line in done.stdout.splitlines() if "refs/tags/" in line]


def _checkout(plan: SetupPlan, git: str, ref: str, env: Mapping[str, str], out: Callable[[str], object]) -> str:
    """
    Clone, or move an existing checkout to C{ref}; returns what was done.
    """
    target = plan.target
    if (target / ".git").exists():
        head = _quiet([git, "rev-parse", "HEAD"], cwd=target, env=env).stdout.strip()
        wanted = _quiet([git, "rev-parse", "--verify", "-q", f"refs/tags/{ref}^{{commit}}"], cwd=target, env=env)
        if wanted.returncode == 0 and wanted.stdout.strip() == head:
            return f"{target} is already at {ref}"
        out(f"    fetching {ref} into the existing checkout {target}")
        code = stream(
            [git, "fetch", "--progress", "--depth", "1", "origin", "tag", ref],
            out,
            cwd=target,
            env=env,
            label="git",
        )
        if code != 0:
            raise SetupError(
                f"git fetch of {ref} failed (exit code {code}): check that the release "
                f"exists (`git ls-remote --tags {plan.repo}`) and the network."
            )
        done = _quiet(
            [git, "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", f"refs/tags/{ref}"],
            cwd=target,
            env=env,
        )
        if done.returncode != 0:
            raise SetupError(
                f"could not check out {ref} in {target}: {done.stderr.strip()}. Local "
                f"changes? Commit or discard them, or use another --immich."
            )
        return f"moved {target} to {ref}"
    if target.exists() and any(target.iterdir()):
        raise SetupError(f"{target} exists and is not a git checkout: remove it or choose another --immich.")
    target.parent.mkdir(parents=True, exist_ok=True)
    code = stream(
        [
            git,
            "-c",
            "advice.detachedHead=false",
            "clone",
            "--progress",
            "--depth",
            "1",
            "--branch",
            ref,
            "--filter=blob:none",
            "--sparse",
            plan.repo,
            str(target),
        ],
        out,
        env=env,
        label="git",
    )
    if code != 0:
        raise SetupError(
            f"git clone of {plan.repo} at {ref} failed (exit code {code}): check the "
            f"address, that the release exists (`git ls-remote --tags {plan.repo}`) "
            f"and the network."
        )
    done = _quiet([git, "sparse-checkout", "set", SPARSE_FOLDER], cwd=target, env=env)
    if done.returncode != 0:
        raise SetupError(
            f"git sparse-checkout failed in {target}: {done.stderr.strip()}. A git older "
            f"than 2.27? Update it (`xcode-select --install` or `brew install git`)."
        )
    return f"cloned {plan.repo} at {ref} into {target} (only {SPARSE_FOLDER}/)"


def _sync(plan: SetupPlan, uv: str, env: Mapping[str, str], out: Callable[[str], object]) -> str:
    uv_env = {k: v for k, v in env.items() if k != "VIRTUAL_ENV"}
    argv = [uv, "sync", "--extra", "cpu", "--no-dev"]
    if plan.python:
        argv += ["--python", plan.python]
    existed = plan.venv_python.exists()
    code = stream(argv, out, cwd=plan.ml_dir, env=uv_env, label="uv")
    if code != 0:
        raise SetupError(
            f"`{' '.join(argv[1:])}` failed in {plan.ml_dir} (exit code {code}); its "
            f"output is above. Common causes: no network, or no Python >= 3.11 that uv "
            f"may use (`uv python install 3.11`, then re-run)."
        )
    if not plan.venv_python.exists():
        raise SetupError(
            f"uv finished but {plan.venv_python} does not exist: is UV_PROJECT_ENVIRONMENT set? Unset it and re-run."
        )
    return f"{'updated' if existed else 'created'} the environment {plan.venv_python.parent.parent}"


def run_setup(
    plan: SetupPlan,
    env: Optional[Mapping[str, str]] = None,
    out: Callable[[str], object] = print,
) -> list[str]:
    """
    Run every step; returns the list of what was done.  Raises L{SetupError}.
    """
    env = dict(os.environ if env is None else env)
    done = []
    steps = 4
    out(f"[1/{steps}] Checking tools")
    git = _tool("git", env, "Install Apple's command line tools: `xcode-select --install` (or `brew install git`).")
    uv = _tool(
        "uv", env, "Install it: `brew install uv`, or see https://docs.astral.sh/uv/getting-started/installation/."
    )
    done.append(f"found git ({git}) and uv ({uv})")
    ref = plan.ref
    if ref is None:
        ref = newest_release(_release_tags(git, plan.repo, env))
        if ref is None:
            raise SetupError(f"{plan.repo} has no vX.Y.Z release tag: name one with --ref.")
        out(f"    newest release: {ref}")
    out(f"[2/{steps}] Fetching Immich {ref} ({SPARSE_FOLDER}/ only) into {plan.target}")
    started = time.monotonic()
    done.append(_checkout(plan, git, ref, env, out))
    if not (plan.ml_dir / "pyproject.toml").exists():
        raise SetupError(
            f"{plan.ml_dir} has no pyproject.toml: {ref} is not an Immich release with a "
            f"{SPARSE_FOLDER}/ folder. Choose another --ref."
        )
    out(f"    done in {time.monotonic() - started:.0f} s")
    out(f"[3/{steps}] Installing Immich ML's dependencies (uv sync --extra cpu --no-dev); this can take minutes")
    started = time.monotonic()
    done.append(_sync(plan, uv, env, out))
    out(f"    done in {time.monotonic() - started:.0f} s")
    out(f"[4/{steps}] Model cache folder {plan.cache}")
    if plan.cache.is_dir():
        done.append(f"the model cache {plan.cache} already exists")
    else:
        try:
            plan.cache.mkdir(parents=True)
        except OSError as exc:
            raise SetupError(
                f"could not create the model cache {plan.cache}: {exc.strerror}. Choose another --cache."
            ) from None
        done.append(f"created the model cache {plan.cache}")
    return done
