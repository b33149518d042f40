"""
The request log: one structured log event per client request
(C{imml_event="request"}), an L{imml.interfaces.IReporter}.
"""

from __future__ import annotations

from time import time

from attrs import define, field
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from .interfaces import IReporter
from .records import AttemptRecord, RequestRecord


@implementer(IReporter)
@define(eq=False)
class RequestLog:
    log: Logger = field(factory=lambda: Logger(namespace="imml.forward"))

    def attempt_finished(self, record: AttemptRecord) -> None:
        pass

    def request_finished(self, record: RequestRecord) -> None:
        # The line is rendered here, once, with an f-string: Twisted's
        # template formatting costs several times more on this hot path.
        summary = (
            f"{record.method} {record.path} ({record.task}) -> {record.status} "
            f"via {record.backend} in {record.duration:.3f} s, {len(record.tried)} tries"
        )
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
                "method": record.method,
                "path": record.path,
                "task": record.task,
                "status": record.status,
                "backend": record.backend,
                "tried": list(record.tried),
                "tries": len(record.tried),
                "duration": record.duration,
                "waited": record.waited,
                "reason": record.reason,
                "imml_event": "request",
            }
        )
