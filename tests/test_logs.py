"""
The balancer's log observer: the lines twistd would write, or one JSON object
per event, and where twistd's options say.
"""

import io
import json
import math
import re
import signal
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from support import bounded
from treq.client import HTTPClient
from twisted.application import service
from twisted.internet import reactor
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from imml import logs, tap
from imml.records import RequestRecord
from imml.requestlog import FIELDS, RequestLog
from imml.testing import start_fake_hosts
from imml.upstream import make_agent, make_pool


@pytest.fixture(autouse=True)
def _keep_sigusr1() -> Iterator[None]:
    # A --logfile observer rotates on SIGUSR1, as twistd's does.
    before = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, before)


def _events() -> list[LogEvent]:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    base = {"log_namespace": "imml.forward.Forwarder", "log_level": LogLevel.info, "log_time": 1764284567.25}
    return [
        dict(base, log_format="POST /predict (clip-textual) -> 200 via 127.0.0.1:3003 in 0.012 s, 1 tries"),
        dict(base, log_format="ML host {backend} is {new}", backend="nas:3003", new="up"),
        dict(base, log_format="a {{literal}} brace"),
        dict(base, log_format="two\nlines"),
        dict(base, log_format="it failed", log_failure=failure),
        dict(base, log_format=None, log_failure=failure),
        dict(base, log_format="{missing}"),
        dict(base, log_format="from a system", log_system="HTTPChannel,3,127.0.0.1"),
        dict(base, log_format="no time", log_time=None),
        dict(base, log_format="no level", log_level=None),
        {"log_format": "bare"},
        dict(base, log_format=""),
        dict(base, log_format="just before the next second", log_time=1764284567.999),
    ]


def test_lines_are_twisteds_classic_lines() -> None:
    """
    Every kind of event (plain, with fields, escaped braces, several lines,
    a traceback, a system, missing keys) reads exactly as twistd's own text
    observer writes it.
    """
    ours, theirs = io.StringIO(), io.StringIO()
    observer, reference = logs.line_observer(ours), textFileLogObserver(theirs)
    for event in _events():
        observer(dict(event))
        reference(dict(event))
    assert ours.getvalue() == theirs.getvalue()
    assert "via 127.0.0.1:3003" in ours.getvalue()
    assert "ZeroDivisionError" in ours.getvalue()


def test_time_changes_with_the_second() -> None:
    """
    The time is formatted once a second, and still shows each second.
    """
    out = io.StringIO()
    observer = logs.line_observer(out)
    base = {"log_namespace": "n", "log_level": LogLevel.info, "log_format": "x"}
    for when in (100.1, 100.9, 101.0, 99.5):
        observer(dict(base, log_time=when))
    reference = io.StringIO()
    for when in (100, 100, 101, 99):
        textFileLogObserver(reference)(dict(base, log_time=when))
    assert out.getvalue() == reference.getvalue()


def _twistd(*args: str, balancer: tuple[str, ...] = ()) -> ServerOptions:
    options = ServerOptions()
    options.parseOptions(
        [
            *args,
            "imml-balancer",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--admin",
            "none",
            "--backends",
            "127.0.0.1:9",
            *balancer,
        ]
    )
    return options


def _application_observer(options: ServerOptions) -> Optional[ILogObserver]:
    top = tap.makeService(options.subOptions)
    application = service.Application("imml-balancer")
    top.setServiceParent(application)
    return application.getComponent(ILogObserver, None)


def test_logfile_rotates_and_keeps_a_few(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    With --logfile, twistd is given the balancer's observer: it writes to
    that file, rotates it by size and keeps only the last few rotated files.
    """
    monkeypatch.setattr(logs, "ROTATE_BYTES", 2000)
    path = tmp_path / "imml.log"
    observer = _application_observer(_twistd("-n", "--logfile", str(path)))
    assert observer is not None
    event = {"log_namespace": "imml", "log_level": LogLevel.info, "log_time": 1.0, "log_format": "x" * 100}
    for _ in range(400):  # about 60 KB: 30 rotations
        observer(dict(event))
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "imml.log")
    assert rotated == [f"imml.log.{i}" for i in range(1, logs.KEEP_ROTATED + 1)]
    assert "x" * 100 in path.read_text()
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)


def test_stdout_when_not_a_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    observer = _application_observer(_twistd("-n"))
    observer({"log_namespace": "imml", "log_level": LogLevel.info, "log_time": 1.0, "log_format": "hello"})
    assert "[imml#info] hello" in capsys.readouterr().out


@pytest.mark.parametrize("args", [("-n", "--syslog"), ("-n", "--logger", "twisted.logger.textFileLogObserver")])
def test_other_loggers_are_left_to_twistd(args: tuple[str, ...]) -> None:
    """
    --syslog and --logger are twistd's to honour: the balancer offers no
    observer then.
    """
    assert _application_observer(_twistd(*args)) is None


def test_an_application_observer_is_kept() -> None:
    """
    An application that already has an observer keeps it.
    """
    options = _twistd("-n")
    top = tap.makeService(options.subOptions)
    application = service.Application("imml-balancer")
    mine = textFileLogObserver(io.StringIO())
    application.setComponent(ILogObserver, mine)
    top.setServiceParent(application)
    assert application.getComponent(ILogObserver) is mine


@bounded(10)
async def test_the_balancers_connections_to_its_hosts_log_nothing_of_their_own() -> None:
    """
    Twisted's HTTP client factories log C{Starting factory} and C{Stopping
    factory} for every connection, more lines than the requests' own; the
    agents the balancer makes for its hosts (requests and health checks)
    are quiet.
    """
    [host] = await start_fake_hosts(reactor, [{"name": "h0"}])
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for pool in (make_pool(reactor), make_pool(reactor, persistent=False)):
            client = HTTPClient(make_agent(reactor, 5.0, pool))
            response = await client.get(f"http://{host.address}/ping")
            assert await response.content() == b"pong"
            await pool.closeCachedConnections()
        await host.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if "factory" in str(e.get("log_format", ""))] == []


# -- --log-format json ---------------------------------------------------------

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines and all(line.startswith("{") for line in lines)  # one object per line
    return [json.loads(line) for line in lines]


def _logged_as_json(emit) -> list[dict[str, Any]]:
    """What C{emit(logger)} logs, as the JSON observer writes it."""
    out = io.StringIO()
    emit(Logger(namespace="imml.test", observer=logs.line_observer(out, "json")))
    return _json_lines(out.getvalue())


def test_every_json_line_has_the_stable_keys_and_the_events_fields() -> None:
    request = RequestRecord(
        "POST", "/predict", "clip-visual", 200, "10.0.0.12:3003", ("10.0.0.12:3003",), 0.041, 0.002,
        client="192.0.2.7", bytes_in=5210, bytes_out=4870,
    )  # fmt: skip

    def emit(log: Logger) -> None:
        RequestLog(log).request_finished(request)
        log.warn("ML host {backend} is {new}", backend="nas:3003", new="down", imml_event="health")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("request {uri!r} failed inside the balancer", uri=b"/predict", imml_event="bug")

    answered, health, failed = _logged_as_json(emit)
    for line in (answered, health, failed):
        assert set(logs.JSON_KEYS) <= set(line) and line["logger"] == "imml.test"
        assert RFC3339_UTC.match(line["time"]) and isinstance(line["epoch"], float)
        assert 0 <= line["epoch"] - datetime.fromisoformat(line["time"]).timestamp() < 0.001
    assert (answered["level"], answered["imml_event"]) == ("info", "request")
    assert answered["message"] == (
        "192.0.2.7 POST /predict clip-visual 200 in 5.2 kB out 4.9 kB via 10.0.0.12:3003 1 try 0.041 s"
    )
    assert set(FIELDS) <= set(answered)
    assert {k: answered[k] for k in FIELDS} == {
        "client": "192.0.2.7",
        "method": "POST",
        "path": "/predict",
        "task": "clip-visual",
        "status": 200,
        "bytes_in": 5210,
        "bytes_out": 4870,
        "host": "10.0.0.12:3003",
        "tries": 1,
        "tried": ["10.0.0.12:3003"],
        "duration_s": 0.041,
        "waited_s": 0.002,
        "reason": None,
    }
    assert (health["level"], health["imml_event"], health["message"]) == ("warn", "health", "ML host nas:3003 is down")
    assert (health["backend"], health["new"]) == ("nas:3003", "down")
    assert (failed["level"], failed["imml_event"], failed["uri"]) == ("critical", "bug", "b'/predict'")
    assert failed["exception"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in failed["traceback"] and "raise ZeroDivisionError" in failed["traceback"]


def test_the_json_time_is_utc_to_the_millisecond() -> None:
    out = io.StringIO()
    observer = logs.line_observer(out, "json")
    for when in (1764284567.25, 1764284567.9999, 1764284568.0):
        observer({"log_namespace": "n", "log_level": LogLevel.info, "log_time": when, "log_format": "x"})
    assert [line["time"] for line in _json_lines(out.getvalue())] == [
        "2025-11-27T23:02:47.250Z",
        "2025-11-27T23:02:47.999Z",
        "2025-11-27T23:02:48.000Z",
    ]


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    __repr__ = __str__


def test_a_value_json_cannot_hold_is_written_as_a_string_and_the_observer_goes_on() -> None:
    looped: list[Any] = []
    looped.append(looped)

    def emit(log: Logger) -> None:
        log.info(
            "odd values",
            a_set={3},
            raw=b"\xff",
            nan=math.nan,
            loop=looped,
            keyed={(1, 2): "tuple key"},
            thing=_Unprintable(),
            message="an event's own field named like a stable key",
        )
        log.info("and the next event")

    odd, after = _logged_as_json(emit)
    assert (odd["message"], odd["a_set"], odd["raw"], odd["nan"]) == ("odd values", "{3}", "b'\\xff'", "nan")
    assert odd["loop"] == "[[...]]" and odd["keyed"] == "{(1, 2): 'tuple key'}"
    assert odd["thing"] == "<unprintable _Unprintable>"
    assert after["message"] == "and the next event"


def test_an_event_that_cannot_be_written_at_all_says_so() -> None:
    out = io.StringIO()
    logs.line_observer(out, "json")({"log_format": "x", "log_time": "not a time"})
    [line] = _json_lines(out.getvalue())
    assert line["imml_event"] == "log-unwritable" and "not a time" in line["event"]


def test_json_to_stdout_with_n(capsys: pytest.CaptureFixture[str]) -> None:
    observer = _application_observer(_twistd("-n", balancer=("--log-format", "json")))
    observer({"log_namespace": "imml", "log_level": LogLevel.info, "log_time": 1.0, "log_format": "hello"})
    [line] = _json_lines(capsys.readouterr().out)
    assert (line["message"], line["level"], line["logger"]) == ("hello", "info", "imml")


def test_json_to_a_logfile_set_in_the_config_file_rotates_as_text_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "ROTATE_BYTES", 2000)
    config = tmp_path / "imml.toml"
    config.write_text('[balancer]\nlog-format = "json"\n')
    path = tmp_path / "imml.log"
    options = _twistd("-n", "--logfile", str(path), balancer=("--config", str(config)))
    assert options.subOptions["log-format"] == "json"
    observer = _application_observer(options)
    for n in range(100):
        observer({"log_namespace": "imml", "log_level": LogLevel.info, "log_time": 1.0, "log_format": f"event {n}"})
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("imml.log."))
    assert rotated == [f"imml.log.{i}" for i in range(1, logs.KEEP_ROTATED + 1)]
    # every file holds whole lines, each one a JSON object; the newest last
    for name in rotated:
        _json_lines((tmp_path / name).read_text())
    assert _json_lines(path.read_text())[-1]["message"] == "event 99"


def _refused(capsys: pytest.CaptureFixture[str], *args: str, balancer: tuple[str, ...]) -> str:
    """
    What twistd's subcommand says, in its one line on stderr, of options it
    refuses (with exit status 2).
    """
    with pytest.raises(SystemExit) as exit:
        _twistd(*args, balancer=balancer)
    assert exit.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    return line


def test_a_log_format_that_does_not_exist_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--log-format must be text or json, not 'xml'" in _refused(capsys, "-n", balancer=("--log-format", "xml"))
    config = tmp_path / "imml.toml"
    config.write_text('[balancer]\nlog-format = "xml"\n')
    line = _refused(capsys, "-n", balancer=("--config", str(config)))
    assert "imml.toml" in line and "log-format must be text or json, not 'xml'" in line


@pytest.mark.parametrize("args", [("-n", "--syslog"), ("-n", "--logger", "twisted.logger.textFileLogObserver")])
def test_json_is_refused_where_twistd_writes_the_log(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert "--log-format json" in _refused(capsys, *args, balancer=("--log-format", "json"))


def test_a_request_line_in_the_text_format() -> None:
    """
    The text observer writes a request's line as it is, braces and all; a
    client gone is nginx's 499, and what is not known reads C{-}.
    """
    events: list[LogEvent] = []
    out = io.StringIO()
    RequestLog(Logger(namespace="imml.forward", observer=events.append)).request_finished(
        RequestRecord("GET", "/{x}", None, "cancelled", None, (), 1.5, reason="the client went away")
    )
    logs.line_observer(out)(events[0])
    line = out.getvalue()
    assert line.endswith(
        "[imml.forward#info] - GET /{x} - 499 in 0 B out 0 B via - 0 tries 1.500 s: the client went away\n"
    )
    assert formatEvent(events[0]) in line
