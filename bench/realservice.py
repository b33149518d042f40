"""
The real Immich ML service for the benchmarks (bench/realhost.py,
bench/fleet.py --immich): its tiny models, its launch on loopback (held to a
share of the CPU by a cgroup when asked), and a few requests to it directly.

Immich's code is not part of imml: every function here takes the path of a
checkout's machine-learning/ folder and the interpreter of a virtual
environment with its CPU extra and onnx.  See bench/README.md, "Real hosts".
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from balancer import Processes, free_port, group_cpu_seconds, wait_http  # noqa: E402

from imml.testing import ENTRIES, predict_body  # noqa: E402

MODEL = "ViT-B-32__openai"
#: Per model: the depths of its visual and text stacks, the patch size and the
#: visual stack's width.  On the 2-core machine of bench/README.md the light
#: one's inference takes about 8.5 ms on one thread (ONNX Runtime does not
#: split products this small; a request alone takes 13-14 ms, as in issue
#: 12's measurement), the heavy one's 130-145 ms split over both threads; a
#: text search a fifth of an image.  bench/realhost.py's --light-ms /
#: --heavy-ms calibrate the depths on the machine instead.
MODELS = {
    "light": {"depth": 700, "text_depth": 10, "patch": 32, "width": 128},
    "heavy": {"depth": 180, "text_depth": 195, "patch": 16, "width": 768},
}
SEARCH_TEXT = "a photo of a dog on the beach"
#: Seconds the service may take to start and load its models (under a CPU
#: quota, too).
START_TIMEOUT_S = 120


def immich_problem(folder: str, python: str) -> str | None:
    """Why C{folder} and C{python} cannot run Immich ML, or None."""
    if not (Path(folder) / "immich_ml" / "__main__.py").is_file():
        return f"{folder} is not Immich's machine-learning/ folder (no immich_ml/__main__.py)"
    if not os.access(python, os.X_OK):
        return f"{python} is not an interpreter"
    return None


def immich_version(folder: str) -> str:
    """The version in the checkout's pyproject.toml, or '?'."""
    try:
        return tomllib.loads((Path(folder) / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "?"


# --------------------------------------------------------------------------
# A share of the CPU: a cgroup
# --------------------------------------------------------------------------


class CPUQuota:
    """
    A cgroup that holds the processes started in it to C{cores} of CPU:
    cgroup v2's C{cpu.max}, or the v1 cpu controller's CFS quota.
    """

    PERIOD_US = 100_000

    def __init__(self, path: Path, procs: Path) -> None:
        self.path, self.procs = path, procs

    @classmethod
    def make(cls, name: str, cores: float) -> CPUQuota | str:
        """The cgroup, or why there is none."""
        quota = int(cores * cls.PERIOD_US)
        v2 = Path("/sys/fs/cgroup")
        controllers = v2 / "cgroup.controllers"
        v1 = v2 / "cpu"
        try:
            if controllers.exists() and "cpu" in controllers.read_text().split():
                (v2 / "cgroup.subtree_control").write_text("+cpu")
                path = v2 / name
                path.mkdir(exist_ok=True)
                (path / "cpu.max").write_text(f"{quota} {cls.PERIOD_US}")
            elif (v1 / "cpu.cfs_quota_us").exists():
                path = v1 / name
                path.mkdir(exist_ok=True)
                (path / "cpu.cfs_period_us").write_text(str(cls.PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                return "no cgroup v2 cpu controller and no v1 cpu hierarchy under /sys/fs/cgroup"
        except OSError as e:
            return f"cannot make a cgroup under /sys/fs/cgroup ({e.strerror}; run as root)"
        return cls(path, path / "cgroup.procs")

    def join(self) -> None:
        """Put the calling process in the cgroup (a child's preexec_fn: its children follow)."""
        self.procs.write_text(str(os.getpid()))

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # its last processes are still exiting


# --------------------------------------------------------------------------
# The service and its models
# --------------------------------------------------------------------------


class Real:
    """
    The real Immich ML service, python -m immich_ml, on a loopback port: it
    starts at once, and L{ready} waits until it answers (its models loaded).
    """

    def __init__(
        self,
        procs: Processes,
        immich: str,
        python: str,
        cache: Path,
        name: str,
        quota: CPUQuota | None,
        request_threads: int | None = None,
    ) -> None:
        self.procs, self.name, self.port = procs, name, free_port()
        env = dict(os.environ)
        env.update(
            # Immich's launcher runs "python -m gunicorn": its interpreter must come first.
            PATH=f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=str(Path(immich).resolve()),
            IMMICH_HOST="127.0.0.1",
            IMMICH_PORT=str(self.port),
            MACHINE_LEARNING_CACHE_FOLDER=str(cache),
            MACHINE_LEARNING_MODEL_TTL="0",
            MACHINE_LEARNING_PRELOAD__CLIP__VISUAL=MODEL,
            MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL=MODEL,
            HF_HUB_OFFLINE="1",
            NO_COLOR="1",
        )
        if request_threads:
            env["MACHINE_LEARNING_REQUEST_THREADS"] = str(request_threads)
        self.proc = procs.start(
            name,
            [str(python), "-m", "immich_ml"],
            env=env,
            preexec_fn=quota.join if quota is not None else None,
        )

    def ready(self) -> None:
        """Wait until /ping answers (the models are preloaded before it does)."""
        try:
            wait_http(self.port, "/ping", b"pong", self.proc, timeout=START_TIMEOUT_S)
        except RuntimeError as e:
            raise RuntimeError(f"Immich ML ({self.name}) did not start: {e}\n{self.procs.log_of(self.name)}") from None

    def cpu_seconds(self) -> float:
        return group_cpu_seconds({self.proc.pid})


def prepare_models(
    python: str,
    workdir: Path,
    model: str,
    image: str = "320x240",
    width: int | None = None,
    depth: int | None = None,
    calibrate_ms: float | None = None,
) -> tuple[Path, dict]:
    """
    Write the C{model} models (light or heavy, L{MODELS}) and a JPEG of
    C{image} (width x height) into a model cache under C{workdir}, with
    bench/realhost_models.py run by Immich's interpreter C{python}: the
    cache's path and what the script measured.  C{width} and C{depth}
    change the model; with C{calibrate_ms}, its depth is calibrated to that
    inference time on this machine instead.
    """
    out = workdir / f"models-{model}"
    spec = MODELS[model]
    cmd = [python, str(HERE / "realhost_models.py"), str(out), "--patch", str(spec["patch"])]
    cmd += ["--width", str(width or spec["width"]), "--image", image]
    if calibrate_ms:
        cmd += ["--visual-ms", f"{calibrate_ms:g}"]
    else:
        cmd += ["--visual-depth", str(depth or spec["depth"]), "--text-depth", str(spec["text_depth"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"making the {model} models failed: {done.stderr.strip()[-800:]}")
    return out, json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# Requests to a host directly, over a kept-alive connection
# --------------------------------------------------------------------------


def request_bytes(port: int, content_type: bytes, body: bytes) -> bytes:
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (port, content_type, len(body)) + body


def clip_requests(port: int, picture: bytes) -> tuple[bytes, bytes]:
    """Immich's CLIP visual request with C{picture}, and its search (CLIP textual) request."""
    return (
        request_bytes(port, *predict_body(ENTRIES["clip-visual"], image=picture)),
        request_bytes(port, *predict_body(ENTRIES["clip-textual"], text=SEARCH_TEXT)),
    )


class Connection:
    """One kept-alive HTTP/1.1 connection; opened again when the host closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> int:
        for attempt in (0, 1):
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                self.writer.write(request)
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if fresh or attempt:
                    raise
                continue  # a kept-alive connection the host had closed: once more on a new one
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            await self.reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                self.close()
            return int(lines[0].split(" ", 2)[1])
        raise ConnectionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def timed_request(conn: Connection, request: bytes, timeout: float, log: list) -> bool:
    """Send C{request} on C{conn}; log (start, end, answered 200); whether it was."""
    began = time.monotonic()
    try:
        ok = await asyncio.wait_for(conn.exchange(request), timeout) == 200
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        conn.close()
        ok = False
    log.append((began, time.monotonic(), ok))
    return ok


def warm_up(host, image: bytes, text: bytes, timeout: float) -> dict:
    """
    A few requests of each kind to C{host} (its C{name} and C{port}), one
    at a time (the first ones are slow): the median seconds of an image
    alone and of a text search alone.
    """

    async def go() -> dict:
        conn, images, texts = Connection(host.port), [], []
        try:
            for _ in range(8):
                await timed_request(conn, image, timeout, images)
            for _ in range(8):
                await timed_request(conn, text, timeout, texts)
        finally:
            conn.close()
        if not all(ok for *_, ok in images + texts):
            raise RuntimeError(f"{host.name} does not answer Immich's CLIP requests")
        return {
            "image": statistics.median(e - b for b, e, _ in images[3:]),
            "text": statistics.median(e - b for b, e, _ in texts[3:]),
        }

    return asyncio.run(go())
