"""
Tests for L{imml.testing}: the fake Immich ML host and the fake host view.

Two tiers: synchronous tests drive the host through treq's L{StubTreq}
(in-memory HTTP) with a L{Clock}; a few tests cross a real loopback socket
or start the host as a child process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer, error, protocol
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from zope.interface.verify import verifyObject

from imml import classify
from imml.backends import BackendAddress, BackendListError
from imml.interfaces import IBackendView
from imml.testing import (
    ENTRIES,
    TASKS,
    FakeBackendView,
    FakeMLHost,
    MultipartError,
    demo_specs,
    parse_predict,
    predict_body,
    start_fake_hosts,
)

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40
TIMEOUT = 10


# --------------------------------------------------------------------------
# In-memory helpers
# --------------------------------------------------------------------------


@attrs.define
class Answer:
    """What an in-memory client got: an answer, or a failure."""

    code: int | None = None
    headers: Any = None
    body: bytes | None = None
    failure: Any = None
    deferred: Any = None

    @property
    def done(self) -> bool:
        return self.body is not None or self.failure is not None

    def json(self) -> Any:
        assert self.body is not None, self.failure
        return json.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


@attrs.define
class Fake:
    """A host behind StubTreq, driven by a Clock."""

    clock: Clock
    host: FakeMLHost
    stub: StubTreq

    def send(
        self, method: str, path: str, body: bytes = b"", content_type: bytes | None = None, flush: bool = True
    ) -> Answer:
        headers = {b"content-type": [content_type]} if content_type else {}
        answer = Answer()
        d = self.stub.request(method, "http://fake" + path, data=body or None, headers=headers)

        def got(response: Any) -> Any:
            answer.code, answer.headers = response.code, response.headers
            return response.content().addCallback(lambda b: setattr(answer, "body", b))

        d.addCallback(got).addErrback(lambda f: setattr(answer, "failure", f))
        answer.deferred = d
        if flush:
            self.stub.flush()
        return answer

    def predict(self, task: str = "clip-visual", **kwargs: Any) -> Answer:
        if "image" not in kwargs and "text" not in kwargs:
            kwargs["image" if task != "clip-textual" else "text"] = JPEG if task != "clip-textual" else "a cat"
        content_type, body = predict_body(ENTRIES.get(task, task), **kwargs)
        return self.send("POST", "/predict", body, content_type)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.stub.flush()


def fake(**settings: Any) -> Fake:
    clock = Clock()
    host = FakeMLHost(clock, **{"name": "a", **settings})
    return Fake(clock, host, StubTreq(host.resource()))


# --------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------


def test_entries_are_immichs_compact_json() -> None:
    assert set(ENTRIES) == {"clip-visual", "clip-textual", "faces", "ocr"} == set(TASKS)
    assert ENTRIES["clip-visual"] == '{"clip":{"visual":{"modelName":"ViT-B-32__openai"}}}'
    for value in ENTRIES.values():
        assert json.dumps(json.loads(value), separators=(",", ":")) == value
    assert json.loads(ENTRIES["ocr"])["ocr"]["detection"]["options"] == {"minScore": 0.5, "maxResolution": 736}


def test_tasks_are_the_classifiers() -> None:
    assert TASKS == tuple(t for t in classify.TASKS if t != "other")
    for task, entries in ENTRIES.items():
        assert classify.task_of(json.loads(entries)) == task
        content_type, body = predict_body(entries, image=JPEG)
        assert classify.classify(b"POST", b"/predict", content_type, body).task == task


def test_predict_body_image_like_undici() -> None:
    content_type, body = predict_body(ENTRIES["faces"], image=JPEG)
    boundary = content_type.split(b"boundary=")[1]
    assert content_type.startswith(b"multipart/form-data; boundary=----formdata-undici-0")
    assert body.startswith(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="entries"\r\n\r\n')
    assert (
        b'Content-Disposition: form-data; name="image"; filename="blob"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + JPEG + b"\r\n"
    ) in body
    assert body.endswith(b"--" + boundary + b"--\r\n")
    assert parse_predict(content_type, body) == {"entries": ENTRIES["faces"], "image": JPEG, "text": None}
    assert predict_body(ENTRIES["faces"], image=JPEG) == (content_type, body), "deterministic"


def test_predict_body_text_and_explicit_boundary() -> None:
    content_type, body = predict_body(ENTRIES["clip-textual"], text="chat\nnoir é", boundary=b"XYZ")
    assert content_type == b"multipart/form-data; boundary=XYZ"
    assert parse_predict(content_type, body) == {
        "entries": ENTRIES["clip-textual"],
        "image": None,
        "text": "chat\r\nnoir é",
    }
    with pytest.raises(ValueError):
        predict_body(ENTRIES["clip-visual"], image=b"..XYZ..", boundary=b"XYZ")


def test_parse_predict_accepts_quoted_boundary_preamble_and_epilogue() -> None:
    body = b'preamble\r\n--b\r\ncontent-disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\nepilogue'
    assert parse_predict(b'Multipart/Form-Data; boundary="b"', body)["text"] == "hi"


@pytest.mark.parametrize(
    "content_type, body",
    [
        (b"application/json", b"{}"),
        (b"multipart/form-data", b"--b\r\n\r\nx\r\n--b--\r\n"),
        (b"multipart/form-data; boundary=b", b"nothing here"),
        (b"multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi'),
        (b"multipart/form-data; boundary=b", b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n"),
        (b"multipart/form-data; boundary=b", b"--b junk\r\n\r\nhi\r\n--b--\r\n"),
        (
            b"multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n\xff\r\n--b--',
        ),
    ],
    ids=["not-multipart", "no-boundary", "no-delimiter", "unterminated", "no-disposition", "garbage", "not-utf8"],
)
def test_parse_predict_is_strict(content_type: bytes, body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_predict(content_type, body)


# --------------------------------------------------------------------------
# Protocol and validation (in memory)
# --------------------------------------------------------------------------


def test_root_ping_404_405() -> None:
    f = fake(name="host-7")
    root, ping, missing, wrong = (
        f.send("GET", "/"),
        f.send("GET", "/ping"),
        f.send("GET", "/nope"),
        f.send("GET", "/predict"),
    )
    assert (root.code, root.json()) == (200, {"message": "Immich ML"})
    assert (ping.code, ping.body) == (200, b"pong")
    assert ping.header(b"content-type").startswith(b"text/plain")
    assert (missing.code, missing.json()) == (404, {"detail": "Not Found"})
    assert (wrong.code, wrong.header(b"allow")) == (405, b"POST")
    assert f.send("POST", "/ping").code == 405
    for answer in (root, ping, missing, wrong):
        assert answer.header(b"x-fake-host") == b"host-7"
    assert f.host.pings == 1 and f.host.received == []


def test_head_is_get_without_body() -> None:
    f = fake()
    answer = f.send("HEAD", "/ping")
    assert (answer.code, answer.body, f.host.pings) == (200, b"", 1)


@pytest.mark.parametrize("task", TASKS)
def test_predict_answers_shaped_like_immich(task: str) -> None:
    f = fake()
    answer = f.predict(task)
    assert answer.code == 200, answer.body
    assert answer.header(b"content-type") == b"application/json"
    result = answer.json()
    if task == "clip-textual":
        assert set(result) == {"clip"}
    else:
        assert isinstance(result.pop("imageHeight"), int) and isinstance(result.pop("imageWidth"), int)
    if task.startswith("clip"):
        embedding = json.loads(result["clip"])
        assert len(embedding) == 512 and all(isinstance(x, float) for x in embedding)
        assert abs(sum(x * x for x in embedding) - 1) < 1e-3
    elif task == "faces":
        [face] = result["facial-recognition"]
        assert set(face["boundingBox"]) == {"x1", "y1", "x2", "y2"}
        assert len(json.loads(face["embedding"])) == 512 and face["score"] == 0.98
    else:
        ocr = result["ocr"]
        assert len(ocr["box"]) == 8 * len(ocr["text"]) == 8 * len(ocr["boxScore"]) == 8 * len(ocr["textScore"])
    assert f.host.served == 1


def test_answers_are_a_pure_function_of_the_input() -> None:
    a, b = fake(name="a"), fake(name="b")
    same = [x.predict("clip-visual", image=JPEG, boundary=bd).body for x, bd in ((a, b"one"), (b, b"two"))]
    assert same[0] == same[1]
    other = a.predict("clip-visual", image=JPEG + b"!").json()["clip"]
    assert other != json.loads(same[0])["clip"]
    assert a.predict("clip-textual", text="dog").body != a.predict("clip-textual", text="cat").body


def test_received_records_each_predict() -> None:
    f = fake()
    content_type, body = predict_body(ENTRIES["ocr"], image=JPEG)
    f.clock.advance(5)
    f.send("POST", "/predict", body, content_type)
    f.send("POST", "/predict", b"junk", b"text/plain")
    first, second = f.host.received
    assert (first.task, first.entries, first.length, first.time) == ("ocr", ENTRIES["ocr"], len(body), 5)
    assert first.sha256 == hashlib.sha256(body).hexdigest()
    assert first.headers["content-type"] == [content_type.decode()]
    assert (second.task, second.entries, second.length) == (None, None, 4)


@pytest.mark.parametrize(
    "entries, kwargs, status, detail",
    [
        (None, {"image": JPEG}, 422, None),
        ("{not json", {"image": JPEG}, 422, "Invalid request format."),
        ('{"clip":{"visual":{}}}', {"image": JPEG}, 422, "Invalid request format."),
        ('["clip"]', {"image": JPEG}, 422, "Invalid request format."),
        (ENTRIES["clip-visual"], {}, 400, "Either image or text must be provided"),
        (ENTRIES["clip-visual"], {"image": b""}, 400, None),
        ('{"clip":{"visual":{"modelName":"ViT-Nope"}}}', {"image": JPEG}, 500, "Failed to load model 'ViT-Nope'"),
        ('{"clip":{"audio":{"modelName":"ViT-B-32__openai"}}}', {"image": JPEG}, 500, None),
    ],
    ids=[
        "missing",
        "bad-json",
        "no-model-name",
        "not-an-object",
        "no-input",
        "empty-image",
        "unknown-model",
        "unknown-type",
    ],
)
def test_predict_validation(entries: str | None, kwargs: dict[str, Any], status: int, detail: str | None) -> None:
    f = fake()
    content_type, body = predict_body(entries, **kwargs)
    answer = f.send("POST", "/predict", body, content_type)
    assert answer.code == status
    assert "detail" in answer.json()
    if detail is not None:
        assert answer.json()["detail"] == detail
    assert f.host.served == 0 and f.host.in_flight == 0 and len(f.host.received) == 1


def test_broken_multipart_is_400_and_other_bodies_422() -> None:
    f = fake()
    assert f.send("POST", "/predict", b"--b\r\n\r\nunterminated", b"multipart/form-data; boundary=b").code == 400
    assert f.send("POST", "/predict", b'{"entries": 1}', b"application/json").code == 422


def test_wrong_input_for_the_model_is_500() -> None:
    f = fake()
    assert f.predict("faces", text="no picture").code == 500
    assert f.predict("clip-textual", image=JPEG).code == 500


def test_failing_tasks_fail_alone() -> None:
    f = fake(failing_tasks={"ocr"})
    assert f.predict("ocr").code == 500
    assert f.predict("faces").code == 200
    f.host.failing_tasks.clear()
    assert f.predict("ocr").code == 200


# --------------------------------------------------------------------------
# Timing: slots, service times, cold starts (Clock)
# --------------------------------------------------------------------------


def test_one_slot_queues_fifo() -> None:
    f = fake(slots=1, service_time=1.0)
    first, second = f.predict(image=b"1"), f.predict(image=b"2")
    assert (f.host.in_flight, f.host.queued) == (1, 1)
    f.advance(0.999)
    assert not first.done
    f.advance(0.001)
    assert first.code == 200 and not second.done
    assert (f.host.in_flight, f.host.queued) == (1, 0)
    f.advance(0.999)
    assert not second.done
    f.advance(0.001)
    assert second.code == 200
    assert (f.host.in_flight, f.host.max_in_flight, f.host.served) == (0, 1, 2)


def test_slots_run_in_parallel() -> None:
    f = fake(slots=2, service_time=1.0)
    answers = [f.predict(image=bytes([i])) for i in range(3)]
    assert (f.host.in_flight, f.host.queued) == (2, 1)
    f.advance(1.0)
    assert [a.done for a in answers] == [True, True, False]
    f.advance(1.0)
    assert all(a.code == 200 for a in answers) and f.host.max_in_flight == 2


def test_service_time_per_task_and_default() -> None:
    f = fake(service_time={"clip-textual": 0.01, "faces": 0.5, "*": 0.2})
    text, faces, ocr = f.predict("clip-textual"), f.predict("faces"), f.predict("ocr")
    f.advance(0.01)
    assert (text.done, faces.done, ocr.done) == (True, False, False)
    f.advance(0.19)
    assert (faces.done, ocr.done) == (False, True)
    f.advance(0.3)
    assert faces.code == 200


def test_zero_service_time_answers_at_once() -> None:
    f = fake()
    assert f.predict().code == 200 and f.clock.getDelayedCalls() == []


def test_cold_start_once_per_model_and_concurrent_requests_wait() -> None:
    f = fake(service_time=0.1, cold_start=2.0)
    first, second = f.predict(image=b"1"), f.predict(image=b"2")
    f.advance(2.099)
    assert not first.done and not second.done
    f.advance(0.001)
    assert first.done and second.done
    warm = f.predict(image=b"3")
    f.advance(0.1)
    assert warm.code == 200
    other_model = f.predict("clip-textual")
    f.advance(0.1)
    assert not other_model.done
    f.advance(2.0)
    assert other_model.code == 200
    assert f.host.cold_starts == 2


def test_model_ttl_and_unload_make_a_host_cold_again() -> None:
    f = fake(cold_start=1.0, model_ttl=300.0)
    f.predict()
    f.advance(1.0)
    f.advance(299)
    assert f.predict().done, "still warm"
    f.advance(301)
    late = f.predict()
    assert not late.done
    f.advance(1.0)
    assert late.done
    f.host.unload_models()
    assert not f.predict().done
    assert f.host.cold_starts == 3


def test_long_queue_drains_without_recursion() -> None:
    # Zero-time requests queued behind a cold start all finish in one go:
    # starting each from the previous one's end would nest 3 frames a request.
    f = fake(slots=1, cold_start=1.0)
    content_type, body = predict_body(ENTRIES["clip-visual"], image=JPEG)
    answers = [f.send("POST", "/predict", body, content_type, flush=False) for _ in range(500)]
    f.stub.flush()
    assert f.host.queued == 499
    f.advance(1.0)
    assert all(a.code == 200 for a in answers) and f.host.served == 500


# --------------------------------------------------------------------------
# Modes and cancellation (in memory)
# --------------------------------------------------------------------------


def test_error_modes() -> None:
    f = fake(mode="error500")
    answer = f.predict()
    assert (answer.code, answer.body) == (500, b"Internal Server Error")
    assert f.send("GET", "/ping").code == 200
    f.host.mode = "error503"
    assert f.predict().code == 503
    f.host.mode = "ping-fail"
    assert f.send("GET", "/ping").code == 503 and f.predict().code == 200
    with pytest.raises(ValueError):
        f.host.mode = "sleepy"
    assert len(f.host.received) == 3 and f.host.served == 1


def test_vectors_change_the_embeddings_and_nothing_else() -> None:
    f = fake()
    exact = json.loads(f.predict().body)
    f.host.vectors = "fp16"
    rounded = json.loads(f.predict().body)
    assert rounded.keys() == exact.keys() and rounded["clip"] != exact["clip"]
    assert len(json.loads(rounded["clip"])) == len(json.loads(exact["clip"])) == 512
    f.host.vectors = "wrong-shape"
    assert len(json.loads(json.loads(f.predict().body)["clip"])) == 768
    with pytest.raises(ValueError):
        f.host.vectors = "sideways"


def test_hang_never_answers_and_counts_the_client_leaving() -> None:
    f = fake(mode="hang")
    answers = [f.predict(), f.send("GET", "/ping"), f.send("GET", "/")]
    f.advance(3600)
    assert not any(a.done for a in answers)
    assert f.host.pings == 1 and len(f.host.received) == 1
    answers[0].deferred.cancel()
    f.stub.flush()
    assert f.host.cancelled == 1


def test_client_leaving_frees_its_place() -> None:
    f = fake(slots=1, service_time=1.0)
    running, queued, last = f.predict(image=b"1"), f.predict(image=b"2"), f.predict(image=b"3")
    queued.deferred.cancel()
    f.stub.flush()
    assert (f.host.cancelled, f.host.queued) == (1, 1)
    running.deferred.cancel()
    f.stub.flush()
    assert (f.host.cancelled, f.host.in_flight, f.host.queued) == (2, 1, 0)
    f.advance(1.0)
    assert last.code == 200 and f.host.served == 1


@pytest.mark.parametrize("mode", ["die-mid-answer", "reset"])
def test_broken_connections_in_memory(mode: str) -> None:
    f = fake(mode=mode)
    answer = f.predict()
    assert answer.failure is not None and answer.body is None
    assert (f.host.served, f.host.cancelled, f.host.in_flight) == (0, 0, 0)


# --------------------------------------------------------------------------
# Real loopback
# --------------------------------------------------------------------------


async def _with_client(test: Any) -> None:
    """Run C{await test(http)} with a private pool, closed afterwards."""
    from twisted.internet import reactor

    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        await defer.ensureDeferred(test(http)).addTimeout(TIMEOUT, reactor)
    finally:
        await pool.closeCachedConnections()


async def _listening(**settings: Any) -> FakeMLHost:
    from twisted.internet import reactor

    host = FakeMLHost(reactor, **settings)
    await host.listen()
    return host


@pytest_twisted.ensureDeferred
async def test_real_predict() -> None:
    host = await _listening(name="real", service_time=0.01)
    try:

        async def test(http: HTTPClient) -> None:
            content_type, body = predict_body(ENTRIES["clip-visual"], image=JPEG)
            response = await http.post(host.url + "/predict", data=body, headers={b"content-type": [content_type]})
            assert response.code == 200
            assert response.headers.getRawHeaders(b"x-fake-host") == [b"real"]
            result = await response.json()
            assert len(json.loads(result["clip"])) == 512
            assert host.served == 1 and host.received[0].sha256 == hashlib.sha256(body).hexdigest()

        await _with_client(test)
        assert host.address == f"127.0.0.1:{host.port}"
    finally:
        await host.stop()

    async def refused(http: HTTPClient) -> None:
        with pytest.raises(error.ConnectionRefusedError):
            await http.get(host.url + "/ping")

    await _with_client(refused)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["die-mid-answer", "reset"])
async def test_real_broken_connections(mode: str) -> None:
    host = await _listening(mode=mode)
    try:

        async def test(http: HTTPClient) -> None:
            content_type, body = predict_body(ENTRIES["faces"], image=JPEG)
            with pytest.raises((ResponseFailed, error.ConnectionLost, error.ConnectionDone)):
                response = await http.post(host.url + "/predict", data=body, headers={b"content-type": [content_type]})
                await treq.content(response)
            assert len(host.received) == 1 and host.served == 0

        await _with_client(test)
    finally:
        await host.stop()


@pytest_twisted.ensureDeferred
async def test_real_die_mid_answer_sends_the_head_and_half_the_body() -> None:
    host = await _listening(mode="die-mid-answer")
    try:

        async def test(http: HTTPClient) -> None:
            content_type, body = predict_body(ENTRIES["faces"], image=JPEG)
            response = await http.post(host.url + "/predict", data=body, headers={b"content-type": [content_type]})
            assert response.code == 200
            with pytest.raises(ResponseFailed):
                await treq.content(response)

        await _with_client(test)
    finally:
        await host.stop()


@pytest_twisted.ensureDeferred
async def test_stop_aborts_hung_and_idle_connections() -> None:
    from twisted.internet import reactor

    host = await _listening(mode="hang")
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        pending = http.get(host.url + "/ping")
        while not host._channels:
            await defer.ensureDeferred(_sleep(0.01))
        await host.stop().addTimeout(TIMEOUT, reactor)
        with pytest.raises(ResponseFailed):
            await pending.addTimeout(TIMEOUT, reactor)
        assert host.cancelled == 1 and host.connections == 1
    finally:
        await host.stop()
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_idle_keepalive_connections_are_closed_like_the_real_service() -> None:
    from twisted.internet import reactor

    host = await _listening(keepalive_timeout=0.2)
    pool = HTTPConnectionPool(reactor, persistent=True)
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        for _ in range(2):
            response = await http.get(host.url + "/ping").addTimeout(TIMEOUT, reactor)
            assert await response.text() == "pong"
        assert host.connections == 1, "the second request reused the connection"
        await _sleep(0.5)
        assert not host._channels, "the idle connection was closed"
    finally:
        await pool.closeCachedConnections()
        await host.stop()


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor, task

    await task.deferLater(reactor, seconds)


@pytest_twisted.ensureDeferred
async def test_start_fake_hosts_for_the_demo() -> None:
    from twisted.internet import reactor

    hosts = await start_fake_hosts(reactor, demo_specs(3))
    try:
        assert [h.name for h in hosts] == ["demo-1", "demo-2", "demo-3"]
        assert len({h.port for h in hosts}) == 3
        assert hosts[0].service_time["faces"] < hosts[2].service_time["faces"]

        async def test(http: HTTPClient) -> None:
            for h in hosts:
                response = await http.get(h.url + "/ping")
                assert (await response.text(), response.headers.getRawHeaders(b"x-fake-host")) == (
                    "pong",
                    [h.name.encode()],
                )

        await _with_client(test)
    finally:
        await defer.gatherResults([h.stop() for h in hosts])


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.first_line: defer.Deferred[bytes] = defer.Deferred()
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"\n" in self.out and not self.first_line.called:
            self.first_line.callback(self.out.split(b"\n")[0])

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        if not self.first_line.called:
            self.first_line.errback(reason)
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_child_process_prints_listening_serves_and_exits_on_sigterm() -> None:
    from twisted.internet import reactor

    child = _ChildProtocol()
    args = [
        sys.executable,
        "-m",
        "imml.testing",
        "--name",
        "child",
        "--slots",
        "2",
        "--service-ms",
        "5",
        "--service-ms-task",
        "clip-textual=1",
    ]
    process = reactor.spawnProcess(child, sys.executable, args, env=dict(os.environ))
    try:
        line = await child.first_line.addTimeout(TIMEOUT, reactor)
        assert line.startswith(b"LISTENING 127.0.0.1:"), child.err
        address = line.split()[1].decode()

        async def test(http: HTTPClient) -> None:
            response = await http.get(f"http://{address}/ping")
            assert await response.text() == "pong"
            assert response.headers.getRawHeaders(b"x-fake-host") == [b"child"]
            content_type, body = predict_body(ENTRIES["clip-textual"], text="a dog")
            response = await http.post(
                f"http://{address}/predict", data=body, headers={b"content-type": [content_type]}
            )
            assert response.code == 200 and "clip" in await response.json()

        await _with_client(test)
        process.signalProcess("TERM")
        assert await child.ended.addTimeout(TIMEOUT, reactor) == 0, child.err
        assert child.out == line + b"\n"
    finally:
        if process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# The fake host view, for strategy authors
# --------------------------------------------------------------------------


def test_fake_backend_view_provides_the_interface() -> None:
    view = FakeBackendView("10.0.0.1:3003")
    verifyObject(IBackendView, view)
    assert view.address == BackendAddress("10.0.0.1", 3003)
    assert (view.index, view.weight, view.tier, view.in_flight, view.limit, view.proven_limit) == (0, 1.0, 0, 0, 1, 1)
    assert (view.error_rate, view.throughput, view.slot_time, view.next_answer_in()) == (0.0, None, None, None)
    assert view.service_time("clip-visual") is None and view.has_free_slot()


def test_fake_backend_view_addresses() -> None:
    assert FakeBackendView("NAS").address == BackendAddress("nas", 3003)
    assert str(FakeBackendView("[fd00::1]:8080")) == "[fd00::1]:8080"
    assert FakeBackendView(BackendAddress("mac", 1)).address == BackendAddress("mac", 1)
    with pytest.raises(BackendListError):
        FakeBackendView("host:99999")


def test_fake_backend_view_is_plain_settable_facts() -> None:
    view = FakeBackendView("a", limit=2, service_times={"faces": 0.15, "other": 0.5}, answer_in=0.02)
    assert view.has_free_slot()
    view.in_flight = 2
    assert not view.has_free_slot()
    view.limit = 3
    assert view.has_free_slot() and view.proven_limit == 3, "the proven limit follows the limit unless set"
    view.proven_limit = 2
    assert (view.limit, view.proven_limit) == (3, 2)
    assert FakeBackendView("b", limit=4, proven_limit=3).proven_limit == 3
    assert (view.service_time("faces"), view.service_time("ocr"), view.service_time(None)) == (0.15, None, 0.5)
    view.service_times["ocr"] = 0.2
    assert view.service_time("ocr") == 0.2
    assert view.next_answer_in() == 0.02
    view.answer_in = None
    assert view.next_answer_in() is None
