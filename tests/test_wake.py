"""
Wake-on-LAN: packets go out while requests wait for a sleeping host.
"""

from support import bounded, until
from twisted.internet import reactor, task
from twisted.internet.protocol import DatagramProtocol

from imml.backends import BackendAddress
from imml.classify import RequestInfo
from imml.fleet import BackendSettings, Fleet
from imml.wake import Waker, magic_packet

OCR = RequestInfo(b"POST", b"/predict", "ocr")


def test_magic_packet():
    packet = magic_packet("AA-bb-cc-dd-ee-0f")
    assert len(packet) == 102
    assert packet[:6] == b"\xff" * 6
    assert packet[6:] == bytes.fromhex("aabbccddee0f") * 16


class Recorder:
    def __init__(self, clock):
        self.sent = []
        self.clock = clock

    def __call__(self, mac):
        self.sent.append((self.clock.seconds(), mac))


def sleeping_fleet(clock):
    fleet = Fleet.from_addresses(
        [BackendAddress("mac"), BackendAddress("nas"), BackendAddress("gpu")],
        clock,
        settings={
            BackendAddress("mac"): BackendSettings(mac="aa:bb:cc:dd:ee:01"),
            BackendAddress("nas"): BackendSettings(mac="aa:bb:cc:dd:ee:02", tasks=frozenset({"clip-visual"})),
            BackendAddress("gpu"): BackendSettings(),
        }.__getitem__,
    )
    for b in fleet.backends:
        fleet.check_failed(b, "timed out")
    return fleet


def test_only_sleeping_hosts_that_serve_the_task_are_woken_and_rate_limited():
    clock = task.Clock()
    fleet = sleeping_fleet(clock)
    sent = Recorder(clock)
    waker = Waker(fleet, clock, interval=30, send=sent)
    waker.waiting(OCR)
    waker.waiting(OCR)
    clock.advance(29)
    waker.waiting(OCR)
    assert sent.sent == [(0, "aa:bb:cc:dd:ee:01")]
    assert fleet.backends[0].waking
    clock.advance(1)
    waker.waiting(OCR)
    assert sent.sent == [(0, "aa:bb:cc:dd:ee:01"), (30, "aa:bb:cc:dd:ee:01")]
    fleet.check_passed(fleet.backends[0])
    fleet.check_passed(fleet.backends[0])
    assert not fleet.backends[0].waking
    clock.advance(60)
    waker.waiting(OCR)
    assert len(sent.sent) == 2  # it is up: no packet


class Catch(DatagramProtocol):
    def __init__(self):
        self.got = []

    def datagramReceived(self, data, addr):
        self.got.append(data)


@bounded(10)
async def test_the_packet_goes_out_over_udp():
    catcher = Catch()
    port = reactor.listenUDP(0, catcher, interface="127.0.0.1")
    try:
        fleet = sleeping_fleet(reactor)
        waker = Waker(fleet, reactor, broadcast="127.0.0.1", port=port.getHost().port)
        waker.waiting(OCR)
        await until(lambda: catcher.got)
        assert catcher.got == [magic_packet("aa:bb:cc:dd:ee:01")]
        await waker.stop()
    finally:
        await port.stopListening()
