"""
The balancer's log: the lines twistd would write, for less, or one JSON
object per event (docs/logging.md).

imml logs one event per request, so on a busy balancer the log observer
runs as often as the proxy does.  twistd's own text observer formats every
event's time from scratch (time zone, C{strftime}) and, with C{--logfile},
rotates at 1 MB and keeps every rotated file.  L{line_observer} writes the
same lines (Twisted's classic format: time, C{[system]}, text), formatting
the time once a second, or (C{--log-format json}) each event as one JSON
object on a line of its own, for Loki or ELK.
L{observer_for} chooses where they go from twistd's own options, so
C{--logfile}, C{-n} and the rest mean what they always mean, with bounded
rotation.  C{--logger} and C{--syslog} are left to twistd.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from types import FrameType
from typing import IO, Any, Callable, Optional

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
        text = _message(event)
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


def _message(event: LogEvent) -> str:
    # The event's text: a message with no fields to fill in (as imml's
    # request lines) is taken as it is.
    text = event.get("log_format")
    if text is None or text.__class__ is not str or "{" in text or "}" in text:
        return formatEvent(event)
    return text


def _text(value: Any) -> str:
    """
    C{value} as a string, whatever it is: for a value JSON has no form for.
    """
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


class _UtcSecond:
    """
    An RFC 3339 time in UTC, to the millisecond, its second formatted once
    per second.
    """

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when // 1)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int((when - second) * 1000):03d}Z"


#: Writes a JSON line's object (made once: C{json.dumps} makes an encoder
#: per call when given options).
_encode = json.JSONEncoder(default=_text, allow_nan=False).encode

#: The keys every JSON line has, whatever the event (an event's own field
#: of the same name is left out).
JSON_KEYS = ("time", "epoch", "level", "logger", "message", "imml_event")


class _JsonLine:
    """
    An event as one JSON object on a line: L{JSON_KEYS}; C{system} when the
    event names one; C{exception} and C{traceback} (a string) when it
    carries a failure; then the event's own fields (not Twisted's
    C{log_*} ones).  A value JSON has no form for is written as a string;
    an event that cannot be written at all is written as a line saying so.
    Never raises.
    """

    def __init__(self) -> None:
        self._time = _UtcSecond()

    def __call__(self, event: LogEvent) -> str:
        try:
            return self._line(event)
        except Exception as e:
            now = time.time()
            return (
                json.dumps(
                    {
                        "time": self._time(now),
                        "epoch": now,
                        "level": "error",
                        "logger": "imml.logs",
                        "message": f"a log event could not be written as JSON: {_text(e)}",
                        "imml_event": "log-unwritable",
                        "event": _text(event),
                    }
                )
                + "\n"
            )

    def _line(self, event: LogEvent) -> str:
        when = event.get("log_time")
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": None if when is None else self._time(when),
            "epoch": when,
            "level": None if level is None else getattr(level, "name", None) or _text(level),
            "logger": event.get("log_namespace"),
            "message": _message(event),
            "imml_event": event.get("imml_event"),
        }
        system = event.get("log_system")
        if system is not None:
            record["system"] = _text(system)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["exception"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
                record["traceback"] = failure.getTraceback()
            except Exception as e:
                record["traceback"] = "(UNABLE TO OBTAIN TRACEBACK FROM EVENT): " + _text(e)
            if not record["message"]:
                record["message"] = record.get("exception", "")
        for key, value in event.items():
            if key.__class__ is not str:
                key = _text(key)
            if key not in record and not key.startswith("log_"):
                record[key] = value
        try:
            return _encode(record) + "\n"
        except (TypeError, ValueError):
            # Something inside a value JSON cannot hold (a NaN, a key that
            # is not a string, a cycle): that value as a string.
            for key, value in record.items():
                try:
                    _encode(value)
                except (TypeError, ValueError):
                    record[key] = _text(value)
            return _encode(record) + "\n"


#: The log formats C{--log-format} takes, and what makes each observer.
FORMATS: dict[str, Callable[[], Callable[[LogEvent], Optional[str]]]] = {"text": _ClassicLine, "json": _JsonLine}


def line_observer(out: IO[Any], log_format: str = "text") -> FileLogObserver:
    """
    An observer writing each event to the text file C{out} as one line,
    flushed at once: in Twisted's classic format, or (C{"json"}) as one
    JSON object.
    """
    return FileLogObserver(out, FORMATS[log_format]())


def observer_for(twistd_options: Any, log_format: str = "text") -> Optional[FileLogObserver]:
    """
    The observer for the log twistd's options ask for, its lines in
    C{log_format} (L{FORMATS}), or L{None} where twistd should make its own
    (C{--logger}, C{--syslog}, a daemon asked to log to stdout, which
    twistd refuses).

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
        return line_observer(sys.stdout, log_format) if nodaemon else None
    log_file = LogFile.fromFullPath(name or "twistd.log", rotateLength=ROTATE_BYTES, maxRotatedFiles=KEEP_ROTATED)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Optional[FrameType]) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return line_observer(log_file, log_format)


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
