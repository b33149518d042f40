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


def test_blanks_are_ignored():
    assert parse_backends(" a , ,b:1,") == [BackendAddress("a"), BackendAddress("b", 1)]


def test_ipv6_url_has_brackets():
    assert BackendAddress("::1", 3003).url(b"/ping") == b"http://[::1]:3003/ping"


@pytest.mark.parametrize(
    "text, words",
    [
        ("nas:99999", ["'nas:99999'", "65535"]),
        ("nas:abc", ["'nas:abc'", "not a number"]),
        ("https://nas", ["'https://nas'", "http://"]),
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
