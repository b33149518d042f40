"""
The admin listener's guard over loopback: requests for a name that is not
the listener's own get 421, and, once a token is set, every page and
action needs it (a bearer token, or the cookie the page's sign-in sets).
"""

import json
from urllib.parse import urlencode

import treq
from steering import act, admin_url, events
from support import bounded, rig
from twisted.internet import reactor
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

TOKEN = "k3y-0f-the-4dmin"
PAGES = ("/", "/api/status", "/metrics")


def hosts(n=1):
    return [dict(name=f"h{i}") for i in range(n)]


async def get(r, path, **headers):
    """
    GET an admin page: its status, headers and body.
    """
    response = await r.client.get(admin_url(r) + path, headers=headers, allow_redirects=False)
    return response.code, response.headers, await response.content()


def bearer(token=TOKEN):
    return {"authorization": f"Bearer {token}"}


def detail(body):
    return json.loads(body)["detail"]


def port_of(r):
    return admin_url(r).rsplit(":", 1)[1]


@bounded(20)
async def test_a_request_for_a_name_not_the_listeners_own_is_refused() -> None:
    async with await rig(hosts(), "--admin-actions") as r:
        for host in ("evil.example", f"evil.example:{port_of(r)}", "localhost.evil.example"):
            name = host.split(":")[0]
            for path in PAGES:
                code, headers, body = await get(r, path, host=host)
                assert code == 421, (host, path)
                assert f"{name} is not a name of this admin listener" in detail(body)
                assert detail(body).endswith(f"--admin-host {name}")
            code, body = await act(r, r.hosts[0].address, "drain", headers={"host": host})
            assert code == 421
        assert not r.fleet.backends[0].draining
        # Its own names, with or without a port, loopback addresses included.
        for host in ("localhost", f"localhost:{port_of(r)}", "127.0.0.1", f"[::1]:{port_of(r)}", "LOCALHOST."):
            for path in PAGES:
                code, _, _ = await get(r, path, host=host)
                assert code == 200, (host, path)


@bounded(20)
async def test_the_operator_can_allow_more_names() -> None:
    async with await rig(hosts(), "--admin-host", "imml.lan,prometheus") as r:
        for host in ("imml.lan", f"prometheus:{port_of(r)}"):
            assert (await get(r, "/api/status", host=host))[0] == 200
        assert (await get(r, "/api/status", host="grafana.lan"))[0] == 421


@bounded(20)
async def test_an_ipv6_listener_answers_for_its_bracketed_address() -> None:
    async with await rig(hosts(), "--admin", r"tcp6:0:interface=\:\:1") as r:
        # treq cannot spell an IPv6 URL; Twisted's own Agent can.
        agent = Agent(reactor, pool=r.pool)
        url = b"http://[::1]:%d/api/status" % r.balancer.admin.port.getHost().port
        response = await agent.request(b"GET", url)  # Host: [::1]:port
        assert response.code == 200 and json.loads(await treq.content(response))["hosts"]
        response = await agent.request(b"GET", url, Headers({b"host": [b"evil.example"]}))
        assert response.code == 421
        await treq.content(response)


@bounded(20)
async def test_with_a_token_every_page_needs_it() -> None:
    async with await rig(hosts(), "--admin-token", TOKEN) as r:
        for path in PAGES:
            code, headers, body = await get(r, path)
            assert code == 401, path
            assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="imml"']
            code, headers, body = await get(r, path, **bearer("wrong"))
            assert code == 401, path
            assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="imml"']
            assert TOKEN.encode() not in body
            code, headers, body = await get(r, path, **bearer())
            assert code == 200, path
        # What each refusal says.
        assert "Authorization: Bearer" in detail((await get(r, "/api/status"))[2])
        assert detail((await get(r, "/metrics", **bearer("wrong")))[2]) == "refused: wrong token"
        code, headers, body = await get(r, "/")
        assert headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
        assert b'name="token"' in body and b"That is not the token" not in body
        # The Host check comes first.
        assert (await get(r, "/api/status", host="evil.example", **bearer()))[0] == 421


@bounded(20)
async def test_with_a_token_actions_need_it_too() -> None:
    async with await rig(hosts(), "--admin-actions", "--admin-token", TOKEN) as r:
        address = r.hosts[0].address
        own_origin = {"origin": f"http://127.0.0.1:{port_of(r)}"}
        for headers in ({}, own_origin, {**own_origin, **bearer("wrong")}):
            code, body = await act(r, address, "drain", headers=headers)
            assert code == 401 and not r.fleet.backends[0].draining
        code, body = await act(r, address, "drain", headers={**own_origin, **bearer()})
        assert code == 200 and body["host"]["state"] == "draining"
        # The token does not lift the Origin check.
        code, body = await act(r, address, "enable", headers={"origin": "http://evil.example", **bearer()})
        assert code == 403 and r.fleet.backends[0].draining
        code, body = await act(r, address, "enable", headers=bearer())
        assert code == 200 and not r.fleet.backends[0].draining


@bounded(20)
async def test_signing_in_sets_a_cookie_that_pages_and_actions_accept() -> None:
    async with await rig(hosts(), "--admin-actions", "--admin-token", TOKEN) as r:
        # Once in the address...
        code, headers, _ = await get(r, f"/?token={TOKEN}")
        assert code == 303 and headers.getRawHeaders(b"location") == [b"./"]
        [set_cookie] = headers.getRawHeaders(b"set-cookie")
        attributes = [a.strip().lower() for a in set_cookie.split(b";")]
        assert b"httponly" in attributes and b"samesite=strict" in attributes
        assert TOKEN.encode() not in set_cookie
        cookie = attributes[0]
        # ...or in the page's form.
        response = await r.client.post(
            admin_url(r) + "/",
            data=urlencode({"token": TOKEN}).encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        )
        assert response.code == 303
        assert response.headers.getRawHeaders(b"set-cookie")[0].split(b";")[0].lower() == cookie
        await response.content()
        for path in PAGES:
            assert (await get(r, path, cookie=cookie.decode()))[0] == 200, path
        code, body = await act(r, r.hosts[0].address, "drain", headers={"cookie": cookie.decode()})
        assert code == 200 and r.fleet.backends[0].draining
        # A wrong token is asked for again, and a made-up cookie is no cookie.
        for attempt in (get(r, "/?token=wrong"), get(r, "/?token=" + TOKEN[:-1])):
            code, headers, body = await attempt
            assert code == 401 and b"That is not the token" in body and not headers.getRawHeaders(b"set-cookie")
        made_up = "imml-admin=" + "0" * 64
        assert (await get(r, "/api/status", cookie=made_up))[0] == 401


@bounded(20)
async def test_a_reload_applies_a_new_token_and_new_names_and_never_logs_the_token(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = tmp_path / "imml.toml"
    config.write_text('[balancer]\nadmin-hosts = ["imml.lan"]\n')
    async with await rig(hosts(), "--admin-token-file", str(token_file), "--config", str(config)) as r:
        _, headers, _ = await get(r, f"/?token={TOKEN}")
        old_cookie = headers.getRawHeaders(b"set-cookie")[0].split(b";")[0].decode()
        assert (await get(r, "/api/status", host="imml.lan", **bearer()))[0] == 200
        token_file.write_text("a-n3w-t0ken\n")
        config.write_text('[balancer]\nadmin-hosts = ["grafana.lan"]\n')
        assert r.balancer.reloader.reload("test")
        assert (await get(r, "/api/status", **bearer()))[0] == 401
        assert (await get(r, "/api/status", cookie=old_cookie))[0] == 401
        assert (await get(r, "/api/status", **bearer("a-n3w-t0ken")))[0] == 200
        assert (await get(r, "/api/status", host="imml.lan", **bearer("a-n3w-t0ken")))[0] == 421
        assert (await get(r, "/api/status", host="grafana.lan", **bearer("a-n3w-t0ken")))[0] == 200
        [reload] = events(r, "reload")
        assert {"admin-token", "admin-hosts"} <= set(reload["changed"])
        for event in r.events:
            for secret in (TOKEN, "a-n3w-t0ken"):
                assert secret not in repr(event)
