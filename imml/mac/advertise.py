"""
Telling the network that Immich ML serves here (Bonjour): while the
supervised child is ready, the service is advertised as C{_immich-ml._tcp}
with TXT records C{version} (imml's) and C{providers} (the ONNX Runtime
execution providers it uses, short names); it is withdrawn (a goodbye the
balancers hear at once) when the child stops answering, ends, or the
service stops.  A balancer started with C{--discover mdns} adds the host
when it appears and drains it when it goes.

python-zeroconf blocks (it announces, and waits for its threads when it
closes): every call to it runs in one worker thread of our own, in the
order asked, never on the reactor.  Without python-zeroconf installed the
service runs unadvertised, with a warning (L{advertiser}).

Events: C{advertised}, C{withdrawn}, C{advertise-failed}, C{advertise-off}.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Mapping, Optional

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from imml import MDNS_SERVICE, __version__

log = Logger()

_SUFFIX = "ExecutionProvider"


def txt_records(providers: tuple[str, ...]) -> dict[str, str]:
    """
    What the service says of itself: imml's version, and its providers
    by their short names (C{CoreML,CPU}).
    """
    short = [p[: -len(_SUFFIX)] if p.endswith(_SUFFIX) else p for p in providers]
    return {"version": __version__, "providers": ",".join(short)}


def reachable_address(host: str) -> str:
    """
    The IPv4 address to advertise for a service listening on C{host}: that
    address itself, or for every address (C{0.0.0.0}) the one this machine
    sends multicast from (where the balancers that hear the advertisement
    can reach it).
    """
    if host not in ("", "0.0.0.0", "::"):
        return socket.gethostbyname(host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("224.0.0.251", 5353))  # (no packet is sent)
            address = s.getsockname()[0]
        except OSError:
            address = "0.0.0.0"
    # Multicast only on the loopback (no other network): this machine only.
    return "127.0.0.1" if address == "0.0.0.0" else address


def default_name() -> str:
    """
    This machine's host name, first label: what it is advertised as.
    """
    return socket.gethostname().split(".")[0] or "imml-mac"


class Advertiser(service.Service):
    """
    Advertises one service while it is L{ready}.

    @param zeroconf: makes the zeroconf instance (C{zeroconf.Zeroconf}).
    @param info: makes the service's record (C{zeroconf.ServiceInfo}) from
        keyword arguments.
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        host: str,
        port: int,
        txt: Mapping[str, str],
        zeroconf: Callable[[], Any],
        info: Callable[..., Any],
    ) -> None:
        self.reactor, self.name_, self.host, self.port, self.txt = reactor, name, host, port, dict(txt)
        self._zeroconf_factory, self._info_factory = zeroconf, info
        self._zeroconf: Any = None
        self._info: Any = None
        self._pool: Optional[ThreadPool] = None
        #: Whether the service is (to be) advertised.
        self.wanted = False

    def startService(self) -> None:
        super().startService()
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="imml-mac mDNS")
        self._pool.start()

    def stopService(self) -> Deferred:
        super().stopService()
        self.not_ready()
        d = self._in_worker(self._close)
        pool = self._pool

        def stop_pool(result: Any) -> Any:
            if pool is not None:
                pool.stop()
            return result

        return d.addBoth(stop_pool)

    def ready(self) -> None:
        """
        The service answers: advertise it.
        """
        if self.running and not self.wanted:
            self.wanted = True
            self._in_worker(self._register)

    def not_ready(self) -> None:
        """
        The service does not answer (or stops): withdraw it.
        """
        if self.wanted:
            self.wanted = False
            self._in_worker(self._unregister)

    def readiness(self, ready: bool) -> None:
        (self.ready if ready else self.not_ready)()

    def _in_worker(self, f: Callable[[], Any]) -> Deferred:
        """
        Run C{f} in the worker thread, after what was asked before (one
        thread: in order); its failure is logged.
        """
        d = deferToThreadPool(self.reactor, self._pool, f)
        d.addErrback(lambda failure: log.failure("mDNS advertising failed", failure, imml_event="advertise-failed"))
        return d

    # In the worker thread:

    def _register(self) -> None:
        if self._zeroconf is None:
            self._zeroconf = self._zeroconf_factory()
        address = reachable_address(self.host)
        self._info = self._info_factory(
            type_=MDNS_SERVICE,
            name=f"{self.name_}.{MDNS_SERVICE}",
            addresses=[socket.inet_aton(address)],
            port=self.port,
            properties=self.txt,
            server=f"{default_name()}.local.",
        )
        self._zeroconf.register_service(self._info, allow_name_change=True)
        self.reactor.callFromThread(
            log.info,
            "advertising Immich ML as {name} ({type}) at {address}:{port}",
            name=self._info.name,
            type=MDNS_SERVICE,
            address=address,
            port=self.port,
            imml_event="advertised",
        )

    def _unregister(self) -> None:
        info, self._info = self._info, None
        if info is not None and self._zeroconf is not None:
            self._zeroconf.unregister_service(info)
            self.reactor.callFromThread(
                log.info, "no longer advertising {name}", name=info.name, imml_event="withdrawn"
            )

    def _close(self) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is not None:
            zeroconf.close()


def advertiser(
    reactor: Any, name: Optional[str], host: str, port: int, providers: tuple[str, ...]
) -> Optional[Advertiser]:
    """
    The advertiser of a service on C{host}:C{port}, under C{name} (None:
    this machine's name); None, with a warning, without python-zeroconf.
    """
    try:
        from zeroconf import ServiceInfo, Zeroconf
    except ImportError:
        log.warn(
            "not advertising the service on the network: python-zeroconf is not installed "
            "(pip install 'imml[mdns]'); balancers must list this Mac by address",
            imml_event="advertise-off",
        )
        return None
    return Advertiser(reactor, name or default_name(), host, port, txt_records(providers), Zeroconf, ServiceInfo)


__all__ = ["Advertiser", "advertiser", "reachable_address", "txt_records"]
