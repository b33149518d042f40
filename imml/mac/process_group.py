"""
The child's process group: how it is made, signalled and waited for.

``python -m immich_ml`` starts gunicorn, which starts workers: killing only
the child would orphan them.  :class:`Command` therefore launches every
child through a two-line Python wrapper that calls ``os.setsid()`` and then
``exec``s the real command.  The child keeps its pid, becomes the leader of
a new session and process group whose id is that pid, and everything it
starts stays in that group (gunicorn does not change groups).  Signals go
to the whole group with ``os.killpg`` (L{signal_group}).  This works the
same on macOS and Linux, needs no ``preexec_fn`` (which ``spawnProcess``
does not have) and no ``setsid`` program (which macOS lacks).  The wrapper
runs before the child's own code, so a signal that arrives before
``setsid`` has run is sent to the pid alone, the only process there is
then.  L{await_empty_group} waits until nothing is left in the group.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from attrs import field, frozen
from twisted.internet import error
from twisted.internet.interfaces import IProcessTransport
from twisted.logger import Logger

# The supervisor's namespace, as before these were split out of it: the
# events keep the system they are logged under.
log = Logger(namespace="imml.mac.supervisor")

SETSID_EXEC = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


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

    def spawn_args(self) -> tuple[str, list[str]]:
        """
        The executable and arguments for C{spawnProcess}: the setsid wrapper
        run by C{launcher}, then the command.
        """
        return self.launcher, [self.launcher, "-c", SETSID_EXEC, *self.argv]


def signal_group(kill: Callable[[int, int], None], pgid: int, process: IProcessTransport, signum: int) -> None:
    """
    Send C{signum} to the process group C{pgid} with C{kill} (C{os.killpg}
    or a stand-in); to C{process} alone if the group does not exist yet
    (the wrapper has not called setsid).
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
