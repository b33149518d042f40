"""
The child's process group: how it is made, signalled and waited for, and
how it goes when imml-mac goes.

``python -m immich_ml`` starts gunicorn, which starts workers: killing only
the child would orphan them.  :class:`Command` therefore launches every
child through :mod:`~imml.mac.launch_script`, run as ``python -I -c``,
which calls ``os.setsid()`` and then ``exec``s the real command.  The child
keeps its pid, becomes the leader of a new session and process group whose
id is that pid, and everything it starts stays in that group (gunicorn does
not change groups).  Signals go to the whole group with ``os.killpg``
(L{signal_group}).  This works the same on macOS and Linux, needs no
``preexec_fn`` (which ``spawnProcess`` does not have) and no ``setsid``
program (which macOS lacks).  The launcher runs before the child's own
code, so a signal that arrives before ``setsid`` has run is sent to the pid
alone, the only process there is then.  L{await_empty_group} waits until
nothing is left in the group.

When imml-mac dies without stopping its child (SIGKILL, a crash), the group
stops itself: the launcher leaves a small watcher in the group that reads
a pipe (fd 3 in the child, L{CHILD_FDS}) whose write end only imml-mac
holds.  End-of-file on it means imml-mac is gone; the watcher then sends
SIGTERM to the group and SIGKILL after the stop timeout, as a stop would.
A pipe rather than a parent-death signal: Linux's ``PR_SET_PDEATHSIG``
reaches only the process that asked for it, not gunicorn and its workers
(they would keep the port), and macOS has no such signal; end-of-file on a
pipe means the same on both, and has no race to check: if imml-mac died
before the watcher began to read, the read ends at once.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Callable, Optional

from attrs import field, frozen
from twisted.internet import error
from twisted.internet.interfaces import IProcessTransport
from twisted.logger import Logger

# The supervisor's namespace, as before these were split out of it: the
# events keep the system they are logged under.
log = Logger(namespace="imml.mac.supervisor")

LAUNCH_SCRIPT = pathlib.Path(__file__).with_name("launch_script.py")

# The child's descriptors: stdin, stdout, stderr as Twisted's default, and
# the read end of the pipe the watcher reads until imml-mac is gone.
CHILD_FDS = {0: "w", 1: "r", 2: "r", 3: "w"}


@frozen
class Command:
    """
    What to run: C{argv} (C{argv[0]} looked up on the environment's PATH),
    in C{cwd}, with exactly the environment C{env}.
    """

    argv: tuple = field(converter=tuple)
    env: dict = field(factory=dict, hash=False)
    cwd: Optional[str] = None
    launcher: str = sys.executable

    def spawn_args(self, grace: float) -> tuple[str, list[str]]:
        """
        The executable and arguments for C{spawnProcess} (with
        L{CHILD_FDS}): the launch script run by C{launcher}, then the
        command.

        @param grace: seconds between SIGTERM and SIGKILL when the group
            stops itself because imml-mac is gone.
        """
        script = LAUNCH_SCRIPT.read_text()
        return self.launcher, [self.launcher, "-I", "-c", script, repr(float(grace)), *self.argv]


def signal_group(kill: Callable[[int, int], None], pgid: int, process: IProcessTransport, signum: int) -> None:
    """
    Send C{signum} to the process group C{pgid} with C{kill} (C{os.killpg}
    or a stand-in); to C{process} alone if the group does not exist yet
    (the launcher has not called setsid).
    """
    try:
        kill(pgid, signum)
        return
    except ProcessLookupError:
        pass
    except PermissionError:
        # Before setsid, on macOS, killpg of a pid that is not yet a group
        # leader may say EPERM rather than ESRCH.
        pass
    try:
        process.signalProcess(signum)
    except (error.ProcessExitedAlready, OSError):
        pass


def await_empty_group(
    clock: Any,
    kill: Callable[[int, int], None],
    pgid: int,
    deadline: float,
    then: Callable[[], None],
    name: str,
) -> None:
    """
    Call C{then} once the process group C{pgid} is empty, looking every
    50 ms, or at C{deadline} (C{clock} seconds) with a warning if it still
    has members then.

    @param name: the supervised child's name, for the warning.
    """
    try:
        kill(pgid, 0)
    except OSError:
        # ESRCH: the group is empty.  (EPERM: what is left is no longer
        # ours to signal.)
        return then()
    if clock.seconds() >= deadline:
        log.warn(
            "{name}: process group {pgid} still has members after SIGKILL",
            imml_event="child-group-lingers",
            name=name,
            pgid=pgid,
        )
        return then()
    clock.callLater(0.05, await_empty_group, clock, kill, pgid, deadline, then, name)
