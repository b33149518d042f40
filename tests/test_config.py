import pytest
from twisted.python import usage

from imml.backends import BackendAddress
from imml.config import ConfigError, load_config, parse_config
from imml.fleet import BackendSettings
from imml.tap import Options

GOOD = """
[balancer]
strategy = "failover"
queue_timeout = 90

[[hosts]]
address = "mac.local:3003"
name = " studio Mac "
slots = 4
weight = 2
tier = 0
tasks = ["clip-visual", "clip-textual", "faces"]
mac = "AA:BB:CC:DD:EE:FF"

[[hosts]]
address = "nas"
slots = 1
tasks = ["ocr"]
tier = 1
"""


def test_a_full_file():
    config = parse_config(GOOD)
    assert [(h.address, h.settings) for h in config.hosts] == [
        (
            BackendAddress("mac.local", 3003),
            BackendSettings(
                2.0, 4, frozenset({"clip-visual", "clip-textual", "faces"}), 0, "aa:bb:cc:dd:ee:ff", "studio Mac"
            ),
        ),
        (BackendAddress("nas", 3003), BackendSettings(1.0, 1, frozenset({"ocr"}), 1, None)),
    ]
    assert config.balancer == {"strategy": "failover", "queue-timeout": 90}


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("[[hosts]]\naddress = 'a'\nslots = 0\n", 3, "slots"),
        ("[[hosts]]\naddress = 'a'\n\n[[hosts]]\naddress = 'b'\nweight = -1\n", 6, "weight"),
        ("[[hosts]]\naddress = 'a:99999'\n", 2, "65535"),
        ("[[hosts]]\nslots = 2\n", 1, "needs an address"),
        ("[[hosts]]\naddress = 'a'\ntasks = ['ocr', 'video']\n", 3, "'video'"),
        ("[[hosts]]\naddress = 'a'\nmac = 'zz'\n", 3, "MAC"),
        ("[[hosts]]\naddress = 'a'\ncolour = 'red'\n", 3, "'colour'"),
        ("[[hosts]]\naddress = 'a'\nname = ''\n", 3, "name must be"),
        ("[[hosts]]\naddress = 'a'\nname = 3\n", 3, "name must be"),
        ("[[hosts]]\naddress = 'a'\nreference = 'yes'\n", 3, "reference must be true or false"),
        ("[[hosts]]\naddress = 'a'\nname = \"two\\nlines\"\n", 3, "name must be"),
        ("[[hosts]]\naddress = 'a'\n[[hosts]]\naddress = 'a:3003'\n", 3, "twice"),
        ("[frontend]\nx = 1\n", 1, "'frontend'"),
        ("[balancer]\nstrategy = 'failover'\nspeed = 11\n", 3, "'speed'"),
        ("[[hosts]]\naddress = = 'a'\n", 2, "Invalid value"),
        ("[[hosts]]\naddress = 'a\n", 2, "end of the file"),
    ],
)
def test_a_bad_file_names_the_line_and_reason(text, line, words):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "imml.toml", known_options={"strategy"})
    assert f"imml.toml, line {line}" in str(e.value) or f"line {line}" in str(e.value)
    assert words in str(e.value)


def test_an_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "missing.toml"))
    assert "missing.toml" in str(e.value) and "cannot read" in str(e.value)


def options(*args):
    o = Options()
    o.parseOptions(list(args))
    return o


def test_the_files_hosts_replace_backends_and_its_options_fill_defaults(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text(GOOD)
    o = options("--config", str(path), "--backends", "ignored")
    assert [a for a, _ in o["hosts"]] == [BackendAddress("mac.local"), BackendAddress("nas")]
    assert o["strategy"] == "failover"
    assert o["queue-timeout"] == 90.0
    # the command line wins over the file
    o = options("--config", str(path), "--strategy", "round-robin")
    assert o["strategy"] == "round-robin"


def test_a_file_without_hosts_keeps_backends(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text("[balancer]\nmax-tries = 5\n")
    o = options("--config", str(path), "--backends", "a,b")
    assert [a.host for a, _ in o["hosts"]] == ["a", "b"]
    assert o["max-tries"] == 5


def test_a_bad_option_value_in_the_file(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text("[balancer]\nmax-tries = 0\n")
    with pytest.raises(usage.UsageError) as e:
        options("--config", str(path), "--backends", "a")
    assert "max-tries" in str(e.value) and "greater than zero" in str(e.value)


def test_a_flag_in_the_file_is_true_or_false(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text("[balancer]\nadmin-actions = true\n")
    assert options("--config", str(path), "--backends", "a")["admin-actions"] == 1
    path.write_text("[balancer]\nadmin-actions = false\n")
    assert options("--config", str(path), "--backends", "a")["admin-actions"] == 0
    path.write_text('[balancer]\nadmin-actions = "yes"\n')
    with pytest.raises(usage.UsageError) as e:
        options("--config", str(path), "--backends", "a")
    assert "admin-actions" in str(e.value) and "true or false" in str(e.value)


def test_a_reference_host_and_the_agreement_options_in_the_file(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text(
        '[balancer]\nagreement-threshold = "faces=0.95"\nagreement-interval = 600\n'
        "[[hosts]]\naddress = 'a'\nreference = true\n[[hosts]]\naddress = 'b'\n"
    )
    o = options("--config", str(path))
    assert [s.reference for _, s in o["hosts"]] == [True, False]
    assert o["agreement"] is True and o["agreement-interval"] == 600.0
    assert o["agreement-threshold"] == {"clip-visual": 0.99, "clip-textual": 0.99, "faces": 0.95}
    path.write_text("[balancer]\nagreement = false\n")
    assert options("--config", str(path), "--backends", "a")["agreement"] is False


@pytest.mark.parametrize(
    "args, words",
    [
        (("--agreement", "maybe"), "neither on nor off"),
        (("--agreement-threshold", "ocr=0.9"), "not a checked task"),
        (("--agreement-threshold", "2"), "at most 1"),
        (("--agreement-interval", "0"), "greater than zero"),
    ],
)
def test_a_bad_agreement_option_is_a_usage_error(args, words):
    with pytest.raises(usage.UsageError, match=words):
        options("--backends", "a", *args)
