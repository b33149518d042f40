"""
ML hosts written C{https://}, over real TLS on loopback with CAs and
certificates the tests make: verified against a CA file (per host, or
C{--ca-file} for all), with a client certificate, with extra headers for an
authenticating proxy; a host whose certificate does not verify is down,
says why, and never gets a request.
"""

from __future__ import annotations

import json
from typing import Callable

from certs import Authority, tls_endpoint
from steering import admin_url, host, status
from support import Rig, bounded, rig, rig_with_config, until
from twisted.internet import reactor
from twisted.logger import formatEvent

from imml.testing import ENTRIES, predict_body, start_fake_hosts

SECRET = "s3cret-token-value"


def server_cert(ca: Authority):
    return ca.issue("fake ML host", ip="127.0.0.1")


@bounded(30)
async def test_a_host_verified_by_its_own_ca_answers(tmp_path) -> None:
    ca = Authority.make()
    ca.write(tmp_path)
    specs = [dict(name="tls", endpoint=tls_endpoint(reactor, server_cert(ca)))]

    def config(addresses: list[str]) -> str:
        return f'[[hosts]]\naddress = "https://{addresses[0]}"\nca = "ca.pem"\n'

    async with await rig_with_config(str(tmp_path / "imml.toml"), specs, config) as r:
        response = await r.predict()
        assert response.code == 200
        await response.content()
        address = f"https://{r.hosts[0].address}"
        assert response.headers.getRawHeaders(b"x-imml-backend") == [address.encode()]
        assert r.hosts[0].served == 1 and r.hosts[0].pings >= 1
        shown = host(await status(r), address)
        assert shown["tls"] == {"ca": str(tmp_path / "ca.pem"), "cert": None}
        assert shown["state"] == "up"


async def _rig_over(specs: list[dict], backends: Callable[[list[str]], str], *args: str) -> Rig:
    """
    Fake hosts from C{specs}, and a balancer whose C{--backends} is
    C{backends(addresses)}, not waiting for the hosts to come up.
    """
    hosts = await start_fake_hosts(reactor, specs)
    try:
        r = await rig([], "--backends", backends([h.address for h in hosts]), *args, wait_up=False)
    except BaseException:
        for fake in hosts:
            await fake.stop()
        raise
    r.hosts = hosts
    return r


@bounded(30)
async def test_ca_file_verifies_every_https_host_and_an_untrusted_one_is_down_and_gets_nothing(tmp_path) -> None:
    ca, stranger = Authority.make(), Authority.make("someone else's CA")
    specs = [
        dict(name="good", endpoint=tls_endpoint(reactor, server_cert(ca))),
        dict(name="bad", endpoint=tls_endpoint(reactor, server_cert(stranger))),
    ]
    r = await _rig_over(
        specs, lambda addresses: ",".join(f"https://{a}" for a in addresses), "--ca-file", ca.write(tmp_path)
    )
    good, bad = r.hosts
    async with r:
        trusted, untrusted = r.fleet.backends
        await until(lambda: trusted.up and untrusted.health.state == "down")
        reason = "certificate verify failed: unable to get local issuer certificate"
        assert untrusted.health.last_result == reason
        for _ in range(4):
            response = await r.predict()
            assert response.code == 200
            await response.content()
        assert good.served == 4
        assert bad.received == [] and bad.pings == 0  # no request got past TLS
        shown = host(await status(r), f"https://{bad.address}")
        assert shown["state"] == "down" and shown["last_result"] == reason
        said = [formatEvent(e) for e in r.events if e.get("imml_event") == "health"]
        assert any(reason in line and bad.address in line for line in said), said


@bounded(30)
async def test_a_certificate_for_another_name_is_refused(tmp_path) -> None:
    ca = Authority.make()
    ca.write(tmp_path)
    specs = [dict(name="misnamed", endpoint=tls_endpoint(reactor, ca.issue("elsewhere", dns="elsewhere.example")))]

    def config(addresses: list[str]) -> str:
        return f'[[hosts]]\naddress = "https://{addresses[0]}"\nca = "ca.pem"\n'

    async with await rig_with_config(str(tmp_path / "imml.toml"), specs, config, wait_up=False) as r:
        [backend] = r.fleet.backends
        await until(lambda: backend.health.state == "down")
        assert backend.health.last_result == "certificate verify failed: the certificate is not for 127.0.0.1"
        assert r.hosts[0].pings == 0


def _client_config(tmp_path, cert: bool):
    def config(addresses: list[str]) -> str:
        text = f'[[hosts]]\naddress = "https://{addresses[0]}"\nca = "ca.pem"\n'
        if cert:
            text += 'cert = "client.pem"\nkey = "client.key"\n'
        return text

    return config


@bounded(30)
async def test_a_host_that_demands_a_client_certificate_gets_one(tmp_path) -> None:
    ca = Authority.make()
    ca.write(tmp_path)
    ca.issue("imml balancer", client=True).write(tmp_path, "client")
    specs = [dict(name="mtls", endpoint=tls_endpoint(reactor, server_cert(ca), clients=ca))]
    async with await rig_with_config(str(tmp_path / "imml.toml"), specs, _client_config(tmp_path, True)) as r:
        response = await r.predict()
        assert response.code == 200
        await response.content()
        assert r.hosts[0].served == 1
        shown = host(await status(r), f"https://{r.hosts[0].address}")
        assert shown["tls"]["cert"] == str(tmp_path / "client.pem")
        assert "key" not in json.dumps(shown["tls"])


@bounded(30)
async def test_without_the_client_certificate_the_host_is_down(tmp_path) -> None:
    ca = Authority.make()
    ca.write(tmp_path)
    specs = [dict(name="mtls", endpoint=tls_endpoint(reactor, server_cert(ca), clients=ca))]
    path = str(tmp_path / "imml.toml")
    async with await rig_with_config(path, specs, _client_config(tmp_path, False), wait_up=False) as r:
        [backend] = r.fleet.backends
        await until(lambda: backend.health.state == "down")
        # (TLS 1.3's words; TLS 1.2 says "handshake failure")
        assert backend.health.last_result.startswith("TLS handshake failed: ")
        assert r.hosts[0].pings == 0 and r.hosts[0].received == []


@bounded(30)
async def test_extra_headers_reach_the_host_and_are_never_shown(tmp_path) -> None:
    ca = Authority.make()
    ca.write(tmp_path)
    # An authenticating proxy: without the token, every request is 401,
    # health checks too.
    specs = [
        dict(name="proxied", endpoint=tls_endpoint(reactor, server_cert(ca)), required_headers={"X-Token": SECRET})
    ]

    def config(addresses: list[str]) -> str:
        return f'[[hosts]]\naddress = "https://{addresses[0]}"\nca = "ca.pem"\nheaders = {{ X-Token = "{SECRET}" }}\n'

    async with await rig_with_config(str(tmp_path / "imml.toml"), specs, config) as r:
        ctype, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8 a small picture")
        headers = {"content-type": ctype, "x-token": "the client's own"}
        response = await r.client.post(r.url + "/predict", data=body, headers=headers)
        assert response.code == 200
        await response.content()
        [received] = r.hosts[0].received
        assert received.headers["x-token"] == [SECRET]  # the host's, not the client's
        page = await (await r.client.get(admin_url(r) + "/")).text()
        document = await (await r.client.get(admin_url(r) + "/api/status")).text()
        shown = host(json.loads(document), f"https://{r.hosts[0].address}")
        assert shown["headers"] == ["X-Token"]
        logged = [formatEvent(e) + repr(e) for e in r.events]
        assert r.request_events()
        for text in [page, document, *logged]:
            assert SECRET not in text


@bounded(30)
async def test_without_its_headers_a_proxied_host_is_down(tmp_path) -> None:
    r = await _rig_over([dict(name="proxied", required_headers={"X-Token": SECRET})], ",".join)
    async with r:
        [backend] = r.fleet.backends
        await until(lambda: backend.health.state == "down")
        assert backend.health.last_result == "status 401"


@bounded(30)
async def test_a_reload_that_gives_the_right_ca_brings_the_host_up(tmp_path) -> None:
    ca, stranger = Authority.make(), Authority.make("someone else's CA")
    ca.write(tmp_path)
    stranger.write(tmp_path, "stranger")
    specs = [dict(name="tls", endpoint=tls_endpoint(reactor, server_cert(ca)))]
    path = str(tmp_path / "imml.toml")

    def config(addresses: list[str], ca_file: str = "stranger.pem") -> str:
        return f'[[hosts]]\naddress = "https://{addresses[0]}"\nca = "{ca_file}"\n'

    async with await rig_with_config(path, specs, config, wait_up=False) as r:
        [backend] = r.fleet.backends
        await until(lambda: backend.health.state == "down")
        with open(path, "w") as f:
            f.write(config([r.hosts[0].address], "ca.pem"))
        assert r.balancer.reloader.reload("test")
        await until(lambda: backend.up)
        response = await r.predict()
        assert response.code == 200
        await response.content()
