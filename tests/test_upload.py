"""
Uploads over real loopback sockets: bodies declared over the limit are
refused at once; large bodies wait in a temporary file, not in memory, and
reach a host byte for byte, on a retry and on a hedge too; their files are
gone when the request ends, whichever way.
"""

import hashlib
import random
import tempfile

from support import bounded, hear_out, open_files_in, rig, until

from imml.testing import ENTRIES, predict_body

#: Three times the size past which a body goes to a file.
PICTURE = random.Random(13).randbytes(3 * 1024 * 1024)


def hosts(n, **kw):
    return [dict(name=f"h{i}", **kw) for i in range(n)]


def port_of(r) -> int:
    return int(r.url.rsplit(":", 1)[1])


def upload(r):
    """POST a /predict with a large picture; the request, and the body's SHA-256."""
    ctype, body = predict_body(ENTRIES["clip-visual"], image=PICTURE)
    request = r.client.post(r.url + "/predict", data=body, headers={"content-type": ctype})
    return request, hashlib.sha256(body).hexdigest()


def served_by(response) -> str:
    return response.headers.getRawHeaders(b"x-fake-host")[0].decode()


async def hear_out_balancer(head: bytes) -> tuple[bytes, list, list]:
    """
    Send C{head} to a balancer with one host, and nothing more: what the
    balancer says until it closes the connection, what the host received,
    and the request log's events.
    """
    async with await rig(hosts(1)) as r:
        return await hear_out(port_of(r), head), r.hosts[0].received, r.request_events()


@bounded(20)
async def test_a_declared_length_over_the_limit_gets_413_at_once_and_the_connection_closes():
    # 200 MiB announced, not one byte sent: the answer cannot wait for it.
    said, received, logged = await hear_out_balancer(
        b"POST /predict HTTP/1.1\r\nHost: balancer\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: %d\r\n\r\n" % (200 * 1024 * 1024)
    )
    assert said.startswith(b"HTTP/1.1 413 ")
    assert b"104857600" in said  # the limit, --max-body 100M
    assert received == []
    [event] = logged
    assert (event["client"], event["method"], event["path"], event["status"]) == ("127.0.0.1", "POST", "/predict", 413)


@bounded(20)
async def test_a_chunk_of_2_to_the_80_bytes_gets_413_at_once_and_the_connection_closes():
    said, received, logged = await hear_out_balancer(
        b"POST /predict HTTP/1.1\r\nHost: balancer\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\nthe first bytes of it" % 2**80
    )
    assert said.startswith(b"HTTP/1.1 413 ") and received == []
    assert [(e["method"], e["status"]) for e in logged] == [("POST", 413)]


@bounded(30)
async def test_a_large_upload_waits_for_a_host_in_a_file_and_reaches_it_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    async with await rig(hosts(1), "--fall", "1", "--rise", "1") as r:
        bodies = r.balancer.site.bodies
        r.hosts[0].mode = "ping-fail"
        await until(lambda: not r.fleet.any_up)
        pending, digest = upload(r)
        await until(lambda: r.balancer.front.active == 1)
        # No host is up: the body waits in the balancer, in a file.
        assert bodies.files == 1 and bodies.in_memory == 0
        assert len(open_files_in(tmp_path)) == 1
        r.hosts[0].mode = "ok"
        response = await pending
        assert response.code == 200
        assert [x.sha256 for x in r.hosts[0].received] == [digest]
        await until(lambda: bodies.files == 0 and not open_files_in(tmp_path))


@bounded(30)
async def test_an_upload_cut_by_a_host_halfway_is_sent_whole_to_the_next():
    async with await rig(hosts(2), "--strategy", "failover") as r:
        r.hosts[0].mode = "drop-upload"
        pending, digest = upload(r)
        response = await pending
        assert response.code == 200 and served_by(response) == "h1"
        assert r.hosts[0].dropped >= 1 and r.hosts[0].received == []
        assert [x.sha256 for x in r.hosts[1].received] == [digest]
        await until(lambda: r.balancer.site.bodies.files == 0)


@bounded(30)
async def test_a_hedged_upload_reaches_both_hosts_byte_for_byte():
    async with await rig(hosts(2), "--strategy", "failover", "--fall", "1", "--health-timeout", "0.5") as r:
        # h0 takes the request and stalls, /ping too: it goes down with the
        # request on it, and the request is sent to h1 as well.
        r.hosts[0].mode = "hang"
        pending, digest = upload(r)
        response = await pending
        assert response.code == 200 and served_by(response) == "h1"
        assert [x.sha256 for x in r.hosts[0].received] == [digest]
        assert [x.sha256 for x in r.hosts[1].received] == [digest]
        assert any(e.get("imml_event") == "redispatch" for e in r.events)
        await until(lambda: r.balancer.site.bodies.files == 0)


@bounded(30)
async def test_the_file_of_an_upload_whose_client_goes_away_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    async with await rig(hosts(1), "--fall", "1") as r:
        r.hosts[0].mode = "ping-fail"
        await until(lambda: not r.fleet.any_up)
        pending, _ = upload(r)
        await until(lambda: r.balancer.front.active == 1)
        assert r.balancer.site.bodies.files == 1
        pending.cancel()
        pending.addErrback(lambda _: None)
        await until(lambda: r.balancer.site.bodies.files == 0 and not open_files_in(tmp_path))
        assert r.balancer.front.active == 0
