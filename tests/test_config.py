import pytest
from twisted.python import usage

from imml.backends import BackendAddress, DnsServer
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


def test_the_files_in_balancer_are_read_from_the_files_own_directory(tmp_path, monkeypatch):
    """
    As the hosts' C{ca}, C{[balancer]}'s C{admin-token-file} names a file
    beside the configuration, wherever the balancer is started from.
    """
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "admin-token").write_text("s3cret\n")
    path = etc / "imml.toml"
    path.write_text('[balancer]\nadmin-token-file = "admin-token"\n')
    monkeypatch.chdir(tmp_path)
    o = options("--config", str(path), "--backends", "a")
    assert o["admin-token"] == "s3cret"
    (tmp_path / "elsewhere.toml").write_text(f'[balancer]\nadmin-token-file = "{etc / "admin-token"}"\n')
    assert options("--config", "elsewhere.toml", "--backends", "a")["admin-token"] == "s3cret"


def test_a_file_without_hosts_keeps_backends(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text("[balancer]\nmax-tries = 5\n")
    o = options("--config", str(path), "--backends", "a,b")
    assert [a.host for a, _ in o["hosts"]] == ["a", "b"]
    assert o["max-tries"] == 5


@pytest.mark.parametrize(
    "text, says",
    [
        (
            '[balancer]\nstrategy = "failover"\nqueue-timeout = "abc"\n',
            "line 3: queue-timeout must be a number greater than 0, not 'abc'",
        ),
        ("[balancer]\n\nmax-tries = 0\n", "line 3: max-tries must be at least 1, not 0"),
        ("# rise\n[balancer]\nrise = 1.5\n", "line 3: rise must be a whole number of at least 1, not 1.5"),
        ("[balancer]\nhealth_interval = -1\n", "line 2: health-interval must be greater than 0, not -1"),
        ('[balancer]\n"wol-port" = 70000\n', "line 2: wol-port must be from 1 to 65535, not 70000"),
        (
            '[balancer]\nmax-body = "lots"\n',
            "line 2: max-body must be a size such as 100M, 512k or 1048576, not 'lots'",
        ),
        ('[balancer]\nmax-tries = 2\nstrategy = "fastest"\n', "line 3: unknown strategy 'fastest'; choose one of"),
        ('[balancer]\nlisten = "tcp:notaport"\n', "line 2: listen 'tcp:notaport': the port must be a number"),
        ('[balancer]\nadmin-actions = "yes"\n', "line 2: admin-actions must be true or false, not 'yes'"),
        (
            '[balancer]\nbackends = "nas,mac"\n',
            "line 2: backends cannot be set in [balancer]: hosts go in [[hosts]] tables",
        ),
        ("[balancer]\ndemo = 3\n", "line 2: demo cannot be set in [balancer]: stand-in hosts are for trying imml out"),
        ('[balancer]\nconfig = "other.toml"\n', "line 2: config cannot be set in [balancer]"),
        ("[balancer]\ncheck = true\n", "line 2: check cannot be set in [balancer]: give --check on the command line"),
    ],
)
def test_a_value_the_file_cannot_set_is_refused_naming_the_file_and_line(tmp_path, text, says):
    path = tmp_path / "imml.toml"
    path.write_text(text)
    with pytest.raises(usage.UsageError) as e:
        options("--config", str(path), "--backends", "a")
    assert str(e.value).startswith(f"{path}, {says}")


def test_the_command_line_wins_over_a_bad_value_in_the_file(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text('[balancer]\nqueue-timeout = "abc"\n')
    assert options("--config", str(path), "--backends", "a", "--queue-timeout", "9")["queue-timeout"] == 9.0


#: The flags the file may set: every flag of the command line but --check.
FILE_FLAGS = [row[0] for row in Options.optFlags if row[0] != "check"]


@pytest.mark.parametrize("flag", FILE_FLAGS)
def test_a_flag_in_the_file_is_true_or_false(tmp_path, flag):
    path = tmp_path / "imml.toml"
    path.write_text(f"[balancer]\n{flag} = true\n")
    assert options("--config", str(path), "--backends", "a")[flag] == 1
    path.write_text(f"[balancer]\n{flag} = false\n")
    assert options("--config", str(path), "--backends", "a")[flag] == 0
    assert options("--config", str(path), "--backends", "a", f"--{flag}")[flag] == 1
    path.write_text(f'[balancer]\n{flag} = "yes"\n')
    with pytest.raises(usage.UsageError) as e:
        options("--config", str(path), "--backends", "a")
    assert str(e.value) == f"{path}, line 2: {flag} must be true or false, not 'yes'"


#: Every option that takes a number (its default is one), and a value out
#: of its bounds.
NUMBERS = [(row[0], "-1" if row[0] == "demo" else "0") for row in Options.optParameters if type(row[2]) in (int, float)]


@pytest.mark.parametrize("name, bad", NUMBERS)
def test_a_number_out_of_bounds_on_the_command_line_names_its_option(name, bad):
    for text, says in [(bad, f"not {bad}"), ("abc", "not 'abc'"), ("nan", "not nan")]:
        with pytest.raises(usage.UsageError) as e:
            options(f"--{name}", text, "--backends", "a")
        message = str(e.value)
        assert message.startswith(f"--{name} must be ") and message.endswith(says), message


@pytest.mark.parametrize(
    "args, says",
    [
        (["--rise", "0"], "--rise must be at least 1, not 0"),
        (["--max-queue", "2.5"], "--max-queue must be a whole number of at least 1, not 2.5"),
        (["--queue-timeout", "abc"], "--queue-timeout must be a number greater than 0, not 'abc'"),
        (["--response-timeout", "inf"], "--response-timeout must be greater than 0, not inf"),
        (["--demo", "-2"], "--demo must be at least 0, not -2"),
        (["--max-body", "lots"], "--max-body must be a size such as 100M, 512k or 1048576, not 'lots'"),
    ],
)
def test_a_bad_number_on_the_command_line_says_what_it_must_be(args, says):
    with pytest.raises(usage.UsageError) as e:
        options(*args, "--backends", "a")
    assert str(e.value) == says


def test_hosts_have_names_from_the_file(tmp_path):
    config = parse_config('[[hosts]]\naddress = "192.168.0.5"\nname = "nas"\n[[hosts]]\naddress = "mac.local"\n')
    assert [h.settings.name for h in config.hosts] == ["nas", None]
    for text, line, words in [
        ('[[hosts]]\naddress = "a"\nname = 3\n', 3, "name must be a short text"),
        ('[[hosts]]\naddress = "a"\nname = ""\n', 3, "name must be a short text"),
        (
            '[[hosts]]\naddress = "a"\nname = "x"\n[[hosts]]\naddress = "b"\nname = "x"\n',
            4,
            "the name 'x' is given to two hosts",
        ),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config(text, "imml.toml")
        assert str(e.value).startswith(f"imml.toml, line {line}: {words}")


def test_the_file_knows_the_line_of_each_balancer_setting():
    text = (
        '# strategy = "round-robin"\n[[hosts]]\naddress = "a"\n\n'
        '[balancer]\nqueue_timeout = 90\n"max-tries" = 2\nstrategy = "failover"\n'
    )
    config = parse_config(text, "imml.toml")
    assert config.balancer == {"queue-timeout": 90, "max-tries": 2, "strategy": "failover"}
    assert [config.where(k) for k in config.balancer] == ["imml.toml, line 6", "imml.toml, line 7", "imml.toml, line 8"]


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
        (("--agreement-interval", "0"), "must be greater than 0"),
    ],
)
def test_a_bad_agreement_option_is_a_usage_error(args, words):
    with pytest.raises(usage.UsageError, match=words):
        options("--backends", "a", *args)


def test_the_dns_server_is_read_once_wherever_it_is_set(tmp_path):
    assert options("--backends", "a")["dns-server"] is None
    assert options("--backends", "a", "--dns-server", "10.0.0.53")["dns-server"] == DnsServer("10.0.0.53", 53)
    with pytest.raises(usage.UsageError) as e:
        options("--backends", "a", "--dns-server", "dns.example")
    assert str(e.value) == "--dns-server 'dns.example': a DNS server is an IP address, with a port if not 53"
    path = tmp_path / "imml.toml"
    path.write_text('[balancer]\ndns-server = "[fd00::53]:5353"\n')
    assert options("--config", str(path), "--backends", "a")["dns-server"] == DnsServer("fd00::53", 5353)
    path.write_text('[balancer]\ndns-server = "dns.example"\n')
    with pytest.raises(usage.UsageError) as e:
        options("--config", str(path), "--backends", "a")
    assert str(e.value).startswith(f"{path}, line 2: dns-server 'dns.example': a DNS server is an IP address")
