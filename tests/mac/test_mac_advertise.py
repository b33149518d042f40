"""
The advertiser with a stand-in for python-zeroconf: what it registers
(the service type, name, address, port and TXT records), that it withdraws
it when the service stops serving and again registers it, that every call
runs off the reactor thread and in order, and that imml-mac without
python-zeroconf runs unadvertised with a warning.
"""

import builtins
import threading

import pytest_twisted
from mac_helpers import tagged
from twisted.internet import reactor
from twisted.internet.defer import Deferred

import imml
from imml.mac import advertise
from imml.mac.advertise import Advertiser, advertiser, txt_records


class FakeZeroconf:
    def __init__(self, calls):
        self.calls = calls

    def register_service(self, info, allow_name_change=False):
        self.calls.append(("register", info, threading.current_thread()))

    def unregister_service(self, info):
        self.calls.append(("unregister", info, threading.current_thread()))

    def close(self):
        self.calls.append(("close", None, threading.current_thread()))


class Info:
    def __init__(self, **kw):
        self.__dict__.update(kw)


async def settled(a):
    """
    Wait until the worker has run what was asked so far.
    """
    d = Deferred()
    a._pool.callInThread(lambda: reactor.callFromThread(d.callback, None))
    await d


@pytest_twisted.ensureDeferred
async def test_advertised_while_ready_withdrawn_otherwise_off_the_reactor_thread():
    calls = []
    a = Advertiser(
        reactor,
        "Studio",
        "127.0.0.1",
        3003,
        txt_records(("CoreMLExecutionProvider", "CPUExecutionProvider")),
        lambda: FakeZeroconf(calls),
        Info,
    )
    a.ready()  # not running yet: nothing
    a.startService()
    try:
        a.readiness(True)
        a.readiness(True)  # (once)
        await settled(a)
        [(what, info, thread)] = calls
        assert what == "register" and thread is not threading.current_thread()
        assert info.type_ == "_immich-ml._tcp.local." == imml.MDNS_SERVICE
        assert info.name == "Studio._immich-ml._tcp.local."
        assert info.addresses == [bytes([127, 0, 0, 1])] and info.port == 3003
        assert info.properties == {"version": imml.__version__, "providers": "CoreML,CPU"}
        a.readiness(False)
        a.readiness(True)
        await settled(a)
        assert [c[0] for c in calls] == ["register", "unregister", "register"]
    finally:
        await a.stopService()
    assert [c[0] for c in calls] == ["register", "unregister", "register", "unregister", "close"]


def test_without_zeroconf_the_service_runs_unadvertised_with_a_warning(monkeypatch, events):
    real_import = builtins.__import__

    def no_zeroconf(name, *args, **kwargs):
        if name == "zeroconf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zeroconf)
    assert advertiser(reactor, None, "0.0.0.0", 3003, ("CPUExecutionProvider",)) is None
    [warning] = tagged(events, "advertise-off")
    assert "pip install 'imml[mdns]'" in warning["log_format"]


def test_the_address_advertised_is_the_one_listened_on_or_reachable():
    assert advertise.reachable_address("127.0.0.1") == "127.0.0.1"
    assert advertise.reachable_address("0.0.0.0") not in ("0.0.0.0", "")
