"""
Who may use the admin listener, decided without a socket: the C{Host}
check, the token and the sign-in cookie (L{imml.guard}), and where the
token and the extra names come from (the options, the environment, the
configuration file).
"""

import pytest
from twisted.python import usage

from imml import guard as guard_module
from imml.guard import AdminGuard, TokenError, host_of, own_names, read_token
from imml.tap import Options

TOKEN = "k3y-0f-the-4dmin"


def a_guard(token=None):
    """
    The guard of a machine called nas.example.lan whose operator also
    allowed imml.lan and 192.168.0.10.
    """
    return AdminGuard(own_names("nas.example.lan"), ["imml.lan", "192.168.0.10"], token)


@pytest.mark.parametrize(
    "value, host",
    [
        ("localhost", "localhost"),
        ("LocalHost.:8080", "localhost"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]", "::1"),
        ("[::1]:8080", "::1"),
        ("::1", "::1"),
        ("[0:0:0:0:0:0:0:1]:8080", "::1"),
        ("[::ffff:127.0.0.1]:8080", "127.0.0.1"),
        ("nas:", "nas"),
        ("[::1", None),
        ("[::1]8080", None),
        ("[nas]:8080", None),
        ("nas:80x", None),
        ("nas:8080:1", None),
        ("http://nas", None),
        ("a b", None),
        ("", None),
    ],
)
def test_host_of_reads_a_host_header(value, host):
    assert host_of(value) == host


@pytest.mark.parametrize(
    "header",
    [
        b"localhost",
        b"localhost:8080",
        b"LOCALHOST.",
        b"127.0.0.1",
        b"127.0.0.1:8080",
        b"127.0.0.5:8080",  # all of 127/8 is loopback
        b"[::1]",
        b"[::1]:8080",
        b"[::ffff:127.0.0.1]:8080",
        b"nas.example.lan:8080",  # this machine's host name
        b"nas",  # ... its first label
        b"nas.local:8080",  # ... and its mDNS name
        b"imml.lan:8080",  # allowed by the operator
        b"192.168.0.10:8080",
    ],
)
def test_the_listeners_own_names_are_allowed(header):
    assert a_guard().host_allowed([header])


@pytest.mark.parametrize(
    "header",
    [
        b"evil.example",
        b"evil.example:8080",
        b"localhost.evil.example",
        b"nas.evil.example",
        b"imml.lan.evil.example",
        b"[::1]:80x",
        b"[evil.example]:8080",
        b"evil.example:8080:8080",
        b"a b",
        b"",
        b"\xffnas",
    ],
)
def test_other_names_are_refused(header):
    assert not a_guard().host_allowed([header])


def test_any_address_is_allowed():
    """
    An address is never a rebound name: on 0.0.0.0 or ::, the listener
    answers for whichever of the machine's addresses it is reached at, and
    through a port Docker publishes, for the Docker host's.
    """
    g = a_guard()
    assert g.host_allowed([b"10.0.0.5:8080"])
    assert g.host_allowed([b"[fd00::5]:8080"])
    assert g.host_allowed([b"[::ffff:10.0.0.5]"])
    assert not g.host_allowed([b"10.0.0.5.evil.example:8080"])


def test_a_request_without_host_passes_and_one_with_two_does_not():
    # HTTP/1.0 may send none; a browser always sends one, so no rebinding hides there.
    assert a_guard().host_allowed(None)
    assert not a_guard().host_allowed([b"localhost", b"evil.example"])


def test_the_operators_names_can_change():
    g = a_guard()
    g.set_hosts(["grafana.lan"])
    assert g.host_allowed([b"grafana.lan:8080"]) and not g.host_allowed([b"imml.lan:8080"])
    assert g.host_allowed([b"localhost:8080"])


def test_without_a_token_every_request_is_authorized():
    assert a_guard().authorized([], None)


@pytest.mark.parametrize(
    "authorization, right",
    [
        ([], False),
        ([b"Bearer " + TOKEN.encode()], True),
        ([b"bearer " + TOKEN.encode() + b" "], True),
        ([b"Bearer wrong"], False),
        ([b"Bearer " + TOKEN.encode() + b"x"], False),
        ([b"Bearer " + TOKEN.encode()[:-1]], False),
        ([b"Basic " + TOKEN.encode()], False),
        ([TOKEN.encode()], False),
        ([b"Bearer"], False),
        ([b"Bearer wrong", b"Bearer " + TOKEN.encode()], True),
    ],
)
def test_the_bearer_token(authorization, right):
    assert a_guard(TOKEN).authorized(authorization, None) is right


def test_the_sign_in_cookie_holds_a_digest_of_the_token_and_dies_with_it():
    g = a_guard(TOKEN)
    cookie = g.cookie()
    assert TOKEN.encode() not in cookie
    assert g.authorized([], cookie)
    assert not g.authorized([], TOKEN.encode())  # the token itself is no cookie
    assert not g.authorized([], a_guard("another-token").cookie())
    g.set_token("a-new-token")
    assert not g.authorized([], cookie)
    assert g.authorized([b"Bearer a-new-token"], None)
    assert not g.authorized([b"Bearer " + TOKEN.encode()], None)


def test_tokens_and_cookies_are_compared_in_constant_time(monkeypatch):
    compared = []
    real = guard_module.hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard_module.hmac, "compare_digest", recording)
    g = a_guard(TOKEN)
    assert not g.authorized([b"Bearer wrong"], b"not-the-cookie")
    assert compared == [(b"wrong", TOKEN.encode()), (b"not-the-cookie", g.cookie())]


def test_the_token_comes_from_the_first_source_given(tmp_path):
    path = tmp_path / "token"
    path.write_text("from-the-file\n")
    env = {"IMML_ADMIN_TOKEN": "from-the-env"}
    assert read_token(None, None, {}) is None
    assert read_token("from-the-option", None, env) == "from-the-option"
    assert read_token(None, str(path), env) == "from-the-file"
    assert read_token(None, None, env) == "from-the-env"
    assert read_token(None, None, {"IMML_ADMIN_TOKEN_FILE": str(path)}) == "from-the-file"
    path.write_text("with-crlf\r\n")
    assert read_token(None, str(path), {}) == "with-crlf"
    path.write_text("no-newline")
    assert read_token(None, str(path), {}) == "no-newline"


@pytest.mark.parametrize(
    "value, file_text, env, words",
    [
        ("secret-1", "secret-2", {}, "not both"),
        (None, None, {"IMML_ADMIN_TOKEN": "secret-1", "IMML_ADMIN_TOKEN_FILE": "/x"}, "not both"),
        ("", None, {}, "empty"),
        (None, None, {"IMML_ADMIN_TOKEN": ""}, "$IMML_ADMIN_TOKEN: the admin token is empty"),
        (None, "\n", {}, "empty"),
        ("secret 1", None, {}, "without spaces"),
        (None, "secret 1\n", {}, "without spaces"),
        ("sécret-1", None, {}, "printable ASCII"),
        (None, "x" * 5000, {}, "too long"),
    ],
)
def test_a_token_that_cannot_be_used_is_refused_without_showing_it(tmp_path, value, file_text, env, words):
    path = None
    if file_text is not None:
        path = tmp_path / "token"
        path.write_text(file_text)
    with pytest.raises(TokenError) as e:
        read_token(value, str(path) if path else None, env)
    assert words in str(e.value)
    assert "secret" not in str(e.value) and "xxxx" not in str(e.value)


def test_a_token_file_that_cannot_be_read(tmp_path):
    with pytest.raises(TokenError) as e:
        read_token(None, str(tmp_path / "missing"), {})
    assert str(tmp_path / "missing") in str(e.value) and "cannot read" in str(e.value)


def options(*args):
    o = Options()
    o.parseOptions(["--backends", "nas", *args])
    return o


@pytest.fixture
def environ(monkeypatch):
    for name in ("IMML_ADMIN_TOKEN", "IMML_ADMIN_TOKEN_FILE", "IMML_ADMIN_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_options_give_no_token_and_no_extra_names_by_default(environ):
    o = options()
    assert o["admin-token"] is None and o["admin-hosts"] == ()


def test_the_options_resolve_the_token(environ, tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert options("--admin-token-file", str(path))["admin-token"] == TOKEN
    environ.setenv("IMML_ADMIN_TOKEN", "from-the-env")
    assert options()["admin-token"] == "from-the-env"
    assert options("--admin-token", "from-the-command-line")["admin-token"] == "from-the-command-line"
    assert options("--admin-token-file", str(path))["admin-token"] == TOKEN
    with pytest.raises(usage.UsageError) as e:
        options("--admin-token", "secret-1", "--admin-token-file", str(path))
    assert "not both" in str(e.value) and "secret" not in str(e.value)


def test_admin_hosts_from_the_command_line_the_environment_and_the_file(environ, tmp_path):
    assert options("--admin-host", "Grafana.lan", "--admin-host", "imml.lan:8080,[FD00::5]")["admin-hosts"] == (
        "grafana.lan",
        "imml.lan",
        "fd00::5",
    )
    environ.setenv("IMML_ADMIN_HOSTS", "imml.lan, prometheus")
    assert options()["admin-hosts"] == ("imml.lan", "prometheus")
    assert options("--admin-host", "grafana.lan")["admin-hosts"] == ("grafana.lan",)
    environ.delenv("IMML_ADMIN_HOSTS")
    path = tmp_path / "imml.toml"
    path.write_text(f'[balancer]\nadmin-hosts = ["imml.lan", "192.168.0.10"]\nadmin-token-file = "{tmp_path}/token"\n')
    (tmp_path / "token").write_text(TOKEN + "\n")
    o = options("--config", str(path))
    assert o["admin-hosts"] == ("imml.lan", "192.168.0.10") and o["admin-token"] == TOKEN
    # the command line wins over the file
    assert options("--config", str(path), "--admin-host", "grafana.lan")["admin-hosts"] == ("grafana.lan",)


@pytest.mark.parametrize(
    "args, env, text, words",
    [
        (["--admin-host", "http://imml.lan"], {}, None, "--admin-host: 'http://imml.lan' is not a host name"),
        ([], {"IMML_ADMIN_HOSTS": "imml.lan,a b"}, None, "$IMML_ADMIN_HOSTS: 'a b' is not a host name"),
        ([], {}, '[balancer]\nadmin-hosts = ["a b"]\n', "admin-hosts: 'a b' is not a host name"),
        ([], {}, "[balancer]\nadmin-hosts = 3\n", "admin-hosts: 3 is not a list of names"),
    ],
)
def test_a_name_that_is_not_one_is_a_usage_error(environ, tmp_path, args, env, text, words):
    for name, value in env.items():
        environ.setenv(name, value)
    if text is not None:
        (tmp_path / "imml.toml").write_text(text)
        args = [*args, "--config", str(tmp_path / "imml.toml")]
    with pytest.raises(usage.UsageError) as e:
        options(*args)
    assert words in str(e.value)


def test_a_reload_reads_the_command_lines_names_and_token_again(environ, tmp_path):
    from imml.control import reparse

    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    o = options("--admin-host", "imml.lan", "--admin-token-file", str(path))
    path.write_text("a-n3w-t0ken\n")
    again = reparse(o)
    assert again["admin-hosts"] == ("imml.lan",) and again["admin-token"] == "a-n3w-t0ken"
