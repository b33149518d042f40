"""
The request log: one structured log event per client request
(C{imml_event="request"}), an L{imml.interfaces.IReporter}, told of the
requests the forwarder answers and of those the site answers itself.

Its text reads like a line of nginx's access log (docs/logging.md)::

    192.0.2.7 POST /predict clip-visual 200 in 5.2 kB out 4.9 kB via 10.0.0.12:3003 1 try 0.041 s

and its fields (L{FIELDS}) are what C{--log-format json} writes.
"""

from __future__ import annotations

from time import time

from attrs import define, field
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from .interfaces import IReporter
from .records import AttemptRecord, RequestRecord

#: The status logged for a request whose client went away before its
#: answer (nginx's C{499}); the metrics call it C{cancelled}.
CLIENT_GONE = 499

#: The fields of a request event, besides Twisted's own and C{imml_event}.
FIELDS = (
    "client",
    "method",
    "path",
    "task",
    "status",
    "bytes_in",
    "bytes_out",
    "host",
    "tries",
    "tried",
    "duration_s",
    "waited_s",
    "reason",
)


def size(count: int) -> str:
    """
    A byte count for people, in decimal units: C{512 B}, C{5.2 kB},
    C{3.1 MB}.
    """
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 999.95:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"


def _printable(text: str) -> str:
    # A method or path as twisted.web let it through, non-ASCII bytes
    # already U+FFFD: a control character is written escaped, so that a
    # line never carries a terminal escape.
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


@implementer(IReporter)
@define(eq=False)
class RequestLog:
    log: Logger = field(factory=lambda: Logger(namespace="imml.forward"))

    def attempt_finished(self, record: AttemptRecord) -> None:
        pass

    def request_finished(self, record: RequestRecord) -> None:
        status = record.status
        if status.__class__ is not int:
            status = CLIENT_GONE
        tries = len(record.tried)
        method = _printable(record.method)
        path = _printable(record.path)
        client, task, host, reason = record.client, record.task, record.backend, record.reason
        # The line is rendered here, once, with an f-string: Twisted's
        # template formatting costs several times more on this hot path.
        summary = (
            f"{client or '-'} {method} {path} {task or '-'} {status} "
            f"in {size(record.bytes_in)} out {size(record.bytes_out)} via {host or '-'} "
            f"{tries} {'try' if tries == 1 else 'tries'} {record.duration:.3f} s"
        )
        if reason:
            summary = f"{summary}: {reason}"
        log = self.log
        # The event Logger.info would make, made here: Logger.emit first
        # checks the level against a freshly sorted list of every level,
        # which on this hot path costs as much as the rest of the event.
        log.observer(
            {
                "log_logger": log,
                "log_level": LogLevel.info,
                "log_namespace": log.namespace,
                "log_source": log.source,
                "log_format": summary.replace("{", "{{").replace("}", "}}"),
                "log_time": time(),
                "client": client,
                "method": method,
                "path": path,
                "task": task,
                "status": status,
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "host": host,
                "tries": tries,
                "tried": list(record.tried),
                "duration_s": record.duration,
                "waited_s": record.waited,
                "reason": reason,
                "imml_event": "request",
            }
        )
