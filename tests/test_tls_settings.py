"""
The TLS and header settings of ML hosts, as the configuration file and the
command line give them: what is read, what is refused and how it is said.
"""

from __future__ import annotations

import pytest
from certs import Authority
from twisted.python import usage

from imml.backends import BackendAddress
from imml.config import ConfigError, parse_config
from imml.tap import Options
from imml.tls import TLSSettings

SECRET = "s3cret-token-value"


def options(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


def write(tmp_path, text: str) -> str:
    path = tmp_path / "imml.toml"
    path.write_text(text)
    return str(path)


def test_a_hosts_ca_cert_key_and_headers_are_read_relative_to_the_file(tmp_path):
    ca = Authority.make()
    ca.write(tmp_path)
    ca.issue("imml", client=True).write(tmp_path, "client")
    path = write(
        tmp_path,
        '[[hosts]]\naddress = "https://gpu.example.net"\nca = "ca.pem"\ncert = "client.pem"\nkey = "client.key"\n'
        f'headers = {{ X-Token = "{SECRET}", X-Other = "b" }}\n',
    )
    [(address, settings)] = options("--config", path)["hosts"]
    assert address == BackendAddress("gpu.example.net", 443, "https")
    assert settings.tls.ca == str(tmp_path / "ca.pem") and settings.tls.authorities == ca.pem
    assert settings.tls.cert == str(tmp_path / "client.pem")
    assert settings.headers == ((b"X-Token", SECRET.encode()), (b"X-Other", b"b"))
    assert settings.header_names == ["X-Token", "X-Other"]
    assert SECRET not in repr(settings)


def test_ca_file_is_for_https_hosts_without_a_ca_of_their_own(tmp_path):
    ours, theirs = Authority.make(), Authority.make("theirs")
    ca_file = ours.write(tmp_path, "ours")
    theirs.write(tmp_path, "theirs")
    path = write(
        tmp_path,
        '[[hosts]]\naddress = "https://a"\n\n[[hosts]]\naddress = "https://b"\nca = "theirs.pem"\n\n'
        '[[hosts]]\naddress = "c"\n',
    )
    a, b, c = (settings for _, settings in options("--config", path, "--ca-file", ca_file)["hosts"])
    assert a.tls.ca == ca_file and a.tls.authorities == ours.pem
    assert b.tls.ca == str(tmp_path / "theirs.pem")
    assert c.tls is None


def test_https_backends_trust_the_system_unless_ca_file_says(tmp_path):
    [(_, settings)] = options("--backends", "https://gpu")["hosts"]
    assert settings.tls == TLSSettings() and settings.tls.describe() == {"ca": "system", "cert": None}
    ca_file = Authority.make().write(tmp_path)
    [(_, settings)] = options("--backends", "https://gpu", "--ca-file", ca_file)["hosts"]
    assert settings.tls.ca == ca_file


@pytest.mark.parametrize(
    "contents, words",
    [(None, "cannot read it"), (b"not a certificate\n", "no PEM certificate")],
)
def test_a_bad_ca_file_is_one_clear_line(tmp_path, contents, words):
    path = tmp_path / "ca.pem"
    if contents is not None:
        path.write_bytes(contents)
    with pytest.raises(usage.UsageError) as e:
        options("--backends", "https://gpu", "--ca-file", str(path))
    assert str(e.value).startswith(f"--ca-file: CA file {path}: ") and words in str(e.value)


@pytest.mark.parametrize(
    "host, line, words",
    [
        ('address = "nas"\nca = "ca.pem"', 3, "ca is for https:// hosts; write the address as https://nas:3003"),
        ('address = "https://nas"\nca = "missing.pem"', 3, "missing.pem: cannot read it"),
        ('address = "https://nas"\ncert = 3', 3, "cert must be the path of a PEM file"),
        ('address = "https://nas"\nkey = "client.key"', 3, "a key needs its certificate"),
        ('address = "https://nas"\ncert = "ca.pem"', 3, "not a PEM certificate with its private key"),
        ('address = "nas"\nheaders = "X-Token: a"', 3, "headers must be a table"),
        ('address = "nas"\nheaders = { "X Token" = "a" }', 3, "'X Token' is not a header name"),
        ('address = "nas"\nheaders = { Content-Length = "1" }', 3, "Content-Length is set by the balancer"),
        ('address = "nas"\nheaders = { X-Token = 1 }', 3, "the value of X-Token must be a string"),
    ],
)
def test_bad_host_tls_settings_name_the_line_and_reason(tmp_path, host, line, words):
    Authority.make().write(tmp_path)
    path = str(tmp_path / "imml.toml")
    with pytest.raises(ConfigError) as e:
        parse_config(f"[[hosts]]\n{host}\n", path)
    assert f"{path}, line {line}: " in str(e.value) and words in str(e.value)


def test_a_bad_header_value_is_refused_without_showing_it(tmp_path):
    secret = "s3cret\\nX-Injected: 1"
    with pytest.raises(ConfigError) as e:
        parse_config(f'[[hosts]]\naddress = "nas"\nheaders = {{ X-Token = "{secret}" }}\n', "imml.toml")
    assert "the value of X-Token must be printable ASCII on one line" in str(e.value)
    assert "s3cret" not in str(e.value)
