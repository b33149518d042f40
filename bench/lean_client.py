"""
A lean HTTP/1.1 client to the ML hosts, for measuring what Twisted's Agent
costs: one L{HostConnection} (a plain Twisted L{Protocol}) per connection,
a list of idle connections per host, no Agent, no HTTPConnectionPool, no
_newclient, one Deferred per request.

It sends a correct request (the request line, C{Host}, C{Content-Length},
the caller's headers, the body) and parses the answer strictly: the status
line, the header lines (no folding, no whitespace before the colon), and a
body delimited by C{Content-Length}, by chunked transfer coding or by the
end of the connection.  Answers are read whole, up to L{MAX_ANSWER} bytes.

What it leaves out, which imml's client to its hosts needs: TLS hosts,
answers streamed as they come (C{IResponse.deliverBody}), timeouts and
C{Expect: 100-continue}.  A request on a reused connection that the host
closes before answering a byte is sent once more on a new connection (the
race with the host's keep-alive timeout), whatever its method: C{/predict}
changes nothing on the host.
"""

from __future__ import annotations

from typing import Optional

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

#: The most a status line and headers may take.
MAX_HEAD = 64 * 1024
#: The most an answer's body may take.
MAX_ANSWER = 64 * 1024 * 1024
#: How long an idle connection is reused: below Immich ML's 2 s keep-alive.
IDLE_SECONDS = 1.0

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class BadAnswer(Exception):
    """
    The host's answer is not HTTP/1.1 this client can read.
    """


class AnswerCut(Exception):
    """
    The connection ended before the answer was whole.
    """


@define(frozen=True)
class Answer:
    """
    A host's whole answer.
    """

    code: int
    phrase: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> Optional[bytes]:
        """
        The first value of the header C{name} (lower case), if any.
        """
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def request_bytes(method: bytes, host: bytes, target: bytes, headers: list, body: Optional[bytes]) -> bytes:
    """
    A request as it goes on the wire.  C{headers} are (name, value) pairs,
    without C{Host}, C{Content-Length}, C{Transfer-Encoding} or C{Connection};
    a C{body} of C{None} sends no C{Content-Length}.
    """
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, host)]
    if body is not None:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    for name, value in headers:
        if b"\n" in value or b"\r" in value or b":" in name or b"\n" in name or b"\r" in name:
            raise ValueError(f"header {name!r} cannot be sent as it is")
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    if body:
        lines.append(body)
    return b"".join(lines)


def _status(line: bytes) -> tuple[bytes, int, bytes]:
    """The version, code and phrase of a status line."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise BadAnswer(f"bad status line {line[:80]!r}")
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else b""


def parse_head(head: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    """
    The version, code, phrase and headers of an answer's head (without its
    closing empty line).
    """
    lines = head.split(b"\r\n")
    version, code, phrase = _status(lines[0])
    return version, code, phrase, parse_headers(lines[1:], BadAnswer)


def parse_headers(lines: list[bytes], error: type[Exception]) -> list[tuple[bytes, bytes]]:
    """
    Header lines as (name, value) pairs, in order; a line that is no header
    (folded, no colon, whitespace in or around the name) raises C{error}.
    """
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or b" " in name or b"\t" in name:
            raise error(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    return headers


def framing(version: bytes, code: int, method: bytes, headers: list) -> tuple[int, int, bool]:
    """
    How an answer's body is delimited: the parser's state, the length (for
    C{Content-Length}), and whether the connection can be reused after it.
    """
    lengths, chunked, close = set(), False, version == b"HTTP/1.0"
    for name, value in headers:
        key = name.lower()
        if key == b"content-length":
            lengths.add(value)
        elif key == b"transfer-encoding":
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            if not chunked:
                close = True
        elif key == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            close = close and b"keep-alive" not in tokens or b"close" in tokens
    if method == b"HEAD" or code in (204, 304) or 100 <= code < 200:
        return _DONE, 0, not close
    if chunked:
        return _CHUNK_SIZE, 0, not close
    if lengths:
        value = lengths.pop()
        if lengths or not value.isdigit():
            raise BadAnswer("bad or conflicting Content-Length")
        length = int(value)
        if length > MAX_ANSWER:
            raise BadAnswer(f"answer of {length} bytes, over {MAX_ANSWER}")
        return (_LENGTH if length else _DONE), length, not close
    return _UNTIL_CLOSE, 0, False


class HostConnection(Protocol):
    """
    One persistent connection to a host: one request at a time, its answer
    read whole and given to the request's Deferred.
    """

    def __init__(self, client: "LeanClient", key: bytes) -> None:
        self.client, self.key = client, key
        self.waiting: Optional[Deferred] = None
        self.method = self.sent = b""
        self.got_bytes = False
        self.reused = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.state, self.buffer, self.parts, self.size, self.remaining = _HEAD, b"", [], 0, 0
        self.head: tuple = ()
        self.keep = False

    def send(self, method: bytes, data: bytes, waiting: Deferred, producer: object = None) -> None:
        """
        Write one request (C{data}, whole) and fire C{waiting} with its L{Answer}.
        """
        self.waiting, self.method, self.sent, self.got_bytes = waiting, method, data, False
        self._reset()
        self.transport.write(data)

    def body_length(self) -> Optional[int]:
        """Once the head is read: the body's length if the head said it."""
        return self.remaining if self.state == _LENGTH else 0 if self.state == _DONE else None

    def resendable(self) -> bool:
        """Whether the request can be sent again: its bytes are all kept."""
        return True

    def dataReceived(self, data: bytes) -> None:
        if self.waiting is None:
            self.transport.loseConnection()  # bytes nobody asked for
            return
        self.got_bytes = True
        try:
            self._parse(self.buffer + data if self.buffer else data)
        except BadAnswer as e:
            self._fail(Failure(e))
            self.transport.loseConnection()

    def _parse(self, data: bytes) -> None:
        while data:
            state = self.state
            if state == _LENGTH:
                data = self._take(data)
                if data is None:
                    return
                self.state = _DONE
            elif state == _HEAD:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise BadAnswer(f"answer's head over {MAX_HEAD} bytes")
                    self.buffer = data
                    return
                self.buffer = b""
                version, code, phrase, headers = parse_head(data[:end])
                data = data[end + 4 :]
                if 100 <= code < 200:
                    continue  # an interim answer: the real one follows
                self.state, self.remaining, self.keep = framing(version, code, self.method, headers)
                self._headed(code, phrase, headers)
            elif state == _UNTIL_CLOSE:
                self._grow(len(data))
                self._body(data)
                return
            elif state == _CHUNK_SIZE or state == _TRAILER:
                end = data.find(b"\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise BadAnswer("chunk size line too long")
                    self.buffer = data
                    return
                self.buffer = b""
                line, data = data[:end], data[end + 2 :]
                if state == _TRAILER:
                    if not line:
                        self.state = _DONE
                    continue
                size = line.split(b";", 1)[0].strip()
                try:
                    self.remaining = int(size, 16)
                except ValueError:
                    raise BadAnswer(f"bad chunk size {size[:20]!r}") from None
                self._grow(self.remaining)
                self.state = _CHUNK_DATA if self.remaining else _TRAILER
            elif state == _CHUNK_DATA:
                data = self._take(data)
                if data is None:
                    return
                self.state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(data) < 2:
                    self.buffer = data
                    return
                self.buffer = b""
                if data[:2] != b"\r\n":
                    raise BadAnswer("chunk not followed by CRLF")
                data = data[2:]
                self.state = _CHUNK_SIZE
            else:
                raise BadAnswer("bytes after the answer")
            if self.state == _DONE:
                if data:
                    raise BadAnswer("bytes after the answer")
                self._done()
                return
        if self.state == _DONE:
            self._done()

    def _take(self, data: bytes) -> Optional[bytes]:
        """
        Keep what C{data} holds of the C{remaining} bytes of the body; what
        follows them, or L{None} while more are to come.
        """
        if len(data) < self.remaining:
            self._body(data)
            self.remaining -= len(data)
            return None
        self._body(data[: self.remaining])
        return data[self.remaining :]

    def _grow(self, more: int) -> None:
        self.size += more
        if self.size > MAX_ANSWER:
            raise BadAnswer(f"answer over {MAX_ANSWER} bytes")

    def _headed(self, code: int, phrase: bytes, headers: list) -> None:
        """The answer's head is read: kept for the whole answer."""
        self.head = (code, phrase, headers)

    def _body(self, data: bytes) -> None:
        """The next bytes of the answer's body: kept for the whole answer."""
        self.parts.append(data)

    def _done(self) -> None:
        """The answer is whole: the request's Deferred fires with it."""
        code, phrase, headers = self.head
        answer = Answer(code, phrase, headers, b"".join(self.parts))
        self._release().callback(answer)

    def _release(self) -> Deferred:
        """
        The answer is read: the connection is free for the next request (or
        closed, if its answer said so); the request's Deferred.
        """
        waiting, self.waiting = self.waiting, None
        self.client.settled(waiting)
        keep = self.keep
        self._reset()
        if keep:
            self.client.idle(self)
        else:
            self.transport.loseConnection()
        return waiting

    def _fail(self, failure: Failure) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            self.client.settled(waiting)
            waiting.errback(failure)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.client.lost(self)
        if self.waiting is None:
            return
        if self.state == _UNTIL_CLOSE:
            self._done()
        elif self.reused and not self.got_bytes and self.resendable():
            self.client.resend(self)
        else:
            self._fail(Failure(AnswerCut(f"connection lost: {reason.getErrorMessage()}")))


@define(eq=False)
class LeanClient:
    """
    Requests to hosts over persistent connections: a list of idle ones per
    host (C{b"ADDRESS:PORT"}), the newest reused first, those idle for
    L{IDLE_SECONDS} or more closed rather than reused.
    """

    reactor: object
    #: What each connection is: a L{HostConnection}, or one that streams answers.
    connection: type = HostConnection
    _idle: dict = field(factory=dict)
    _pending: dict = field(factory=dict)

    def request(
        self, method: bytes, host: bytes, target: bytes, headers: list, body: Optional[bytes] = None
    ) -> Deferred:
        """
        Send one request to C{host}; fires with its L{Answer}.  Cancelling it
        aborts the connection.
        """
        data = request_bytes(method, host, target, headers, body)
        waiting = Deferred(self._cancel)
        self.send(host, method, data, waiting)
        return waiting

    def send(
        self, host: bytes, method: bytes, data: bytes, waiting: Deferred, producer: object = None, reuse: bool = True
    ) -> None:
        """
        Send C{data} (a request's head, and its body unless a C{producer}
        writes it) on an idle connection to C{host} or a new one; its
        connection fires C{waiting}, which cancels with L{LeanClient._cancel}.
        """
        idle = self._idle.get(host)
        now = self.reactor.seconds()
        while reuse and idle:
            connection = idle.pop()
            if now - connection.idle_since < IDLE_SECONDS:
                connection.reused = True
                self._pending[waiting] = connection
                connection.send(method, data, waiting, producer)
                return
            connection.transport.loseConnection()
        address, _, port = host.rpartition(b":")
        endpoint = TCP4ClientEndpoint(self.reactor, address.decode("ascii"), int(port))
        connecting = connectProtocol(endpoint, self.connection(self, host))
        self._pending[waiting] = connecting

        def connected(connection: HostConnection) -> None:
            self._pending[waiting] = connection
            connection.send(method, data, waiting, producer)

        def failed(failure: Failure) -> None:
            if not waiting.called:
                self.settled(waiting)
                waiting.errback(failure)

        connecting.addCallbacks(connected, failed)

    def settled(self, waiting: Deferred) -> None:
        """
        C{waiting} is about to fire: nothing is left to cancel.
        """
        self._pending.pop(waiting, None)

    def _cancel(self, waiting: Deferred) -> None:
        pending = self._pending.pop(waiting, None)
        if isinstance(pending, Deferred):
            pending.cancel()
        elif pending is not None:
            pending.waiting = None
            pending.transport.abortConnection()

    def resend(self, connection: HostConnection) -> None:
        """
        Send again on a new connection the request that C{connection}, a
        reused one, lost before its answer began.
        """
        waiting, connection.waiting = connection.waiting, None
        self.send(connection.key, connection.method, connection.sent, waiting, reuse=False)

    def idle(self, connection: HostConnection) -> None:
        """
        C{connection} is free for the next request to its host.
        """
        connection.idle_since = self.reactor.seconds()
        self._idle.setdefault(connection.key, []).append(connection)

    def lost(self, connection: HostConnection) -> None:
        """
        C{connection} is gone: never reuse it.
        """
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
