"""
The services the balancer's tree is made of: a listener that says when it
listens (L{Listener}), a service that starts and stops a component
(L{Running}), and what makes the process exit when a listener cannot
listen (L{ListensOrExits}).

Event: C{cannot-listen}.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class CannotListen(Exception):
    """
    A listener's port could not be opened: where, and why in a few words.
    """

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(endpoint, reason)
        self.endpoint, self.reason = endpoint, reason

    def __str__(self) -> str:
        return f"cannot listen on {self.endpoint}: {self.reason}"


def why(failure: Failure) -> str:
    """
    Why a port could not be opened, as the system says it (C{address
    already in use}, C{permission denied}), else the error's message.
    """
    error = failure.value
    if isinstance(error, CannotListenError) and isinstance(error.socketError, BaseException):
        error = error.socketError
    text = error.strerror if isinstance(error, OSError) and error.strerror else failure.getErrorMessage()
    return text[:1].lower() + text[1:]


class Listener(service.Service):
    """
    Listens on an endpoint while running.  L{listening} tells when the port
    is open, and which it is, or why it could not be opened (L{CannotListen});
    the listener logs nothing of it, whoever started it says it.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, description: str = "") -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description or repr(endpoint)
        #: The open port, while listening.
        self.port: Optional[IListeningPort] = None
        #: Why the port could not be opened (L{CannotListen}), if it could not.
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
        if self._opening is None and self.port is None and self.failure is None:
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
        if not failure.check(CancelledError):
            failure = Failure(CannotListen(self.description, why(failure)))
        self.failure = failure
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def listening(self) -> Deferred[IListeningPort]:
        """
        Fires with the listening port once it is open, or fails with why it
        could not be (L{CannotListen}).
        """
        if self.port is not None:
            return succeed(self.port)
        if self.failure is not None:
            return fail(self.failure)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d

    def move(self, endpoint: IStreamServerEndpoint, description: str) -> Deferred[None]:
        """
        Listen on C{endpoint} instead: its port opens first, and the old one
        closes once it has (the connections it accepted stay).  If it cannot
        be opened, the old port stays and the result fails with
        L{CannotListen}.  A listener not running takes the endpoint for its
        next start.
        """
        if not self.running or self.port is None:
            if self._opening is not None:
                self._opening.cancel()
            self.endpoint, self.description = endpoint, description
            if not self.running:
                return succeed(None)
            self._open()
            return self.listening().addCallback(lambda _: None)

        def opened(port: IListeningPort) -> Deferred[None]:
            old, self.port = self.port, port
            self.endpoint, self.description = endpoint, description
            return maybeDeferred(old.stopListening) if old is not None else succeed(None)

        def failed(failure: Failure) -> Failure:
            return Failure(CannotListen(description, why(failure)))

        return endpoint.listen(self.factory).addCallbacks(opened, failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._opening is not None:
            self._opening.cancel()
        self.failure = None
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


class CannotStart(SystemExit, Exception):
    """
    The service tree cannot start (raised while twistd starts it, before
    its reactor runs).  As a L{SystemExit} it ends the process with status
    1 and no traceback; as an L{Exception} twistd first handles it as a
    failed start: it removes its PID file and tells a daemon's waiting
    parent why, which then exits with status 1 too.
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_when_done(status: int) -> None:
    """
    End the process with C{status} once twistd is done with it: after
    twistd has stopped its reactor, removed its PID file and logged its
    last line, when Python runs its exit hooks.  It runs first of them
    (the last one registered), and ends the process there, after flushing
    the standard streams: the hooks registered before it and Python's own
    clean-up do not run.
    """

    def end() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is None:
                continue
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # closed, or its reader gone: nothing more to say
        os._exit(status)

    atexit.register(end)


class ListensOrExits:
    """
    A mixin for the service tree twistd runs: the L{Listener}s among its
    children must open their ports when twistd starts the tree, or the
    process exits with status 1 after one line in the log saying which
    (endpoint, and option: the listener's name) and why.

    twistd starts the tree (L{privilegedStartService}) before its reactor
    runs, and Twisted's own server endpoints open their ports at once, so
    the failure is known then, and L{CannotStart} ends twistd.  Once the
    reactor runs, nothing public sets twistd's exit status: a port that
    fails to open later (an endpoint plugin that opens asynchronously)
    stops the reactor, after the same line, and the process ends with
    status 1 once twistd is done (L{exit_when_done}).  (Under twistd as a
    daemon, that is the process it left running: the command that started
    it has ended already, with status 0, once the tree started.)

    @ivar reactor: stopped in that case.
    @ivar exit_when_done: called with the status the process ends with.
    """

    reactor: Any
    exit_when_done: Callable[[int], None] = staticmethod(exit_when_done)
    #: Whether a port failed to open once the reactor ran: the process ends.
    _ending: bool = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[misc]
        listeners = [child for child in self if isinstance(child, Listener)]  # type: ignore[attr-defined]
        failed = [listener for listener in listeners if listener.failure is not None]
        if failed:
            lines = [self._say(listener, listener.failure, "exiting") for listener in failed]
            for listener in listeners:
                listener.stopService()
            raise CannotStart("; ".join(lines))
        for listener in listeners:
            if listener.port is None:
                listener.listening().addErrback(self._failed_late, listener)

    def _say(self, listener: Listener, failure: Failure, then: str) -> str:
        """
        Log that C{listener} cannot listen and what happens C{then}; return
        the line.
        """
        error = failure.value
        line = "cannot listen on {endpoint}{option}: {reason}".format(
            endpoint=getattr(error, "endpoint", listener.description),
            option=f" (--{listener.name})" if listener.name else "",
            reason=getattr(error, "reason", failure.getErrorMessage()),
        )
        log.critical("{line}; {then}", line=line, then=then, imml_event="cannot-listen")
        return line

    def _failed_late(self, failure: Failure, listener: Listener) -> None:
        if failure.check(CancelledError):
            return
        self._say(listener, failure, "stopping")
        if not self._ending:  # (another port may fail too)
            self._ending = True
            self.exit_when_done(1)
            self.reactor.stop()
