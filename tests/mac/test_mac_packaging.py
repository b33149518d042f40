"""
The wheel carries everything imml-mac needs at run time that is not a
plain module: the tiny ONNX model, the provider hook, the probe script run
in the Immich interpreter, and the twistd dropin.
"""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_wheel_has_the_mac_files(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "imml/mac/tiny.onnx",
        "imml/mac/hook/sitecustomize.py",
        "imml/mac/probe_script.py",
        "twisted/plugins/imml_mac.py",
    ):
        assert needed in names, f"{needed} is not in the wheel"
    assert not any(name.startswith("tests/") for name in names)
