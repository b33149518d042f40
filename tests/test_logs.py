"""
The balancer's log observer: the lines twistd would write, and where twistd's
options say.
"""

import io
import signal
from pathlib import Path
from typing import Iterator, Optional

import pytest
from support import bounded
from treq.client import HTTPClient
from twisted.application import service
from twisted.internet import reactor
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from imml import logs, tap
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


def _twistd(*args: str) -> ServerOptions:
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
