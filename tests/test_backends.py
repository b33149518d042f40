import pytest

from imml.backends import BackendAddress, BackendListError, parse_backend, parse_backends


@pytest.mark.parametrize(
    "entry, host, port",
    [
        ("immich-machine-learning", "immich-machine-learning", 3003),
        ("192.168.0.123:3003", "192.168.0.123", 3003),
        ("desktop.local:3004", "desktop.local", 3004),
        ("  Desktop.Local  ", "desktop.local", 3003),
        ("[::1]:3005", "::1", 3005),
        ("[fe80::1]", "fe80::1", 3003),
        ("::1", "::1", 3003),
        ("http://gpu-box:3010", "gpu-box", 3010),
        ("http://gpu-box/", "gpu-box", 3003),
        ("HTTP://nas", "nas", 3003),
    ],
)
def test_entries(entry, host, port):
    assert parse_backend(entry) == BackendAddress(host, port)


def test_the_nginx_images_example_list():
    assert [str(a) for a in parse_backends("immich-machine-learning,192.168.0.123:3003,desktop.local:3003")] == [
        "immich-machine-learning:3003",
        "192.168.0.123:3003",
        "desktop.local:3003",
    ]


@pytest.mark.parametrize(
    "entry, host, port, shown",
    [
        ("https://gpu.example.net", "gpu.example.net", 443, "https://gpu.example.net:443"),
        ("HTTPS://gpu.example.net:8443/", "gpu.example.net", 8443, "https://gpu.example.net:8443"),
        ("https://[::1]:8443", "::1", 8443, "https://[::1]:8443"),
        ("https://127.0.0.1", "127.0.0.1", 443, "https://127.0.0.1:443"),
    ],
)
def test_https_entries(entry, host, port, shown):
    address = parse_backend(entry)
    assert address == BackendAddress(host, port, "https")
    assert address.is_https
    assert str(address) == shown
    assert address.url(b"/ping") == shown.encode() + b"/ping"


def test_https_and_http_on_one_host_are_two_hosts():
    assert parse_backends("nas:3003,https://nas:3003") == [
        BackendAddress("nas", 3003),
        BackendAddress("nas", 3003, "https"),
    ]


def test_blanks_are_ignored():
    assert parse_backends(" a , ,b:1,") == [BackendAddress("a"), BackendAddress("b", 1)]


def test_ipv6_url_has_brackets():
    assert BackendAddress("::1", 3003).url(b"/ping") == b"http://[::1]:3003/ping"


@pytest.mark.parametrize(
    "text, words",
    [
        ("nas:99999", ["'nas:99999'", "65535"]),
        ("nas:abc", ["'nas:abc'", "not a number"]),
        ("ftp://nas", ["'ftp://nas'", "https://"]),
        ("https://nas/predict", ["path"]),
        ("http://nas/predict", ["path"]),
        ("[::1", ["'[::1'", "]"]),
        ("[nas]:3003", ["IPv6"]),
        ("a::b::c", ["[address]:port"]),
        ("bad host!", ["'bad host!'"]),
        ("good, bad/host", ["'bad/host'"]),
        (" , ", ["IMML_BACKENDS"]),
        ("nas,nas:3003", ["twice"]),
    ],
)
def test_bad_entries_are_named(text, words):
    with pytest.raises(BackendListError) as e:
        parse_backends(text)
    for word in words:
        assert word in str(e.value)
