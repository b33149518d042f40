"""
Request bodies: small ones in memory within one budget for all, the rest in
temporary files, each try reading the body from its first byte on its own.
"""

import random
import tempfile

import pytest
from support import open_files_in
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from imml.body import BodyStore, SpoolError
from imml.chunked import DeclaredChunks
from imml.classify import classify
from imml.testing import ENTRIES, predict_body


@implementer(IConsumer)
class Slow:
    """A connection to a host whose buffer is full after every write."""

    def __init__(self, producer):
        self.data = bytearray()
        self.producer = producer
        self.done = []
        producer.startProducing(self).addBoth(self.done.append)

    def write(self, data):
        self.data += data
        self.producer.pauseProducing()

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass


def received(store, data: bytes, length=None, piece=4096):
    body = store.new(length)
    for i in range(0, len(data), piece):
        body.write(data[i : i + piece])
    return body


def test_a_small_body_stays_in_memory_and_its_memory_is_given_back():
    store = BodyStore(spool_over=1000, budget=10_000)
    body = received(store, b"x" * 800)
    assert not body.spooled and store.in_memory == 800 and store.files == 0
    assert body.value() == b"x" * 800
    body.close()
    assert store.in_memory == 0


def test_a_body_over_the_threshold_goes_to_a_file_deleted_when_it_is_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = random.Random(1).randbytes(50_000)
    store = BodyStore(spool_over=1000)
    for length in (len(data), None):  # declared, or found out as it arrives
        body = received(store, data, length)
        assert body.spooled and store.files == 1 and store.in_memory == 0
        assert len(open_files_in(tmp_path)) == 1
        assert bytes(Slow(body.producer()).data) == data
        body.close()
        assert store.files == 0 and open_files_in(tmp_path) == []


def test_past_the_budget_even_a_small_body_goes_to_a_file():
    store = BodyStore(spool_over=1000, budget=2000)
    first, second = received(store, b"a" * 1000), received(store, b"b" * 1000)
    third = received(store, b"c" * 1000)
    assert (first.spooled, second.spooled, third.spooled) == (False, False, True)
    assert store.in_memory == 2000 and store.files == 1
    first.close()
    fourth = received(store, b"d" * 1000)
    assert not fourth.spooled and store.in_memory == 2000
    for body in (second, third, fourth):
        body.close()
    assert store.in_memory == 0 and store.files == 0


def test_two_tries_at_once_each_send_the_whole_body():
    data = random.Random(2).randbytes(300_000)
    body = received(BodyStore(spool_over=1000), data, len(data))
    one, other = Slow(body.producer()), Slow(body.producer())
    while not (one.done and other.done):
        # The two interleave, as a hedge's two connections do.
        for consumer in (one, other, other):
            if not consumer.done:
                consumer.producer.resumeProducing()
    assert one.done == [None] and other.done == [None]
    assert bytes(one.data) == data and bytes(other.data) == data
    body.close()


def test_a_try_still_sending_when_the_body_is_closed_fails_and_reads_nothing_more():
    data = b"y" * 200_000
    body = received(BodyStore(spool_over=1000), data, len(data))
    sending = Slow(body.producer())
    body.close()
    sending.producer.resumeProducing()
    assert len(sending.data) == 65536
    assert len(sending.done) == 1 and sending.done[0].check(ValueError)


def test_a_stopped_try_never_finishes():
    data = b"z" * 200_000
    body = received(BodyStore(spool_over=1000), data, len(data))
    sending = Slow(body.producer())
    sending.producer.stopProducing()
    sending.producer.resumeProducing()
    assert len(sending.data) == 65536 and sending.done == []
    body.close()


def test_a_spooled_body_is_classified_as_in_memory():
    for task in ("clip-visual", "faces", "ocr"):
        ctype, data = predict_body(ENTRIES[task], image=random.Random(3).randbytes(30_000))
        body = received(BodyStore(spool_over=1000), data)
        assert body.spooled
        with body.view() as view:
            assert classify(b"POST", b"/predict", ctype, view).task == task
        body.close()


def test_a_file_that_cannot_be_made_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    store = BodyStore(spool_over=10)
    with pytest.raises(SpoolError, match="missing"):
        received(store, b"x" * 100)
    assert store.files == 0 and store.in_memory == 0


def declared(*pieces: bytes) -> DeclaredChunks:
    chunks = DeclaredChunks()
    for piece in pieces:
        chunks.feed(piece)
    return chunks


def test_declared_chunk_sizes_are_added_up_however_the_bytes_arrive():
    raw = b"5;name=value\r\nhello\r\n10\r\n" + b"x" * 16 + b"\r\n1\r\n!\r\n0\r\nTrailer: yes\r\n\r\n"
    whole = declared(raw)
    assert (whole.declared, whole.done) == (0x16, True)
    one_by_one = declared(*(raw[i : i + 1] for i in range(len(raw))))
    assert (one_by_one.declared, one_by_one.done) == (0x16, True)


def test_a_huge_declared_chunk_is_seen_before_its_data():
    chunks = declared(b"100000000000000000000\r\n", b"abc")
    assert chunks.declared == 2**80 and not chunks.done


def test_many_small_chunks_in_one_read_are_all_counted():
    raw = b"1\r\nx\r\n" * 20_000
    assert declared(raw).declared == 20_000


def test_a_size_line_it_cannot_read_stops_it():
    for raw in (b"zz\r\n", b"f" * 5000):
        chunks = declared(raw)
        assert chunks.done and chunks.declared == 0
