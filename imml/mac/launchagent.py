"""
``imml-mac launchagent``: start the service at login with launchd.

Writes ``~/Library/LaunchAgents/<label>.plist`` running
``twistd -n --pidfile= imml-mac <the user's options>`` with KeepAlive (launchd
restarts twistd if it ever exits; twistd restarts Immich ML) and log files
under ``~/Library/Logs``, then prints how to load it and the line that joins
this Mac to a balancer's ``IMML_BACKENDS``.  On another system it writes the
file all the same, saying first that it is one for macOS.
"""

from __future__ import annotations

import os
import pathlib
import plistlib
import shutil
import socket
import subprocess
import sys
from typing import Callable, Optional, Sequence, Union

LABEL = "app.imml.mac"
# launchd starts agents with a bare PATH; caffeinate lives in /usr/bin.
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


def twistd_path() -> str:
    """
    The twistd beside this Python (the one imml is installed for), else on PATH.
    """
    beside = pathlib.Path(sys.executable).with_name("twistd")
    if beside.exists():
        return str(beside)
    return shutil.which("twistd") or str(beside)


def plist_for(
    arguments: Sequence[str],
    home: Union[str, os.PathLike],
    label: str = LABEL,
    twistd: Optional[str] = None,
) -> dict:
    """
    The LaunchAgent as a dictionary.

    @param arguments: the ``imml-mac`` options, as a list of strings.
    @param home: the user's home folder (logs and working directory).
    """
    twistd = twistd or twistd_path()
    logs = pathlib.Path(home) / "Library" / "Logs"
    return {
        "Label": label,
        "ProgramArguments": [twistd, "-n", "--pidfile=", "imml-mac", *arguments],
        "RunAtLoad": True,
        "KeepAlive": True,
        # After a crash at start-up, wait this long before launchd tries again.
        "ThrottleInterval": 30,
        "ProcessType": "Interactive",
        "WorkingDirectory": str(home),
        "EnvironmentVariables": {
            "PATH": os.pathsep.join([str(pathlib.Path(twistd).parent), SYSTEM_PATH]),
        },
        "StandardOutPath": str(logs / "imml-mac.log"),
        "StandardErrorPath": str(logs / "imml-mac.err.log"),
    }


def local_hostname(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str:
    """
    This Mac's Bonjour name (``scutil --get LocalHostName``), else the host
    name without its domain.
    """
    try:
        done = run(["scutil", "--get", "LocalHostName"], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except OSError:
        pass
    return socket.gethostname().split(".")[0]


def write_agent(
    arguments: Sequence[str],
    home: Union[str, os.PathLike],
    port: int,
    label: str = LABEL,
    twistd: Optional[str] = None,
    hostname: Optional[str] = None,
    out: Callable[[str], object] = print,
    platform: str = sys.platform,
) -> pathlib.Path:
    """
    Write the plist and print what to do next; returns its path.
    """
    home = pathlib.Path(home)
    path = home / "Library" / "LaunchAgents" / f"{label}.plist"
    if platform != "darwin":
        out(
            f"This is {platform}, not macOS: writing a LaunchAgent, a file for macOS's launchd, "
            f"which does nothing on this system (twistd -n imml-mac runs the service here)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    (home / "Library" / "Logs").mkdir(parents=True, exist_ok=True)
    agent = plist_for(arguments, home, label=label, twistd=twistd)
    with open(path, "wb") as f:
        plistlib.dump(agent, f)
    hostname = hostname or local_hostname()
    out(f"Wrote {path}")
    out(f"It runs: {' '.join(agent['ProgramArguments'])}")
    out(f"Logs: {agent['StandardOutPath']} and {agent['StandardErrorPath']}")
    out("")
    out("Load it now (and at every login):")
    out(f"  launchctl bootstrap gui/$(id -u) {path}")
    out("Restart it after changing options (re-run this command first):")
    out(f"  launchctl bootout gui/$(id -u)/{label}; launchctl bootstrap gui/$(id -u) {path}")
    out("Stop it and keep it from starting at login:")
    out(f"  launchctl bootout gui/$(id -u)/{label}")
    out("")
    out("On the balancer, add this Mac to IMML_BACKENDS (comma-separated):")
    out(f"  IMML_BACKENDS={hostname}.local:{port}")
    return path
