"""
The request log, through the balancer's request path in memory
(L{memory.memory_balancer}): every request, whatever becomes of it, is one
event with its client, method, path, task, status, bytes, host, tries and
duration, and a line that reads like nginx's, with C{-} where nothing is
known, never C{None}.
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

from memory import MemoryBalancer, memory_balancer
from twisted.logger import formatEvent

from imml.requestlog import FIELDS, size

CLIENT = "192.0.2.50"  # where memory_balancer's clients come from
A, B = "10.0.0.1:3003", "10.0.0.2:3003"

#: A request line: client method path task status in N out N via host tries duration[: reason].
LINE = re.compile(
    r"^(?P<client>\S+) (?P<method>\S+) (?P<path>\S+) (?P<task>\S+) (?P<status>\d{3}) "
    r"in (?P<bytes_in>\d+(\.\d)? [kMG]?B) out (?P<bytes_out>\d+(\.\d)? [kMG]?B) via (?P<host>\S+) "
    r"(?P<tries>\d+) tr(y|ies) (?P<duration>\d+\.\d{3}) s(: (?P<reason>.+))?$"
)


def the_request(b: MemoryBalancer) -> tuple[dict[str, Any], re.Match]:
    """
    The one request event logged, checked for what every event must be;
    with its line, parsed.
    """
    [event] = b.request_events()
    assert set(FIELDS) <= set(event)
    text = formatEvent(event)
    assert "None" not in text
    line = LINE.match(text)
    assert line is not None, text
    assert (line["client"], line["method"], line["path"]) == (event["client"], event["method"], event["path"])
    assert (int(line["status"]), line["host"], line["task"]) == (
        event["status"],
        event["host"] or "-",
        event["task"] or "-",
    )
    assert (line["bytes_in"], line["bytes_out"]) == (size(event["bytes_in"]), size(event["bytes_out"]))
    assert int(line["tries"]) == event["tries"] == len(event["tried"])
    assert line["reason"] == event["reason"]
    assert event["duration_s"] >= event["waited_s"] >= 0
    return event, line


def test_an_answered_request():
    b = memory_balancer({"name": "a", "service_time": 0.05})
    client = b.predict()
    b.advance(0.05)
    _, _, body = client.answer()
    event, line = the_request(b)
    assert event["client"] == CLIENT and (event["method"], event["path"]) == ("POST", "/predict")
    assert (event["task"], event["status"], event["host"], event["tried"]) == ("clip-visual", 200, A, [A])
    assert (event["bytes_in"], event["bytes_out"]) == (len(client.body), len(body))
    assert event["reason"] is None and event["duration_s"] > 0
    assert formatEvent(event).endswith(f" via {A} 1 try 0.050 s")


def test_a_request_failed_over_to_another_host():
    b = memory_balancer({"name": "a", "mode": "error503"}, {"name": "b"})
    status, _, _ = b.predict("clip-textual").answer()
    assert status == 200
    event, line = the_request(b)
    assert (event["task"], event["status"], event["host"]) == ("clip-textual", 200, B)
    assert event["tried"] == [A, B] and " 2 tries " in line.string


def test_a_path_the_hosts_do_not_know_is_a_forwarded_404():
    b = memory_balancer({"name": "a"})
    assert b.send(b"GET", b"/nothing?x=1").answer()[0] == 404
    event, _ = the_request(b)
    assert (event["method"], event["path"], event["task"], event["status"], event["host"]) == (
        "GET",
        "/nothing",  # never the query: it may carry what is not the log's
        None,
        404,
        A,
    )


def test_requests_for_another_host_are_refused_with_400_and_logged():
    for raw, method, path in [
        (b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n", "GET", "http://example.org/"),
        (b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org\r\n\r\n", "CONNECT", "example.org:443"),
    ]:
        b = memory_balancer({"name": "a"})
        assert b.send_raw(raw).answer()[0] == 400
        event, line = the_request(b)
        assert (event["client"], event["method"], event["path"], event["status"]) == (CLIENT, method, path, 400)
        assert (line["task"], line["host"], line["tries"]) == ("-", "-", "0")
        assert "not a forward proxy" in event["reason"] and event["bytes_out"] > 0
        assert not b.host("a").received


def test_a_declared_body_over_the_limit_is_refused_with_413_and_logged_once():
    b = memory_balancer({"name": "a"}, max_body=1000)
    client = b.send_raw(b"POST /predict HTTP/1.1\r\nHost: balancer\r\nContent-Length: 5000\r\n\r\n")
    status, _, body = client.answer()
    assert status == 413
    client.go_away()
    event, line = the_request(b)
    assert (event["method"], event["path"], event["status"], event["bytes_in"]) == ("POST", "/predict", 413, 0)
    assert event["bytes_out"] == len(body) and "1000 bytes" in event["reason"] and line["tries"] == "0"


def test_a_chunked_body_over_the_limit_is_refused_with_413_and_logged_once():
    b = memory_balancer({"name": "a"}, max_body=1000)
    client = b.send_raw(
        b"POST /predict HTTP/1.1\r\nHost: balancer\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n"
    )
    client.channel.dataReceived(b"%x\r\nmore" % 2**40)
    assert client.answer()[0] == 413
    client.go_away()
    event, _ = the_request(b)
    assert (event["method"], event["status"], event["bytes_in"]) == ("POST", 413, 16)


def test_a_body_that_cannot_be_kept_gets_503_and_is_logged_once(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    b = memory_balancer({"name": "a"})
    b.site.bodies.spool_over = 10  # every body goes to a file, which cannot be made
    client = b.predict()
    assert client.answer()[0] == 503
    client.go_away()
    event, _ = the_request(b)
    assert (event["method"], event["status"], event["host"]) == ("POST", 503, None)
    assert "could not keep the request body" in event["reason"]


def test_a_client_gone_while_its_request_is_on_a_host():
    b = memory_balancer({"name": "a", "service_time": 10.0})
    client = b.predict()
    b.advance(1)
    client.go_away()
    b.agent.flush()
    event, line = the_request(b)
    # nginx's 499 (the metrics say cancelled)
    assert (event["status"], event["host"], event["tried"]) == (499, None, [A])
    assert event["reason"] == "the client went away" and line["host"] == "-"
    assert event["bytes_in"] == len(client.body) and event["bytes_out"] == 0


def test_a_client_gone_while_sending_its_body():
    b = memory_balancer({"name": "a"})
    client = b.send_raw(b"POST /predict HTTP/1.1\r\nHost: balancer\r\nContent-Length: 5000\r\n\r\n0123456789")
    b.advance(2)
    client.go_away()
    event, line = the_request(b)
    assert (event["method"], event["path"], event["status"], event["bytes_in"]) == ("POST", "/predict", 499, 10)
    assert "before its request was whole" in event["reason"] and line["duration"] == "2.000"
    assert not b.host("a").received


def test_a_malformed_body_is_refused_by_twisted_web_with_400_and_logged():
    b = memory_balancer({"name": "a"})
    client = b.send_raw(b"POST /predict HTTP/1.1\r\nHost: balancer\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert client.answer()[0] == 400
    client.go_away()
    event, _ = the_request(b)
    assert (event["method"], event["status"]) == ("POST", 400) and "malformed" in event["reason"]


def test_a_request_that_waited_for_a_host_until_the_queue_timeout():
    b = memory_balancer({"name": "a"}, queue_timeout=5.0)
    b.fleet.check_failed(b.fleet.backends[0], "connection refused")
    b.fleet.check_failed(b.fleet.backends[0], "connection refused")
    b.fleet.check_failed(b.fleet.backends[0], "connection refused")
    assert not b.fleet.any_up
    client = b.predict()
    b.advance(5.1)
    assert client.answer()[0] == 503
    event, line = the_request(b)
    assert (event["status"], event["host"], event["tries"]) == (503, None, 0)
    assert event["waited_s"] >= 5.0 and "no ML host came up within 5 s" in event["reason"]
    assert (line["host"], line["tries"]) == ("-", "0")


def test_a_host_answer_cut_short_is_logged_with_why():
    b = memory_balancer({"name": "a", "mode": "die-mid-answer"}, {"name": "b"}, hold_limit=100)
    client = b.predict()
    b.advance(0.1)
    assert client.cut
    event, _ = the_request(b)
    assert (event["status"], event["host"]) == (200, A) and event["bytes_out"] == len(client.partial()) > 100
    assert event["reason"] == "the host's answer broke off: connection lost mid-answer"


def test_ping_is_logged():
    b = memory_balancer({"name": "a"})
    assert b.send(b"GET", b"/ping").answer()[2] == b"pong"
    event, line = the_request(b)
    assert (event["path"], event["status"], event["bytes_out"], event["reason"]) == ("/ping", 200, 4, None)
    assert line.string == f"{CLIENT} GET /ping - 200 in 0 B out 4 B via - 0 tries {line['duration']} s"


def test_sizes_read_as_people_write_them():
    assert [size(n) for n in (0, 999, 1000, 5210, 999_949, 999_950, 3_100_000, 2 * 10**9, 5 * 10**12)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "5.2 kB",
        "999.9 kB",
        "1.0 MB",
        "3.1 MB",
        "2.0 GB",
        "5.0 TB",
    ]
