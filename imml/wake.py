"""
Wake-on-LAN: while requests wait and a host with a MAC address is down, send
it a magic packet, at most once per interval per host.
"""

from __future__ import annotations

import socket
from typing import Callable, Optional

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .classify import RequestInfo
from .fleet import Fleet


def magic_packet(mac: str) -> bytes:
    """
    The Wake-on-LAN magic packet for C{mac} (C{aa:bb:cc:dd:ee:ff}, with
    colons, dashes or nothing between the bytes): six 0xFF bytes, then the
    address sixteen times.
    """
    digits = mac.replace(":", "").replace("-", "")
    address = bytes.fromhex(digits)
    if len(address) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return b"\xff" * 6 + address * 16


class _Broadcast(DatagramProtocol):
    def startProtocol(self) -> None:
        self.transport.setBroadcastAllowed(True)


@define(eq=False)
class Waker:
    """
    Sends magic packets to down hosts that have a MAC address, when a
    request of a task they serve has to wait.

    @ivar broadcast: where packets go (a broadcast address, or a host's own).
    @ivar interval: least seconds between two packets to one host.
    """

    fleet: Fleet
    reactor: object
    broadcast: str = "255.255.255.255"
    port: int = 9
    interval: float = 30.0
    #: Sends a packet to a MAC address; by default over UDP, as above.
    send: Optional[Callable[[str], None]] = None
    log: Logger = field(factory=Logger)
    _sent: dict = field(factory=dict)
    _udp: Optional[object] = None
    _loop: Optional[LoopingCall] = None

    def __attrs_post_init__(self) -> None:
        if self.send is None:
            self.send = self._send_udp

    def waiting(self, info: RequestInfo) -> None:
        """
        A request is waiting: wake every sleeping host that could serve it.
        """
        now = self.reactor.seconds()
        for backend in self.fleet.backends:
            mac = backend.settings.mac
            if mac is None or backend.up or backend.draining or not backend.serves(info.task):
                continue
            last = self._sent.get(backend.address)
            if last is not None and now - last < self.interval:
                continue
            self._sent[backend.address] = now
            self.send(mac)
            self.fleet.woken(backend)
            self.log.info(
                "sent a Wake-on-LAN packet to ML host {backend} ({mac}) via {broadcast}:{port}",
                backend=str(backend),
                mac=mac,
                broadcast=self.broadcast,
                port=self.port,
                imml_event="wake",
            )

    def start(self, waiting_now: Callable[[], list[RequestInfo]]) -> None:
        """
        Every C{interval} seconds, wake hosts again for the requests
        C{waiting_now()} returns.
        """

        def again() -> None:
            for info in {(i.task, i.interactive): i for i in waiting_now()}.values():
                self.waiting(info)

        self._loop = LoopingCall(again)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True).addErrback(
            lambda failure: self.log.failure("the Wake-on-LAN timer stopped", failure)
        )

    def stop(self) -> Optional[Deferred]:
        """
        Stop waking, and close the socket.
        """
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._udp is not None:
            udp, self._udp = self._udp, None
            return udp.stopListening()
        return None

    def _send_udp(self, mac: str) -> None:
        try:
            if self._udp is None:
                self._udp = self.reactor.listenUDP(0, _Broadcast())
            self._udp.write(magic_packet(mac), (self.broadcast, self.port))
        except (OSError, socket.error) as e:
            self.log.warn("cannot send a Wake-on-LAN packet to {mac}: {error}", mac=mac, error=str(e))
