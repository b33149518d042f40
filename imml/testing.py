"""
A fake Immich machine-learning server, shared by tests, benchmarks and users.

Like L{treq.testing}, this module ships with the package so that anyone can
exercise a balancer without a GPU or Immich's ML models:

    - L{ENTRIES}, L{predict_body} and L{parse_predict} build and read the
      C{multipart/form-data} bodies Immich's server sends to C{POST /predict};
    - L{FakeMLHost} speaks the ML service's protocol (C{/}, C{/ping},
      C{/predict}) with a bounded number of slots, per-task service times,
      cold starts and switchable failure modes, over an in-memory resource or
      a real loopback port;
    - L{start_fake_hosts} starts several hosts in-process (the balancer's
      demo mode);
    - C{python -m imml.testing --listen tcp:0:interface=127.0.0.1 ...} runs
      one host as a child process and prints C{LISTENING host:port}.

The protocol follows C{docs/immich-ml.md} (Immich 3.1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = [
    "ENTRIES",
    "KNOWN_MODELS",
    "MODES",
    "TASKS",
    "FakeMLHost",
    "MultipartError",
    "Received",
    "demo_specs",
    "main",
    "parse_predict",
    "predict_body",
    "start_fake_hosts",
]

log = Logger()

# --------------------------------------------------------------------------
# What Immich's server sends
# --------------------------------------------------------------------------

ENTRIES: dict[str, str] = {
    "clip-visual": '{"clip":{"visual":{"modelName":"ViT-B-32__openai"}}}',
    "clip-textual": (
        '{"clip":{"textual":{"modelName":"ViT-B-32__openai",'
        '"options":{"language":"en"}}}}'
    ),
    "faces": (
        '{"facial-recognition":{"detection":{"modelName":"buffalo_l",'
        '"options":{"minScore":0.7}},"recognition":{"modelName":"buffalo_l"}}}'
    ),
    "ocr": (
        '{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile",'
        '"options":{"minScore":0.5,"maxResolution":736}},'
        '"recognition":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.8}}}}'
    ),
}
"""
The exact C{entries} form field Immich's server sends for each kind of job,
keyed by task: C{clip-visual} (smart search indexing, with an image),
C{clip-textual} (a search query, with text), C{faces} and C{ocr} (with an
image).
"""

TASKS: tuple[str, ...] = tuple(ENTRIES)
"""The task keys, as used by L{ENTRIES} and L{FakeMLHost.service_time}."""

MODES: tuple[str, ...] = (
    "ok",
    "error500",
    "error503",
    "hang",
    "die-mid-answer",
    "reset",
    "ping-fail",
)
"""The values L{FakeMLHost.mode} accepts."""

KNOWN_MODELS: frozenset[str] = frozenset(
    {
        # CLIP
        "ViT-B-32__openai",
        "ViT-B-16__openai",
        "ViT-L-14__openai",
        "ViT-B-32__laion2b-s34b-b79k",
        "ViT-B-16-SigLIP2__webli",
        "XLM-Roberta-Large-Vit-B-16Plus",
        "nllb-clip-base-siglip__v1",
        # faces
        "buffalo_l",
        "buffalo_m",
        "buffalo_s",
        "antelopev2",
        # OCR
        "PP-OCRv5_mobile",
        "PP-OCRv5_server",
    }
)
"""Model names a L{FakeMLHost} loads by default; any other one answers 500."""

# (task, type) pairs the service knows, and the task key each belongs to.
_TASK_KEYS: dict[tuple[str, str], str] = {
    ("clip", "visual"): "clip-visual",
    ("clip", "textual"): "clip-textual",
    ("facial-recognition", "detection"): "faces",
    ("facial-recognition", "recognition"): "faces",
    ("ocr", "detection"): "ocr",
    ("ocr", "recognition"): "ocr",
}
_TEXT_TASKS = frozenset({"clip-textual"})

_UNDICI_PREFIX = b"----formdata-undici-0"


class MultipartError(ValueError):
    """
    A body is not well-formed C{multipart/form-data}.
    """


def _normalize_linefeeds(value: bytes) -> bytes:
    # What the fetch standard (undici) does to string fields of a FormData.
    return value.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def predict_body(
    entries: str | None,
    image: bytes | None = None,
    text: str | None = None,
    boundary: bytes | None = None,
) -> tuple[bytes, bytes]:
    """
    Build a C{POST /predict} body the way Immich's server (Node's C{fetch}
    with a C{FormData}) does.

    @param entries: The C{entries} field, usually a value of L{ENTRIES};
        L{None} leaves the field out (to provoke a 422).
    @param image: The picture, sent as a file part named C{image} with
        filename C{blob} and type C{application/octet-stream}.
    @param text: The C{text} field.  Line breaks become CRLF, as in the
        browser/undici encoding.
    @param boundary: The multipart boundary; by default one shaped like
        undici's, derived from the content so equal inputs give equal bodies.

    @return: C{(content_type, body)}: the C{Content-Type} header value and
        the body.
    @raise ValueError: If C{boundary} occurs in one of the parts.
    """
    parts: list[tuple[bytes, bytes]] = []
    if entries is not None:
        head = b'Content-Disposition: form-data; name="entries"\r\n\r\n'
        parts.append((head, _normalize_linefeeds(entries.encode("utf-8"))))
    if image is not None:
        head = (
            b'Content-Disposition: form-data; name="image"; filename="blob"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append((head, image))
    if text is not None:
        head = b'Content-Disposition: form-data; name="text"\r\n\r\n'
        parts.append((head, _normalize_linefeeds(text.encode("utf-8"))))

    if boundary is None:
        seed = hashlib.blake2b(digest_size=8)
        for _, content in parts:
            seed.update(content)
        number = int.from_bytes(seed.digest(), "big")
        while True:
            boundary = _UNDICI_PREFIX + b"%011d" % (number % 10**11)
            if not any(boundary in content for _, content in parts):
                break
            number += 1
    elif any(boundary in content for _, content in parts):
        raise ValueError("the boundary occurs in the content")

    delimiter = b"--" + boundary + b"\r\n"
    chunks: list[bytes] = []
    for head, content in parts:
        chunks += [delimiter, head, content, b"\r\n"]
    chunks.append(b"--" + boundary + b"--\r\n")
    return b"multipart/form-data; boundary=" + boundary, b"".join(chunks)


_PARAM = re.compile(
    rb"""\s*;\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\\r\n]|\\.)*"|[^;\s"]*)\s*"""
)
_QUOTED_PAIR = re.compile(rb"\\(.)")


@lru_cache(maxsize=256)
def _header_value(value: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """
    Split a header value like C{form-data; name="x"} into its lowercased
    first token and its parameters (names lowercased, quotes removed).

    Memoized (a pure function; the same few values recur on every request):
    callers must not change the returned dict.
    """
    semicolon = value.find(b";")
    if semicolon < 0:
        return value.strip().lower(), {}
    params: dict[bytes, bytes] = {}
    pos = semicolon
    while pos < len(value):
        match = _PARAM.match(value, pos)
        if match is None:
            raise MultipartError(f"bad header parameters: {value!r}")
        name, raw = match.groups()
        if raw[:1] == b'"':
            raw = _QUOTED_PAIR.sub(rb"\1", raw[1:-1])
        params[name.lower()] = raw
        pos = match.end()
    return value[:semicolon].strip().lower(), params


def _multipart_parts(body: bytes, boundary: bytes) -> list[tuple[dict[bytes, bytes], bytes]]:
    """
    Split a multipart body into C{(headers, content)} pairs.  A preamble and
    an epilogue are allowed (RFC 2046); anything else out of place raises.
    """
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        first = body.find(b"\r\n" + delimiter)
        if first < 0:
            raise MultipartError("no boundary delimiter in the body")
        pos = first + 2 + len(delimiter)
    separator = b"\r\n" + delimiter
    parts: list[tuple[dict[bytes, bytes], bytes]] = []
    while True:
        if body.startswith(b"--", pos):
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise MultipartError("garbage after a boundary delimiter")
        start = eol + 2
        headers: dict[bytes, bytes] = {}
        if body.startswith(b"\r\n", start):
            content_start = start + 2
        else:
            end_of_headers = body.find(b"\r\n\r\n", start)
            if end_of_headers < 0:
                raise MultipartError("unterminated part headers")
            for line in body[start:end_of_headers].split(b"\r\n"):
                name, colon, value = line.partition(b":")
                if not colon or not name or name != name.strip():
                    raise MultipartError(f"bad part header line: {line!r}")
                headers[name.lower()] = value.strip()
            content_start = end_of_headers + 4
        end = body.find(separator, content_start)
        if end < 0:
            raise MultipartError("unterminated part: no closing delimiter")
        parts.append((headers, body[content_start:end]))
        pos = end + len(separator)


def parse_predict(content_type: bytes, body: bytes) -> dict[str, Any]:
    """
    Read a C{POST /predict} body strictly.

    @param content_type: The request's C{Content-Type} header value, which
        must be C{multipart/form-data} with a boundary.
    @param body: The raw body.

    @return: C{{"entries": str | None, "image": bytes | None,
        "text": str | None}}; a field sent twice keeps its last value (as
        Starlette does), unknown fields are ignored.
    @raise MultipartError: If the body is not well-formed multipart, or a
        text field is not UTF-8.
    """
    kind, params = _header_value(content_type)
    if kind != b"multipart/form-data":
        raise MultipartError(f"not multipart/form-data: {content_type!r}")
    boundary = params.get(b"boundary", b"")
    if not 0 < len(boundary) <= 70:
        raise MultipartError("missing or invalid boundary")
    fields: dict[str, Any] = {"entries": None, "image": None, "text": None}
    for headers, content in _multipart_parts(body, boundary):
        disposition, dparams = _header_value(headers.get(b"content-disposition", b""))
        name = dparams.get(b"name")
        if disposition != b"form-data" or name is None:
            raise MultipartError("a part without Content-Disposition: form-data; name=...")
        key = name.decode("utf-8", "replace")
        if key == "image":
            fields["image"] = content
        elif key in fields:
            try:
                fields[key] = content.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MultipartError(f"field {key!r} is not UTF-8") from e
    return fields


# --------------------------------------------------------------------------
# The fake host
# --------------------------------------------------------------------------


@attrs.frozen
class Received:
    """
    One C{POST /predict} a L{FakeMLHost} received.

    @ivar task: The task key (see L{TASKS}; several joined by C{+}), or
        L{None} when C{entries} was missing or unreadable.
    @ivar entries: The C{entries} field as sent, or L{None}.
    @ivar sha256: Hex SHA-256 of the raw body.
    @ivar length: Length of the raw body in bytes.
    @ivar headers: Request headers, lowercase name to list of values.
    @ivar time: C{reactor.seconds()} when the request arrived.
    """

    task: str | None
    entries: str | None
    sha256: str
    length: int
    headers: dict[str, list[str]]
    time: float


class _BadRequest(Exception):
    """An answer about the request itself: (status, JSON or text body)."""

    def __init__(self, status: int, detail: Any, plain: bool = False) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.plain = plain


def _read_entries(entries: str | None) -> tuple[str, tuple[str, ...]]:
    """
    Validate C{entries} like Immich's C{get_entries} and model lookup.

    @return: C{(task_key, model_ids)}.
    @raise _BadRequest: 422 for a missing or malformed field, 500 for a
        task/type combination the service does not know.
    """
    if entries is None:
        raise _BadRequest(
            422,
            [{"type": "missing", "loc": ["body", "entries"], "msg": "Field required", "input": None}],
        )
    try:
        request = json.loads(entries)
        keys: list[str] = []
        models: list[str] = []
        for task, types in request.items():
            for type_, entry in types.items():
                name = entry["modelName"]
                if not isinstance(name, str):
                    raise TypeError(name)
                key = _TASK_KEYS.get((task, type_))
                if key is None:
                    raise _BadRequest(500, f"Unknown model combination: {task}/{type_}")
                if key not in keys:
                    keys.append(key)
                models.append(f"{task}/{type_}/{name}")
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise _BadRequest(422, "Invalid request format.") from e
    if not keys:
        raise _BadRequest(422, "Invalid request format.")
    return "+".join(keys), tuple(models)


def _embedding(seed: bytes, size: int = 512) -> str:
    """A unit vector of C{size} floats derived from C{seed}, as a JSON string."""
    raw = hashlib.shake_256(seed).digest(2 * size)
    values = struct.unpack(f"<{size}h", raw)
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return "[" + ",".join([f"{v / norm:.6f}" for v in values]) + "]"


_IMAGE_HEIGHT = 1080
_IMAGE_WIDTH = 1440


def _answer(task: str, seed: bytes, is_image: bool) -> bytes:
    """The JSON body a healthy host answers; a pure function of its input."""
    answer: dict[str, Any] = {}
    for key in task.split("+"):
        digest = hashlib.blake2b(seed, digest_size=16, person=key.encode()[:16]).digest()
        if key.startswith("clip-"):
            answer["clip"] = _embedding(digest)
        elif key == "faces":
            x, y = digest[0] * 4, digest[1] * 4
            answer["facial-recognition"] = [
                {
                    "boundingBox": {"x1": x, "y1": y, "x2": x + 120, "y2": y + 150},
                    "embedding": _embedding(digest),
                    "score": 0.98,
                }
            ]
        elif key == "ocr":
            x, y = float(digest[0]), float(digest[1])
            answer["ocr"] = {
                "box": [x, y, x + 200.0, y, x + 200.0, y + 40.0, x, y + 40.0],
                "text": [f"immich {digest[:4].hex()}"],
                "boxScore": [0.93],
                "textScore": [0.97],
            }
    if is_image:
        answer["imageHeight"] = _IMAGE_HEIGHT
        answer["imageWidth"] = _IMAGE_WIDTH
    return json.dumps(answer, separators=(",", ":")).encode()


_QUEUED, _RUNNING, _DONE = "queued", "running", "done"


@attrs.define(eq=False)
class _Job:
    """A valid /predict waiting for or occupying a slot."""

    request: Request
    task: str
    models: tuple[str, ...]
    answer: bytes
    die: bool
    state: str = _QUEUED
    call: IDelayedCall | None = None


_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_ANSWER_CACHE_SIZE = 4096


def _check_mode(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {value!r}")


@attrs.define(eq=False)
class FakeMLHost:
    """
    A fake Immich ML host.

    Every answer carries C{X-Fake-Host: <name>}.  Valid C{/predict}
    requests take a slot for C{service_time} seconds (plus C{cold_start} the
    first time a model is used); requests beyond C{slots} wait in FIFO order.
    Error answers and the answers to C{/} and C{/ping} are immediate.

    C{mode} and C{failing_tasks} may be changed at any time; they apply to
    requests that arrive afterwards:

        - C{"ok"}: normal service;
        - C{"error500"} / C{"error503"}: C{/predict} answers 500 (plain text
          C{Internal Server Error}) / 503 at once;
        - C{"hang"}: every request is accepted and never answered;
        - C{"die-mid-answer"}: C{/predict} is processed, then the status line,
          headers and half the body are sent and the connection is dropped;
        - C{"reset"}: the connection is aborted as soon as a C{/predict}
          arrives;
        - C{"ping-fail"}: C{/ping} answers 503, C{/predict} works.

    @ivar reactor: Provides C{callLater} and C{seconds} (a L{task.Clock} in
        tests); L{listen} needs a real reactor.
    @ivar service_time: Seconds a request occupies a slot: one number for
        every task, or a mapping task key -> seconds (key C{"*"} for the
        rest, else 0).
    @ivar models: Model names that load; others answer 500.
    @ivar model_ttl: Seconds a model may stay unused before it is unloaded
        (the host turns cold again), or L{None} for never.
    @ivar keepalive_timeout: Idle seconds before a connection is closed (the
        real service: 2), or L{None}.
    @ivar received: Every C{/predict} received, in order.
    @ivar in_flight: Requests occupying a slot now.
    @ivar max_in_flight: Peak of C{in_flight}.
    @ivar served: C{/predict} answered 200 (a C{die-mid-answer} is not).
    @ivar pings: C{/ping} requests received.
    @ivar cancelled: Requests whose client went away before the answer.
    @ivar cold_starts: Model loads (each paid C{cold_start}).
    @ivar connections: TCP connections accepted by L{listen}'s port.
    @ivar port: The listening port number, once L{listen} has fired.
    @ivar address: C{"127.0.0.1:PORT"}, once L{listen} has fired.
    """

    reactor: IReactorTime
    name: str = "fake-ml"
    slots: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    service_time: float | Mapping[str, float] = 0.0
    cold_start: float = 0.0
    mode: str = attrs.field(default="ok", validator=_check_mode)
    failing_tasks: set[str] = attrs.field(factory=set, converter=set)
    models: frozenset[str] = KNOWN_MODELS
    model_ttl: float | None = None
    keepalive_timeout: float | None = 2.0

    received: list[Received] = attrs.field(init=False, factory=list)
    in_flight: int = attrs.field(init=False, default=0)
    max_in_flight: int = attrs.field(init=False, default=0)
    served: int = attrs.field(init=False, default=0)
    pings: int = attrs.field(init=False, default=0)
    cancelled: int = attrs.field(init=False, default=0)
    cold_starts: int = attrs.field(init=False, default=0)
    connections: int = attrs.field(init=False, default=0)
    port: int | None = attrs.field(init=False, default=None)
    address: str | None = attrs.field(init=False, default=None)

    _queue: deque[_Job] = attrs.field(init=False, factory=deque)
    _running: set[_Job] = attrs.field(init=False, factory=set)
    _parked: set[Request] = attrs.field(init=False, factory=set)
    _draining: bool = attrs.field(init=False, default=False)
    _ready_at: dict[str, float] = attrs.field(init=False, factory=dict)
    _last_used: dict[str, float] = attrs.field(init=False, factory=dict)
    _answers: dict[tuple[str, bytes, bool], bytes] = attrs.field(init=False, factory=dict)
    _listening: IListeningPort | None = attrs.field(init=False, default=None)
    _channels: set[HTTPChannel] = attrs.field(init=False, factory=set)
    _all_closed: list[Deferred[None]] = attrs.field(init=False, factory=list)
    _resource: Resource | None = attrs.field(init=False, default=None)

    # ---- public API -------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    @property
    def url(self) -> str:
        """C{http://address}, once L{listen} has fired."""
        if self.address is None:
            raise RuntimeError(f"{self.name} is not listening")
        return f"http://{self.address}"

    def resource(self) -> Resource:
        """The host as a L{twisted.web.resource.IResource} (one per host)."""
        if self._resource is None:
            self._resource = _FakeMLResource(self)
        return self._resource

    def unload_models(self) -> None:
        """Forget every loaded model: the next requests pay C{cold_start}."""
        self._ready_at.clear()
        self._last_used.clear()

    def listen(self, endpoint_string: str = "tcp:0:interface=127.0.0.1") -> Deferred[IListeningPort]:
        """
        Serve on a server endpoint; sets L{port} and L{address} when bound.

        @param endpoint_string: A L{serverFromString} description.
        @return: A Deferred firing with the L{IListeningPort}.
        """
        if self._listening is not None:
            raise RuntimeError(f"{self.name} is already listening")
        endpoint = serverFromString(self.reactor, endpoint_string)

        def bound(listening: IListeningPort) -> IListeningPort:
            self._listening = listening
            where = listening.getHost()
            self.port = getattr(where, "port", None)
            host = getattr(where, "host", None)
            self.address = f"{host}:{self.port}" if host is not None else str(where)
            log.info("fake ML host {name} listening on {address}", name=self.name, address=self.address)
            return listening

        return endpoint.listen(_FakeSite(self)).addCallback(bound)

    def stop(self) -> Deferred[None]:
        """
        Stop listening, abort every open connection and drop every pending
        request.

        @return: A Deferred firing when the port is closed and every
            connection is gone.
        """
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            waits.append(maybeDeferred(self._listening.stopListening))
            self._listening = None
        if self._channels:
            gone: Deferred[None] = Deferred()
            self._all_closed.append(gone)
            waits.append(gone)
            for channel in list(self._channels):
                channel.transport.abortConnection()
        for job in list(self._running):
            if job.call is not None and job.call.active():
                job.call.cancel()
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # ---- request handling -------------------------------------------------

    def _header(self) -> bytes:
        return self.name.encode("utf-8")

    def _park(self, request: Request) -> object:
        """Accept a request and never answer it (mode C{hang})."""
        self._parked.add(request)

        def gone(failure: Failure) -> None:
            self._parked.discard(request)
            self.cancelled += 1

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET

    def _ping(self, request: Request) -> bytes:
        self.pings += 1
        if self.mode == "ping-fail":
            return _plain(request, 503, b"Service Unavailable")
        return _plain(request, 200, b"pong")

    def _predict(self, request: Request) -> object:
        content = request.content
        content.seek(0)
        body = content.read()
        content_type = request.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
        entries = task = models = failure = None
        fields: dict[str, Any] | None = None
        try:
            fields = parse_predict(content_type, body)
        except MultipartError:
            if content_type.lower().startswith(b"multipart/"):
                failure = _BadRequest(400, "There was an error parsing the body")
            else:
                # Starlette reads no form fields from another type of body.
                fields = {"entries": None, "image": None, "text": None}
        if fields is not None:
            entries = fields["entries"]
            try:
                task, models = _read_entries(entries)
            except _BadRequest as e:
                failure = e
        self.received.append(
            Received(
                task=task,
                entries=entries,
                sha256=hashlib.sha256(body).hexdigest(),
                length=len(body),
                headers={
                    name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
                time=self.reactor.seconds(),
            )
        )

        mode = self.mode
        if mode == "hang":
            return self._park(request)
        if mode == "reset":
            _abort(request)
            return NOT_DONE_YET
        if mode == "error500":
            return _plain(request, 500, b"Internal Server Error")
        if mode == "error503":
            return _plain(request, 503, b"Service Unavailable")
        try:
            if failure is not None:
                raise failure
            assert fields is not None and task is not None and models is not None
            answer = self._check(task, models, fields["image"], fields["text"])
        except _BadRequest as e:
            if e.plain:
                return _plain(request, e.status, e.detail.encode())
            return _json(request, e.status, {"detail": e.detail})

        job = _Job(request, task, models, answer, die=mode == "die-mid-answer")
        request.notifyFinish().addErrback(self._client_gone, job)
        if self.in_flight < self.slots and not self._queue:
            self._start(job)
        else:
            self._queue.append(job)
        return NOT_DONE_YET

    def _check(self, task: str, models: tuple[str, ...], image: bytes | None, text: str | None) -> bytes:
        """
        The rest of the real service's checks; returns the 200 answer body.
        """
        if image is None and text is None:
            raise _BadRequest(400, "Either image or text must be provided")
        if image is not None and not image:
            raise _BadRequest(400, "The image is empty")
        for model in models:
            name = model.rsplit("/", 1)[1]
            if name not in self.models:
                raise _BadRequest(500, f"Failed to load model '{name}'")
        for key in task.split("+"):
            if key in self.failing_tasks:
                raise _BadRequest(500, f"Failed to load model for {key}")
            if (key in _TEXT_TASKS) != (image is None):
                # The model gets an input it cannot handle: an unhandled error.
                raise _BadRequest(500, "Internal Server Error", plain=True)
        is_image = image is not None
        seed = hashlib.blake2b(image if is_image else text.encode("utf-8")).digest()  # type: ignore[union-attr]
        cache_key = (task, seed, is_image)
        answer = self._answers.get(cache_key)
        if answer is None:
            if len(self._answers) >= _ANSWER_CACHE_SIZE:
                self._answers.clear()
            answer = self._answers[cache_key] = _answer(task, seed, is_image)
        return answer

    def _service_seconds(self, task: str) -> float:
        times = self.service_time
        if isinstance(times, (int, float)):
            return float(times)
        default = times.get("*", 0.0)
        return sum(times.get(key, default) for key in task.split("+"))

    def _load_wait(self, models: tuple[str, ...], now: float) -> float:
        """Seconds until every model of a request is loaded; loads the cold ones."""
        wait = 0.0
        ttl = self.model_ttl
        for model in models:
            ready = self._ready_at.get(model)
            if ready is not None and ttl is not None and ready <= now:
                if now - self._last_used.get(model, ready) > ttl:
                    ready = None
            if ready is None:
                ready = self._ready_at[model] = now + self.cold_start
                self.cold_starts += 1
            wait = max(wait, ready - now)
        return wait

    def _start(self, job: _Job) -> None:
        job.state = _RUNNING
        self._running.add(job)
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        now = self.reactor.seconds()
        delay = self._service_seconds(job.task) + self._load_wait(job.models, now)
        if delay > 0:
            job.call = self.reactor.callLater(delay, self._finish, job)
        else:
            self._finish(job)

    def _release(self, job: _Job) -> None:
        job.state = _DONE
        self._running.discard(job)
        self.in_flight -= 1
        now = self.reactor.seconds()
        for model in job.models:
            self._last_used[model] = now

    def _finish(self, job: _Job) -> None:
        self._release(job)
        request = job.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", _JSON)
        request.setHeader(b"content-length", b"%d" % len(job.answer))
        if job.die:
            request.write(job.answer[: len(job.answer) // 2])
            _abort(request)
        else:
            request.write(job.answer)
            request.finish()
            self.served += 1
        self._drain()

    def _drain(self) -> None:
        """Start queued requests while slots are free (iteratively)."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and self.in_flight < self.slots:
                self._start(self._queue.popleft())
        finally:
            self._draining = False

    def _client_gone(self, failure: Failure, job: _Job) -> None:
        if job.state == _QUEUED:
            self._queue.remove(job)
        elif job.state == _RUNNING:
            if job.call is not None and job.call.active():
                job.call.cancel()
            job.state = _DONE
            self._running.discard(job)
            self.in_flight -= 1
            self._drain()
        else:
            return
        job.state = _DONE
        self.cancelled += 1

    # ---- connection tracking (for stop) ------------------------------------

    def _connected(self, channel: HTTPChannel) -> None:
        self.connections += 1
        self._channels.add(channel)

    def _disconnected(self, channel: HTTPChannel) -> None:
        self._channels.discard(channel)
        if not self._channels:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)


def _plain(request: Request, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", _TEXT)
    return body


def _json(request: Request, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", _JSON)
    return json.dumps(value, separators=(",", ":")).encode()


def _abort(request: Request) -> None:
    """Drop the request's connection without a word (TCP RST when possible)."""
    transport = request.channel.transport
    abort = getattr(transport, "abortConnection", None) or transport.loseConnection
    abort()


_NOT_FOUND = b'{"detail":"Not Found"}'
_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_ROOT = b'{"message":"Immich ML"}'
_READS = (b"GET", b"HEAD")


class _FakeMLResource(Resource):
    """The web face of a L{FakeMLHost}: one leaf answering every path."""

    isLeaf = True

    def __init__(self, host: FakeMLHost) -> None:
        super().__init__()
        self.host = host

    def render(self, request: Request) -> object:  # type: ignore[override]
        host = self.host
        request.setHeader(b"x-fake-host", host._header())
        path, method = request.path, request.method
        if path == b"/predict":
            if method == b"POST":
                return host._predict(request)
            allowed = b"POST"
        elif host.mode == "hang":
            if path == b"/ping":
                host.pings += 1
            return host._park(request)
        elif path == b"/ping" and method in _READS:
            return host._ping(request)
        elif path == b"/" and method in _READS:
            request.setHeader(b"content-type", _JSON)
            return _ROOT
        elif path in (b"/", b"/ping"):
            allowed = b"GET"
        else:
            request.setResponseCode(404)
            request.setHeader(b"content-type", _JSON)
            return _NOT_FOUND
        request.setResponseCode(405)
        request.setHeader(b"allow", allowed)
        request.setHeader(b"content-type", _JSON)
        return _NOT_ALLOWED


class _Channel(HTTPChannel):
    """An HTTP channel its L{FakeMLHost} can find and abort."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.host._connected(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.factory.host._disconnected(self)


class _FakeSite(Site):
    """A quiet L{Site}: no access log, no form parsing, connections tracked."""

    protocol = _Channel  # type: ignore[assignment]
    noisy = False
    displayTracebacks = False

    def __init__(self, host: FakeMLHost) -> None:
        kwargs: dict[str, Any] = {"reactor": host.reactor, "timeout": host.keepalive_timeout}
        try:
            super().__init__(host.resource(), parsePOSTFormSubmission=False, **kwargs)
        except TypeError:  # Twisted without that option
            super().__init__(host.resource(), **kwargs)
        self.host = host

    def log(self, request: Request) -> None:
        """No access log: the hot path stays lean."""

    def startFactory(self) -> None:
        """Nothing to start: no access log, so no log-date timer."""

    def stopFactory(self) -> None:
        """Nothing to stop."""


# --------------------------------------------------------------------------
# Several hosts, in-process or as a child process
# --------------------------------------------------------------------------


async def start_fake_hosts(
    reactor: IReactorTime,
    specs: Iterable[Mapping[str, Any]],
    endpoint: str = "tcp:0:interface=127.0.0.1",
) -> list[FakeMLHost]:
    """
    Start one listening L{FakeMLHost} per spec.

    @param reactor: A real reactor.
    @param specs: Keyword arguments for L{FakeMLHost} (without C{reactor});
        a spec may hold C{"endpoint"} to override C{endpoint}.
    @param endpoint: Where each host listens (default: an ephemeral port on
        127.0.0.1).
    @return: The hosts, listening (see L{FakeMLHost.address}).  If one fails
        to start, those already started are stopped and the error raised.
    """
    hosts: list[FakeMLHost] = []
    try:
        for spec in specs:
            kwargs = dict(spec)
            where = kwargs.pop("endpoint", endpoint)
            host = FakeMLHost(reactor, **kwargs)
            await host.listen(where)
            hosts.append(host)
    except BaseException:
        await gatherResults([h.stop() for h in hosts], consumeErrors=True)
        raise
    return hosts


_DEMO_SECONDS = {"clip-visual": 0.05, "clip-textual": 0.01, "faces": 0.15, "ocr": 0.2}


def demo_specs(count: int) -> list[dict[str, Any]]:
    """
    Specs for L{start_fake_hosts}: C{count} hosts named C{demo-1}... with 2
    slots each, from fast to slow (host M{i} is M{1 + i/2} times slower
    than the first).
    """
    return [
        {
            "name": f"demo-{i + 1}",
            "slots": 2,
            "service_time": {k: v * (1 + i / 2) for k, v in _DEMO_SECONDS.items()},
        }
        for i in range(count)
    ]


def _task_ms(value: str) -> tuple[str, float]:
    task, equals, ms = value.partition("=")
    if not equals or task not in TASKS:
        raise argparse.ArgumentTypeError(f"expected TASK=MS with TASK in {', '.join(TASKS)}")
    return task, float(ms)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m imml.testing",
        description="Run a fake Immich ML host; prints 'LISTENING host:port' once bound.",
    )
    parser.add_argument("--listen", default="tcp:0:interface=127.0.0.1", help="server endpoint")
    parser.add_argument("--name", default="fake-ml", help="value of the X-Fake-Host header")
    parser.add_argument("--slots", type=int, default=1000, help="requests processed at once")
    parser.add_argument("--service-ms", type=float, default=0.0, help="milliseconds per request")
    parser.add_argument(
        "--service-ms-task",
        type=_task_ms,
        action="append",
        default=[],
        metavar="TASK=MS",
        help="milliseconds for one task (repeatable)",
    )
    parser.add_argument("--cold-ms", type=float, default=0.0, help="extra milliseconds on a model's first use")
    parser.add_argument("--model-ttl-s", type=float, default=None, help="unload a model idle this long")
    parser.add_argument("--keepalive-s", type=float, default=2.0, help="idle connection timeout")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--failing-task", choices=TASKS, action="append", default=[])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Serve one fake host on the global reactor until SIGTERM or SIGINT.

    @return: The exit code: 0 after a signal, 1 if the port could not be bound.
    """
    args = _arguments(argv)
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    times: dict[str, float] = {"*": args.service_ms / 1000}
    times.update((task, ms / 1000) for task, ms in args.service_ms_task)
    host = FakeMLHost(
        reactor,
        name=args.name,
        slots=args.slots,
        service_time=times,
        cold_start=args.cold_ms / 1000,
        mode=args.mode,
        failing_tasks=set(args.failing_task),
        model_ttl=args.model_ttl_s,
        keepalive_timeout=args.keepalive_s or None,
    )
    exit_code = [0]

    def listening(_: object) -> None:
        sys.stdout.write(f"LISTENING {host.address}\n")
        sys.stdout.flush()
        reactor.addSystemEventTrigger("before", "shutdown", host.stop)

    def failed(failure: Failure) -> None:
        sys.stderr.write(f"cannot listen on {args.listen}: {failure.getErrorMessage()}\n")
        exit_code[0] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: host.listen(args.listen).addCallbacks(listening, failed))
    reactor.run()
    return exit_code[0]


if __name__ == "__main__":
    sys.exit(main())
