"""
The lean client of bench/lean_client.py behind Twisted's IAgent interface,
the shape a drop-in for imml's Agent would have to take: request headers
as a Headers object, the body written by an IBodyProducer, the request's
Deferred firing with an IResponse as soon as the answer's head is read,
and the body streamed to the protocol given to IResponse.deliverBody,
which ends with ResponseDone (or ResponseFailed if the connection is lost
before the body is whole).

http:// URLs only; a producer must say its length (no chunked upload).  A
request with a body that a reused connection drops unanswered fails
(RequestNotSent), as Agent's does: its producer cannot be run again.
"""

from __future__ import annotations

from typing import Optional

from lean_client import AnswerCut, HostConnection, LeanClient, request_bytes
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web.client import RequestNotSent, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer


@implementer(IResponse)
class LeanResponse:
    """
    An answer whose head is read; its body goes to the protocol given to
    L{deliverBody}, kept until then.
    """

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code: int, phrase: bytes, headers: Headers, length: object, transport: object) -> None:
        self.code, self.phrase, self.headers, self.length = code, phrase, headers, length
        self._transport = transport
        self._protocol = None
        self._kept: list[bytes] = []
        self._end: Optional[Failure] = None

    def deliverBody(self, protocol: object) -> None:
        self._protocol = protocol
        protocol.makeConnection(self._transport)
        for data in self._kept:
            protocol.dataReceived(data)
        self._kept = []
        if self._end is not None:
            protocol.connectionLost(self._end)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def received(self, data: bytes) -> None:
        """The next bytes of the body."""
        if self._protocol is None:
            self._kept.append(data)
        else:
            self._protocol.dataReceived(data)

    def ended(self, reason: Failure) -> None:
        """The body is whole (L{ResponseDone}) or cut (L{ResponseFailed})."""
        if self._protocol is None:
            self._end = reason
        else:
            self._protocol.connectionLost(reason)


@implementer(IConsumer)
class Counting:
    """A connection's transport, counting what a body's producer writes to it."""

    def __init__(self, transport: object) -> None:
        self.transport, self.written = transport, 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.transport.write(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()


class StreamingConnection(HostConnection):
    """
    A host connection that writes request bodies with producers and
    streams answers through a L{LeanResponse}.
    """

    response: Optional[LeanResponse] = None
    producer: Optional[IBodyProducer] = None
    #: The producer still writing the request's body.
    producing: Optional[IBodyProducer] = None

    def send(self, method: bytes, data: bytes, waiting: Deferred, producer: object = None) -> None:
        self.response, self.producer = None, producer
        super().send(method, data, waiting)
        if producer is not None:
            self.producing = producer
            consumer = Counting(self.transport)
            d = producer.startProducing(consumer)
            d.addCallback(self._produced, consumer, producer).addErrback(self._produce_failed, producer)

    def _produced(self, _: object, consumer: "Counting", producer: IBodyProducer) -> None:
        if self.producing is producer:
            self.producing = None
        if consumer.written != producer.length:
            raise ValueError(f"the body's producer wrote {consumer.written} bytes, not {producer.length}")

    def _produce_failed(self, failure: Failure, producer: IBodyProducer) -> None:
        if self.producer is producer:
            if self.response is None:
                self._fail(failure)
            self.transport.abortConnection()

    def _release(self) -> Deferred:
        # An answer that came before the request's body was all written: the
        # rest is not sent, and the connection is not reused.
        producing, self.producing = self.producing, None
        if producing is not None:
            self.keep = False
            producing.stopProducing()
        return super()._release()

    def resendable(self) -> bool:
        return self.producer is None

    def _headed(self, code: int, phrase: bytes, headers: list) -> None:
        raw = Headers()
        for name, value in headers:
            raw.addRawHeader(name, value)
        length = self.body_length()
        self.response = LeanResponse(code, phrase, raw, UNKNOWN_LENGTH if length is None else length, self.transport)
        self.client.settled(self.waiting)  # too late to cancel: its body may still be cut
        self.waiting.callback(self.response)

    def _body(self, data: bytes) -> None:
        self.response.received(data)

    def _done(self) -> None:
        response = self.response
        self._release()
        self.response = None
        response.ended(Failure(ResponseDone()))

    def _fail(self, failure: Failure) -> None:
        response, self.response = self.response, None
        if response is None:
            if self.reused and not self.got_bytes and not self.resendable() and failure.check(AnswerCut):
                failure = Failure(RequestNotSent())
            super()._fail(failure)
        else:
            self.waiting = None
            response.ended(Failure(ResponseFailed([failure])))


@implementer(IAgent)
class LeanAgent:
    """
    An IAgent over the lean client's connections (one idle list per host).
    """

    def __init__(self, reactor: object) -> None:
        self.client = LeanClient(reactor, connection=StreamingConnection)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred:
        scheme, _, rest = uri.partition(b"://")
        if scheme != b"http":
            raise ValueError(f"{uri!r}: http:// only")
        host, slash, path = rest.partition(b"/")
        pairs = []
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                for value in values:
                    pairs.append((name, value))
        if bodyProducer is not None and bodyProducer.length is UNKNOWN_LENGTH:
            raise ValueError("a body of unknown length")
        length = None if bodyProducer is None else bodyProducer.length
        # The head, with Content-Length for the producer's body to follow.
        data = request_bytes(method, host, slash + path, pairs, None)
        if length is not None:
            data = data[:-2] + b"Content-Length: %d\r\n\r\n" % length
        waiting = Deferred(self.client._cancel)
        self.client.send(host, method, data, waiting, bodyProducer)
        return waiting
