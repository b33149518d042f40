"""
The services the balancer's tree is made of: a listener that says when it
listens (L{Listener}), and a service that starts and stops a component
(L{Running}).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class Listener(service.Service):
    """
    Listens on an endpoint while running.  L{listening} tells when the port
    is open, and which it is.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, description: str = "") -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description or repr(endpoint)
        #: The open port, while listening.
        self.port: Optional[IListeningPort] = None
        #: Why the port could not be opened, if it could not.
        self.failure: Optional[Failure] = None
        self._opening: Optional[Deferred[None]] = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        """
        Open the port while twistd may still bind privileged ports (before
        it drops to C{--uid}).
        """
        super().privilegedStartService()
        self._open()

    def startService(self) -> None:
        super().startService()
        if self._opening is None and self.port is None:
            self._open()

    def _open(self) -> None:
        self.failure = None
        self._opening = d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self._opening = None
        self.port = port
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)

    def _failed(self, failure: Failure) -> None:
        self._opening = None
        self.failure = failure
        if not failure.check(CancelledError):
            log.failure("cannot listen on {endpoint}", failure, endpoint=self.description)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def listening(self) -> Deferred[IListeningPort]:
        """
        Fires with the listening port once it is open, or fails with why it
        could not be.
        """
        if self.port is not None:
            return succeed(self.port)
        if self.failure is not None:
            return fail(self.failure)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._opening is not None:
            self._opening.cancel()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


class Running(service.Service):
    """
    Starts a component when the tree starts, stops it when the tree stops.
    """

    def __init__(self, name: str, start: Callable[[], Any], stop: Callable[[], Any]) -> None:
        self.setName(name)
        self._start, self._stop = start, stop

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return maybeDeferred(self._stop)
