"""
The balancer's log: the lines twistd would write, for less.

imml logs one event per request, so on a busy balancer the log observer
runs as often as the proxy does.  twistd's own text observer formats every
event's time from scratch (time zone, C{strftime}) and, with C{--logfile},
rotates at 1 MB and keeps every rotated file.  L{line_observer} writes the
same lines (Twisted's classic format: time, C{[system]}, text), formatting
the time once a second; L{observer_for} chooses where they go from twistd's
own options, so C{--logfile}, C{-n} and the rest mean what they always
mean, with bounded rotation.  C{--logger} and C{--syslog} are left to
twistd.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import IO, Any, Optional

from twisted.application.service import IServiceCollection
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    formatTime,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

#: A log file is rotated when it reaches this size...
ROTATE_BYTES = 10 * 1000 * 1000
#: ... and this many rotated files are kept (C{imml.log.1} to C{.5}).
KEEP_ROTATED = 5


class _SecondClock:
    """
    Twisted's L{formatTime}, computed once per second: a timestamp shows
    whole seconds, and a change of time zone offset happens on a whole
    second.
    """

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._text = ""

    def __call__(self, when: Optional[float]) -> str:
        if when is None:
            return formatTime(when)
        second = int(when // 1)
        if second != self._second:
            self._text = formatTime(second)
            self._second = second
        return self._text


class _ClassicLine:
    """
    Twisted's L{formatEventAsClassicLogText}, the same text for less: the
    time is formatted once a second, and a message with no fields to
    fill in (as imml's request lines) is taken as it is.
    """

    def __init__(self) -> None:
        self._time = _SecondClock()

    def __call__(self, event: LogEvent) -> Optional[str]:
        namespace = event.get("log_namespace", "-")
        text = event.get("log_format")
        if text is None or text.__class__ is not str or "{" in text or "}" in text:
            text = formatEvent(event)
        if "log_failure" in event:
            try:
                traceback = event["log_failure"].getTraceback()
            except BaseException as e:
                traceback = "(UNABLE TO OBTAIN TRACEBACK FROM EVENT):" + str(e)
            text = text + "\n" + traceback
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{namespace}#{'-' if level is None else level.name}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def line_observer(out: IO[Any]) -> FileLogObserver:
    """
    An observer writing each event to the text file C{out} as one line in
    Twisted's classic format, flushed at once.
    """
    return FileLogObserver(out, _ClassicLine())


def observer_for(twistd_options: Any) -> Optional[FileLogObserver]:
    """
    The observer for the log twistd's options ask for, or L{None} where
    twistd should make its own (C{--logger}, C{--syslog}, a daemon asked to
    log to stdout, which twistd refuses).

    A log file rotates at L{ROTATE_BYTES} and keeps L{KEEP_ROTATED} rotated
    files; C{SIGUSR1} rotates it at once, as with twistd's own.
    """
    if twistd_options is None:
        return None
    options = dict(twistd_options)
    if options.get("logger") or options.get("syslog"):
        return None
    name = options.get("logfile")
    nodaemon = bool(options.get("nodaemon"))
    if name == "-" or (nodaemon and not name):
        return line_observer(sys.stdout) if nodaemon else None
    log_file = LogFile.fromFullPath(name or "twistd.log", rotateLength=ROTATE_BYTES, maxRotatedFiles=KEEP_ROTATED)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Optional[FrameType]) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return line_observer(log_file)


class OffersLogObserver:
    """
    A mixin for the service a twistd plugin makes: when twistd makes it a
    child of its application, it sets C{log_observer} (if any) as the
    application's L{ILogObserver} component, which twistd then logs to
    instead of making its own observer.
    """

    log_observer: Optional[FileLogObserver] = None

    def setServiceParent(self, parent: IServiceCollection) -> None:
        observer = self.log_observer
        if observer is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)
