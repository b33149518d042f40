"""
`--check`, as `nginx -t` and `haproxy -c`: the options, the configuration
file and the hosts read, the settings in force printed with where each
came from, exit status 0; or the first error in one line and status 2.
Nothing listens, nothing runs.  And the options as the README documents
them.
"""

import os
import re
import signal
import socket

import pytest
from support import ROOT, twistd

from imml import __version__
from imml.control import reparse
from imml.summary import report
from imml.tap import Options

TOKEN = "s3cret-admin-token"

CONFIG = """\
[balancer]
strategy = "failover"
queue-timeout = 90
admin-actions = true

[[hosts]]
address = "192.168.0.5"
name = "nas"
slots = 2
tasks = ["ocr", "faces"]

[[hosts]]
address = "mac.local:3004"
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "imml.toml"
    path.write_text(CONFIG)
    return path


def check(tmp_path, *args, env=None):
    """
    C{twistd imml-balancer --check} as a user runs it (as a daemon would
    start: no C{-n}), with its pid file and log in C{tmp_path}; neither may
    appear.
    """
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    try:
        result = twistd(
            f"--pidfile={pidfile}", f"--logfile={logfile}", "imml-balancer", "--check", *args, env=env, timeout=60
        )
    finally:
        if pidfile.exists():
            # It started after all: stop the daemon this test started.
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert not pidfile.exists() and not logfile.exists()
    return result


def rows(output: str) -> dict:
    """
    The settings --check printed: option to (value, origin).
    """
    found = {}
    for line in output.splitlines():
        m = re.match(r"^  (\S+)\s{2,}(\S.*?)\s{2,}(\S.*)$", line)
        if m:
            found[m[1]] = (m[2], m[3])
    return found


def test_check_prints_the_settings_in_force_and_where_each_came_from(tmp_path, config):
    with socket.socket() as held:
        # Where it is told to listen is taken: --check never tries.
        held.bind(("127.0.0.1", 0))
        held.listen()
        listen = f"127.0.0.1:{held.getsockname()[1]}"
        result = check(
            tmp_path, "--config", str(config), "--max-tries", "4", "--listen", listen, env={"IMML_ADMIN_TOKEN": TOKEN}
        )
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    first, *_ = result.stdout.splitlines()
    assert first == f"imml {__version__}: the configuration is valid; the settings in force:"
    settings = rows(result.stdout)
    assert settings["listen"] == (listen, "command line")
    assert settings["max-tries"] == ("4", "command line")
    assert settings["strategy"] == ("failover", f"file ({config}, line 2)")
    assert settings["queue-timeout"] == ("90", f"file ({config}, line 3)")
    assert settings["admin-actions"] == ("on", f"file ({config}, line 4)")
    assert settings["rise"] == ("2", "default")
    assert settings["max-body"] == ("100M", "default")
    # A secret is said to be set, never shown.
    assert settings["admin-token"] == ("set", "environment ($IMML_ADMIN_TOKEN)")
    assert TOKEN not in result.stdout
    assert f"hosts (2, from file ({config})):" in result.stdout
    assert "  nas (192.168.0.5:3003)  weight 1; slots 2; tier 0; tasks faces, ocr" in result.stdout
    assert "  mac.local:3004          weight 1; slots learned; tier 0; tasks all" in result.stdout
    # Every option is there.
    assert set(settings) == {"option", *(row[0] for row in Options.optParameters), "admin-hosts", "admin-actions"}


def test_check_of_a_bad_file_says_the_first_error_in_one_line_and_exits_2(tmp_path):
    path = tmp_path / "imml.toml"
    for text, says in [
        ('[balancer]\nqueue-timeout = "abc"\nstrategy = "fastest"\n', "line 2: queue-timeout must be a number"),
        ('[balancer]\nmax-tries = 2\nstrategy = "fastest"\n', "line 3: unknown strategy 'fastest'"),
        ('[[hosts]]\naddress = "nas:99999"\n', "line 2: backend 'nas:99999': port 99999 is not between 1 and 65535"),
    ]:
        path.write_text(text)
        result = check(tmp_path, "--config", str(path))
        assert (result.returncode, result.stdout) == (2, "")
        [line] = result.stderr.splitlines()
        assert line.startswith(f"imml-balancer: error: {path}, {says}")


def test_check_of_bad_backends_names_the_variable(tmp_path):
    result = check(tmp_path, env={"IMML_BACKENDS": "nas,ftp://mac"})
    assert result.returncode == 2
    assert result.stderr.startswith("imml-balancer: error: $IMML_BACKENDS: backend 'ftp://mac'")


def options(*args: str) -> Options:
    parsed = Options()
    parsed.parseOptions(list(args))
    return parsed


def test_the_report_shows_no_secret_and_the_stand_in_hosts(monkeypatch, tmp_path):
    monkeypatch.delenv("IMML_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("IMML_ADMIN_TOKEN_FILE", raising=False)
    text = report(options("--demo", "3", "--admin-token", TOKEN, "--admin-host", "nas.lan"), "9.9")
    assert TOKEN not in text
    assert rows(text)["admin-token"] == ("set", "command line")
    assert rows(text)["admin-hosts"] == ("nas.lan", "command line")
    assert text.splitlines()[-1] == "hosts: 3 stand-in hosts, started with the balancer (from command line)"
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    text = report(options("--backends", "nas", "--admin-token-file", str(token)), "9.9")
    assert TOKEN not in text
    assert rows(text)["admin-token"] == ("set", "command line")
    assert rows(text)["admin-token-file"] == (str(token), "command line")
    assert rows(text)["admin-token"] != ("none", "default")


def test_check_prints_the_report_and_exits_0(config, capsys):
    with pytest.raises(SystemExit) as e:
        options("--config", str(config), "--check")
    assert e.value.code == 0
    assert rows(capsys.readouterr().out)["strategy"] == ("failover", f"file ({config}, line 2)")


def test_a_command_line_value_equal_to_the_default_wins_over_the_file(tmp_path, capsys):
    path = tmp_path / "imml.toml"
    path.write_text("[balancer]\ndns-interval = 60\nagreement-wait = 20\n")
    args = ("--config", str(path), "--backends", "nas", "--dns-interval", "30", "--agreement-wait", "10")
    with pytest.raises(SystemExit) as e:
        options(*args, "--check")
    assert e.value.code == 0
    settings = rows(capsys.readouterr().out)
    assert settings["dns-interval"] == ("30", "command line")
    assert settings["agreement-wait"] == ("10", "command line")
    # and a reload, with the file changed, keeps them
    parsed = options(*args)
    path.write_text("[balancer]\ndns-interval = 90\nagreement-wait = 5\n")
    again = reparse(parsed)
    assert (again["dns-interval"], again["agreement-wait"]) == (30.0, 10.0)


# The README documents the options.

README = (ROOT / "README.md").read_text()


def documented_options() -> set:
    """
    The options in the README's option table (a row may name two).
    """
    table = README[README.index("| option | default | meaning |") :]
    table = table[: table.index("\n\n")]
    names = set()
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        names.update(re.findall(r"`--([a-z-]+)`", first))
    return names


def options_of_the_command_line() -> set:
    """
    Every long option of C{twistd imml-balancer} but C{--help}.
    """
    names = {row[0] for row in Options.optParameters + Options.optFlags}
    names |= {name[len("opt_") :].replace("_", "-") for name in dir(Options) if name.startswith("opt_")}
    return names - {"help"}


def test_the_readme_documents_every_option_and_no_other():
    assert documented_options() == options_of_the_command_line()


def test_the_readmes_example_file_works(tmp_path):
    section = README[README.index("### Per-host settings") :]
    example = section[section.index("```toml\n") + len("```toml\n") :]
    example = example[: example.index("```")]
    path = tmp_path / "imml.toml"
    path.write_text(example)
    parsed = options("--config", str(path))
    assert parsed["admin-actions"] == 1 and parsed["admin-hosts"] == ("nas.local",)
    assert [settings.name for _, settings in parsed["hosts"]] == ["mac", "nas"]


def test_the_admin_guide_says_which_settings_a_reload_applies():
    from unittest.mock import Mock

    from imml.wiring import appliers

    text = " ".join((ROOT / "docs" / "admin.md").read_text().split())
    text = text[text.index("apply at once where they can (") :]
    at_once, restart = re.findall(r"\(([^()]*)\)", text)[:2]
    at_once, restart = set(re.findall(r"`([a-z*-]+)`", at_once)), set(re.findall(r"`([a-z*-]+)`", restart))
    applied = set(appliers(*[Mock()] * 10, listeners={"listen": Mock(), "admin": Mock()}))
    # (The admin token is named in words: "the admin token".)
    assert at_once == applied - {"admin-token", "admin-token-file"}
    if "wol-*" in restart:
        restart = restart - {"wol-*"} | {name for name in options_of_the_command_line() if name.startswith("wol-")}
    settings = {row[0] for row in Options.optParameters + Options.optFlags} | set(Options.repeated)
    # Every other setting names the hosts, or is for the command line only.
    assert restart == settings - applied - {"backends", "config", "demo", "check"}
