"""
Request bodies: held in memory while small, spooled to a temporary file when
large, and read back from the start for every try.

A L{BodyStore} (one per site) decides where each body goes and keeps the
account.  A body stays in memory while it is at most L{SPOOL_OVER} bytes and
the bodies held in memory, all requests together, stay within
L{MEMORY_BUDGET}; any other body goes to an anonymous temporary file in the
system's temporary directory (C{TMPDIR}, else C{/tmp}), as twisted.web's own
requests and nginx's C{client_body_buffer_size} do.  Each try sends the body
through a producer of its own (L{RequestBody.producer}), which reads the file
at its own offset (C{os.pread}): two tries at once (a hedge) never share a
file position.  Closing a body (its request ended, whichever way) deletes its
file and gives its memory back.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

from attrs import define
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

#: A body larger than this goes to a temporary file (nginx's image for
#: Immich ML sets C{client_body_buffer_size 1M}; most previews are smaller).
SPOOL_OVER = 1024 * 1024
#: Most bytes of request bodies held in memory at once, every request
#: together; past it, even a small body goes to a file.
MEMORY_BUDGET = 64 * 1024 * 1024
#: Bytes read from a spooled body at a time, for one try.
READ_SIZE = 64 * 1024


class SpoolError(Exception):
    """
    A request body could not be written to a temporary file (no space, no
    writable temporary directory, too many open files).
    """


@define(eq=False)
class BodyStore:
    """
    Where request bodies go, and how much of them is held.

    @ivar spool_over: bodies larger than this go to a file.
    @ivar budget: most bytes of bodies held in memory at once.
    @ivar in_memory: bytes of bodies held in memory now.
    @ivar files: temporary files open now.
    """

    spool_over: int = SPOOL_OVER
    budget: int = MEMORY_BUDGET
    in_memory: int = 0
    files: int = 0

    def new(self, length: Optional[int]) -> RequestBody:
        """
        A body to receive, of C{length} bytes (None: not known yet).
        """
        return RequestBody(self, to_file=length is not None and length > self.spool_over)

    def _reserve(self, size: int) -> bool:
        if self.in_memory + size > self.budget:
            return False
        self.in_memory += size
        return True

    def _release(self, size: int) -> None:
        self.in_memory -= size

    def _open(self) -> Any:
        try:
            spool = tempfile.TemporaryFile(buffering=0)
        except OSError as e:
            raise SpoolError(f"cannot make a temporary file in {tempfile.gettempdir()}: {e.strerror or e}") from e
        self.files += 1
        return spool

    def _closed(self) -> None:
        self.files -= 1


class RequestBody:
    """
    One request's body, as it arrives and then for every try.

    It is the C{content} of a L{imml.site.BalancerRequest}: it has the
    file-like face twisted.web asks of one (C{write}, C{tell}, C{seek},
    C{close}), but no position of its own: each reader says where it reads.

    @ivar length: bytes received so far.
    @ivar closed: the body was closed: its memory given back, its file
        deleted.
    """

    def __init__(self, store: BodyStore, to_file: bool = False) -> None:
        self._store = store
        self._to_file = to_file
        self._chunks: list[bytes] = []
        self._reserved = 0
        self._file: Any = None
        self.length = 0
        self.closed = False

    @property
    def spooled(self) -> bool:
        """
        Whether the body is in a temporary file rather than in memory.
        """
        return self._file is not None

    def write(self, data: bytes) -> None:
        """
        Add C{data}, received, to the body.

        @raise SpoolError: the body had to go to a file and could not.
        """
        if self.closed:
            raise ValueError("the body is closed")
        if not data:
            return
        store = self._store
        if self._file is None:
            size = len(data)
            if not self._to_file and self.length + size <= store.spool_over and store._reserve(size):
                self._reserved += size
                self._chunks.append(data)
                self.length += size
                return
            self._spool()
        self._write_file(data)
        self.length += len(data)

    def _spool(self) -> None:
        self._file = self._store._open()
        held, self._chunks = self._chunks, []
        self._store._release(self._reserved)
        self._reserved = 0
        for chunk in held:
            self._write_file(chunk)

    def _write_file(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view) :]
        except OSError as e:
            raise SpoolError(f"cannot write to a temporary file: {e.strerror or e}") from e

    def tell(self) -> int:
        return self.length

    def seek(self, offset: int, whence: int = 0) -> int:
        # Readers give their own offset (read_at, producer): nothing to move.
        return 0

    def value(self) -> bytes:
        """
        The whole body, from memory.  Only for a body that is not spooled.
        """
        if self._file is not None:
            raise ValueError("the body is in a file: read it with read_at or view")
        chunks = self._chunks
        if len(chunks) > 1:
            chunks[:] = [b"".join(chunks)]
        return chunks[0] if chunks else b""

    def read_at(self, offset: int, size: int) -> bytes:
        """
        Up to C{size} bytes from C{offset}, without moving anything another
        reader relies on.

        @raise ValueError: the body is closed.
        """
        if self._file is None:
            if self.closed:
                raise ValueError("the body is closed")
            return self.value()[offset : offset + size]
        return os.pread(self._file.fileno(), size, offset)

    @contextmanager
    def view(self) -> Iterator[Union[bytes, mmap.mmap]]:
        """
        The whole body to search in, without copying it: the bytes, or the
        file mapped in memory (read-only) for as long as the block runs.
        """
        if self._file is None:
            yield self.value()
            return
        with mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped

    def producer(self) -> IBodyProducer:
        """
        A producer that sends the whole body, from its first byte: one for
        each try.
        """
        if self._file is None:
            return BytesProducer(self.value())
        return FileProducer(self)

    def close(self) -> None:
        """
        Give the body's memory back and delete its file.  Tries still
        sending it stop.
        """
        if self.closed:
            return
        self.closed = True
        self._chunks = []
        self._store._release(self._reserved)
        self._reserved = 0
        if self._file is not None:
            self._file.close()
            self._store._closed()


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body held in memory, written at once: no reactor or
    cooperator needed (so it also works under a task.Clock).
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class PacedProducer:
    """
    A body producer paced by its consumer (a connection to a host) alone,
    with no reactor or cooperator: it writes the blocks L{next_block} gives,
    one after another, while the consumer keeps up, and is done when
    L{next_block} gives an empty one.

    @ivar length: the bytes it writes in all.
    @ivar finished: fires when all is written (the Deferred that
        C{startProducing} returns); fails with what L{next_block} raised
        (C{OSError} or C{ValueError}); never fires once stopped.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.finished: Deferred[None] = Deferred()
        self._consumer: Optional[IConsumer] = None
        self._paused = False
        self._stopped = False
        self._pumping = False

    def next_block(self) -> bytes:
        """
        The next bytes to write; C{b""} when all is written.
        """
        raise NotImplementedError()

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._pump()
        return self.finished

    def _pump(self) -> None:
        if self._pumping or self._consumer is None:
            return
        self._pumping = True
        try:
            self._write()
        finally:
            self._pumping = False

    def _write(self) -> None:
        finished = self.finished
        while not (self._paused or self._stopped or finished.called):
            try:
                data = self.next_block()
            except (OSError, ValueError) as e:
                self._stopped = True
                finished.errback(e)
                return
            if not data:
                finished.callback(None)
                return
            self._consumer.write(data)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        # As IBodyProducer asks: the Deferred never fires after this.
        self._stopped = True


class FileProducer(PacedProducer):
    """
    A spooled body, sent from its first byte, L{READ_SIZE} bytes at a time,
    read at this producer's own offset.
    """

    def __init__(self, body: RequestBody) -> None:
        super().__init__(body.length)
        self._body = body
        self._offset = 0

    def next_block(self) -> bytes:
        left = self.length - self._offset
        if left <= 0:
            return b""
        data = self._body.read_at(self._offset, min(READ_SIZE, left))
        if not data:
            raise ValueError("the spooled body is shorter than it was")
        self._offset += len(data)
        return data


__all__ = [
    "MEMORY_BUDGET",
    "SPOOL_OVER",
    "BodyStore",
    "BytesProducer",
    "FileProducer",
    "PacedProducer",
    "RequestBody",
    "SpoolError",
]
