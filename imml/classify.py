"""
Reading what a request asks for, so the balancer can route and prioritise it.

The task is read from the ``entries`` part of a ``/predict`` multipart body
by searching the body in place: nothing of the (often megabytes large) picture
is copied.
"""

from __future__ import annotations

import functools
import json
from typing import Optional

from attrs import frozen
from zope.interface import implementer

from .interfaces import IRequestInfo

TASKS = ("clip-visual", "clip-textual", "faces", "ocr", "other")
#: The task a person waits for: a search.
INTERACTIVE = "clip-textual"

#: A request's raw C{entries} is kept in its L{RequestInfo} (for the
#: agreement check: the same models and options) up to this many bytes.
ENTRIES_KEPT = 1024


@implementer(IRequestInfo)
@frozen
class RequestInfo:
    """
    What a request asks for.

    @ivar entries: the raw C{entries} field of a C{/predict} (which models,
        with which options), or None (none, or longer than L{ENTRIES_KEPT}).
    """

    method: bytes
    path: bytes
    task: Optional[str] = None
    interactive: bool = False
    ahead: int = 0
    entries: Optional[bytes] = None
    searching: bool = False

    @property
    def retryable(self) -> bool:
        """
        Whether the request may be sent again to another host: Immich ML's
        C{/predict} is a pure function of its input, and reads are safe.
        """
        return self.method in (b"GET", b"HEAD", b"OPTIONS") or (self.method == b"POST" and self.task is not None)

    def behind(self, ahead: int, searching: bool = False) -> RequestInfo:
        """
        The same request with C{ahead} others waiting ahead of it, and
        people searching or not (what C{attrs.evolve} makes, at a third of
        its cost: the balancer asks this for each request waiting, each
        time a host frees).
        """
        return RequestInfo(
            method=self.method,
            path=self.path,
            task=self.task,
            interactive=self.interactive,
            ahead=ahead,
            entries=self.entries,
            searching=searching,
        )


def _boundary(content_type: bytes) -> Optional[bytes]:
    kind, _, params = content_type.partition(b";")
    if kind.strip().lower() != b"multipart/form-data":
        return None
    for param in params.split(b";"):
        name, _, value = param.strip().partition(b"=")
        if name.strip().lower() == b"boundary":
            value = value.strip()
            if value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            return value or None
    return None


def _delimiter(body: bytes, delimiter: bytes, start: int) -> int:
    # A delimiter line is the boundary followed by CRLF, or by "--" at the end.
    while True:
        at = body.find(delimiter, start)
        if at == -1:
            return -1
        after = body[at + len(delimiter) : at + len(delimiter) + 2]
        if after in (b"\r\n", b"--"):
            return at
        start = at + 1


def entries_field(content_type: bytes, body: bytes) -> Optional[bytes]:
    """
    The raw value of the C{entries} form field of a multipart body, or None.
    """
    boundary = _boundary(content_type)
    if boundary is None:
        return None
    delimiter = b"--" + boundary
    start = 0
    while True:
        part = body.find(delimiter, start)
        if part == -1:
            return None
        headers_start = part + len(delimiter)
        headers_end = body.find(b"\r\n\r\n", headers_start)
        if headers_end == -1:
            return None
        headers = body[headers_start:headers_end]
        value_start = headers_end + 4
        value_end = _delimiter(body, b"\r\n" + delimiter, value_start)
        if value_end == -1:
            return None
        lowered = headers.lower()
        if b'name="entries"' in lowered or b"name=entries" in lowered:
            return body[value_start:value_end]
        start = value_end + 2


def task_of(entries: dict) -> str:
    """
    The task key of a decoded C{entries} object.
    """
    if "clip" in entries:
        clip = entries["clip"]
        if isinstance(clip, dict) and "textual" in clip:
            return "clip-textual"
        return "clip-visual"
    if "facial-recognition" in entries:
        return "faces"
    if "ocr" in entries:
        return "ocr"
    return "other"


def classify(method: bytes, path: bytes, content_type: Optional[bytes], body: bytes) -> RequestInfo:
    """
    Describe a request for routing.  A C{/predict} whose entries cannot be
    read is still forwarded (task C{'other'}): the host answers it with the
    service's own 4xx, which the balancer passes through.
    """
    if path != b"/predict" or method != b"POST":
        return RequestInfo(method, path)
    raw = entries_field(content_type, body) if content_type else None
    task = "other" if raw is None else _task_of_raw(raw)
    kept = bytes(raw) if raw is not None and len(raw) <= ENTRIES_KEPT else None
    return RequestInfo(method, path, task, task == "clip-textual", entries=kept)


@functools.lru_cache(maxsize=256)
def _task_of_raw(raw: bytes) -> str:
    # Immich's server sends a handful of distinct entries strings: decode
    # each once.
    try:
        decoded = json.loads(raw)
    except ValueError:
        return "other"
    return task_of(decoded) if isinstance(decoded, dict) else "other"
