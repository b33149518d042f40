"""
Keep the Mac awake while the service runs.

On macOS, ``caffeinate -i -w PID`` (PID being twistd's own pid) holds an
idle-sleep assertion until it is stopped or twistd is gone: even a twistd
killed with SIGKILL does not leave it behind.  caffeinate runs under a
:class:`~imml.mac.supervisor.Supervisor`, so it is restarted if it dies and
stopped, with a Deferred, when the service stops.  Anywhere else the step
is skipped with a log line.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Mapping, Optional

from twisted.application import service
from twisted.logger import Logger

from imml.mac.process_group import Command
from imml.mac.supervisor import Supervisor

log = Logger()


def caffeinate_argv(pid: int, program: str = "caffeinate") -> tuple[str, ...]:
    """
    Prevent idle sleep (C{-i}) until process C{pid} exits (C{-w}).
    """
    return (program, "-i", "-w", str(pid))


def sleep_guard(
    reactor: Any,
    platform: str = sys.platform,
    env: Optional[Mapping[str, str]] = None,
    pid: Optional[int] = None,
    enabled: bool = True,
    **kwargs: Any,
) -> service.Service:
    """
    The service that keeps the Mac awake, or a do-nothing service (with a
    log line saying why) where there is nothing to do.

    @param platform: C{sys.platform}; injectable for tests.
    @param env: the environment caffeinate is looked up in and run with.
    @param pid: the pid to wait for (default: this process).
    @param kwargs: passed to L{Supervisor} (restart delay, timeouts).
    """
    env = dict(os.environ if env is None else env)
    if not enabled:
        return _Skipped("sleep prevention switched off (--allow-sleep): the Mac may sleep")
    if platform != "darwin":
        return _Skipped(f"not macOS ({platform}): skipping caffeinate, nothing keeps this machine awake")
    program = shutil.which("caffeinate", path=env.get("PATH"))
    if program is None:
        return _Skipped("caffeinate not found on PATH (it is /usr/bin/caffeinate on macOS)")
    argv = caffeinate_argv(os.getpid() if pid is None else pid, program)
    return Supervisor(reactor, Command(argv, env=env), name="caffeinate", **kwargs)


class _Skipped(service.Service):
    name = "caffeinate"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def startService(self) -> None:
        service.Service.startService(self)
        log.info("{reason}", imml_event="sleep-skipped", reason=self.reason)
