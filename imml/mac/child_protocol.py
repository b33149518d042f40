"""
The child's process protocol: its output logged line by line, its exit and
end handed to whoever supervises it.

Each line of the child's stdout and stderr becomes one ``child-output``
event naming the child, its pid and the stream; a last line without a
newline is logged when the child has ended.  Lines are logged as plain
text: the terminal escape sequences the child may print (uvicorn's and
rich's colours, rich's hyperlinks, progress bars' cursor moves) are taken
out (L{plain}).  A line redrawn in place (a download's progress bar, each
state ended by a carriage return) is what a terminal would show: its last
state; and a line longer than L{MAX_LINE} bytes is logged in pieces, so the
child's output holds no more than that in memory.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

# The supervisor's namespace, as before this was split out of it: the
# child's output keeps the system it is logged under.
log = Logger(namespace="imml.mac.supervisor")

# ECMA-48 escape sequences, in 7-bit (ESC ...) and 8-bit (C1) forms.
_ESCAPES = re.compile(
    r"""
    (?:\x1b\[|\x9b) [\x30-\x3f]* [\x20-\x2f]* [\x40-\x7e]  # CSI: colours, cursor moves, erasing
    | (?:\x1b[]PX^_]|[\x90\x98\x9d\x9e\x9f])                # OSC (titles, hyperlinks), DCS, SOS, PM, APC
      .*? (?:\x07|\x1b\\|\x9c|$)                             # ... up to BEL or ST, or the line's end
    | \x1b [\x20-\x2f]* [\x30-\x7e]                           # the others: ESC 7, ESC ( B, ESC c ...
    | \x1b                                                   # an escape cut short
    """,
    re.VERBOSE,
)


#: Bytes of one line held before it is logged without waiting for its end.
MAX_LINE = 64 * 1024


def plain(line: str) -> str:
    """
    C{line} without terminal escape sequences.
    """
    return _ESCAPES.sub("", line)


class LineLogger(protocol.ProcessProtocol):
    """
    Log the child's output line by line, naming the stream, and report its
    exit and end.

    @param name: the child's name, for the log lines.
    @param exited: called with this protocol and the reason when the child
        (the group's leader) has exited; its group may still have members.
    @param ended: called with this protocol and the reason when the child
        has exited and its output pipes are closed.
    """

    def __init__(
        self,
        name: str,
        exited: Callable[[LineLogger, Failure], None],
        ended: Callable[[LineLogger, Failure], None],
    ) -> None:
        self.name = name
        self._exited = exited
        self._ended = ended
        self.pid: Optional[int] = None
        self._partial = {"stdout": b"", "stderr": b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def _received(self, stream: str, data: bytes) -> None:
        lines = (self._partial[stream] + data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            self._emit(stream, line)
        # A state a carriage return ended was drawn over: only the one after
        # it will show (a CR alone at the end may be half a CRLF).
        drawn, cr, last = rest[:-1].rpartition(b"\r")
        if cr:
            rest = rest[len(drawn) + 1 :]
        while len(rest) > MAX_LINE:
            self._emit(stream, rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial[stream] = rest

    def _emit(self, stream: str, line: bytes) -> None:
        line = line.rstrip(b"\r").rpartition(b"\r")[2]
        log.info(
            "[{name} {pid} {stream}] {line}",
            imml_event="child-output",
            name=self.name,
            pid=self.pid,
            stream=stream,
            line=plain(line.decode("utf-8", "replace")),
        )

    def outReceived(self, data: bytes) -> None:
        self._received("stdout", data)

    def errReceived(self, data: bytes) -> None:
        self._received("stderr", data)

    def processExited(self, reason: Failure) -> None:
        self._exited(self, reason)

    def processEnded(self, reason: Failure) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._emit(stream, rest)
        self._partial = {"stdout": b"", "stderr": b""}
        self._ended(self, reason)


def exit_status(reason: Failure) -> tuple[Optional[int], Optional[int]]:
    """
    The exit code and the signal (either may be C{None}) that a process's
    end C{reason} carries.
    """
    value = reason.value
    return getattr(value, "exitCode", None), getattr(value, "signal", None)
