"""
Run *first in every child imml-mac supervises*, before the child's own code.

:class:`~imml.mac.process_group.Command` runs this file's text as
``python -I -c <text> GRACE COMMAND...``, with fd 3 the read end of a pipe
whose write end only imml-mac holds and never writes to.  It uses only the
standard library, and:

1. calls ``os.setsid()``: the child leads a new session and process group
   whose id is its pid, and everything it starts stays in that group;
2. forks a *watcher* that stays in the group and reads fd 3.  The read ends
   only when every write end is closed, which happens when imml-mac is gone,
   however it went: the kernel closes a dead process's descriptors, so a
   SIGKILL too.  The watcher then sends SIGTERM to the group, waits GRACE
   seconds, and sends SIGKILL to what is left, itself included;
3. ``exec``s COMMAND in the original process, which keeps its pid (the
   group's id) and no longer holds fd 3.

While imml-mac runs, the watcher only waits; a stop of the group (SIGTERM,
SIGKILL) ends it with the rest.  Without a pipe on fd 3 the command runs
unwatched, with a line on stderr saying so.
"""

# No ``from __future__ import annotations``: this runs in whatever
# interpreter the command names, before anything of imml is importable.

import os
import signal
import stat
import sys
import time

WATCH_FD = 3


def watch(grace: float) -> None:
    """
    In the watcher: wait until imml-mac is gone, then stop the group.
    """
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    while os.read(WATCH_FD, 512):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    time.sleep(grace)
    os.killpg(0, signal.SIGKILL)


def watched() -> bool:
    """
    Whether fd 3 is the pipe from imml-mac.
    """
    try:
        return stat.S_ISFIFO(os.fstat(WATCH_FD).st_mode)
    except OSError:
        return False


def main(argv: list) -> None:
    grace, command = float(argv[0]), argv[1:]
    os.setsid()
    if not watched():
        print(f"imml-mac: no pipe on fd {WATCH_FD}: {command[0]} will not stop with imml-mac", file=sys.stderr)
    elif os.fork() == 0:
        try:
            watch(grace)
        finally:
            os._exit(0)
    else:
        os.close(WATCH_FD)
    # As subprocess does: the command gets the signal dispositions Python
    # changed at start-up back.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
