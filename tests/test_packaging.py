"""
The package as users install it: the wheel carries the twistd plugins (and
the agreement check's pictures), and twistd finds them.
"""

import subprocess
import sys
import zipfile

from support import ROOT, twistd


def test_the_wheel_carries_the_dropins(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("imml-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/imml_balancer.py" in names
    assert "twisted/plugins/imml_mac.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "imml/tap.py" in names and "imml/testing/__init__.py" in names
    # The agreement check's pictures, which it sends to every host.
    assert {"imml/canary-pictures/scene.png", "imml/canary-pictures/face.png"} <= set(names)
    assert not [n for n in names if n.startswith("tests/")]


def test_twistd_lists_both_plugins():
    result = twistd("--help")
    assert "imml-balancer" in result.stdout
    assert "imml-mac" in result.stdout


def test_balancer_help_names_every_option():
    result = twistd("imml-balancer", "--help")
    for option in [
        "--listen",
        "--backends",
        "--strategy",
        "--health-interval",
        "--health-timeout",
        "--rise",
        "--fall",
        "--connect-timeout",
        "--response-timeout",
        "--max-body",
        "--max-tries",
        "--agreement",
        "--agreement-threshold",
        "--agreement-interval",
        "--agreement-wait",
    ]:
        assert option in result.stdout


def test_a_bad_backend_list_stops_start_up_with_a_message_naming_the_entry():
    result = twistd(
        "-n",
        "--pidfile=",
        "imml-balancer",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--backends",
        "nas:3003,desktop.local:99999",
    )
    assert result.returncode != 0
    assert "'desktop.local:99999'" in result.stdout + result.stderr
    assert "65535" in result.stdout + result.stderr


def test_imml_backends_is_read_from_the_environment():
    result = twistd(
        "-n",
        "--pidfile=",
        "imml-balancer",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        env={"IMML_BACKENDS": "http://ok:3003,ftp://nope"},
    )
    assert result.returncode != 0
    assert "'ftp://nope'" in result.stdout + result.stderr


def test_no_backends_at_all_is_explained():
    env = {"IMML_BACKENDS": ""}
    result = twistd("-n", "--pidfile=", "imml-balancer", "--listen", "tcp:0:interface=127.0.0.1", env=env)
    assert result.returncode != 0
    assert "IMML_BACKENDS" in result.stdout + result.stderr
